"""Stride bookkeeping shared by the native ops: see tensors ``[..., rows, cols]`` as ``[batch0, batch1, rows, cols]``
views without copying whenever the strides allow it."""

from __future__ import annotations

import torch


def merged_batch_strides(tensors: list[torch.Tensor]) -> tuple[tuple[int, int], list[tuple[int, int, int]]] | None:
    """For tensors sharing a shape ``[..., rows, cols]`` with unit stride on ``cols``: the leading dims merged (jointly
    for all tensors) into at most two, as ``((batch0, batch1), [(stride0, stride1, row_stride) per tensor])``, or None
    when more than two leading groups remain (the caller copies)."""
    shape = tensors[0].shape
    leading = len(shape) - 2
    if leading <= 2:  # already at most two leading dims (attention's [N, heads, F, D]): their own strides
        pad = (1,) * (2 - leading)
        return pad + tuple(shape[:leading]), [
            (0,) * (2 - leading) + t.stride()[:leading] + (t.stride(-2),) for t in tensors]
    groups: list[tuple[int, list[int]]] = []  # (size, stride of each tensor)
    for dim, size in enumerate(shape[:-2]):
        if size == 1:
            continue
        strides = [t.stride(dim) for t in tensors]
        if groups and all(prev == s * size for prev, s in zip(groups[-1][1], strides)):
            groups[-1] = (groups[-1][0] * size, strides)
        else:
            groups.append((size, strides))
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.insert(0, (1, [0] * len(tensors)))
    sizes = (groups[0][0], groups[1][0])
    per_tensor = [(groups[0][1][i], groups[1][1][i], t.stride(-2)) for i, t in enumerate(tensors)]
    return sizes, per_tensor


def unit_stride_last(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its last dim has stride 1 (or size 1), else a contiguous copy."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


def plan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Inputs and output of an attention kernel as ``[batch0, batch1, F, D]`` strided views: returns
    ``(q, k, v, out, (batch0, batch1), strides)`` where q/k/v have unit stride on D (copied only if not), ``out``
    has q's layout (contiguous when q's layout cannot be reproduced), and ``strides`` holds the (batch0, batch1,
    frame) strides of q, k, v and out. Falls back to contiguous copies when the leading dims do not merge into two."""
    q, k, v = unit_stride_last(q), unit_stride_last(k), unit_stride_last(v)
    out = torch.empty_like(q)
    if out.stride(-1) != 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    plan = merged_batch_strides([q, k, v, out])
    if plan is None:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        plan = merged_batch_strides([q, k, v, out])
    sizes, strides = plan
    return q, k, v, out, sizes, strides
