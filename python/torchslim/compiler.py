"""The ``torchslim`` torch.compile backend: torchslim's graph passes, then Inductor.

    model = torchslim.patch(model, quant="int8")
    compiled = torch.compile(model, backend="torchslim")
    torch._inductor.config.freezing = True  # constant weights: fuse_siblings applies
    compiled = torch.compile(model, backend="torchslim")

The backend is registered when torchslim is imported and, for an installed torchslim, through
the ``torch_dynamo_backends`` entry point, so ``backend="torchslim"`` works without an import.
It hands the graph to Inductor (``compile_fx``) with the passes below installed as Inductor's
post-grad custom pass: they see the ATen graph after autograd and functionalization, where
torchslim's ops are single nodes, and Inductor compiles the rewritten graph.

Passes (run in this order; ``options={"passes": [...]}`` picks a subset, ``[]`` none):

    attention       on the graph Dynamo captured, before autograd: calls of
                    ``F.scaled_dot_product_attention`` -> torchslim's drop-in of the same name
                    (torchslim.nn.functional), and the explicit pattern
                    ``softmax(q @ k.transpose(-2, -1) [* s | / s] [+ mask], dim=-1) @ v`` (a
                    cast of the weights back to q's dtype, and a dropout that is not training,
                    allowed: Hugging Face's eager attention) -> ``torchslim.attention``,
                    where a torchslim kernel runs those inputs (on the reference it leaves them)
                    and nothing else reads the scores. The attention op carries its own
                    backward, so training graphs are rewritten too (not where the mask needs a
                    gradient). One result differs from eager's: a row whose every score is
                    -inf gives zeros, as SDPA's, where softmax gives NaN.
    fuse_bias       ``linear(x, w, ...) + b`` -> ``linear(x, w, ..., bias=b)`` for torchslim's
                    int8 and int4 linears: a bias added
                    after the op moves into the op's epilogue (one pass over the output less).
                    Applies when b has shape (N,) and the output's dtype and the linear has no
                    other user.
    fuse_siblings   linears of one kind (int8 W8A8, int8 W8A16, or int4 with one group size)
                    that read the same x with frozen weights (q/k/v, or gate/up) become one op
                    on the weights concatenated along N, followed by views of its output: x is
                    quantized and streamed once instead of once per projection, and one launch
                    replaces several. Needs constant weights: Inductor freezing
                    (``torch._inductor.config.freezing = True`` before torch.compile, which
                    assumes parameters are not modified after compilation) or AOTInductor
                    (torchslim.aot_compile runs these passes).

Options (``torch.compile(..., options={...})``):

    passes      names of the passes to run (default: all of them).
    freezing    True only where torch._inductor.config.freezing is already set: Dynamo has
                traced the parameters as inputs before the backend sees this option.
    any other   an Inductor config option, as with the default backend (e.g.
                ``"max_autotune": True``); ``mode=`` is honoured as well.

``counters`` counts the rewrites of every compilation since the last ``counters.clear()``.
"""

from __future__ import annotations

import collections
import functools
import logging
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger(__name__)

BACKEND_NAME = "torchslim"

counters: collections.Counter[str] = collections.Counter()


def _linear_ops() -> dict:
    """torchslim's linear ops -> the names of their weight tensors (concatenated along N, dim
    0, by fuse_siblings). Every one has ``x`` first and an optional ``bias`` last; any other
    argument (int4's group_size) must be equal for siblings to fuse."""
    ns = torch.ops.torchslim
    return {
        ns.int8_dynamic_linear.default: ("w_q", "w_scale"),
        ns.int8_weight_only_linear.default: ("w_q", "w_scale"),
        ns.int4_weight_only_linear.default: ("packed_w", "scales", "zeros"),
    }


