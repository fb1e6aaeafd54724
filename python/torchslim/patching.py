"""patch(model, ...): swap a model's layers for torchslim's, in place, with a report.

One generic function for every model (plain nn.Module stacks, Hugging Face transformers, ...):
it walks the module tree, picks the layers that the chosen method applies to and that the
name filters select, and replaces each with the method's drop-in module. Methods live in one
table, METHODS; a new capability (int4, sparsity, attention) is one more entry there.

    model = torchslim.patch(model, quant="int8-weight", exclude="lm_head")
    model = torchslim.patch(model, quant="int4", group_size=32)   # a method's own options
    model = torchslim.patch(model, attention=True)  # attention on torchslim's fused kernel
    model = torchslim.patch(model, sparsity="2:4", sparsity_method="wanda", calibration=data)
    print(model.torchslim_report)      # replaced / kept (and why), bytes before and after
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn
from tqdm.auto import tqdm

from torchslim import hf_attention
from torchslim._calibration import watch_inputs
from torchslim._names import as_patterns, name_matches
from torchslim.nn import Int4Linear, Int8Linear, MultiheadAttention
from torchslim.nn.sparse_linear import LAYER_FORMATS, SparseLinear, check_mode
from torchslim.quant import smoothquant_factors
from torchslim.sparse.patterns import check_pattern, parse_pattern
from torchslim.sparse.prune import prune_, shared_weights


@dataclass(frozen=True)
class Method:
    """How one quant name turns a layer into a torchslim layer.

    Attributes:
        name: the value users pass, e.g. ``quant="int8"``.
        applies_to: the layer type it replaces.
        convert: builds the replacement from the float layer, the max |input| per input
            channel seen on the calibration data (None without calibration, or when the method
            does not calibrate) and the method's options as keyword arguments.
        calibrated: whether ``convert`` uses calibration statistics.
        why_not: called as why_not(layer, options): None when ``convert`` can take this layer
            with these options, else the reason it stays.
        describe: a short description for reports.
        config: the replacement's constructor arguments, as JSON-able data (saved recipes).
        empty: builds an unfilled replacement for a float layer from ``config``, on the float
            layer's device, for ``torchslim.load`` to load packed weights into.
        owns: whether a module is this method's replacement (how ``torchslim.save`` finds
            them, patched or built by hand).
        options: the keyword options ``patch`` accepts for this method, with their defaults.
        check_options: raises TypeError/ValueError naming a bad option value.
    """

    name: str
    applies_to: type[nn.Module]
    convert: Callable[..., nn.Module]
    why_not: Callable[[nn.Module, Mapping[str, object]], str | None]
    describe: str
    config: Callable[[nn.Module], dict]
    empty: Callable[[nn.Module, dict], nn.Module]
    owns: Callable[[nn.Module], bool]
    calibrated: bool = False
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    check_options: Callable[[Mapping[str, object]], None] = lambda _options: None


def _linear_why_not(layer: nn.Module, options: Mapping[str, object] | None = None) -> str | None:
    if type(layer) is not nn.Linear:
        return f"{type(layer).__name__} subclasses nn.Linear (its forward may differ)"
    if layer.in_features == 0 or layer.out_features == 0:
        return f"no weights (in_features={layer.in_features}, out_features={layer.out_features})"
    if layer.weight.device.type == "meta":
        return "weights are on the meta device (nothing to quantize)"
    if not layer.weight.is_floating_point():
        return f"weight dtype {layer.weight.dtype} is not floating point"
    return None


def _shape_config(layer: nn.Module) -> dict:
    """The part of every layer's recipe config that _check_same_linear compares."""
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
    }


def _int8_config(layer: Int8Linear) -> dict:
    return {
        **_shape_config(layer),
        "mode": layer.mode,
        "smooth": layer.smooth is not None,
    }


def _check_same_linear(linear: nn.Module, config: dict) -> tuple[int, int, bool]:
    shape = (config["in_features"], config["out_features"], config["bias"])
    if (linear.in_features, linear.out_features, linear.bias is not None) != shape:
        raise ValueError(
            f"the model's layer is Linear(in={linear.in_features}, out={linear.out_features}, "
            f"bias={linear.bias is not None}) but the recipe has (in={shape[0]}, out={shape[1]}, "
            f"bias={shape[2]})"
        )
    return shape


