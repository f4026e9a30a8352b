"""One rank of the global-selection check, started by torchrun from test_selection.py (gloo,
CPU): every rank makes the same seeded batches of every rank, selects over the union with
``scope="global"``, and checks its part against one process selecting over the concatenated
batch: the mask, the loss (the mean of the ranks' values) and the gradient (the ranks' mean, as
DistributedDataParallel averages it)."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rho_stream import random_key, select_mask_torch, slm_loss  # noqa: E402


def batches(world: int, t: int, v: int, seed: int):
    """Each rank's (logits, labels, ref_loss, valid): row counts differ by rank, scores tie."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        rows = 2 + r
        # Logits on a coarse grid, so that losses (and excess scores) tie across ranks.
        logits = torch.randint(0, 3, (rows, t, v), generator=g).float()
        labels = torch.randint(0, v, (rows, t), generator=g)
        ref = torch.randint(0, 4, (rows, t), generator=g).float() * 0.5
        valid = torch.rand((rows, t), generator=g) > 0.2
        out.append((logits, labels, ref, valid))
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t, v = 7, 5
    for seed, rule, ratio in [(0, "excess", 0.6), (1, "excess", 0.3), (2, "random", 0.5), (3, "reference", 0.7)]:
        parts = batches(world, t, v, seed)
        key = random_key(seed, 3)
        logits = parts[rank][0].clone().requires_grad_(True)
        _, labels, ref, valid = parts[rank]
        loss, mask = slm_loss(logits, labels, ref, ratio, "global", valid, rule=rule, return_mask=True, key=key)
        loss.backward()
        grad = logits.grad.clone()
        # One process over the concatenated batch.
        whole = torch.cat([p[0] for p in parts]).requires_grad_(True)
        cat = [torch.cat([p[i] for p in parts]) for i in (1, 2, 3)]
        one, one_mask = slm_loss(whole, cat[0], cat[1], ratio, "batch", cat[2], rule=rule, return_mask=True, key=key)
        one.backward()
        start = sum(p[0].shape[0] for p in parts[:rank])
        rows = parts[rank][0].shape[0]
        want = one_mask[start : start + rows]
        assert torch.equal(mask, want), f"seed {seed} rank {rank}: masks differ\n{mask}\n{want}"
        # The same mask, straight from the selection function.
        assert torch.equal(select_mask_torch(logits.detach()[..., 0], ref, valid, ratio, "global", "reference"),
                           select_mask_torch(whole.detach()[..., 0], cat[1], cat[2], ratio, "batch", "reference")
                           [start : start + rows])
        total = loss.detach().clone()
        dist.all_reduce(total)
        assert torch.allclose(total / world, one.detach(), atol=1e-5), (seed, float(total / world), float(one))
        # DDP averages gradients: the mean of the ranks' gradients of their part.
        mean_grad = grad / world
        assert torch.allclose(mean_grad, whole.grad[start : start + rows], atol=1e-6), f"seed {seed}: gradients differ"
        assert int(want.sum()) > 0
    if os.environ.get("RHO_GLOBAL_OUT"):
        Path(os.environ["RHO_GLOBAL_OUT"]).joinpath(f"rank-{rank}.ok").write_text("ok")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