def _val(node: Any) -> torch.Tensor | None:
    """The fake tensor Inductor recorded for a node's output, if any."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _call_args(node: fx.Node) -> dict[str, Any]:
    """A torchslim op node's arguments by schema name, in schema order, defaults filled in."""
    args = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            args[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            args[arg.name] = node.kwargs[arg.name]
        else:
            args[arg.name] = arg.default_value
    return args


# ------------------------------------------------------------------------------------ fuse_bias
def fuse_bias(graph: fx.Graph) -> int:
    """``linear(x, w, s) + b`` -> ``linear(x, w, s, b)``; returns the number of rewrites."""
    linear_ops = _linear_ops()
    add = torch.ops.aten.add.Tensor
    rewrites = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not add or node.kwargs.get("alpha", 1) != 1:
            continue
        for lin, bias in (node.args, node.args[::-1]):
            if not (isinstance(lin, fx.Node) and lin.target in linear_ops) or len(lin.users) != 1:
                continue
            args = _call_args(lin)
            out, b = _val(lin), _val(bias)
            if args["bias"] is not None or out is None or b is None:
                continue
            if b.shape != (out.shape[-1],) or b.dtype != out.dtype or b.device != out.device:
                continue
            args["bias"] = bias
            with graph.inserting_before(node):
                fused = graph.call_function(lin.target, tuple(args.values()))
            fused.meta.update(node.meta)
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            graph.erase_node(lin)
            rewrites += 1
            break
    return rewrites


# -------------------------------------------------------------------------------- fuse_siblings
def _constant(graph: fx.Graph, node: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node of the graph's module (a frozen parameter)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or graph.owning_module is None:
        return None
    value = graph.owning_module
    for part in node.target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def fuse_siblings(graph: fx.Graph) -> int:
    """Linears of one op on one x with constant weights -> one linear on concatenated weights,
    then a slice of its output per original linear. Returns the number of linears removed."""
    linear_ops = _linear_ops()
    # (op, x, other args) -> [(node, {name: constant}, bias constant or None)]
    groups: dict[tuple, list[tuple]] = collections.defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in linear_ops or _val(node) is None:
            continue
        args = _call_args(node)
        names = linear_ops[node.target]
        weights = {name: _constant(graph, args[name]) for name in names}
        bias = args["bias"]
        bias_const = None if bias is None else _constant(graph, bias)
        if any(w is None for w in weights.values()) or (bias is not None and bias_const is None):
            continue
        others = tuple(v for k, v in args.items() if k not in (*names, "x", "bias"))
        groups[(node.target, args["x"], others)].append((node, weights, bias_const))

    removed = 0
    for (target, x, others), members in groups.items():
        nodes = [m[0] for m in members]
        names = linear_ops[target]
        parts = {name: [m[1][name] for m in members] for name in names}
        biases = [m[2] for m in members]
        bias_dtypes = {b.dtype for b in biases if b is not None}
        if len(nodes) < 2 or len(bias_dtypes) > 1 or not all(map(_stackable, parts.values())):
            continue
        fused = {name: torch.cat(tensors) for name, tensors in parts.items()}
        if bias_dtypes:  # a sibling without a bias contributes zeros
            like = next(b for b in biases if b is not None)
            rows = [len(w) for w in parts[names[0]]]
            fused["bias"] = torch.cat(
                [like.new_zeros(n) if b is None else b for b, n in zip(biases, rows, strict=True)]
            )
        _replace_with_fused(graph, nodes, x, others, fused)
        removed += len(nodes) - 1
    return removed


def _stackable(tensors: list[torch.Tensor]) -> bool:
    """Concatenable along dim 0 as they are: one dtype, one device, equal trailing dims."""
    first = tensors[0]
    return all(
        t.dtype == first.dtype and t.device == first.device and t.shape[1:] == first.shape[1:]
        for t in tensors
    )


def _replace_with_fused(graph, nodes: list[fx.Node], x, others: tuple, consts: dict) -> None:
    """One call of the nodes' op on x, the constants ``consts`` (by argument name; they become
    attributes of the graph's module) and ``others``, where the first of ``nodes`` was (x is
    defined before it), and a slice of its output per node."""
    gm = graph.owning_module
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(nodes, key=order.__getitem__)
    fake_mode = _val(first).fake_mode
    args = _call_args(first)
    remaining = iter(others)
    with graph.inserting_before(first):
        for name in args:
            if name in consts:
                attr_name = _fresh_attr(gm, "_torchslim_fused")
                gm.register_buffer(attr_name, consts[name])
                args[name] = graph.get_attr(attr_name)
                args[name].meta["val"] = fake_mode.from_tensor(consts[name], static_shapes=True)
            elif name == "bias":
                args[name] = None
            elif name != "x":
                args[name] = next(remaining)
        fused = graph.call_function(first.target, tuple(args.values()))
    out = _val(first)
    fused.meta["val"] = out.new_empty((*out.shape[:-1], sum(_val(n).shape[-1] for n in nodes)))
    start = 0
    for node in nodes:
        stop = start + _val(node).shape[-1]
        with graph.inserting_after(fused):
            piece = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, start, stop))
        piece.meta["val"] = fused.meta["val"][..., start:stop]
        node.replace_all_uses_with(piece)
        graph.erase_node(node)
        start = stop