def _int8_empty(linear: nn.Module, config: dict) -> Int8Linear:
    shape = _check_same_linear(linear, config)
    device, dtype = linear.weight.device, linear.weight.dtype
    layer = Int8Linear(*shape, mode=config["mode"], device=device, dtype=dtype)
    if config["smooth"]:
        layer.smooth = torch.ones(shape[0], device=device)
    return layer


SMOOTHQUANT_ALPHA = 0.5


def _int8_method(name: str, mode: str, describe: str) -> Method:
    # W8A8 quantizes activations, so outlier input channels cost accuracy: with calibration
    # data it applies SmoothQuant (alpha 0.5). W8A16 keeps float activations and needs none.
    calibrated = mode == "dynamic"

    def convert(layer: nn.Linear, act_absmax: torch.Tensor | None) -> Int8Linear:  # no options
        smooth = None
        if calibrated and act_absmax is not None:
            smooth = smoothquant_factors(act_absmax, layer.weight, alpha=SMOOTHQUANT_ALPHA)
        return Int8Linear.from_linear(layer, mode=mode, smooth=smooth)

    return Method(
        name=name,
        applies_to=nn.Linear,
        convert=convert,
        calibrated=calibrated,
        why_not=_linear_why_not,
        describe=describe,
        config=_int8_config,
        empty=_int8_empty,
        owns=lambda module: isinstance(module, Int8Linear) and module.mode == mode,
    )


_SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _int4_config(layer: Int4Linear) -> dict:
    return {
        **_shape_config(layer),
        "group_size": layer.group_size,
        "symmetric": layer.symmetric,
        "scale_dtype": str(layer.scale_dtype).removeprefix("torch."),
    }


def _int4_empty(linear: nn.Module, config: dict) -> Int4Linear:
    _check_same_linear(linear, config)
    if config["scale_dtype"] not in _SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {config['scale_dtype']!r}"
        )
    return Int4Linear(
        config["in_features"],
        config["out_features"],
        config["bias"],
        group_size=config["group_size"],
        symmetric=config["symmetric"],
        scale_dtype=_SCALE_DTYPES[config["scale_dtype"]],
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def _int4_why_not(layer: nn.Module, options: Mapping[str, object]) -> str | None:
    why = _linear_why_not(layer)
    group_size = options["group_size"]
    if why is None and layer.in_features % 2:
        return f"in_features={layer.in_features} is odd (two int4 codes per byte)"
    if why is None and group_size != -1 and layer.in_features % group_size:
        return f"in_features={layer.in_features} is not a multiple of group_size={group_size}"
    return why


def _int4_check_options(options: Mapping[str, object]) -> None:
    group_size = options["group_size"]
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size != -1 and (group_size < 2 or group_size % 2):
        raise ValueError(
            f"group_size must be -1 (per channel) or a positive even int, got {group_size}"
        )
    for name in ("symmetric", "clip_search"):
        if not isinstance(options[name], bool):
            raise TypeError(f"{name} must be a bool, got {options[name]!r}")
    if options["scale_dtype"] not in _SCALE_DTYPES.values():
        raise TypeError(
            f"scale_dtype must be one of {list(_SCALE_DTYPES.values())}, "
            f"got {options['scale_dtype']!r}"
        )


def _int4_convert(layer, _act_absmax, *, group_size, symmetric, scale_dtype, clip_search):
    return Int4Linear.from_linear(
        layer, group_size, symmetric, scale_dtype=scale_dtype, clip_search=clip_search
    )


INT4 = Method(
    name="int4",
    applies_to=nn.Linear,
    convert=_int4_convert,
    why_not=_int4_why_not,
    describe="W4A16: int4 weights per group",
    config=_int4_config,
    empty=_int4_empty,
    owns=lambda module: isinstance(module, Int4Linear),
    options=MappingProxyType(
        {"group_size": 128, "symmetric": False, "scale_dtype": torch.bfloat16, "clip_search": False}
    ),
    check_options=_int4_check_options,
)


# The values SparseLinear stores: float, or int8 codes with per-row scales.
_SPARSE_DTYPES = {**_SCALE_DTYPES, "int8": torch.int8}


def _sparse_config(layer: SparseLinear) -> dict:
    block = {"block": list(layer.block)} if layer.block else {}
    return {
        **_shape_config(layer),
        "format": layer.format,
        "dtype": str(layer.values.dtype).removeprefix("torch."),
        "mode": layer.mode,
        **block,
    }


def _sparse_empty(linear: nn.Module, config: dict) -> SparseLinear:
    shape = _check_same_linear(linear, config)
    if config["dtype"] not in _SPARSE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_SPARSE_DTYPES)}, got {config['dtype']!r}")
    block = config.get("block")
    if config["format"] == "block" and not (
        isinstance(block, list) and len(block) == 2 and all(isinstance(d, int) for d in block)
    ):
        raise ValueError(f"a block layer's config must give block [R, C], got {block!r}")
    return SparseLinear(
        *shape,
        format=config["format"],
        device=linear.weight.device,
        dtype=_SPARSE_DTYPES[config["dtype"]],
        block=tuple(block) if config["format"] == "block" else None,
        mode=config.get("mode", "weight_only"),  # saved before there were modes
    )


