"""torchslim.sparse.prune: the selection rules against a loop reference, wanda, model handling,
bad input, and Wanda beating magnitude on a real small LM."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from torchslim.sparse.patterns import check_pattern, nm_group_counts
from torchslim.sparse.prune import fold_torch_prune, prune_, sparsity

SHAPES = [(7, 13), (16, 64), (65, 257)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def _skewed_norms(k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(3.0 * torch.randn(k, generator=gen))  # spans orders of magnitude


def _scores(w, norms=None):
    """The spec's fp32 scores as nested lists; already-zero weights rank at -1."""
    s = w.float().abs()
    if norms is not None:
        s = s * norms.float()
    return s.masked_fill(w == 0, -1.0).tolist()


def _round(x):
    """The spec's round(): halves up (Python's round() sends 6.5 to 6)."""
    return math.floor(x + 0.5)


def _keep_best(items, keep):
    """Indices of the ``keep`` best of [(rank, index)]; ties to the lower index."""
    return {i for _, i in sorted(items, key=lambda t: (-t[0], t[1]))[:keep]}


def ref_nm(w, n, m, norms=None):
    s = _scores(w, norms)
    keep = torch.zeros(w.shape, dtype=torch.bool)
    for r, row in enumerate(s):
        for start in range(0, len(row), m):
            for j in _keep_best([(row[j], j) for j in range(start, min(start + m, len(row)))], n):
                keep[r, j] = True
    return keep


def ref_block(w, rows, cols, fraction, norms=None):
    """Blocks tiled from (0, 0), cut off at the edges; per block-row keep the best blocks."""
    s = _scores(w, norms)
    n, k = w.shape
    k_blocks = math.ceil(k / cols)
    pruned = _round(fraction * k_blocks)
    keep = torch.zeros(w.shape, dtype=torch.bool)
    for r0 in range(0, n, rows):
        items = []
        for b in range(k_blocks):
            cells = [(i, j) for i in range(r0, min(r0 + rows, n)) for j in range(b * cols, k)]
            cells = [(i, j) for i, j in cells if j < (b + 1) * cols]
            total = sum(max(s[i][j], 0.0) for i, j in cells)
            empty = all(s[i][j] < 0 for i, j in cells)
            items.append((-1.0 if empty else total, b, cells))
        best = _keep_best([(rank, b) for rank, b, _ in items], k_blocks - pruned)
        for _, b, cells in items:
            for i, j in cells:
                keep[i, j] = b in best
    return keep


def _assert_pruned_to(pruned, original, keep):
    """Kept weights are bitwise unchanged, the others are exactly 0."""
    want = torch.where(keep, original, torch.zeros_like(original))
    assert torch.equal(pruned, want), f"{int(pruned.ne(want).sum())} of {want.numel()} differ"


# --- the selection rules ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_keeps_top_n_per_group(shape, pattern, dtype):
    n, m = (int(v) for v in pattern.split(":"))
    w = _weight(shape, dtype)
    out = prune_(w.clone(), pattern, progress=False)
    _assert_pruned_to(out, w, ref_nm(w, n, m))
    k = shape[1]
    want = torch.full((shape[0], math.ceil(k / m)), n)
    want[:, -1] = min(n, k - (math.ceil(k / m) - 1) * m)  # the short last group
    assert torch.equal(nm_group_counts(out, m), want)
    check_pattern(out, pattern)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unstructured_prunes_lowest_per_row(shape, fraction, dtype):
    w = _weight(shape, dtype, seed=2)
    out = prune_(w.clone(), "unstructured", fraction, progress=False)
    _assert_pruned_to(out, w, ref_block(w, 1, 1, fraction))
    zeros_per_row = (out == 0).sum(dim=1)
    assert torch.equal(zeros_per_row, torch.full((shape[0],), _round(fraction * shape[1])))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", ["4x4", "1x16", (2, 3), "8x1"])
@pytest.mark.parametrize("fraction", [0.25, 0.6])
def test_block_prunes_lowest_blocks_per_block_row(shape, pattern, fraction):
    w = _weight(shape, seed=3)
    out = prune_(w.clone(), pattern, fraction, progress=False)
    rows, cols = pattern if isinstance(pattern, tuple) else map(int, pattern.split("x"))
    keep = ref_block(w, rows, cols, fraction)
    _assert_pruned_to(out, w, keep)
    # Whole blocks go: every block is all zero or all kept, and each block-row lost its share.
    k_blocks = math.ceil(shape[1] / cols)
    for r0 in range(0, shape[0], rows):
        zero_blocks = 0
        for b in range(k_blocks):
            block = out[r0 : r0 + rows, b * cols : (b + 1) * cols]
            assert bool((block == 0).all()) or bool((block != 0).all())
            zero_blocks += bool((block == 0).all())
        assert zero_blocks == _round(fraction * k_blocks)


