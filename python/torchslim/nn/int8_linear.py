"""Int8Linear: a drop-in replacement for nn.Linear with int8 weights."""

from __future__ import annotations

import torch
from torch import nn

from torchslim import ops  # noqa: F401 (defines the torch.ops.torchslim ops below)
from torchslim.nn._buffers import CodesKeepTheirDtype, apply_keeping_dtypes, validate_after_load
from torchslim.ops.int8 import _require_tensors
from torchslim.quant.int8 import quantize_weight_per_channel

_OP_DYNAMIC = torch.ops.torchslim.int8_dynamic_linear.default
_OP_WEIGHT_ONLY = torch.ops.torchslim.int8_weight_only_linear.default

MODES = ("dynamic", "weight_only")


class Int8Linear(nn.Module):
    """y = x @ W.T + b with W stored as per-output-channel int8 codes and fp32 scales.

    Modes:
        "dynamic"      W8A8: activations quantized per token inside the op, int8 x int8 GEMM
                       (torch.ops.torchslim.int8_dynamic_linear).
        "weight_only"  W8A16: activations stay in float, weights dequantized inside the GEMM
                       (torch.ops.torchslim.int8_weight_only_linear).

    Buffers (all in the state_dict): ``weight`` (out, in) int8, ``weight_scale`` (out,) fp32,
    ``bias`` (out,) or None, ``smooth`` (in,) fp32 or None (SmoothQuant factors: the layer
    computes (x / smooth) @ (W * smooth).T, with W * smooth the quantized weight).
    ``module.to(dtype)`` casts the bias like nn.Linear does; the scales stay fp32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "dynamic",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
        )
        bias_t = torch.zeros(out_features, dtype=dtype or torch.float32, device=device)
        self.register_buffer("bias", bias_t if bias else None)
        self.register_buffer("smooth", None)
        self.register_load_state_dict_pre_hook(CodesKeepTheirDtype("weight", torch.int8))
        self.register_load_state_dict_post_hook(validate_after_load)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mode: str = "dynamic", smooth: torch.Tensor | None = None
    ) -> Int8Linear:
        """Quantizes an nn.Linear (per-output-channel symmetric int8).

        Args:
            linear: the float layer; it is left unchanged.
            mode: "dynamic" (W8A8) or "weight_only" (W8A16).
            smooth: optional (in_features,) SmoothQuant factors
                (see :func:`torchslim.quant.smoothquant_factors`).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            mode=mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        if smooth is not None:
            if tuple(smooth.shape) != (linear.in_features,):
                raise ValueError(
                    f"smooth must have shape (in_features,) = ({linear.in_features},), "
                    f"got {tuple(smooth.shape)}"
                )
            smooth = smooth.detach().to(device=weight.device, dtype=torch.float32)
            weight = weight.to(torch.float32) * smooth
            layer.smooth = smooth.clone()
        w_q, w_scale = quantize_weight_per_channel(weight)
        layer.weight.copy_(w_q)
        layer.weight_scale.copy_(w_scale)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        layer._validate()
        return layer

    def _validate(self) -> None:
        shape = (self.out_features, self.in_features)
        if self.weight.dtype != torch.int8 or tuple(self.weight.shape) != shape:
            raise ValueError(
                f"weight must be int8 of shape {shape}, got {self.weight.dtype} "
                f"{tuple(self.weight.shape)}"
            )
        if self.weight_scale.dtype != torch.float32 or tuple(self.weight_scale.shape) != shape[:1]:
            raise ValueError(
                f"weight_scale must be float32 of shape ({shape[0]},), got "
                f"{self.weight_scale.dtype} {tuple(self.weight_scale.shape)}"
            )
        if not (torch.isfinite(self.weight_scale).all() and (self.weight_scale > 0).all()):
            raise ValueError("weight_scale must be finite and > 0 everywhere")
        if self.smooth is not None and not (
            torch.isfinite(self.smooth).all() and (self.smooth > 0).all()
        ):
            raise ValueError("smooth must be finite and > 0 everywhere")

    def _apply(self, fn, recurse=True):
        # The scales stay fp32 when the module is cast (module.to(torch.bfloat16), .half()):
        # only their device follows the module.
        return apply_keeping_dtypes(self, fn, recurse, ("weight_scale", "smooth"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op itself, and the buffers from _buffers: see Int4Linear.forward.
        _require_tensors(x=x)
        b = self._buffers
        if b["smooth"] is not None:
            x = x / b["smooth"].to(x.dtype)
        op = _OP_DYNAMIC if self.mode == "dynamic" else _OP_WEIGHT_ONLY
        return op(x, b["weight"], b["weight_scale"], b["bias"])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode!r}, smooth={self.smooth is not None}"
        )
