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
from conftest import RUN_ID, SECRET, rho

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
