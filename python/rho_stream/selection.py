"""Token selection (Rho-1's Selective Language Modeling), exactly as rho's Rust trainer does it.

Conventions (shared with ``trainer/src/selection.rs``, checked on ``tests/vectors/selection.json``):

- a score per valid target position: ``excess`` = current loss - reference loss (float32),
  ``reference`` = -reference loss, ``current`` = current loss; ``none`` keeps every valid one;
  ``random`` scores position ``i`` (row-major over the step's batch) with
  ``random_score(key, i)``, ``key = random_key(seed, step)`` (a control that keeps as many tokens
  without choosing them);
- from ``n`` valid positions (of the whole batch, or of each sequence) the ``floor(ratio * n +
  0.5)`` highest scores are kept; the ``global`` scope of a data-parallel step selects over the
  union of every rank's batch, concatenated in rank order, exactly as one process would over the
  concatenated batch (``torch.distributed``, one all-gather of the scores per step);
- equal scores are broken by position (earlier first, row-major); NaN ranks below every number;
- invalid positions (padding) are never kept and never counted.
"""

from __future__ import annotations

import numpy as np

RULES = ("excess", "reference", "current", "random", "none")
SCOPES = ("batch", "sequence")
# ``global``: over the union of the ranks' batches of a step (torch only, under torch.distributed).
TORCH_SCOPES = SCOPES + ("global",)


def keep_count(ratio: float, n: int) -> int:
    """How many of ``n`` valid positions are kept at ``ratio`` (round half up)."""
    return int(min(max(np.floor(ratio * n + 0.5), 0), n))


_M64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """SplitMix64's finalizer on a Python int (as ``mix64`` in ``common/src/splitmix.rs``)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def random_key(seed: int, step: int) -> int:
    """The key of step ``step``'s random scores under ``seed``: ``mix64(seed ^ mix64(step))``."""
    return mix64((seed & _M64) ^ mix64(step & _M64))


def random_scores(key: int, n: int) -> np.ndarray:
    """The random scores of positions ``0..n``: the top 24 bits of ``mix64(key ^ i)`` over 2**24."""
    z = np.uint64(key & _M64) ^ np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float64) / float(1 << 24)).astype(np.float32)


def _check(rule: str, scope: str, scopes=SCOPES) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if scope not in scopes:
        raise ValueError(f"scope must be one of {scopes}, got {scope!r}")


def _score(rule: str, current, reference, key: int = 0):
    """The per-position score of a rule (higher is kept first), for numpy arrays or tensors."""
    if rule == "random":
        scores = random_scores(key, current.numel() if hasattr(current, "numel") else current.size)
        if hasattr(current, "numel"):
            import torch

            return torch.from_numpy(scores).to(current.device).reshape(current.shape)
        return scores.reshape(current.shape)
    if rule == "excess":
        return current - reference
    if rule == "reference":
        return -reference
    return current


def select_mask(
    current, reference, valid, ratio: float, scope: str = "batch", rule: str = "excess", key: int = 0
) -> np.ndarray:
    """The selection mask (float32 of 0 and 1, shape ``[rows, len]``) in numpy; ``key`` scores
    the ``random`` rule (``random_key(seed, step)``)."""
    _check(rule, scope)
    current = np.asarray(current, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if current.ndim == 1:
        current, reference, valid = current[None], reference[None], valid[None]
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, as in Rust
        score = _score(rule, current, reference, key)
    mask = np.zeros(current.shape, dtype=np.float32)
    groups = [slice(None)] if scope == "batch" else [slice(r, r + 1) for r in range(current.shape[0])]
    for g in groups:
        s, v, m = score[g].reshape(-1), valid[g].reshape(-1), mask[g].reshape(-1)
        idx = np.flatnonzero(v)
        k = len(idx) if rule == "none" else keep_count(ratio, len(idx))
        if k == 0:
            continue
        key = s[idx]
        nan = np.isnan(key)
        key = np.where(nan, -np.inf, key).astype(np.float32)
        # Descending by score (stable: ties stay in position order), then NaN last (stable).
        order = np.argsort(-key, kind="stable")
        order = order[np.argsort(nan[order], kind="stable")]
        m[idx[order[:k]]] = 1.0
        mask[g] = m.reshape(mask[g].shape)
    return mask


def select_mask_torch(
    current, reference, valid, ratio: float, scope: str = "batch", rule: str = "excess", key: int = 0
):
    """The same selection on torch tensors, on their device (no gradient flows through it).
    ``scope="global"`` selects over every rank's batch of the step (:func:`global_select_mask_torch`)."""
    import torch

    _check(rule, scope, TORCH_SCOPES)
    if scope == "global":
        return global_select_mask_torch(current, reference, valid, ratio, rule, key)
    with torch.no_grad():
        current = current.float()
        reference = reference.float()
        valid = valid.bool()
        if current.dim() == 1:
            current, reference, valid = current[None], reference[None], valid[None]
        score = _score(rule, current, reference, key)
        mask = torch.zeros_like(current)
        rows = [None] if scope == "batch" else list(range(current.shape[0]))
        for r in rows:
            s = score.reshape(-1) if r is None else score[r]
            v = valid.reshape(-1) if r is None else valid[r]
            idx = torch.nonzero(v, as_tuple=False).reshape(-1)
            k = idx.numel() if rule == "none" else keep_count(ratio, idx.numel())
            if k == 0:
                continue
            key = s[idx]
            nan = torch.isnan(key)
            key = torch.where(nan, torch.full_like(key, float("-inf")), key)
            order = torch.argsort(-key, stable=True)
            order = order[torch.argsort(nan[order].to(torch.int8), stable=True)]
            keep = idx[order[:k]]
            if r is None:
                mask.view(-1)[keep] = 1.0
            else:
                mask[r][keep] = 1.0
        return mask


def _gather_rows(x, rows, group):
    """Every rank's ``x`` (``[rows_r, T]``), concatenated in rank order: padded to the most rows
    for the all-gather, the padding dropped after."""
    import torch
    import torch.distributed as dist

    most = max(rows)
    padded = torch.zeros((most,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, rows)])


