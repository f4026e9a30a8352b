"""TensorBoard's own reader reads back every scalar a short `rho run` wrote, with the steps and
values of the trainer's metrics lines; a resumed run continues the same curves."""

import json
import subprocess

import pytest
from conftest import rho_bin


def run(config, env):
    out = subprocess.run(
        [rho_bin(), "run", str(config)], capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert out.returncode == 0, out.stderr


def scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_process_writes_scalars_that_tensorboard_reads_back(pipeline):
    pytest.importorskip("tensorboard")
    root = pipeline.root
    config = {
        "run_dir": "run",
        "selectors": 1,
        "loader": {
            "run_id": "tb", "data": {"paths": ["data"]}, "tokenizer": "tokenizer.json",
            "seq_len": 32, "batch_size": 4, "epochs": 50, "metrics_interval_secs": 0.2,
        },
        "selector": {"model": "ref", "tokenizer": "tokenizer.json", "metrics_interval_secs": 0.2},
        "trainer": {
            "model": "ref", "selection": {"score": "excess"}, "optimizer": {"lr": 0.003},
            "max_steps": 6, "resume": True,
        },
    }
    path = pipeline.write("tb-run.json", config)
    env = dict(pipeline.env, RUST_LOG="warn")
    run(path, env)
    # Resumed up to step 12 (`max_steps` is the global step): six more steps, continuing the
    # same curves.
    config["trainer"]["max_steps"] = 12
    path = pipeline.write("tb-run.json", config)
    run(path, env)

    tb = root / "run" / "tensorboard"
    trainer = scalars(tb / "trainer")
    # The first attempt's metrics lines were moved aside when the run was started again.
    files = [root / "run" / "attempts" / "1" / "trainer.metrics.jsonl", root / "run" / "trainer.metrics.jsonl"]
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 13))
    for tag, key in [
        ("trainer/loss_all", "loss_all"),
        ("trainer/loss_selected", "loss_selected"),
        ("trainer/selected_fraction", "selected_fraction"),
        ("trainer/lr", "lr"),
        ("trainer/grad_norm", "grad_norm"),
    ]:
        got = trainer[tag]
        assert [s for s, _ in got] == list(range(1, 13)), tag
        for (_, value), m in zip(got, lines):
            assert value == pytest.approx(m[key], rel=1e-6, abs=1e-9), tag
    for process in ("selector-0", "loader"):
        tags = scalars(tb / process)
        assert tags, f"{process} wrote no scalars"
        assert all(len(points) > 0 for points in tags.values())
