"""Data parallelism: two ranks, each with its own loader (`rank` / `world`), on deliberately
unbalanced shards, trained under torchrun with DDP (gloo, CPU). Every rank must get the same
number of batches, or the rank with more would wait forever in an all-reduce."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RUN_ID, SECRET, rho, rho_bin, wait_until

WORKER = Path(__file__).with_name("ddp_worker.py")


def unbalanced_shards(root: Path) -> None:
    """Three jsonl shards: one large, two small (split by shards, two ranks would get 2 and 1)."""
    data = root / "shards"
    data.mkdir()
    for i, docs in enumerate([60, 5, 5]):
        with open(data / f"shard-{i}.jsonl", "w") as f:
            for d in range(docs):
                text = f"Document {d} of shard {i}: " + " ".join(f"x{(d * 7 + k) % 50} = {k * d}" for k in range(30))
                f.write(json.dumps({"text": text}) + "\n")


def test_two_ranks_on_unbalanced_shards_end_together_under_torchrun(pipeline):
    pytest.importorskip("torch")
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed")
    root = pipeline.root
    unbalanced_shards(root)
    tokenizer = str(root / "ranks-tok.json")
    rho("tokenizer", "train", "--vocab-size", "300", "--input", str(root / "shards"), "--out", tokenizer)
    vocab = len(json.loads((root / "ranks-tok.json").read_text())["model"]["vocab"])
    from rho_stream import RhoStream
    common = dict(data={"paths": [str(root / "shards")]}, tokenizer=str(root / "ranks-tok.json"))
    # The single-loader stream, for the expected counts; a batch size that makes it odd, so
    # that one batch is left over for the ranks to drop.
    for batch_size in (4, 3, 5, 6, 7):
        whole = pipeline.loader(f"whole-{batch_size}", batch_size=batch_size, **common)
        with RhoStream(whole, RUN_ID, scored=False, secret=SECRET.encode()) as stream:
            g = sum(1 for _ in stream)
        if g % 2 == 1:
            break
    assert g % 2 == 1, f"{g} batches: the test wants an odd count"
    endpoints = [pipeline.loader(f"rank{r}", batch_size=batch_size, rank=r, world=2, **common) for r in range(2)]
    (root / "endpoints.txt").write_text("\n".join(endpoints))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, RHO_SECRET=SECRET, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(WORKER),
         str(root / "endpoints.txt"), RUN_ID, str(root), str(vocab)],
        capture_output=True, text=True, timeout=180, env=env, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    ranks = [json.loads((root / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == g // 2
    for r, got in enumerate(ranks):
        assert got["seqs"] == [n * 2 + r for n in range(g // 2)]
        assert got["total"] == (g // 2 - 1) * 2 + r + 1


def torchrun_or_skip() -> str:
    pytest.importorskip("torch")
    beside = Path(sys.executable).parent / "torchrun"
    if beside.exists():
        return str(beside)
    found = shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun is not installed")
    return found


def per_rank_stream(pipeline, rank: int, world: int, loader: dict, state=None):
    """What a loader of one rank issues, (seq, digest of the tokens) of every batch, and the
    documents it tokenized; from the cursor in ``state`` when given (a fresh loader moved there
    by the consumer's resume)."""
    import hashlib

    import numpy as np

    from rho_stream import RhoStream

    endpoint = pipeline.loader(f"alone-{rank}-of-{world}-{len(pipeline.procs)}", rank=rank, world=world, **loader)
    process = pipeline.procs[-1]
    with RhoStream(endpoint, RUN_ID, scored=False, rank=rank, world=world, secret=SECRET.encode()) as s:
        if state is not None:
            s.load_state_dict(state)
        batches = [(b.seq, hashlib.sha256(np.asarray(b.tokens).astype(np.int64).tobytes()).hexdigest()) for b in s]
    report, _ = process.communicate(timeout=60)
    return batches, json.loads(report)["counts"]["docs"]


LOADER = {"seq_len": 32, "batch_size": 4, "shuffle_window": 4}


def rho_run(pipeline, name: str, ranks: int, selectors: int, env: dict, on_start=None):
    """`rho run` with a trainer command of ``ranks`` torchrun ranks (python/tests/run_worker.py)
    and ``selectors`` selectors, to its end; returns the summary, each rank's result, and the
    output directory. ``on_start`` is called with the run directory while the run goes on."""
    torchrun = torchrun_or_skip()
    root = pipeline.root
    vocab = len(json.loads((root / "tokenizer.json").read_text())["model"]["vocab"])
    out = root / f"{name}-out"
    out.mkdir()
    run = {
        "run_dir": f"{name}-run",
        "selectors": selectors,
        "loader": {"run_id": RUN_ID, "data": {"paths": [str(root / "data")]},
                   "tokenizer": str(root / "tokenizer.json"), "max_in_flight": 8, "selector_timeout_secs": 2,
                   **LOADER},
        "selector": {"model": str(root / "ref"), "tokenizer": str(root / "tokenizer.json"),
                     "liveness": {"heartbeat_secs": 0.2, "peer_timeout_secs": 2.0}},
        "trainer_command": {
            "command": [torchrun, "--standalone", "--nproc-per-node", str(ranks),
                        str(Path(__file__).with_name("run_worker.py")), str(out), str(vocab)],
            "ranks": ranks,
            "env": {"OMP_NUM_THREADS": "1", **env},
        },
    }
    config = pipeline.write(f"{name}.json", run)
    env = dict(pipeline.env, RUST_LOG="info")
    env.pop("RHO_SECRET")
    p = subprocess.Popen([rho_bin(), "run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    pipeline.procs.append(p)
    if on_start is not None:
        on_start(root / f"{name}-run")
    stdout, stderr = p.communicate(timeout=150)
    assert p.returncode == 0, stderr[-4000:]
    summary = json.loads((root / f"{name}-run" / "summary.json").read_text())
    results = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(ranks)]
    return summary, results, out


@pytest.mark.parametrize("selectors", [1, 3])
def test_rho_run_serves_two_torchrun_ranks_from_one_loader(pipeline, selectors):
    """`rho run` with a trainer command (torchrun, 2 ranks): one loader tokenizes the corpus
    once and serves both ranks, the selectors score for both; each rank trains exactly the
    batches a loader of its own rank would issue, scored, and both end with the same count. With
    three selectors, one is killed mid-run: the loader hands its batches to the others once it has
    been silent for `selector_timeout_secs` (the leases are the default 300 s, past the test's
    time limit), and nothing is lost or trained twice."""
    torchrun_or_skip()
    alone = [per_rank_stream(pipeline, r, 2, LOADER) for r in range(2)]
    expected, docs = [a[0] for a in alone], alone[0][1]
    assert len(expected[0]) == len(expected[1]) > 4
    killed = []

    def kill_a_selector(run_dir: Path) -> None:
        progress = run_dir / "rank-0.metrics.jsonl"

        def batches() -> int:
            lines = progress.read_text().split("\n")[:-1] if progress.exists() else []
            return json.loads(lines[-1])["batches"] if lines else 0

        wait_until(lambda: batches() >= 2, timeout=120, what="rank 0's second batch")
        os.kill(int((run_dir / "selector-1.pid").read_text()), 9)
        killed.append(batches())

    summary, ranks, _ = rho_run(
        pipeline, "run", 2, selectors, {"STEP_SECS": "0.05" if selectors == 3 else "0"},
        on_start=kill_a_selector if selectors == 3 else None,
    )
    for r, got in enumerate(ranks):
        assert list(zip(got["seqs"], got["digests"])) == expected[r], f"rank {r}"
        assert got["scored"] == len(got["seqs"]), f"rank {r}: every batch scored"
    assert summary["steps"] == len(expected[0])
    assert [x["batches"] for x in summary["ranks"]] == [len(expected[0])] * 2
    # One loader read each document once for both ranks, as a loader of one rank reads them all.
    assert summary["loader"]["docs"] == docs, (summary["loader"]["docs"], docs)
    if selectors == 3:
        assert killed[0] < len(expected[0]), "the selector was killed before the stream ended"


@pytest.mark.parametrize("world", [1, 3])
def test_a_run_stopped_on_two_ranks_resumes_on_another_number(pipeline, world):
    """Two torchrun ranks stop after 5 steps (rank 0's cursor saved, as a DDP checkpoint holds
    it); `rho run` resumes on ``world`` ranks from that cursor, 10, which is not a multiple of 3
    (rank 0 of three starts at 10, not at 9 or 12). Together the two runs train every
    global batch exactly once (but the last ``(G - cursor) % world``, which make no batch for
    every rank), the ranks of the second run end with the same count, and each trains what a fresh
    loader of its rank of ``world`` issues from the cursor."""
    torchrun_or_skip()
    whole, _ = per_rank_stream(pipeline, 0, 1, LOADER)
    steps = 5
    _, first, out = rho_run(pipeline, "two", 2, 1, {"STOP_AFTER": str(steps)})
    assert [len(r["seqs"]) for r in first] == [steps, steps]
    state = json.loads((out / "state.json").read_text())
    cursor = state["next_seq"] - state["rank"]
    assert cursor == 2 * steps
    _, second, _ = rho_run(pipeline, "resumed", world, 1, {"RESUME": str(out / "state.json")})
    n = (len(whole) - cursor) // world
    assert n > 1, f"{len(whole)} batches leave {n} per rank after the cursor"
    trained = sorted(s for r in first + second for s in r["seqs"])
    assert trained == list(range(cursor + n * world)), "every global batch exactly once"
    for r, got in enumerate(second):
        fresh, _ = per_rank_stream(pipeline, r, world, LOADER, state=state)
        assert len(fresh) == n, f"rank {r}"
        assert list(zip(got["seqs"], got["digests"])) == fresh, f"rank {r}"
        # The batches are the single stream's.
        assert fresh == [whole[s] for s, _ in fresh]
        assert got["scored"] == n
