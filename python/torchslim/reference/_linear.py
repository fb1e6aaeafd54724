"""The float matmul under every reference linear op: ``x @ w.T + bias`` in one dtype."""

from __future__ import annotations

import torch


def linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cd: torch.dtype
) -> torch.Tensor:
    """``x @ w.T + bias`` computed in ``cd``, returned in x's dtype.

    Args:
        x: (..., K) any float dtype and strides. w: (N, K). bias: (N,) or None.
        cd: the dtype of the matmul and the bias add.

    PyTorch's bf16/fp16 CPU matmul on AMX machines (oneDNN's brgemm before the fix of its issue
    5717) reads past a row's K columns when K % 32 != 0, so a NaN in memory beside a row (the
    padding of a view, another row) leaks into outputs it has no part in. Such a product is
    taken on operands zero-padded to a multiple of 32 columns, which leaves the result exact.
    """
    xc = x.to(cd)
    if xc.device.type == "cpu" and cd in (torch.bfloat16, torch.float16) and w.shape[-1] % 32:
        pad = -w.shape[-1] % 32
        xc = torch.nn.functional.pad(xc, (0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    out = xc @ w.T
    if bias is not None:
        out = out + bias.to(cd)
    return out.to(x.dtype)