SPARSE_PATTERNS = ("2:4", "unstructured", "RxC blocks such as '16x16'")


def _is_block_pattern(pattern: object) -> bool:
    try:
        return parse_pattern(pattern).kind == "block"
    except (TypeError, ValueError):
        return False


def _sparse_check_options(options: Mapping[str, object]) -> None:
    if options["pattern"] not in SPARSE_PATTERNS[:2] and not _is_block_pattern(options["pattern"]):
        raise ValueError(f"pattern must be one of {SPARSE_PATTERNS}, got {options['pattern']!r}")
    if options["format"] is not None and options["format"] not in LAYER_FORMATS:
        raise ValueError(
            f"format must be None or one of {LAYER_FORMATS}, got {options['format']!r}"
        )
    if options["dtype"] is not None and options["dtype"] not in _SPARSE_DTYPES.values():
        raise TypeError(
            f"dtype must be None or one of {list(_SPARSE_DTYPES.values())}, "
            f"got {options['dtype']!r}"
        )
    check_mode(options["mode"], options["format"], options["dtype"])


def _sparse_convert(layer, _act_absmax, *, pattern, dtype, format, mode):
    return SparseLinear.from_linear(layer, pattern, format=format, dtype=dtype, mode=mode)


SPARSE = Method(
    name="sparse",
    applies_to=nn.Linear,
    convert=_sparse_convert,
    why_not=lambda layer, _options: _linear_why_not(layer),
    describe="sparse weights, compressed (2:4, bitmask, csr, sliced or block)",
    config=_sparse_config,
    empty=_sparse_empty,
    owns=lambda module: isinstance(module, SparseLinear),
    options=MappingProxyType(
        {"pattern": "2:4", "dtype": None, "format": None, "mode": "weight_only"}
    ),
    check_options=_sparse_check_options,
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _int8_method("int8", "dynamic", "W8A8: int8 weights per channel, tokens quantized"),
        _int8_method("int8-weight", "weight_only", "W8A16: int8 weights per channel"),
        INT4,
        SPARSE,
    )
}


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass
class PatchRow:
    name: str
    before: str
    after: str | None  # None: kept as it was
    reason: str
    bytes_before: int
    bytes_after: int
    method: str | None = None  # the METHODS entry that replaced it
    alias_of: str | None = None  # another name of the same module, whose row counts its bytes


@dataclass
class PatchReport:
    """What patch() did: one row per layer the quant method applies to, and one per attention
    that ``attention=True`` looked at."""

    quant: str
    rows: list[PatchRow] = field(default_factory=list)
    attention: list[PatchRow] = field(default_factory=list)

    @property
    def replaced(self) -> list[PatchRow]:
        return [r for r in self.rows if r.after is not None]

    @property
    def kept(self) -> list[PatchRow]:
        return [r for r in self.rows if r.after is None]

    def bytes_before(self) -> int:
        """Bytes of the rows' layers before, each module once (a shared one has one row per
        name)."""
        return sum(r.bytes_before for r in self.rows if r.alias_of is None)

    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows if r.alias_of is None)

    def __str__(self) -> str:
        head = ("layer", "before", "after", "MB before", "MB after", "note")
        body = [
            (
                r.name,
                r.before,
                r.after or "(kept)",
                f"{r.bytes_before / 1e6:.2f}",
                f"{r.bytes_after / 1e6:.2f}",
                r.reason + (f"; the same module as {r.alias_of!r}" if r.alias_of else ""),
            )
            for r in self.rows + self.attention
        ]
        if not body:
            return f"quant={self.quant}: nothing patched"
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
        before, after = self.bytes_before(), self.bytes_after()
        ratio = before / after if after else float("inf")
        lines.append(
            f"quant={self.quant}: {len(self.replaced)} replaced, {len(self.kept)} kept; "
            f"these layers {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({ratio:.2f}x smaller)"
        )
        if self.attention:
            swapped = sum(r.after is not None for r in self.attention)
            lines.append(f"attention: {swapped} of {len(self.attention)} on torchslim's kernel")
        return "\n".join(lines)


