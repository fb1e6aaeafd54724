"""Pruning: zero the least important weights of a model's linears, in place, to a pattern.

A weight W is (N, K): one row per output feature, K the reduction (input-feature) dim. Each
weight gets a score, and the lowest-scoring weights (or blocks) of each comparison group are
set to exactly 0:

    magnitude   S_ij = |W_ij|
    wanda       S_ij = |W_ij| * ||X_j||_2,  X_j = input feature j over every calibration token
                (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
                Models"): a small weight on a loud input channel can matter more than a large
                weight on a quiet one.

Scores are computed in fp32 whatever the weight's dtype. A weight that is already 0 has score
0 and ranks below every nonzero weight, so it is pruned first: pruning a pruned weight again
to the same pattern and sparsity changes nothing, and pruning further keeps the old zeros.
Among equal scores the lower index along K (or the lower block) is kept. Per pattern
(see torchslim.sparse.patterns):

    "n:m"           in every group of m consecutive weights along K keep the n with the largest
                    score. When K % m != 0 the last group is the K % m weights left and keeps
                    min(n, K % m) of them. The sparsity is fixed: 1 - n/m.
    "unstructured"  per output row (Wanda's comparison group; it also gives every row the same
                    number of nonzeros, which balances the kernels' work per row) prune the
                    round(sparsity * K) lowest-scoring weights.
    "RxC" blocks    tile W into R x C blocks from (0, 0); a block's score is the sum of its
                    weights' scores (a block of zeros ranks below every block with a nonzero).
                    Blocks cut off by N or K keep the weights they have and are scored as they
                    are (so they tend to go first). Per block-row (R rows of W) prune the
                    round(sparsity * ceil(K / C)) lowest blocks. With K % C != 0 the fraction of
                    zero weights can differ slightly from ``sparsity``.

round() rounds halves up. ``prune_`` takes a module (every selected nn.Linear's ``weight``) or
one 2-D weight tensor. Wanda's input norms come from one pass of the calibration data through
the unpruned model (the paper re-collects the inputs of each decoder block after pruning the
blocks before it; this one-pass variant needs no knowledge of the model's structure).

    prune_(model, "2:4", exclude="lm_head")
    prune_(model, "unstructured", sparsity=0.5, method="wanda", calibration=batches)
    prune_(linear.weight, "4x4", sparsity=0.75)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from tqdm.auto import tqdm

from torchslim._calibration import watch_inputs
from torchslim._names import as_patterns, name_matches
from torchslim.sparse.patterns import Pattern, parse_pattern, resolve_sparsity

__all__ = ["METHODS", "fold_torch_prune", "prune_", "sparsity"]

METHODS = ("magnitude", "wanda")


def sparsity(weight: torch.Tensor) -> float:
    """The fraction of ``weight``'s elements that are exactly 0 (0.0 for an empty tensor).

    Args:
        weight: any shape and dtype.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.numel() == 0:
        return 0.0
    return int((weight == 0).sum()) / weight.numel()