def _fresh_attr(module: torch.nn.Module, prefix: str) -> str:
    i = 0
    while hasattr(module, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


# ------------------------------------------------------------------------------------ attention
_MATMUL = ((operator.matmul, torch.matmul), ("matmul", "__matmul__"))
_SOFTMAX = ((torch.softmax, F.softmax, torch.special.softmax), ("softmax",))
_TRANSPOSE = ((torch.transpose,), ("transpose",))
_MUL = ((operator.mul, torch.mul), ("mul", "__mul__"))
_DIV = ((operator.truediv, torch.div), ("div", "__truediv__"))
_ADD = ((operator.add, torch.add), ("add", "__add__"))
_CAST = ((), ("to", "type_as"))
_DROPOUT = ((F.dropout, torch.dropout), ())
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _calls(node: Any, kind: tuple[tuple, tuple]) -> bool:
    """Whether ``node`` (of a Dynamo graph) calls one of the functions or methods of ``kind``."""
    if not isinstance(node, fx.Node):
        return False
    functions, methods = kind
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def _example(node: Any) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node's output, if any."""
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _kernel_runs(q, k, v, mask, causal, scale) -> bool:
    """Whether torchslim.attention takes these nodes' values (shapes, heads, dtypes, a mask
    that broadcasts and needs no gradient) and would run a kernel on them, not the
    reference."""
    from torchslim.ops.attention import _check_attention, why_no_kernel

    values = [_example(n) for n in (q, k, v)]
    mask_value = _example(mask) if mask is not None else None
    if any(t is None for t in values) or (mask is not None and mask_value is None):
        return False
    if mask_value is not None and mask_value.requires_grad:
        return False  # a learned bias: the op gives no gradient to its mask
    try:
        _check_attention(*values, mask_value, causal, scale, -1, None)
    except (ValueError, TypeError, RuntimeError):
        return False
    return why_no_kernel(*values, mask_value, causal, scale) is None


def _is_identity_dropout(node: Any) -> bool:
    """F.dropout(x, p, training) that returns x: not training, or p = 0 (Hugging Face's eager
    attention calls it on the weights in every mode)."""
    if not _calls(node, _DROPOUT):
        return False
    bound = dict(zip(("input", "p", "training", "inplace"), node.args, strict=False))
    bound |= dict(node.kwargs)
    p, training = bound.get("p", 0.5), bound.get("training", True)
    return isinstance(p, numbers.Real) and isinstance(training, bool) and (p == 0 or not training)


def _match_explicit(out: fx.Node) -> tuple | None:
    """``out`` = softmax(q @ k^T * scale [+ mask]) @ v -> (q, k, v, mask, scale, nodes to
    erase), else None."""
    if not _calls(out, _MATMUL) or len(out.args) != 2 or out.kwargs:
        return None
    weights, v = out.args
    chain = [out]
    for _ in range(2):  # a cast back to q's dtype, a dropout that is not training: either order
        step = _calls(weights, _CAST) or _is_identity_dropout(weights)
        if step and _only_user(weights, chain[-1]):
            chain.append(weights)
            weights = weights.args[0]
    if not (_calls(weights, _SOFTMAX) and _only_user(weights, chain[-1])):
        return None
    dim = weights.args[1] if len(weights.args) > 1 else weights.kwargs.get("dim")
    if dim not in (-1, 3):
        return None
    chain.append(weights)
    scores, mask, scale = weights.args[0], None, 1.0
    # Plain binary calls only: add(..., alpha=a) or div(..., rounding_mode=m) compute more.
    added = _calls(scores, _ADD) and len(scores.args) == 2 and not scores.kwargs
    if added and _only_user(scores, chain[-1]):
        chain.append(scores)
        scores, mask = scores.args
    scaled = (_calls(scores, _MUL) or _calls(scores, _DIV)) and not scores.kwargs
    if scaled and _only_user(scores, chain[-1]) and len(scores.args) == 2:
        chain.append(scores)
        left, right = scores.args
        if _calls(scores, _MUL) and isinstance(left, numbers.Real):
            left, right = right, left
        if not isinstance(right, numbers.Real) or isinstance(right, bool) or right == 0:
            return None
        scale = float(right) if _calls(scores, _MUL) else 1.0 / float(right)
        scores = left
    if not (_calls(scores, _MATMUL) and _only_user(scores, chain[-1]) and len(scores.args) == 2):
        return None
    chain.append(scores)
    q, k_t = scores.args
    if _calls(k_t, _TRANSPOSE) and sorted(a % 4 for a in k_t.args[1:3]) == [2, 3]:
        k = k_t.args[0]
    elif isinstance(k_t, fx.Node) and k_t.op == "call_function" and k_t.target is getattr:
        k = k_t.args[0] if k_t.args[1] == "mT" else None
    else:
        return None
    if k is None or not _only_user(k_t, scores):
        return None
    chain.append(k_t)
    shapes = [_example(n) for n in (q, k, v)]
    if any(t is None or t.dim() != 4 for t in shapes) or _example(out) is None:
        return None
    if mask is not None and (_example(mask) is None or not _example(mask).is_floating_point()):
        return None
    return q, k, v, mask, scale, chain


def rewrite_attention(gm: fx.GraphModule) -> int:
    """The ``attention`` pass on a Dynamo graph; returns the number of rewrites."""
    from torchslim.nn.functional import _why_not_sdpa, scaled_dot_product_attention
    from torchslim.ops.attention import attention

    graph = gm.graph
    rewrites = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_PARAMS, node.args, strict=False)) | dict(node.kwargs)
            q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
            mask, dropout = bound.get("attn_mask"), bound.get("dropout_p", 0.0)
            causal, scale = bound.get("is_causal", False), bound.get("scale")
            if (
                not isinstance(dropout, numbers.Real)
                or dropout != 0.0
                or not isinstance(causal, bool)
            ):
                continue
            if (causal and mask is not None) or not isinstance(scale, (numbers.Real, type(None))):
                continue
            values = [_example(n) for n in (q, k, v)]
            if any(t is None for t in values) or not _kernel_runs(q, k, v, mask, causal, scale):
                continue
            mask_value = _example(mask) if mask is not None else None
            if _why_not_sdpa(*values, mask_value, 0.0, bool(bound.get("enable_gqa", False))):
                continue
            node.target = scaled_dot_product_attention
            rewrites += 1
            continue
        match = _match_explicit(node)
        if match is None:
            continue
        q, k, v, mask, scale, chain = match
        if not _kernel_runs(q, k, v, mask, False, scale):
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(attention, (q, k, v), {"scale": scale, "attn_mask": mask})
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        for dead in chain:
            graph.erase_node(dead)
        rewrites += 1
    if rewrites:
        graph.lint()
        gm.recompile()
    return rewrites