def patch(
    model: nn.Module,
    quant: str | None = None,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    calibration: Iterable | Callable[[nn.Module], object] | None = None,
    progress: bool = True,
    attention: bool = False,
    sparsity: str | float | None = None,
    sparsity_method: str = "magnitude",
    **options: object,
) -> nn.Module:
    """Replaces the model's layers with torchslim layers, in place.

    Args:
        model: any nn.Module (a Hugging Face model included).
        quant: one of METHODS ("int8", "int8-weight", "int4", "sparse"), or None to change
            nothing. "sparse" compresses layers already pruned (torchslim.sparse.prune_) into
            SparseLinear; options ``pattern`` ("2:4", "unstructured" or blocks "RxC" such as
            "16x16"), ``dtype`` of the stored values (default the weight's; torch.int8: codes
            quantized per output channel, W8A16), ``format`` (default: "2:4" for that
            pattern, "block" for blocks, else per layer the one of "bitmask" and "csr" with the
            fewer bytes) and ``mode`` ("weight_only", or "dynamic": see ``sparsity``).
        include: names (exact, glob or regex) of the layers to patch; default all.
        exclude: names (exact, glob or regex) of layers to leave alone, e.g. "lm_head".
        filter_fn: called as filter_fn(name, module); a layer is patched only if it returns True.
        calibration: data for methods that calibrate ("int8": SmoothQuant factors from the max
            |input| per channel of each layer): an iterable of model inputs (a tensor is passed
            as model(t), a dict as model(**d)), or a callable run as calibration(model).
            Ignored by methods that do not calibrate.
        progress: show a progress bar over the layers.
        attention: run the model's attention on torchslim's fused kernel: a Hugging Face model
            gets ``set_attn_implementation("torchslim")`` (torchslim.hf_attention), and every
            nn.MultiheadAttention becomes a torchslim.nn.MultiheadAttention sharing its
            parameters. Model-wide: include, exclude and filter_fn select quant layers only.
        sparsity: prune the selected layers first, then store them compressed (quant
            "sparse"): "2:4", or a float in (0, 1) for unstructured sparsity per output row
            (bitmask or csr format), or with ``pattern="16x16"`` (any "RxC") that share of
            whole blocks per block row (the block format). With quant="int8-weight" the kept
            weights are stored as int8 codes per output channel (the sparse kernels' int8
            values, W8A16); with quant="int8" too, in the 2:4 format for "2:4", the block
            format for blocks, else in the bitmask or sliced format (the one with the fewer
            bytes), and the activations are quantized per token inside the op (W8A8:
            SparseLinear's mode="dynamic"); no other quant combines with it. A layer whose
            weight is also held elsewhere (an output head tied to the input embeddings) is
            kept, since pruning it would prune the other too.
        sparsity_method: "magnitude" or "wanda" (|W| times the input norm per channel, from
            ``calibration``); see torchslim.sparse.prune_.
        **options: the method's own options (``METHODS[quant].options`` lists them with their
            defaults). "int4": ``group_size`` (128; 32, 64, ... or -1 per channel),
            ``symmetric`` (False), ``scale_dtype`` (torch.bfloat16), ``clip_search`` (False).

    Returns:
        ``model`` itself. Its ``torchslim_report`` attribute (a PatchReport) lists every layer
        the method applies to: replaced, or kept and why; bytes before and after; and, with
        ``attention=True``, each attention it switched or could not. A layer reachable under
        several names is replaced under all of them or, when any of its names is kept, under
        none. A layer that cannot be converted (a NaN in an int8 weight, say) raises an error
        naming it, and the layers already replaced are put back (weights pruned by
        ``sparsity`` stay pruned).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if quant is not None and quant not in METHODS:
        raise ValueError(f"quant must be one of {sorted(METHODS)} or None, got {quant!r}")
    includes = as_patterns(include, "include")
    excludes = as_patterns(exclude, "exclude")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable, got {type(filter_fn).__name__}")

    for arg, value in (("attention", attention), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg} must be a bool, got {type(value).__name__}")

    if sparsity is not None:
        if quant in ("int8-weight", "int8"):  # sparse int8 values: W8A16 or W8A8
            if options.setdefault("dtype", torch.int8) != torch.int8:
                raise ValueError(
                    f"dtype={options['dtype']!r} contradicts quant={quant!r} with sparsity"
                )
            mode = "dynamic" if quant == "int8" else "weight_only"
            if options.setdefault("mode", mode) != mode:
                raise ValueError(
                    f"mode={options['mode']!r} contradicts quant={quant!r} with sparsity"
                )
        elif quant not in (None, "sparse"):
            raise ValueError(
                f"sparsity={sparsity!r} does not combine with quant={quant!r}: the sparse "
                "kernels take float or int8 values (quant=None, 'int8-weight' or 'int8')"
            )
        if isinstance(sparsity, str) and sparsity != "2:4":
            raise ValueError(f"sparsity must be '2:4' or a float in (0, 1), got {sparsity!r}")
        quant = "sparse"
        pattern = "2:4" if sparsity == "2:4" else "unstructured"
        given = options.setdefault("pattern", pattern)
        if given != pattern and not (pattern == "unstructured" and _is_block_pattern(given)):
            raise ValueError(f"pattern={options['pattern']!r} contradicts sparsity={sparsity!r}")

    report = PatchReport(quant=str(quant))
    if attention:
        report.attention = _patch_attention(model)
    if quant is None:
        model.torchslim_report = report
        return model
    method = METHODS[quant]
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        raise TypeError(
            f"patch(quant={quant!r}) got unknown options {unknown}; it takes "
            f"{sorted(method.options) or 'none'}"
        )
    options = {**method.options, **options}
    method.check_options(options)
    # Every name of every candidate: a layer reachable under two names is converted once and
    # replaced under both, so the model keeps sharing it.
    candidates = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, method.applies_to) and name
    ]
    converted: dict[int, nn.Module] = {}
    for pattern, arg in [(p, "include") for p in includes] + [(p, "exclude") for p in excludes]:
        if not any(name_matches(name, pattern) for name, _ in candidates):
            kind = method.applies_to.__name__
            warnings.warn(
                f"torchslim.patch: {arg} pattern {pattern!r} matches no {kind} in the model",
                stacklevel=2,
            )

    def why_kept_by_name(name: str, module: nn.Module) -> str | None:
        if includes and not any(name_matches(name, p) for p in includes):
            return "not included"
        if any(name_matches(name, p) for p in excludes):
            return "excluded"
        if filter_fn is not None and not filter_fn(name, module):
            return "filter_fn returned False"
        return None

    # A layer reachable under several names is replaced under all of them or under none, so
    # the model keeps sharing it: kept when any of its names is.
    by_name = {name: why_kept_by_name(name, module) for name, module in candidates}
    first_name: dict[int, str] = {}
    kept_under: dict[int, str] = {}
    for name, module in candidates:
        first_name.setdefault(id(module), name)
        if by_name[name] is not None:
            kept_under.setdefault(id(module), name)

    shares: dict[int, str] = {}  # pruning would change a tensor held outside the selection

    def why_kept(name: str, module: nn.Module) -> str | None:
        if by_name[name] is not None:
            return by_name[name]
        other = kept_under.get(id(module))
        if other is not None:
            return f"the same module as {other!r}, which is {by_name[other]}"
        if id(module) in shares:
            return f"its weight is also {shares[id(module)]!r}, which pruning would change too"
        return method.why_not(module, options)

    selected = {id(m): m for name, m in candidates if why_kept(name, m) is None}
    while sparsity is not None and (found := shared_weights(model, selected.values())):
        shares.update(found)  # a layer left out can leave another's weight shared: repeat
        selected = {key: m for key, m in selected.items() if key not in found}
    if sparsity is not None and selected:
        prune_(
            model,
            options["pattern"],
            sparsity=None if sparsity == "2:4" else sparsity,
            method=sparsity_method,
            calibration=calibration if sparsity_method == "wanda" else None,
            filter_fn=lambda _name, module: id(module) in selected,
            progress=progress,
        )
    elif quant == "sparse" and options["pattern"] == "2:4":
        for name, module in candidates:  # before any layer is replaced
            if id(module) in selected:
                check_pattern(module.weight.detach(), "2:4", name=f"{name}.weight")
    stats = {}
    if calibration is not None and method.calibrated and selected:
        chosen = [(n, m) for n, m in candidates if id(m) in selected]
        stats = _input_absmax(model, chosen, calibration, progress)

    if isinstance(model, method.applies_to):
        size = module_bytes(model)
        why = "the model itself (patch replaces submodules): wrap it, e.g. nn.Sequential(model)"
        report.rows.append(PatchRow("(model)", type(model).__name__, None, why, size, size))
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name, module in tqdm(candidates, desc=f"patch {quant}", disable=not progress):
            why = why_kept(name, module)
            before = module_bytes(module)
            alias = first_name[id(module)] if first_name[id(module)] != name else None
            kind = type(module).__name__
            if why is not None:
                report.rows.append(PatchRow(name, kind, None, why, before, before, alias_of=alias))
                continue
            if id(module) not in converted:
                converted[id(module)] = _convert(method, name, module, stats, options)
            new = converted[id(module)]
            _set_submodule(model, name, new)
            swapped.append((name, module))
            after, new_kind = module_bytes(new), type(new).__name__
            report.rows.append(
                PatchRow(name, kind, new_kind, method.describe, before, after, alias_of=alias)
            )
    except BaseException:
        for name, module in reversed(swapped):  # the model as it came (pruned, with sparsity)
            _set_submodule(model, name, module)
        raise
    model.torchslim_report = report
    return model


def _convert(method: Method, name: str, module: nn.Module, stats: dict, options: dict):
    """method.convert on one layer; an error it raises names the layer."""
    try:
        with torch.no_grad():
            return method.convert(module, stats.get(id(module)), **options)
    except (ValueError, TypeError, RuntimeError) as exc:
        kind = next(k for k in (ValueError, TypeError, RuntimeError) if isinstance(exc, k))
        raise kind(f"layer {name!r}: {exc}") from exc


def _patch_attention(model: nn.Module) -> list[PatchRow]:
    rows = []
    if hasattr(model, "set_attn_implementation") and hasattr(model, "config"):
        before = str(getattr(model.config, "_attn_implementation", None))
        hf_attention.register()
        try:
            model.set_attn_implementation(hf_attention.NAME)
        except (ValueError, ImportError) as e:  # a model that takes no custom attention
            rows.append(PatchRow("(model)", before, None, str(e), 0, 0, "attention"))
        else:
            describe = "Hugging Face attention interface"
            rows.append(PatchRow("(model)", before, hf_attention.NAME, describe, 0, 0, "attention"))
    swapped: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.MultiheadAttention) or isinstance(module, MultiheadAttention):
            continue
        size = module_bytes(module)
        why = None
        if type(module) is not nn.MultiheadAttention:
            why = (
                f"{type(module).__name__} subclasses nn.MultiheadAttention (its forward may differ)"
            )
        elif not name:  # patch works in place; the model cannot replace itself
            why = "the model itself: use torchslim.nn.MultiheadAttention.from_module(model)"
        if why is not None:
            rows.append(PatchRow(name, type(module).__name__, None, why, size, size, "attention"))
            continue
        if id(module) not in swapped:
            swapped[id(module)] = MultiheadAttention.from_module(module)
        _set_submodule(model, name, swapped[id(module)])
        rows.append(
            PatchRow(name, "MultiheadAttention", "torchslim.nn.MultiheadAttention",
                     "fused attention kernel", size, size, "attention")
        )  # fmt: skip
    return rows


def _input_absmax(model, layers, calibration, progress) -> dict[int, torch.Tensor]:
    """Runs the calibration data through ``model`` and returns, per layer (by id), the max
    |input| per input channel (the last dim of the layer's input)."""
    stats: dict[int, torch.Tensor] = {}

    def collect(module, x):
        amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        key = id(module)
        stats[key] = torch.maximum(stats[key], amax) if key in stats else amax

    watch_inputs(model, layers, collect, calibration, progress)
    if not stats and layers:
        raise ValueError("calibration ran no data through the selected layers")
    return stats


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