def fold_torch_prune(module: nn.Module) -> bool:
    """Makes a torch.nn.utils.prune mask on ``module.weight`` permanent, in place.

    A module pruned with torch.nn.utils.prune holds ``weight_orig`` (parameter) and
    ``weight_mask`` (buffer) and recomputes ``weight`` before each forward. This calls
    ``torch.nn.utils.prune.remove(module, "weight")``: ``weight`` becomes a plain parameter
    equal to weight_orig * weight_mask, so the pruned weights are stored as zeros.

    Returns:
        True when it folded a mask, False when ``module.weight`` carried none.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not (hasattr(module, "weight_orig") and hasattr(module, "weight_mask")):
        return False
    torch_prune.remove(module, "weight")
    return True


def prune_(
    target: nn.Module | torch.Tensor,
    pattern: str | tuple[int, int] | Pattern = "2:4",
    sparsity: float | None = None,
    method: str = "magnitude",
    calibration: Iterable | Callable[[nn.Module], object] | torch.Tensor | None = None,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    progress: bool = True,
) -> nn.Module | torch.Tensor:
    """Prunes ``target`` in place to ``pattern`` (see the module docstring for the rules).

    Args:
        target: an nn.Module, whose selected nn.Linear layers (subclasses included; the model
            itself too when it is one) get their ``weight`` pruned; or one weight, a 2-D
            (N, K) fp32/bf16/fp16 tensor or nn.Parameter (e.g. ``linear.weight``).
        pattern: "2:4" (any "n:m"), "unstructured", a block "RxC" such as "1x16" or "4x4",
            or (R, C).
        sparsity: the fraction to prune, a float in (0, 1); required for "unstructured" and
            blocks, fixed to 1 - n/m by "n:m" (None or that value).
        method: "magnitude" (score |W|) or "wanda" (score |W| * ||X||_2 per input feature).
        calibration: "wanda" only (an error with "magnitude"). For a module: an iterable of
            model inputs (a tensor runs model(t), a dict runs model(**d)) or a callable run as
            calibration(model); every selected layer must see some data. For a weight tensor:
            a 1-D (K,) tensor is the per-input-feature norm ||X_j||_2 (finite, >= 0), and an
            (..., K) tensor of 2 or more dims is the layer's input activations, whose norms
            are taken over all leading dims.
        include: names (exact, glob or regex) of the layers to prune; default all. Module only.
        exclude: names (exact, glob or regex) of layers to leave alone, e.g. "lm_head".
        filter_fn: called as filter_fn(name, module); a layer is pruned only if it returns True.
            A layer reachable under several names is pruned only when every one of them is
            selected (included, not excluded and passing filter_fn), as torchslim.patch does.
            A selected layer whose weight is also held elsewhere (an input embedding tied to
            the output head, a layer left out) is an error: pruning it would prune the other.
        progress: show progress bars over the calibration batches and the layers.

    Returns:
        ``target`` itself. Its pruned weights are exactly 0; the others are unchanged. Layers
        pruned earlier with torch.nn.utils.prune are folded first (see fold_torch_prune), so
        their zeros are kept and pruning continues from them.
    """
    if method not in METHODS:
        raise ValueError(f"method must be 'magnitude' or 'wanda', got {method!r}")
    parsed = parse_pattern(pattern)
    fraction = resolve_sparsity(parsed, sparsity)
    if method == "magnitude" and calibration is not None:
        raise ValueError(
            "calibration is only used by method='wanda'; got calibration with method='magnitude'"
        )
    if method == "wanda" and calibration is None:
        raise ValueError("method='wanda' needs calibration data, got calibration=None")

    if isinstance(target, torch.Tensor):
        for arg, value in (("include", include), ("exclude", exclude), ("filter_fn", filter_fn)):
            if value is not None:
                raise TypeError(f"{arg} selects layers of a module; target is a tensor")
        _check_weight(target, "target")
        if target.grad_fn is not None:
            raise ValueError(
                "target is computed from other tensors (the weight of a layer pruned with "
                "torch.nn.utils.prune, say), so pruning it in place would not last: pass the "
                "module, whose pruning is folded first"
            )
        norms = None if calibration is None else _tensor_norms(calibration, target.shape[1])
        _prune_weight(target, norms, parsed, fraction)
        return target
    if not isinstance(target, nn.Module):
        raise TypeError(
            f"target must be a torch.nn.Module or a 2-D weight tensor, got {type(target).__name__}"
        )

    includes = as_patterns(include, "include")
    excludes = as_patterns(exclude, "exclude")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable, got {type(filter_fn).__name__}")
    layers = _select_linears(target, includes, excludes, filter_fn)
    if not layers:
        raise ValueError(
            f"prune_ selected no nn.Linear in the {type(target).__name__} "
            f"(include={include!r}, exclude={exclude!r}, filter_fn={filter_fn!r})"
        )
    for name, layer in layers:
        _check_weight(layer.weight, f"layer {name!r} weight")
    shared = shared_weights(target, [layer for _, layer in layers])
    if shared:
        name, layer = next((name, layer) for name, layer in layers if id(layer) in shared)
        other = shared[id(layer)]
        raise ValueError(
            f"the weight of layer {name!r} is also {other!r}, which is not selected: pruning it "
            f"would prune {other!r} too (tied weights, say). Exclude {name!r}, or select every "
            "layer that holds the weight"
        )

    norms = {}
    if method == "wanda":
        sums = _input_square_sums(target, layers, calibration, progress)
        for name, layer in layers:
            if id(layer) not in sums:
                raise ValueError(
                    f"layer {name!r} saw no calibration data (it never ran, or only on empty "
                    "inputs)"
                )
            norms[id(layer)] = sums[id(layer)].sqrt().float()

    # Nothing changes before every check has passed; then torch.nn.utils.prune masks are
    # folded so that their zeros are part of the weights ranked below.
    for _name, layer in layers:
        fold_torch_prune(layer)
    done: set[int] = set()  # weights shared by several layers are pruned once
    for _name, layer in tqdm(layers, desc=f"prune {parsed}", disable=not progress):
        if id(layer.weight) not in done:
            done.add(id(layer.weight))
            _prune_weight(layer.weight, norms.get(id(layer)), parsed, fraction)
    return target


def _check_weight(weight: torch.Tensor, name: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point (fp32/bf16/fp16), got {weight.dtype}")
    if weight.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: there are no values to prune")


def _tensor_norms(calibration: object, k: int) -> torch.Tensor:
    """||X_j||_2 (K,) fp32 from a weight tensor's calibration (norms or activations)."""
    if not isinstance(calibration, torch.Tensor) or not calibration.is_floating_point():
        raise TypeError(
            "calibration for a weight tensor must be a floating point tensor: the input norms "
            f"(K,) or activations (..., K), got {getattr(calibration, 'dtype', type(calibration))}"
        )
    if calibration.shape[-1:] != (k,):
        raise ValueError(
            f"calibration must have K={k} input features in its last dim, got shape "
            f"{tuple(calibration.shape)}"
        )
    if calibration.dim() >= 2:
        if calibration.numel() == 0:
            raise ValueError(f"calibration activations are empty: shape {tuple(calibration.shape)}")
        if not bool(torch.isfinite(calibration).all()):
            raise ValueError("calibration activations must be finite; they hold NaN or inf")
        return calibration.detach().reshape(-1, k).double().square().sum(0).sqrt().float()
    if not bool(torch.isfinite(calibration).all()) or bool((calibration < 0).any()):
        raise ValueError("calibration as input norms (K,) must be finite and >= 0")
    return calibration.detach().float()


