"""SparseLinear: a drop-in replacement for nn.Linear whose pruned weight is stored compressed."""

from __future__ import annotations

import torch
from torch import nn

from torchslim import ops  # noqa: F401 (defines the torch.ops.torchslim ops below)
from torchslim.nn._buffers import apply_keeping_dtypes, validate_after_load
from torchslim.ops.int8 import _require_tensors
from torchslim.quant.int8 import quantize_weight_per_channel
from torchslim.reference import sparse as ref
from torchslim.sparse.formats import (
    FORMATS,
    VALUE_DTYPES,
    compress_24,
    compress_bitmask,
    compress_block,
    compress_csr,
    compress_sliced,
    format_bytes,
)
from torchslim.sparse.patterns import parse_pattern

LAYER_FORMATS = (*FORMATS, "block")

_OP_24 = torch.ops.torchslim.sparse24_linear.default
_OP_24_DYNAMIC = torch.ops.torchslim.sparse24_dynamic_linear.default
_OP_BITMASK = torch.ops.torchslim.sparse_bitmask_linear.default
_OP_CSR = torch.ops.torchslim.sparse_csr_linear.default
_OP_BLOCK = torch.ops.torchslim.sparse_block_linear.default
_OP_SLICED = torch.ops.torchslim.sparse_sliced_linear.default
_OP_SLICED_DYNAMIC = torch.ops.torchslim.sparse_sliced_dynamic_linear.default
_OP_BITMASK_DYNAMIC = torch.ops.torchslim.sparse_bitmask_dynamic_linear.default
_OP_BLOCK_DYNAMIC = torch.ops.torchslim.sparse_block_dynamic_linear.default
# The formats with a W8A8 kernel (mode="dynamic"), and those of them for unstructured weights.
DYNAMIC_FORMATS = ("2:4", "bitmask", "sliced", "block")
_UNSTRUCTURED_DYNAMIC = ("bitmask", "sliced")

MODES = ("weight_only", "dynamic")

# The buffers of each format, besides bias.
_BUFFERS = {
    "2:4": ("values", "meta"),
    "bitmask": ("values", "mask", "row_offsets"),
    "csr": ("values", "columns", "bases", "group_offsets"),
    "block": ("values", "col_blocks", "row_offsets"),
    "sliced": ("values", "columns", "groups", "group_offsets", "value_offsets"),
}
# The buffers whose length depends on the weight: a loaded state_dict brings theirs.
_SIZED_BY_WEIGHT = {
    "2:4": (),
    "bitmask": ("values",),
    "csr": ("values", "columns", "bases"),
    "block": ("values", "col_blocks"),
    "sliced": ("values", "columns", "groups"),
}