def global_select_mask_torch(current, reference, valid, ratio: float, rule: str = "excess", key: int = 0, group=None):
    """The selection over the union of every rank's batch of a step: this rank's part of the mask
    that :func:`select_mask_torch` gives, at the ``batch`` scope, on the batches of ranks ``0, 1,
    ...`` concatenated row-wise (so ties break by rank, then by row-major position, and the
    ``random`` rule numbers positions over the concatenation). Every rank of ``group`` (default:
    the whole world) calls it at the same step; the ranks' batches may have different row counts
    but the same window. One all-gather of the row counts and three of ``[rows, T]`` tensors."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("the global scope selects across ranks: initialize torch.distributed first")
    with torch.no_grad():
        current, reference, valid = current.float(), reference.float(), valid.bool()
        if current.dim() == 1:
            current, reference, valid = current[None], reference[None], valid[None]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = torch.tensor([current.shape[0]], dtype=torch.int64, device=current.device)
        counts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(counts, mine, group=group)
        rows = [int(c.item()) for c in counts]
        union = [_gather_rows(x, rows, group) for x in (current, reference, valid.to(torch.uint8))]
        mask = select_mask_torch(union[0], union[1], union[2].bool(), ratio, "batch", rule, key)
        start = sum(rows[:rank])
        return mask[start : start + rows[rank]].contiguous()


def slm_loss(
    logits,
    labels,
    ref_loss,
    ratio: float = 0.6,
    scope: str = "batch",
    valid=None,
    rule: str = "excess",
    return_mask: bool = False,
    key: int = 0,
):
    """Selective Language Modeling loss in PyTorch.

    ``logits``: ``[B, T, V]`` for the inputs ``tokens[:, :-1]``; ``labels``: ``[B, T]`` targets
    ``tokens[:, 1:]``; ``ref_loss``: ``[B, T]`` reference losses from the stream; ``valid``:
    ``[B, T]`` bool (default: every position); ``key``: the ``random`` rule's
    ``random_key(seed, step)``. Returns the mean cross-entropy over the kept
    positions (0 when none is kept), and the mask with ``return_mask``.

    ``scope="global"`` (under ``torch.distributed``, every rank at the same step) keeps the top
    ``ratio`` of the union of the ranks' valid positions, and returns ``world * sum(kept ce) /
    kept over every rank``: DistributedDataParallel averages the ranks' gradients, so the step
    is the gradient of the mean loss over every kept position of the step, as one process
    training on the concatenated batch would take; the mean of the ranks' returned values is
    that loss.
    """
    import torch
    import torch.nn.functional as F

    b, t, v = logits.shape
    ce = F.cross_entropy(logits.float().reshape(b * t, v), labels.reshape(b * t).long(), reduction="none").view(b, t)
    if valid is None:
        valid = torch.ones((b, t), dtype=torch.bool, device=logits.device)
    mask = select_mask_torch(ce.detach(), ref_loss.to(ce.device), valid.to(ce.device), ratio, scope, rule, key)
    kept = mask.sum()
    if scope == "global":
        import torch.distributed as dist

        total = kept.detach().clone()
        dist.all_reduce(total)
        loss = (ce * mask).sum() * dist.get_world_size() / total.clamp(min=1.0)
    else:
        loss = (ce * mask).sum() / kept.clamp(min=1.0)
    return (loss, mask) if return_mask else loss