def _select_linears(
    model: nn.Module,
    includes: list[str],
    excludes: list[str],
    filter_fn: Callable[[str, nn.Module], bool] | None,
) -> list[tuple[str, nn.Linear]]:
    """(first name, layer) of each selected nn.Linear, once each, in module order."""
    names: dict[int, list[str]] = {}
    layers: dict[int, nn.Linear] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            names.setdefault(id(module), []).append(name)
            layers[id(module)] = module

    def selected(name: str, module: nn.Module) -> bool:
        if includes and not any(name_matches(name, p) for p in includes):
            return False
        return filter_fn is None or bool(filter_fn(name, module))

    return [
        (names[key][0], layer)
        for key, layer in layers.items()
        if not any(name_matches(n, p) for n in names[key] for p in excludes)
        and all(selected(n, layer) for n in names[key])
    ]


def _pruned_parameter(layer: nn.Module) -> torch.Tensor:
    """The parameter that pruning ``layer`` changes (weight_orig under torch.nn.utils.prune)."""
    return getattr(layer, "weight_orig", layer.weight)


def shared_weights(model: nn.Module, layers: Iterable[nn.Module]) -> dict[int, str]:
    """Of ``layers`` (linears of ``model``), those whose weight ``model`` also holds elsewhere
    (a parameter or buffer of another module, or of a layer not in ``layers``), by id, each
    with one such other name. Pruning one of them in place would change that other tensor."""
    layers = list(layers)
    ours = {id(_pruned_parameter(layer)): id(layer) for layer in layers}
    ids = {id(layer) for layer in layers}
    own_names = {
        f"{name}.{attr}" if name else attr
        for name, module in model.named_modules(remove_duplicate=False)
        if id(module) in ids
        for attr in ("weight", "weight_orig")
    }
    tensors = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    out: dict[int, str] = {}
    for name, tensor in tensors:
        if id(tensor) in ours and name not in own_names:
            out.setdefault(ours[id(tensor)], name)
    return out