def test_ties_keep_the_lower_index():
    w = torch.tensor([[0.5, -0.5, 0.5, 0.5, 0.25, -0.25, 0.25]])
    assert prune_(w.clone(), "2:4").tolist() == [[0.5, -0.5, 0, 0, 0.25, -0.25, 0]]
    assert prune_(w.clone(), "unstructured", 0.5).tolist() == [[0.5, -0.5, 0.5, 0, 0, 0, 0]]


@pytest.mark.parametrize(
    ("pattern", "fraction"), [("2:4", None), ("unstructured", 0.5), ("4x4", 0.5), ("1x8", 0.7)]
)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_repruning_is_idempotent(pattern, fraction, method):
    w = _weight((33, 70), seed=4)
    norms = _skewed_norms(70) if method == "wanda" else None
    once = prune_(w.clone(), pattern, fraction, method, norms)
    twice = prune_(once.clone(), pattern, fraction, method, norms)
    assert torch.equal(once, twice)
    assert sparsity(once) > 0.3


def test_existing_zeros_are_pruned_first_and_kept():
    w = _weight((9, 40), seed=5)
    gen = torch.Generator().manual_seed(6)
    w[torch.rand(w.shape, generator=gen) < 0.2] = 0.0  # some large weights are zero already
    zeros = w == 0
    out = prune_(w.clone(), "unstructured", 0.5)
    assert bool((out[zeros] == 0).all())
    _assert_pruned_to(out, w, ref_block(w, 1, 1, 0.5))
    more = prune_(out.clone(), "unstructured", 0.75)  # pruning further keeps the old zeros
    assert bool((more[out == 0] == 0).all())
    assert torch.equal((more == 0).sum(dim=1), torch.full((9,), 30))


# --- wanda ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "fraction"), [("2:4", None), ("unstructured", 0.5)])
def test_wanda_ranks_by_weight_times_input_norm(pattern, fraction):
    w = _weight((24, 96), seed=7)
    norms = _skewed_norms(96)
    wanda = prune_(w.clone(), pattern, fraction, "wanda", norms)
    magnitude = prune_(w.clone(), pattern, fraction)
    keep = ref_nm(w, 2, 4, norms) if pattern == "2:4" else ref_block(w, 1, 1, fraction, norms)
    _assert_pruned_to(wanda, w, keep)
    changed = int(((wanda == 0) != (magnitude == 0)).sum())
    assert changed > w.numel() // 10, changed  # skewed norms move many choices


def test_zero_weights_rank_below_weights_on_dead_inputs():
    """A nonzero weight on an input that never fires scores 0 like a zero weight, but an
    already-zero weight is pruned first (the lower-index tie rule would keep it)."""
    w = _weight((3, 8), seed=13).abs() + 0.1
    w[:, [0, 3]] = 0.0
    norms = _skewed_norms(8)
    norms[[1, 2]] = 0.0  # dead inputs 1 and 2
    out = prune_(w.clone(), "2:4", method="wanda", calibration=norms)
    assert torch.equal(out[:, :4] != 0, torch.tensor([[False, True, True, False]] * 3))
    _assert_pruned_to(out, w, ref_nm(w, 2, 4, norms))
    # Blocks of 1x2: (0, 1) holds only zeros (-> -1) against (2, 3) on a dead input (score 0).
    w[:, 1] = 0.0
    out = prune_(w.clone(), "1x2", 0.25, method="wanda", calibration=norms)
    assert torch.equal(out[:, 2:], w[:, 2:]) and bool((out[:, :2] == 0).all())
    _assert_pruned_to(out, w, ref_block(w, 1, 2, 0.25, norms))