# Passes on the graph Dynamo captured (before autograd), then on the post-grad ATen graph.
GRAPH_PASSES: dict[str, Callable[[fx.GraphModule], int]] = {"attention": rewrite_attention}
PASSES: dict[str, Callable[[fx.Graph], int]] = {
    "fuse_bias": fuse_bias,
    "fuse_siblings": fuse_siblings,
}


# ------------------------------------------------------------------------------------- backend
def _pass_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class TorchslimPasses(CustomGraphPass):
        """torchslim's passes as one Inductor post-grad custom pass."""

        def __init__(self, names: Sequence[str], then: Callable | None) -> None:
            self.names = tuple(name for name in names if name in PASSES)  # post-grad ones
            self.then = then  # a custom pass that was configured before ours

        def __call__(self, graph: fx.Graph) -> None:
            for name in self.names:
                done = PASSES[name](graph)
                if done:
                    counters[name] += done
                    log.info("torchslim pass %s: %d rewrites", name, done)
            if self.names:
                graph.lint()
            if self.then is not None:
                self.then(graph)

        def uuid(self) -> Any:
            then = self.then.uuid() if hasattr(self.then, "uuid") else self.then
            return (get_hash_for_files((__file__,)), self.names, then)

    return TorchslimPasses


def _pass_names(passes: Iterable[str] | None, what: str = "options['passes']") -> tuple[str, ...]:
    if passes is None:
        return (*GRAPH_PASSES, *PASSES)
    if isinstance(passes, str):
        raise TypeError(f"{what} must be a list of pass names, got the string {passes!r}")
    names = tuple(passes)
    unknown = [n for n in names if n not in PASSES and n not in GRAPH_PASSES]
    if unknown:
        known = sorted([*GRAPH_PASSES, *PASSES])
        raise ValueError(f"{what}: unknown pass {unknown}; known: {known}")
    return names


def backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable:
    """torch.compile backend: torchslim's passes (see the module docstring), then Inductor."""
    import torch._inductor
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    names = _pass_names(options.pop("passes", None))
    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    for key in options:
        if not hasattr(inductor_config, key):
            raise ValueError(
                f"options: {key!r} is neither a torchslim option ('passes') nor an Inductor "
                "config option"
            )
    if options.get("freezing") and not inductor_config.freezing:
        raise ValueError(
            "options['freezing'] comes after Dynamo has traced the parameters as inputs; set "
            "torch._inductor.config.freezing = True before calling torch.compile instead"
        )
    patches.update(options)
    for name in names:
        if name in GRAPH_PASSES:
            done = GRAPH_PASSES[name](gm)
            if done:
                counters[name] += done
                log.info("torchslim pass %s: %d rewrites", name, done)
    passes_cls = _pass_class()
    previous = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
    patches["post_grad_custom_pre_pass"] = passes_cls(names, previous)
    return compile_fx(gm, example_inputs, config_patches=patches)


@functools.cache
def register() -> None:
    """Makes ``torch.compile(..., backend="torchslim")`` work in this process (run on import).

    An installed torchslim is found by torch through its ``torch_dynamo_backends`` entry point,
    which costs nothing until it is used; registering it here as well would make torch's lookup
    fail with a duplicate name when it loads the entry point. So only a torchslim that is not
    installed (a source tree on sys.path) registers here, at the price of importing torch._dynamo.
    """
    from importlib.metadata import entry_points

    if entry_points(group="torch_dynamo_backends", name=BACKEND_NAME):
        return
    import torch._dynamo

    if BACKEND_NAME not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(backend, name=BACKEND_NAME)