def _input_square_sums(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    calibration: Iterable | Callable[[nn.Module], object],
    progress: bool,
) -> dict[int, torch.Tensor]:
    """Runs the calibration data through ``model``; per layer (by id) the sum over all its
    input tokens of x_j^2: (K,) float64. Layers that never ran are missing."""
    sums: dict[int, torch.Tensor] = {}

    def collect(module, x):
        sq = x.reshape(-1, x.shape[-1]).double().square().sum(0)
        key = id(module)
        sums[key] = sums[key] + sq if key in sums else sq

    watch_inputs(model, layers, collect, calibration, progress)
    return sums


def _n_pruned(fraction: float, total: int) -> int:
    """round(fraction * total), halves up."""
    return int(fraction * total + 0.5)


def _keep_top(rank: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask (..., L), True at the ``keep`` largest of ``rank`` (..., L) along the last
    dim; among equals the lower index wins."""
    mask = torch.zeros(rank.shape, dtype=torch.bool, device=rank.device)
    if keep > 0:
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
        mask.scatter_(-1, order[..., :keep], True)
    return mask


def _keep_mask(
    weight: torch.Tensor, norms: torch.Tensor | None, pattern: Pattern, fraction: float
) -> torch.Tensor:
    """Bool (N, K): True where ``weight`` (N, K) keeps its value.

    norms: None (magnitude) or ||X_j||_2 (K,) for wanda.
    """
    n_rows, k = weight.shape
    score = weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))
    if norms is not None:
        score = score * norms.to(score.device)
    nonzero = weight.detach() != 0
    if pattern.kind == "n:m":  # groups of m along K, padded with never-kept slots
        m = pattern.m
        rank = score.masked_fill(~nonzero, -1.0)
        rank = nn.functional.pad(rank, (0, -k % m), value=-float("inf"))
        keep = _keep_top(rank.reshape(n_rows, -1, m), pattern.n)
        return keep.reshape(n_rows, -1)[:, :k]
    # Unstructured is the 1x1 block: per block-row, rank the blocks by their summed score.
    rows, cols = pattern.block if pattern.kind == "block" else (1, 1)
    n_blocks, k_blocks = -(-n_rows // rows), -(-k // cols)
    pad = (0, k_blocks * cols - k, 0, n_blocks * rows - n_rows)

    def block_sums(x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, pad)  # zero padding: cut-off blocks count as they are
        return x.reshape(n_blocks, rows, k_blocks, cols).sum(dim=(1, 3))

    rank = block_sums(score).masked_fill(block_sums(nonzero.float()) == 0, -1.0)
    keep = _keep_top(rank, k_blocks - _n_pruned(fraction, k_blocks))
    keep = keep.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)
    return keep[:n_rows, :k]


def _prune_weight(
    weight: torch.Tensor, norms: torch.Tensor | None, pattern: Pattern, fraction: float
) -> None:
    """Zeroes, in place, the weights of ``weight`` (N, K) that ``pattern`` prunes.

    norms: None (magnitude) or ||X_j||_2 (K,) for wanda.
    """
    if weight.numel() == 0:
        return
    with torch.no_grad():
        weight.masked_fill_(~_keep_mask(weight, norms, pattern, fraction), 0)