def test_wanda_activations_equal_their_norms():
    w = _weight((10, 48), seed=8)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(9)) * _skewed_norms(48)
    norms = x.double().reshape(-1, 48).norm(dim=0).float()
    by_x = prune_(w.clone(), "unstructured", 0.6, "wanda", x)
    by_norms = prune_(w.clone(), "unstructured", 0.6, "wanda", norms)
    assert torch.equal(by_x, by_norms)
    assert not torch.equal(by_x, prune_(w.clone(), "unstructured", 0.6))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 24)
        self.head = nn.Linear(24, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def _net(seed=10):
    torch.manual_seed(seed)
    return _Net()


def test_wanda_on_a_model_uses_each_layers_inputs():
    net = _net()
    gen = torch.Generator().manual_seed(11)
    skew = _skewed_norms(32)
    batches = [torch.randn(4, 7, 32, generator=gen) * skew for _ in range(3)]
    # The reference: each layer's inputs captured by hand, then the weight-tensor form.
    want = copy.deepcopy(net)
    inputs = {name: [] for name in ("up", "down", "head")}
    for name in inputs:
        getattr(net, name).register_forward_hook(
            lambda _m, args, _o, name=name: inputs[name].append(
                args[0].reshape(-1, args[0].shape[-1])
            )
        )
    with torch.no_grad():
        for batch in batches:
            net(batch)
    for name, xs in inputs.items():
        prune_(getattr(want, name).weight, "2:4", method="wanda", calibration=torch.cat(xs))
    for calibration in (batches, [{"x": b} for b in batches], lambda m: [m(b) for b in batches]):
        got = _net()
        prune_(
            got, "2:4", method="wanda", calibration=calibration, exclude="unused", progress=False
        )
        for name in inputs:
            assert torch.equal(getattr(got, name).weight, getattr(want, name).weight), name
        assert torch.equal(got.unused.weight, _net().unused.weight)  # excluded: untouched


def test_wanda_layer_without_data_is_named_and_nothing_changes():
    net = _net()
    torch_prune.l1_unstructured(net.up, "weight", amount=0.3)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="'unused' saw no calibration data"):
        prune_(net, "2:4", method="wanda", calibration=[torch.randn(2, 32)], progress=False)
    assert hasattr(net.up, "weight_mask")  # not folded: the error came first
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- models: selection, torch.nn.utils.prune, progress ------------------------------------------


def _changed(before, after):
    return {
        name
        for name, m in after.named_modules()
        if isinstance(m, nn.Linear) and not torch.equal(m.weight, before.get_submodule(name).weight)
    }


@pytest.mark.parametrize(
    ("kwargs", "want"),
    [
        ({}, {"up", "down", "head", "unused"}),
        ({"exclude": "head"}, {"up", "down", "unused"}),
        ({"include": ["up", "d*"]}, {"up", "down"}),
        ({"include": r"(up|head)", "exclude": "head"}, {"up"}),
        ({"filter_fn": lambda name, m: m.in_features >= 32}, {"up", "down"}),
    ],
)
def test_include_exclude_filter_select_layers(kwargs, want):
    base = _net()
    model = prune_(copy.deepcopy(base), "2:4", progress=False, **kwargs)
    assert _changed(base, model) == want
    for name in want:
        check_pattern(model.get_submodule(name).weight, "2:4")


def test_shared_layer_is_pruned_only_when_every_name_is_selected():
    shared = nn.Linear(16, 16)
    model = nn.ModuleDict({"a": shared, "b": shared, "c": nn.Linear(16, 16)})
    before = copy.deepcopy(model)
    prune_(model, "2:4", exclude="b", progress=False)
    assert torch.equal(model["a"].weight, before["a"].weight)
    assert not torch.equal(model["c"].weight, before["c"].weight)
    prune_(model, "2:4", include=["b", "c"], progress=False)  # "a" is not included
    assert torch.equal(model["a"].weight, before["a"].weight)
    prune_(model, "2:4", include=["a", "b"], progress=False)
    assert sparsity(shared.weight) == 0.5