class SparseLinear(nn.Module):
    """y = x @ W.T + b with the pruned W stored compressed (torchslim.reference.sparse):

        "2:4"      ``values`` (out, 2 * ceil(in / 4)), ``meta`` (out, ceil(in / 8)) uint8
                   (torch.ops.torchslim.sparse24_linear)
        "bitmask"  ``values`` (nnz,), ``mask`` (out, ceil(in / 8)) uint8, ``row_offsets``
                   (out + 1,) int64 (torch.ops.torchslim.sparse_bitmask_linear)
        "csr"      ``values`` (G, 8), ``columns`` (G, 8) uint8, ``bases`` (G,) int16,
                   ``group_offsets`` (out + 1,) int64 (torch.ops.torchslim.sparse_csr_linear)
        "sliced"   ``values`` (V,), ``columns`` (V,) uint8, ``groups`` (G, 2) uint8,
                   ``group_offsets`` (B * S + 1,) int64, ``value_offsets`` (B + 1,) int64: blocks
                   of 64 rows, slices of 128 columns (torch.ops.torchslim.sparse_sliced_linear)
        "block"    ``values`` (B, R, C) whole R x C blocks (``block``), ``col_blocks`` (B,)
                   int32, ``row_offsets`` (ceil(out / R) + 1,) int64
                   (torch.ops.torchslim.sparse_block_linear)

    All are buffers in the state_dict, with ``bias`` (out,) or None; loading a state_dict keeps
    its values' and bias' dtypes, and a bitmask, csr, sliced or block layer takes its number of
    values from it.
    Values are fp32, bf16 or fp16 and need not match the activations' dtype: bf16 values under
    fp32 activations halve the bytes read. With ``dtype=torch.int8`` they are int8 codes of the
    pruned weight quantized per output channel, with ``scales`` (out,) fp32 (W8A16: W[n] =
    codes[n] * scales[n]): a byte per nonzero, so 2:4 reads 0.625 bytes per weight.
    ``mode="dynamic"`` (int8 values in the 2:4, bitmask, sliced or block format) quantizes the
    activations per token inside the op and multiplies them with the codes exactly (W8A8, the
    rule of Int8Linear's "dynamic" mode: torch.ops.torchslim.sparse24_dynamic_linear,
    sparse_bitmask_dynamic_linear, sparse_sliced_dynamic_linear and
    sparse_block_dynamic_linear); the default "weight_only" keeps them in float.
    ``module.to(dtype)`` casts float values and the bias, like nn.Linear's weight and bias;
    int8 codes and their fp32 scales stay as they are.
    ``dense_weight()`` decompresses W.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        format: str = "2:4",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        block: str | tuple[int, int] | None = None,
        mode: str = "weight_only",
    ) -> None:
        super().__init__()
        if format not in LAYER_FORMATS:
            raise ValueError(f"format must be one of {LAYER_FORMATS}, got {format!r}")
        dtype = _mode_dtype(mode, dtype)
        check_mode(mode, format, dtype)
        if (block is not None) != (format == "block"):
            raise ValueError(
                f"block (R, C) goes with format='block' and only with it, got block={block!r} "
                f"and format={format!r}"
            )
        self.block = None if block is None else _block_shape(block)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        dtype = dtype or torch.float32
        if dtype not in (*VALUE_DTYPES, torch.int8):
            raise TypeError(f"dtype must be float32, bfloat16, float16 or int8, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.format = format
        self.mode = mode
        n, k = out_features, in_features
        byte_cols = -(-k // ref.MASK_BITS)
        if format == "2:4":
            (_, kept), _ = ref.sparse24_shapes(n, k)
            self.register_buffer("values", torch.zeros(n, kept, dtype=dtype, device=device))
            self.register_buffer("meta", self._empty_meta(n, k, device))
        elif format == "bitmask":
            self.register_buffer("values", torch.zeros(0, dtype=dtype, device=device))
            self.register_buffer(
                "mask", torch.zeros(n, byte_cols, dtype=torch.uint8, device=device)
            )
            self.register_buffer(
                "row_offsets", torch.zeros(n + 1, dtype=torch.int64, device=device)
            )
        elif format == "block":
            rows, cols = self.block
            self.register_buffer("values", torch.zeros(0, rows, cols, dtype=dtype, device=device))
            self.register_buffer("col_blocks", torch.zeros(0, dtype=torch.int32, device=device))
            self.register_buffer(
                "row_offsets",
                torch.zeros(ref.block_rows(n, self.block) + 1, dtype=torch.int64, device=device),
            )
        elif format == "sliced":  # an all-zero weight: no groups, the 16 slots past the values
            blocks, slices = ref.sliced_shape(n, k)
            slack = ref.SLICED_GROUP
            self.register_buffer("values", torch.zeros(slack, dtype=dtype, device=device))
            self.register_buffer("columns", torch.zeros(slack, dtype=torch.uint8, device=device))
            self.register_buffer("groups", torch.zeros(0, 2, dtype=torch.uint8, device=device))
            self.register_buffer(
                "group_offsets",
                torch.zeros(blocks * slices + 1, dtype=torch.int64, device=device),
            )
            self.register_buffer(
                "value_offsets", torch.zeros(blocks + 1, dtype=torch.int64, device=device)
            )
        else:
            group = ref.CSR_GROUP
            self.register_buffer("values", torch.zeros(0, group, dtype=dtype, device=device))
            self.register_buffer("columns", torch.zeros(0, group, dtype=torch.uint8, device=device))
            self.register_buffer("bases", torch.zeros(0, dtype=torch.int16, device=device))
            self.register_buffer(
                "group_offsets", torch.zeros(n + 1, dtype=torch.int64, device=device)
            )
        quantized = dtype == torch.int8
        scales = torch.ones(n, dtype=torch.float32, device=device) if quantized else None
        self.register_buffer("scales", scales)
        bias_dtype = torch.float32 if quantized else dtype
        self.register_buffer(
            "bias", torch.zeros(n, dtype=bias_dtype, device=device) if bias else None
        )
        self.register_load_state_dict_post_hook(validate_after_load)

    @staticmethod
    def _empty_meta(n: int, k: int, device) -> torch.Tensor:
        # An all-zero weight: every group keeps columns 0 and 1 (meta pairs (0, 1) = 0b0100).
        _, (_, cols) = ref.sparse24_shapes(n, k)
        return torch.full((n, cols), 0x44, dtype=torch.uint8, device=device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        pattern: str = "2:4",
        *,
        format: str | None = None,
        dtype: torch.dtype | None = None,
        mode: str = "weight_only",
    ) -> SparseLinear:
        """Compresses an already pruned nn.Linear (see torchslim.sparse.prune_); it is left
        unchanged. A layer pruned with torch.nn.utils.prune is read through its mask.

        Args:
            linear: the float layer, its weight already zero where pruned.
            pattern: the pattern the weight is declared to follow: "2:4" (checked: a weight
                off the pattern raises ValueError, it is never re-pruned), "unstructured", or
                blocks "RxC" such as "16x16" (any weight holds: every block with a nonzero is
                stored).
            format: "2:4", "bitmask", "csr", "sliced" or "block"; default "2:4" for the 2:4
                pattern, "block" for blocks, else the one of bitmask and csr that reads the
                fewer bytes (csr from about 90% sparsity, see default_format). "sliced" takes
                about csr's bytes; its kernel holds x's slice in registers (see
                csrc/cpu/sliced_gemm.h).
            dtype: dtype of the stored values (default the weight's); torch.int8 stores the
                weight quantized per output channel (int8 codes and fp32 scales, see
                torchslim.quant.quantize_weight_per_channel; zeros stay zeros).
            mode: "weight_only" (activations stay in float) or "dynamic" (W8A8: activations
                quantized per token; int8 values, dtype None meaning int8, in the 2:4, bitmask,
                sliced or block format, by default 2:4 for the 2:4 pattern, block for blocks,
                else the one of bitmask and sliced with the fewer bytes: bitmask up to about 85%
                sparsity).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        parsed = parse_pattern(pattern)
        if parsed.kind == "n:m" and str(parsed) != "2:4":
            raise ValueError(
                f"pattern must be '2:4', 'unstructured' or blocks 'RxC' for SparseLinear, got "
                f"{pattern!r} (an n:m-pruned weight is stored as 'unstructured')"
            )
        weight = linear.weight.detach()  # with torch.nn.utils.prune: weight_orig * weight_mask
        dtype = _mode_dtype(mode, dtype)
        if dtype is not None and dtype not in (*VALUE_DTYPES, torch.int8):
            raise TypeError(f"dtype must be float32, bfloat16, float16 or int8, got {dtype}")
        scales = None
        if dtype == torch.int8:
            weight, scales = quantize_weight_per_channel(weight)
        if mode == "dynamic" and format is None and parsed.kind != "block":
            format = "2:4" if str(parsed) == "2:4" else dynamic_format(weight)
        if parsed.kind == "block":
            format = format or "block"
        format = format or ("2:4" if str(parsed) == "2:4" else default_format(weight, dtype))
        if format not in LAYER_FORMATS:
            raise ValueError(f"format must be one of {LAYER_FORMATS}, got {format!r}")
        check_mode(mode, format, dtype)
        if format == "block" and parsed.kind != "block":
            raise ValueError(
                f"format='block' needs a block pattern such as '16x16', got {pattern!r}"
            )
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            format=format,
            device=weight.device,
            dtype=dtype or weight.dtype,
            block=parsed.block if format == "block" else None,
            mode=mode,
        )
        if scales is not None:
            layer.scales = scales
        if format == "2:4":
            layer.values, layer.meta = compress_24(weight, dtype)
        elif format == "bitmask":
            layer.values, layer.mask, layer.row_offsets = compress_bitmask(weight, dtype)
        elif format == "block":
            layer.values, layer.col_blocks, layer.row_offsets = compress_block(
                weight, layer.block, dtype
            )
        elif format == "sliced":
            for name, part in zip(_BUFFERS["sliced"], compress_sliced(weight, dtype), strict=True):
                setattr(layer, name, part)
        else:
            layer.values, layer.columns, layer.bases, layer.group_offsets = compress_csr(
                weight, dtype
            )
        if linear.bias is not None:
            bias = linear.bias.detach()
            layer.bias = bias.float() if scales is not None else bias.clone()
        layer._validate()
        return layer

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs
    ):
        # The values and the bias keep the dtypes they were saved in, and a bitmask, csr or
        # sliced layer's number of values comes with the weights it loads. int8 codes load only into
        # a layer made with dtype=torch.int8 (they need its scales), float values only into
        # one with float values.
        values = state_dict.get(prefix + "values")
        if isinstance(values, torch.Tensor) and (values.dtype == torch.int8) != (
            self.scales is not None
        ):
            own = "int8" if self.scales is not None else "float"
            error_msgs.append(
                f"values of {prefix or 'the layer'}: the state_dict holds {values.dtype} values "
                f"and this SparseLinear {own} ones: make it with "
                f"dtype={values.dtype if values.dtype == torch.int8 else 'a float dtype'}"
            )
            return
        sized = _SIZED_BY_WEIGHT[self.format]
        for name in {"values", "bias", *sized}:
            incoming, own = state_dict.get(prefix + name), self._buffers.get(name)
            if not (isinstance(incoming, torch.Tensor) and own is not None):
                continue
            if incoming.dim() != own.dim():
                continue  # the load reports the mismatch
            shape = incoming.shape if name in sized else own.shape
            float_value = name in ("values", "bias") and incoming.dtype in VALUE_DTYPES
            self._buffers[name] = own.new_empty(
                shape, dtype=incoming.dtype if float_value else own.dtype
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs
        )

    def _validate(self) -> None:
        n, k = self.out_features, self.in_features
        b = self._buffers
        scales = b["scales"]
        if scales is None:
            if b["values"].dtype not in VALUE_DTYPES:
                raise ValueError(
                    f"values must be float32, bfloat16 or float16, got {b['values'].dtype}"
                )
        else:
            if b["values"].dtype != torch.int8:
                raise ValueError(f"values must be int8 codes, got {b['values'].dtype}")
            if scales.dtype != torch.float32 or tuple(scales.shape) != (n,):
                raise ValueError(
                    f"scales must be float32 of shape ({n},), got {scales.dtype} "
                    f"{tuple(scales.shape)}"
                )
            if not (torch.isfinite(scales).all() and (scales > 0).all()):
                raise ValueError("scales must be finite and > 0 everywhere")
        if self.format == "2:4":
            (_, kept), (_, cols) = ref.sparse24_shapes(n, k)
            if tuple(b["values"].shape) != (n, kept):
                raise ValueError(
                    f"values must have shape ({n}, {kept}), got {tuple(b['values'].shape)}"
                )
            if b["meta"].dtype != torch.uint8 or tuple(b["meta"].shape) != (n, cols):
                raise ValueError(
                    f"meta must be uint8 of shape ({n}, {cols}), got {b['meta'].dtype} "
                    f"{tuple(b['meta'].shape)}"
                )
            index = ref.meta_indices(b["meta"], kept // 2).reshape(n, -1, 2)
            if not bool((index[..., 0] < index[..., 1]).all()):
                raise ValueError("meta must hold two increasing column indices per group of 4")
        elif self.format == "bitmask":
            ref.check_bitmask(b["values"], b["mask"], b["row_offsets"], k)
        elif self.format == "block":
            if b["values"].dim() != 3 or tuple(b["values"].shape[1:]) != self.block:
                raise ValueError(
                    f"values must have shape (B, {self.block[0]}, {self.block[1]}), got "
                    f"{tuple(b['values'].shape)}"
                )
            if (
                b["col_blocks"].dtype != torch.int32
                or b["col_blocks"].shape != b["values"].shape[:1]
            ):
                raise ValueError(
                    f"col_blocks must be int32 of shape ({b['values'].shape[0]},), got "
                    f"{b['col_blocks'].dtype} {tuple(b['col_blocks'].shape)}"
                )
            ref.check_block(b["values"], b["col_blocks"], b["row_offsets"], n, k)
        elif self.format == "sliced":
            ref.check_sliced(*self._sliced_parts(), n, k)
        else:
            ref.check_csr(b["values"], b["columns"], b["bases"], b["group_offsets"], k)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decompressed (out_features, in_features) weight (int8 codes times their scales,
        in fp32 unless ``dtype`` says otherwise)."""
        b = self._buffers
        scales = b["scales"]
        dtype = dtype or (torch.float32 if scales is not None else None)
        if self.format == "2:4":
            w = ref.decompress_24(b["values"], b["meta"], self.in_features, dtype)
        elif self.format == "bitmask":
            w = ref.decompress_bitmask(
                b["values"], b["mask"], b["row_offsets"], self.in_features, dtype
            )
        elif self.format == "block":
            w = ref.decompress_block(
                b["values"], b["col_blocks"], b["row_offsets"], *self._shape(), dtype
            )
        elif self.format == "sliced":
            w = ref.decompress_sliced(*self._sliced_parts(), *self._shape(), dtype)
        else:
            w = ref.decompress_csr(
                b["values"], b["columns"], b["bases"], b["group_offsets"], self.in_features, dtype
            )
        return ref.scale_rows(w, scales, w.dtype)

    def _apply(self, fn, recurse=True):
        # int8 codes' scales stay fp32 when the module is cast (module.to(torch.bfloat16)): only
        # their device follows the module. Float values, and the bias, follow a cast to a dtype
        # the kernels take and keep theirs otherwise (.double(): fp64 back to what it was, exactly).
        b = self._buffers
        dtypes = {name: b[name].dtype for name in ("values", "bias") if b[name] is not None}
        apply_keeping_dtypes(self, fn, recurse, ("scales",))
        for name, dtype in dtypes.items():
            t = self._buffers[name]
            if t.dtype != dtype and t.dtype not in VALUE_DTYPES:
                self._buffers[name] = t.to(dtype)
        return self

    @property
    def sparsity(self) -> float:
        """Fraction of W's weights that are zero (every nonzero of W is one of the values)."""
        nonzero = int(torch.count_nonzero(self._buffers["values"]))
        return 1.0 - nonzero / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op itself, and the buffers from _buffers: see Int4Linear.forward.
        _require_tensors(x=x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            # The 2:4 and block arrays fix K only to a multiple of 4 or of the block width.
            raise ValueError(
                f"x must be (..., in_features = {self.in_features}), got shape {tuple(x.shape)}"
            )
        b = self._buffers
        values, bias, scales = b["values"], b["bias"], b["scales"]
        if self.format == "2:4":
            if self.mode == "dynamic":
                return _OP_24_DYNAMIC(x, values, b["meta"], scales, bias)
            return _OP_24(x, values, b["meta"], bias, scales)
        if self.format == "bitmask":
            if self.mode == "dynamic":
                return _OP_BITMASK_DYNAMIC(x, values, b["mask"], b["row_offsets"], scales, bias)
            return _OP_BITMASK(x, values, b["mask"], b["row_offsets"], bias, scales)
        if self.format == "block":
            n = self.out_features
            if self.mode == "dynamic":
                return _OP_BLOCK_DYNAMIC(
                    x, values, b["col_blocks"], b["row_offsets"], n, scales, bias
                )
            return _OP_BLOCK(x, values, b["col_blocks"], b["row_offsets"], n, bias, scales)
        if self.format == "sliced":
            if self.mode == "dynamic":
                return _OP_SLICED_DYNAMIC(x, *self._sliced_parts(), self.out_features, scales, bias)
            return _OP_SLICED(x, *self._sliced_parts(), self.out_features, bias, scales)
        return _OP_CSR(x, values, b["columns"], b["bases"], b["group_offsets"], bias, scales)

    def _sliced_parts(self) -> tuple[torch.Tensor, ...]:
        b = self._buffers
        return tuple(b[name] for name in _BUFFERS["sliced"])

    def _shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def extra_repr(self) -> str:
        block = f", block={self.block[0]}x{self.block[1]}" if self.block else ""
        mode = f", mode={self.mode!r}" if self.mode != "weight_only" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format!r}{block}, "
            f"values={str(self.values.dtype).removeprefix('torch.')}{mode}"
        )


