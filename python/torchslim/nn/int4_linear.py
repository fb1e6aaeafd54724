"""Int4Linear: a drop-in replacement for nn.Linear with group-wise int4 weights (W4A16)."""

from __future__ import annotations

import torch
from torch import nn

from torchslim import ops  # noqa: F401 (defines the torch.ops.torchslim ops below)
from torchslim.nn._buffers import CodesKeepTheirDtype, apply_keeping_dtypes, validate_after_load
from torchslim.ops.int8 import _require_tensors
from torchslim.quant.int4 import SCALE_DTYPES, check_group_size, quantize_int4
from torchslim.reference.int4 import (
    TC_TILE_BYTES,
    TC_TILE_K,
    TC_TILE_N,
    plain_to_tc,
    resolve_group_size,
    tc_to_plain,
)

_OP = torch.ops.torchslim.int4_weight_only_linear.default
_OP_TC = torch.ops.torchslim.int4_weight_only_linear_tc.default

LAYOUTS = ("plain", "tc")


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W stored as group-wise int4 codes, scales and zero points.

    Buffers (all in the state_dict), format in :mod:`torchslim.reference.int4`:
    ``weight`` (out, in // 2) uint8, two codes per byte; ``weight_scales`` and ``weight_zeros``
    (out, in // G) in ``scale_dtype``; ``bias`` (out,) or None. Runs
    torch.ops.torchslim.int4_weight_only_linear. ``module.to(dtype)`` casts the bias like
    nn.Linear does; the scales and zeros keep their dtype.

    ``repack("tc")`` shuffles the codes in memory into the CUDA tensor-core kernel's layout
    (:func:`torchslim.reference.pack_int4_tc`; out_features % 64 == 0, in_features % 16 == 0,
    group size a multiple of 16) and runs torch.ops.torchslim.int4_weight_only_linear_tc.
    The state_dict always holds the plain layout, so checkpoints do not depend on it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 128,
        symmetric: bool = False,
        scale_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        check_group_size(group_size, in_features)
        if scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.symmetric = symmetric
        groups = in_features // resolve_group_size(group_size, in_features)
        self.register_buffer(
            "weight",
            torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "weight_scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device)
        )
        self.register_buffer(
            "weight_zeros",
            torch.full((out_features, groups), 8.0, dtype=scale_dtype, device=device),
        )
        bias_t = torch.zeros(out_features, dtype=dtype or torch.float32, device=device)
        self.register_buffer("bias", bias_t if bias else None)
        self.layout = "plain"
        self.register_state_dict_post_hook(_weight_to_plain)
        self.register_load_state_dict_pre_hook(CodesKeepTheirDtype("weight", torch.uint8))
        self.register_load_state_dict_pre_hook(_weight_from_plain)
        self.register_load_state_dict_post_hook(validate_after_load)

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.weight_scales.dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        symmetric: bool = False,
        *,
        scale_dtype: torch.dtype = torch.bfloat16,
        clip_search: bool = False,
    ) -> Int4Linear:
        """Quantizes an nn.Linear to group-wise int4 (see :func:`torchslim.quant.quantize_int4`).

        Args:
            linear: the float layer; it is left unchanged.
            group_size: weights per group along in_features (32, 64, 128), or -1 per channel.
            symmetric: zero point fixed at 8 instead of fitted per group.
            scale_dtype: dtype of the scales and zero points.
            clip_search: choose a clipping ratio per group that minimises the squared error.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            device=weight.device,
            dtype=weight.dtype,
        )
        packed, scales, zeros = quantize_int4(
            weight,
            group_size,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            clip_search=clip_search,
        )
        layer.weight.copy_(packed)
        layer.weight_scales.copy_(scales)
        layer.weight_zeros.copy_(zeros)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        layer._validate()
        return layer

    def repack(self, layout: str) -> Int4Linear:
        """Converts the codes in memory to ``layout`` ("plain" or "tc"); returns the module."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "tc":
            why = self._tc_why_not()
            if why is not None:
                raise ValueError(f"layout 'tc' does not fit this layer: {why}")
        if layout != self.layout:
            convert = plain_to_tc if layout == "tc" else tc_to_plain
            self.weight = convert(self.weight)
            self.layout = layout
        return self

    def _tc_why_not(self) -> str | None:
        n, k = self.out_features, self.in_features
        if n % TC_TILE_N or k % TC_TILE_K:
            return (
                f"needs out_features % {TC_TILE_N} == 0 and in_features % {TC_TILE_K} == 0, "
                f"got {n} and {k}"
            )
        if resolve_group_size(self.group_size, k) % TC_TILE_K:
            return f"needs a group size that is a multiple of {TC_TILE_K}, got {self.group_size}"
        return None

    def _weight_shape(self) -> tuple[int, int]:
        n, k = self.out_features, self.in_features
        if self.layout == "tc":
            return (n // TC_TILE_N, k // TC_TILE_K * TC_TILE_BYTES)
        return (n, k // 2)

    def _validate(self) -> None:
        shape = self._weight_shape()
        if self.weight.dtype != torch.uint8 or tuple(self.weight.shape) != shape:
            raise ValueError(
                f"weight must be uint8 of shape {shape} (layout {self.layout!r}), got "
                f"{self.weight.dtype} {tuple(self.weight.shape)}"
            )
        n, k = self.out_features, self.in_features
        groups = k // resolve_group_size(self.group_size, k)
        for name in ("weight_scales", "weight_zeros"):
            t = getattr(self, name)
            if t.dtype not in SCALE_DTYPES or tuple(t.shape) != (n, groups):
                raise ValueError(
                    f"{name} must be float32, bfloat16 or float16 of shape ({n}, {groups}), "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
        if self.weight_zeros.dtype != self.weight_scales.dtype:
            raise ValueError(
                f"weight_zeros must have the dtype of weight_scales ({self.weight_scales.dtype}), "
                f"got {self.weight_zeros.dtype}"
            )
        if not (torch.isfinite(self.weight_scales).all() and (self.weight_scales > 0).all()):
            raise ValueError("weight_scales must be finite and > 0 everywhere")
        if not torch.isfinite(self.weight_zeros).all():
            raise ValueError("weight_zeros must be finite everywhere")

    def _apply(self, fn, recurse=True):
        # The scales and zeros keep their dtype when the module is cast; only their device follows.
        return apply_keeping_dtypes(self, fn, recurse, ("weight_scales", "weight_zeros"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op itself, and the buffers from _buffers: nn.Module.__getattr__ and the Python
        # entry point cost ~7 us per call, half of a decode-sized (M = 1) call on the CPU.
        _require_tensors(x=x)
        b = self._buffers
        op = _OP_TC if self.layout == "tc" else _OP
        return op(x, b["weight"], b["weight_scales"], b["weight_zeros"], self.group_size, b["bias"])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, "
            f"symmetric={self.symmetric}, scale_dtype={self.scale_dtype}, layout={self.layout}"
        )


def _weight_to_plain(module: Int4Linear, state_dict, prefix, _metadata) -> None:
    """state_dict hook: the saved codes are in the plain layout whatever the layout in memory."""
    key = prefix + "weight"
    if module.layout == "tc" and key in state_dict:
        state_dict[key] = tc_to_plain(state_dict[key])


def _weight_from_plain(module: Int4Linear, state_dict, prefix, *_args) -> None:
    """load_state_dict pre-hook: plain codes are repacked into the module's layout."""
    key = prefix + "weight"
    plain = (module.out_features, module.in_features // 2)
    weight = state_dict.get(key)
    if module.layout == "tc" and isinstance(weight, torch.Tensor) and tuple(weight.shape) == plain:
        state_dict[key] = plain_to_tc(weight)