class _TiedHead(nn.Module):
    """An output head holding the input embeddings' weight, as many language models do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_a_weight_held_outside_the_selection_is_an_error_and_nothing_changes():
    model = _TiedHead()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"'head' is also 'embed.weight'.*Exclude 'head'"):
        prune_(model, "2:4", progress=False)
    pairs = zip(model.parameters(), before.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    prune_(model, "2:4", exclude="head", progress=False)
    assert torch.equal(model.embed.weight, before.embed.weight)
    assert sparsity(model.body.weight) == 0.5

    # Two linears sharing one weight parameter, one of them left out.
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    b.weight = a.weight
    pair = nn.ModuleDict({"a": a, "b": b})
    with pytest.raises(ValueError, match=r"'a' is also 'b.weight'"):
        prune_(pair, "2:4", exclude="b", progress=False)
    prune_(pair, "2:4", progress=False)  # both selected: pruned once
    assert sparsity(b.weight) == 0.5


def test_a_linear_itself_and_a_parameter():
    linear = nn.Linear(20, 6)
    w = linear.weight.detach().clone()
    assert prune_(linear, "unstructured", 0.25, progress=False) is linear
    _assert_pruned_to(linear.weight.detach(), w, ref_block(w, 1, 1, 0.25))
    param = nn.Linear(20, 6).weight  # an nn.Parameter that requires grad
    assert prune_(param, "2:4") is param
    assert param.requires_grad and sparsity(param) == 0.5


def test_torch_prune_masks_are_folded_and_kept():
    model = _net()
    torch_prune.random_unstructured(model.up, "weight", amount=0.3)
    torch_prune.l1_unstructured(model.down, "weight", amount=0.6)
    old_zeros = {name: getattr(model, name).weight == 0 for name in ("up", "down")}
    assert not fold_torch_prune(model.head)
    prune_(model, "2:4", progress=False)
    for name, zeros in old_zeros.items():
        layer = getattr(model, name)
        assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")
        assert isinstance(layer.weight, nn.Parameter)
        assert bool((layer.weight[zeros] == 0).all())
        check_pattern(layer.weight, "2:4")
    # 60% of down was zero already: many groups keep fewer than 2 (l1 pruned them).
    assert sparsity(model.down.weight) > 0.6
    layer = nn.Linear(8, 4)
    torch_prune.random_unstructured(layer, "weight", amount=0.5)
    assert fold_torch_prune(layer) and not fold_torch_prune(layer)
    assert sparsity(layer.weight) == 0.5


def test_progress_bars_only_when_asked(capsys):
    batches = [torch.randn(2, 32)]
    prune_(_net(), "2:4", None, "wanda", batches, exclude="unused", progress=False)
    assert capsys.readouterr().err == ""
    prune_(_net(), "2:4", None, "wanda", batches, exclude="unused", progress=True)
    err = capsys.readouterr().err
    assert "prune 2:4" in err and "calibrate" in err


def test_sparsity():
    w = _weight((5, 8), seed=12)
    assert sparsity(w) == 0.0
    w[0, :3] = 0.0
    w[4, 7] = -0.0
    assert sparsity(w) == 4 / 40
    assert sparsity(torch.empty(0, 3)) == 0.0
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor, got list"):
        sparsity([0.0, 1.0])


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((), {"method": "sparsegpt"}, ValueError, "method must be 'magnitude' or 'wanda', got 'sp"),
        (("unstructured",), {"sparsity": 0}, ValueError, r"sparsity must be in \(0, 1\), got 0"),
        (("unstructured", 1.2), {}, ValueError, r"sparsity must be in \(0, 1\), got 1.2"),
        (("4x4", -0.1), {}, ValueError, r"sparsity must be in \(0, 1\), got -0.1"),
        (("unstructured", "0.5"), {}, TypeError, "sparsity must be a float, got str"),
        (("unstructured",), {}, ValueError, "sparsity is required for pattern unstructured"),
        (("2:4", 0.7), {}, ValueError, "sparsity must be 0.5 .* for pattern 2:4, got 0.7"),
        (("2-4",), {}, ValueError, "pattern must be '2:4' .* got '2-4'"),
        (("4:2",), {}, ValueError, "0 < n < m, got '4:2'"),
        ((3,), {}, TypeError, "pattern must be a string"),
        ((), {"calibration": [torch.randn(2, 32)]}, ValueError, "calibration is only used by"),
        ((), {"method": "wanda"}, ValueError, "needs calibration data, got calibration=None"),
        ((), {"include": "nothing"}, ValueError, "selected no nn.Linear .*include='nothing'"),
        ((), {"include": [""]}, TypeError, "include must be a name pattern"),
        ((), {"exclude": [3]}, TypeError, "exclude must be a name pattern .* got 3"),
        ((), {"filter_fn": "up"}, TypeError, "filter_fn must be callable, got str"),
    ],
)
def test_bad_arguments_on_a_model(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        prune_(_net(), *args, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("target", "kwargs", "error", "match"),
    [
        (torch.randn(16), {}, ValueError, r"target must be 2-D \(N, K\), got shape \(16,\)"),
        (torch.randint(0, 9, (4, 8)), {}, TypeError, "target must be floating point .*int64"),
        ([[1.0, 2.0]], {}, TypeError, "target must be a torch.nn.Module or a 2-D weight .*list"),
        (nn.ReLU(), {}, ValueError, "selected no nn.Linear in the ReLU"),
        (torch.randn(4, 8), {"exclude": "x"}, TypeError, "exclude selects layers of a module"),
        (
            torch.randn(4, 8),
            {"method": "wanda", "calibration": torch.rand(7)},
            ValueError,
            r"calibration must have K=8 input features .* got shape \(7,\)",
        ),
        (
            torch.randn(4, 8),
            {"method": "wanda", "calibration": torch.full((2, 8), float("nan"))},
            ValueError,
            "calibration activations must be finite",
        ),
        (
            torch.randn(4, 8),
            {"method": "wanda", "calibration": torch.randn(0, 8)},
            ValueError,
            r"calibration activations are empty: shape \(0, 8\)",
        ),
        (
            torch.randn(4, 8),
            {"method": "wanda", "calibration": -torch.rand(8)},
            ValueError,
            "must be finite and >= 0",
        ),
        (
            torch.randn(4, 8),
            {"method": "wanda", "calibration": [1.0] * 8},
            TypeError,
            "calibration for a weight tensor must be a floating point tensor",
        ),
        (
            _net(),
            {"method": "wanda", "calibration": torch.randn(2, 32)},
            TypeError,
            r"wrap one batch in a list",
        ),
        (
            _net(),
            {"method": "wanda", "calibration": ["text"]},
            TypeError,
            "calibration must yield tensors or dicts of model inputs, got str",
        ),
    ],
)
def test_bad_targets_and_calibration(target, kwargs, error, match):
    with pytest.raises(error, match=match):
        prune_(target, "2:4", progress=False, **kwargs)


def test_the_weight_of_a_torch_pruned_layer_is_refused_as_a_tensor():
    layer = nn.Linear(8, 8)
    torch_prune.l1_unstructured(layer, "weight", 0.3)
    with pytest.raises(ValueError, match="target is computed from other tensors"):
        prune_(layer.weight, "2:4")
    prune_(layer, "2:4", progress=False)  # the module: folded, then pruned
    assert sparsity(layer.weight) >= 0.5


def test_fp64_weights_are_ranked_in_fp64():
    w = torch.tensor([[1e-50, 2e-50, 3e-50, 4e-50]], dtype=torch.float64)  # 0 in fp32
    assert prune_(w, "2:4").tolist() == [[0.0, 0.0, 3e-50, 4e-50]]


def test_a_pattern_made_by_hand_is_checked():
    from torchslim.sparse.patterns import Pattern

    for kwargs in ({"n": 2, "m": 0}, {"n": 5, "m": 4}):
        with pytest.raises(ValueError, match="an n:m Pattern must have ints 0 < n < m"):
            Pattern("n:m", **kwargs)
    with pytest.raises(ValueError, match=r"block \(R, C\) >= 1"):
        Pattern("block", block=(0, 4))
    with pytest.raises(ValueError, match="Pattern kind must be"):
        Pattern("foo")


def test_bad_layer_weight_is_named():
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match="layer '0' weight is on the meta device"):
        prune_(model, "2:4", progress=False)


# --- a real small LM --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    demo = pytest.importorskip("torchslim.demo")
    try:
        path = demo.default_model_path()
    except FileNotFoundError as exc:  # CI installs it; elsewhere say how
        pytest.skip(str(exc))
    model, tokenizer = demo.load_model(path)
    return demo, model, tokenizer, demo.eval_ids(tokenizer, 512)


@pytest.mark.parametrize(("pattern", "fraction"), [("unstructured", 0.5), ("2:4", None)])
def test_wanda_beats_magnitude_on_smollm2(smollm2, pattern, fraction):
    """SmolLM2-135M, every decoder-layer linear (the tied lm_head excluded) pruned to 50%."""
    demo, base, tokenizer, ids = smollm2
    calibration = demo.calibration_batches(tokenizer)
    ppl = {"dense": demo.perplexity(base, ids)}
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(base)
        data = calibration if method == "wanda" else None
        prune_(model, pattern, fraction, method, data, exclude="lm_head", progress=False)
        pruned = [m for name, m in model.named_modules() if name.endswith("proj")]
        assert len(pruned) == 30 * 7
        assert all(abs(sparsity(m.weight) - 0.5) < 1e-3 for m in pruned)
        assert torch.equal(model.lm_head.weight, base.lm_head.weight)
        ppl[method] = demo.perplexity(model, ids)
    report = ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
    assert 2.0 < ppl["dense"] < 100.0, report
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"], report
