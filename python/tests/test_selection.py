"""The selection of rho_stream against the masks of the Rust selection
(tests/vectors/selection.json, written by trainer/tests/vectors.rs)."""

import json
import math

import numpy as np
import pytest
from conftest import ROOT

from rho_stream import keep_count, select_mask
from rho_stream.selection import random_key


def _float(v):
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return float(v)


def cases():
    data = json.loads((ROOT / "tests" / "vectors" / "selection.json").read_text())
    for c in data["cases"]:
        shape = (c["rows"], c["len"])
        yield (
            c["name"],
            c["rule"],
            c["scope"],
            c["ratio"],
            np.array([_float(x) for x in c["current"]], dtype=np.float32).reshape(shape),
            np.array([_float(x) for x in c["reference"]], dtype=np.float32).reshape(shape),
            np.array(c["valid"], dtype=bool).reshape(shape),
            np.array(c["mask"], dtype=np.float32).reshape(shape),
            random_key(c.get("seed", 0), c.get("step", 0)),
        )


CASES = list(cases())


def test_there_are_vectors():
    assert len(CASES) >= 40
    assert any(c[1] == "random" for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_numpy_selection_gives_the_rust_masks(case):
    name, rule, scope, ratio, cur, ref, valid, expected, key = case
    np.testing.assert_array_equal(select_mask(cur, ref, valid, ratio, scope, rule, key), expected)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_selection_gives_the_rust_masks(case):
    torch = pytest.importorskip("torch")
    from rho_stream import select_mask_torch

    name, rule, scope, ratio, cur, ref, valid, expected, key = case
    got = select_mask_torch(
        torch.from_numpy(cur), torch.from_numpy(ref), torch.from_numpy(valid), ratio, scope, rule, key
    )
    np.testing.assert_array_equal(got.numpy(), expected)


def test_keep_count_rounds_half_up():
    assert [keep_count(0.5, n) for n in range(6)] == [0, 1, 1, 2, 2, 3]
    assert keep_count(0.0, 7) == 0 and keep_count(1.0, 7) == 7


def test_slm_loss_is_the_mean_over_kept_positions():
    torch = pytest.importorskip("torch")
    from rho_stream import slm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.rand(2, 5, generator=g) * 3
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    loss, mask = slm_loss(logits, labels, ref, 0.6, "batch", valid, return_mask=True)
    ce = torch.nn.functional.cross_entropy(logits.reshape(10, 11), labels.reshape(10), reduction="none").view(2, 5)
    expected_mask = select_mask(ce.detach().numpy(), ref.numpy(), valid.numpy(), 0.6, "batch", "excess")
    np.testing.assert_array_equal(mask.numpy(), expected_mask)
    assert mask.sum().item() == keep_count(0.6, 9)
    assert torch.allclose(loss, (ce * mask).sum() / mask.sum())
    loss.backward()
    # Positions left out get no gradient.
    grads = logits.grad.abs().sum(-1)
    assert torch.all((grads > 0) == (mask > 0))


def test_global_scope_equals_one_process_over_the_concatenated_batch(tmp_path):
    """Two ranks under torchrun (gloo): ``scope="global"`` gives each rank its part of the mask
    one process computes over the ranks' batches concatenated, with ties, uneven row counts and
    the ``random`` rule; the ranks' mean loss and gradients are that process's."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        found = shutil.which("torchrun")
        if found is None:
            pytest.skip("torchrun is not installed")
        torchrun = Path(found)
    worker = Path(__file__).with_name("global_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", RHO_GLOBAL_OUT=str(tmp_path))
    out = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(worker)],
                         capture_output=True, text=True, timeout=180, env=env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0.ok", "rank-1.ok"]