def _mode_dtype(mode: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """The values' dtype: int8 under mode="dynamic" where none is given (W8A8 has no other)."""
    return torch.int8 if mode == "dynamic" and dtype is None else dtype


def check_mode(mode: str, format: str | None, dtype: torch.dtype | None) -> None:
    """Raises ValueError unless ``mode`` is one of MODES and "dynamic" goes with int8 values in
    one of DYNAMIC_FORMATS (format None: one still to be chosen)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "dynamic" and (format not in (None, *DYNAMIC_FORMATS) or dtype != torch.int8):
        raise ValueError(
            f"mode='dynamic' (W8A8) takes int8 values in the 2:4, bitmask, sliced or block "
            f"format, got format={format!r} and dtype={dtype}"
        )


def _block_shape(block: str | tuple[int, int]) -> tuple[int, int]:
    parsed = parse_pattern(block)
    if parsed.kind != "block":
        raise ValueError(f"block must be 'RxC' such as '16x16' or (R, C), got {block!r}")
    return parsed.block


def dynamic_format(codes: torch.Tensor) -> str:
    """The unstructured W8A8 format that stores ``codes`` (N, K) int8 in fewer bytes:
    "bitmask" (a byte per nonzero, 1/8 per weight) or "sliced" (two bytes per nonzero and two
    per group)."""
    n, k = codes.shape
    sparsity = 1.0 - int(torch.count_nonzero(codes)) / max(n * k, 1)
    bytes_of = {
        f: format_bytes(f, n, k, sparsity=sparsity, dtype=torch.int8) for f in _UNSTRUCTURED_DYNAMIC
    }
    return min(_UNSTRUCTURED_DYNAMIC, key=bytes_of.__getitem__)


def default_format(weight: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """The unstructured format that stores ``weight`` (values in ``dtype``, default its own;
    int8 for quantized codes) in fewer bytes: "bitmask" (an item per nonzero, 1/8 per weight)
    or "csr" (8 items + 10 bytes per group of up to 8 nonzeros: fewer from about 90% sparsity
    on long rows). The kernels' work follows the bytes at decode, and csr's SpMM is the one
    that scales at large M."""
    item = torch.empty((), dtype=dtype or weight.dtype).element_size()
    per_row = torch.count_nonzero(weight, dim=1)
    groups = int((-(-per_row // ref.CSR_GROUP)).sum())
    csr = groups * (ref.CSR_GROUP * (item + 1) + 2)
    bitmask = int(per_row.sum()) * item + weight.shape[0] * -(-weight.shape[1] // ref.MASK_BITS)
    return "csr" if csr < bitmask else "bitmask"
