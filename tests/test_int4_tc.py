"""The int4 tc layout (tensor-core B fragments) and the CUDA C++ W4A16 kernel that reads it.

The layout's tests run everywhere: exact pack / unpack, and that every lane's 16 bytes hold
exactly the m16n8k16 B-fragment pairs the kernel extracts with ``(word >> 4s) & 0x000f000f``.
The kernel's tests need a GPU and the extension built with CUDA; elsewhere they are skipped and
the op runs the reference (checked here too).
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_BACKENDS, run_on
from torch import nn

from torchslim import _ext, ops
from torchslim import reference as ref
from torchslim.nn import Int4Linear
from torchslim.quant import quantize_int4
from torchslim.testing import M_FULL, check_close, nan_padded, sqnr

needs_cuda_kernel = pytest.mark.skipif(
    "cuda" not in KERNEL_BACKENDS, reason="needs a GPU and torchslim._C built with CUDA"
)

# (N, K, group sizes): N a multiple of 64, K of 16 (what the layout holds); groups of 16 up to
# per channel, K tiles that do not fill the prefetch depth, and one K with an odd tile count.
TC_NKG = (
    (64, 16, (16, -1)),
    (128, 96, (16, 32, 48, -1)),
    (192, 512, (64, 128, -1)),
    (320, 1040, (16, 80, -1)),
)


def _codes(n, k, gen):
    return torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize(("n", "k"), [(64, 16), (128, 96), (192, 1040)])
def test_tc_pack_unpack_are_exact_inverses(n, k, gen):
    codes = _codes(n, k, gen)
    packed_tc = ref.pack_int4_tc(codes)
    assert packed_tc.shape == (n // 64, k // 16 * 512) and packed_tc.dtype == torch.uint8
    assert torch.equal(ref.unpack_int4_tc(packed_tc), codes)
    raw = torch.randint(0, 256, (n // 64, k // 16 * 512), generator=gen, dtype=torch.uint8)
    assert torch.equal(ref.pack_int4_tc(ref.unpack_int4_tc(raw)), raw)
    plain = ref.pack_int4(codes)
    assert torch.equal(ref.plain_to_tc(plain), packed_tc)
    assert torch.equal(ref.tc_to_plain(packed_tc), plain)


def _b_fragment_position(lane: int, i: int) -> tuple[int, int]:
    """(k, n) of element b_i (i = 0..3) of lane ``lane`` in the B operand (16 x 8, "col") of
    mma.sync.aligned.m16n8k16 for f16 / bf16, from the PTX ISA's fragment table: with
    groupID = lane / 4 and tig = lane % 4, b0, b1 sit at k = 2 tig + (0, 1), b2, b3 at k + 8,
    all at n = groupID. Register r of the fragment holds b_2r in its low 16 bits and b_2r+1 in
    its high 16 bits."""
    return 2 * (lane % 4) + (i & 1) + (8 if i >= 2 else 0), lane // 4


def test_tc_lanes_hold_their_mma_fragments(gen):
    """Assembles, from every lane's 16 bytes, the B operands the kernel feeds to mma: for word
    i and S = 0..3 the pair (word >> 4S) & 0x000f000f goes to register S // 2 of n8 tile
    2i + S % 2 (int4_gemm.cu, dequant_pair). Placed by the PTX fragment table, every (k, n) of
    every 16 x 8 operand is filled exactly once, with the code of that weight."""
    n, k = 128, 64
    codes = _codes(n, k, gen)
    b = ref.pack_int4_tc(codes).to(torch.int64).reshape(n // 64, k // 16, 32, 4, 4)
    words = (b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24).tolist()
    for c in range(n // 64):
        for t in range(k // 16):
            operand = torch.full((8, 16, 8), -1, dtype=torch.int64)  # (n8 tile, k, n)
            for lane in range(32):
                for i in range(4):
                    for s in range(4):
                        pair = (words[c][t][lane][i] >> (4 * s)) & 0x000F000F
                        for half, value in enumerate((pair & 0xFFFF, pair >> 16)):
                            kk, nn = _b_fragment_position(lane, 2 * (s // 2) + half)
                            assert operand[2 * i + s % 2, kk, nn] == -1, "filled twice"
                            operand[2 * i + s % 2, kk, nn] = value
            want = codes[64 * c : 64 * c + 64, 16 * t : 16 * t + 16].reshape(8, 8, 16)
            assert torch.equal(operand, want.transpose(1, 2).to(torch.int64)), (c, t)


def test_tc_pack_rejects_bad_input(gen):
    with pytest.raises(ValueError, match="N divisible by 64 and K by 16"):
        ref.pack_int4_tc(_codes(65, 16, gen))
    with pytest.raises(ValueError, match="N divisible by 64 and K by 16"):
        ref.pack_int4_tc(_codes(64, 24, gen))
    with pytest.raises(TypeError, match="codes must be uint8"):
        ref.pack_int4_tc(_codes(64, 16, gen).to(torch.int32))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\]"):
        ref.pack_int4_tc(_codes(64, 16, gen) + 16)
    with pytest.raises(ValueError, match="packed_tc must be 2-D"):
        ref.unpack_int4_tc(torch.zeros(1, 500, dtype=torch.uint8))
    with pytest.raises(TypeError, match="packed_tc must be uint8"):
        ref.unpack_int4_tc(torch.zeros(1, 512, dtype=torch.int8))


def _layer(n, k, group_size, scale_dtype, gen, device="cpu"):
    w = torch.randn(n, k, generator=gen) / k**0.5
    packed, scales, zeros = quantize_int4(w, group_size, scale_dtype=scale_dtype)
    bias = torch.randn(n, generator=gen)
    tensors = (ref.plain_to_tc(packed), scales, zeros, bias, packed)
    return tuple(t.to(device) for t in tensors)


def test_tc_op_on_the_cpu_runs_the_reference_and_says_why(gen):
    packed_tc, scales, zeros, bias, packed = _layer(128, 96, 32, torch.bfloat16, gen)
    x = torch.randn(2, 3, 96, generator=gen)
    report = ops.explain(
        "int4_weight_only_linear_tc", x.reshape(6, 96), packed_tc, scales, zeros, 32
    )
    assert report["backend"] == "reference"
    (why,) = report["passed_over"]  # the extension's CUDA status, or "no kernel for cpu tensors"
    assert why.startswith("cuda: ")
    out = ops.int4_weight_only_linear_tc(x, packed_tc, scales, zeros, 32, bias)
    assert out.shape == (2, 3, 128)
    assert torch.equal(out, ref.int4_weight_only_linear(x, packed, scales, zeros, 32, bias))


def test_tc_opcheck(gen):
    packed_tc, scales, zeros, bias, _ = _layer(64, 48, 16, torch.float16, gen)
    x = torch.randn(5, 48, generator=gen)
    op = torch.ops.torchslim.int4_weight_only_linear_tc.default
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, (x, packed_tc, scales, zeros, 16, bias), test_utils=tests)
    one = (scales[:, :1].contiguous(), zeros[:, :1].contiguous())
    torch.library.opcheck(op, (x, packed_tc, *one, -1, None), test_utils=tests)


def _bad_inputs():
    x = torch.randn(4, 64)
    p = torch.randint(0, 256, (2, 4 * 512), dtype=torch.uint8)
    s = torch.rand(128, 2) + 0.1
    z = torch.full((128, 2), 8.0)
    f = ops.int4_weight_only_linear_tc
    return [
        ("K not a tile multiple", lambda: f(torch.randn(4, 40), p, s, z, -1), ValueError, "by 16"),
        ("group not dividing K", lambda: f(x, p, s, z, 48), ValueError, "group_size must be -1"),
        ("packed dtype", lambda: f(x, p.to(torch.int8), s, z, 32), TypeError, "packed_tc must be"),
        ("packed shape", lambda: f(x, p[:, :512], s, z, 32), ValueError, "packed_tc must have"),
        ("scales shape", lambda: f(x, p, s[:64], z, 32), ValueError, r"scales must have shape"),
        ("zeros dtype", lambda: f(x, p, s, z.half(), 32), TypeError, "zeros must have the dtype"),
        ("bias shape", lambda: f(x, p, s, z, 32, torch.randn(3)), ValueError, "bias must have"),
        ("group type", lambda: f(x, p, s, z, "32"), TypeError, "group_size"),
    ]


@pytest.mark.parametrize(("what", "call", "exc", "match"), _bad_inputs(), ids=lambda v: None)
def test_tc_bad_input_names_the_argument(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_int4_linear_repack_keeps_the_checkpoint_plain(gen):
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(nn.Linear(96, 128), group_size=16)
    plain_state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 5, 96, generator=gen)
    assert layer.repack("tc") is layer and layer.layout == "tc"
    assert layer.weight.shape == (2, 96 // 16 * 512)
    args = (plain_state["weight"], layer.weight_scales, layer.weight_zeros, 16, layer.bias)
    assert torch.equal(layer(x), ref.int4_weight_only_linear(x, *args))
    # the state_dict holds the plain layout; a tc module loads it into its own layout
    for key, value in layer.state_dict().items():
        assert torch.equal(value, plain_state[key]), key
    again = Int4Linear(96, 128, group_size=16).repack("tc")
    again.load_state_dict(plain_state)
    assert torch.equal(again.weight, layer.weight)
    assert torch.equal(layer.repack("plain").weight, plain_state["weight"])


def test_int4_linear_repack_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="layout must be one of"):
        Int4Linear(64, 64, group_size=32).repack("marlin")
    with pytest.raises(ValueError, match="out_features % 64 == 0"):
        Int4Linear(64, 96, group_size=32).repack("tc")
    with pytest.raises(ValueError, match="a multiple of 16"):
        Int4Linear(96, 64, group_size=24).repack("tc")


# ----------------------------------------------------------------------------- the CUDA kernel
def _kernel_cases():
    m_sizes = sorted({*M_FULL, 17, 32})  # 17 and 32: the two-m16-tile variant
    return [(m, n, k, g) for m in m_sizes for n, k, groups in TC_NKG for g in groups]


@needs_cuda_kernel
@pytest.mark.parametrize(("m", "n", "k", "group_size"), _kernel_cases())
def test_tc_kernel_against_reference(m, n, k, group_size, gen, poisoned_empty):
    """Every M-tile count, the automatic split and forced splits (1, 3), aligned and misaligned
    activations (NaN-padded rows), bias and none, all scale dtypes."""
    scale_dtype = (torch.float32, torch.bfloat16, torch.float16)[(m + n) % 3]
    packed_tc, scales, zeros, bias, packed = _layer(n, k, group_size, scale_dtype, gen, "cuda")
    bias = bias if m % 2 else None
    for dtype in (torch.float16, torch.bfloat16):
        if bias is not None and m % 4 == 1:
            bias = bias.to(dtype)
        for pad, split_k in ((2, 0), (3, 1), (2, 3)):  # pad 3: x is not 4-byte aligned
            x = nan_padded(torch.randn(m, k, generator=gen).to("cuda", dtype), pad)
            out = _ext._C.int4_weight_only_linear_tc_cuda(
                x, packed_tc, scales, zeros, group_size, bias, split_k
            )
            args = (packed, scales, zeros, group_size, bias)
            ref64 = ref.int4_weight_only_linear(x.double(), *args, compute_dtype=torch.float64)
            lowp = ref.int4_weight_only_linear(x, *args)
            check_close(out, ref64, lowp, name=f"{dtype} pad={pad} split_k={split_k}")


@needs_cuda_kernel
def test_tc_kernel_odd_row_stride_and_misaligned_codes(gen):
    """x with an odd row stride (no pair loads) and codes at an odd address (the binding copies
    them to an aligned buffer)."""
    packed_tc, scales, zeros, bias, packed = _layer(128, 96, 32, torch.float16, gen, "cuda")
    x = torch.randn(5, 97, generator=gen).to("cuda", torch.float16)[:, :96]
    shifted = torch.empty(packed_tc.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted[1:] = packed_tc.reshape(-1)
    odd = shifted[1:].view(packed_tc.shape)
    assert odd.data_ptr() % 16 != 0
    out = _ext._C.int4_weight_only_linear_tc_cuda(x, odd, scales, zeros, 32, bias, 0)
    args = (packed, scales, zeros, 32, bias)
    ref64 = ref.int4_weight_only_linear(x.double(), *args, compute_dtype=torch.float64)
    check_close(out, ref64, ref.int4_weight_only_linear(x, *args))


@needs_cuda_kernel
def test_tc_kernel_through_the_op(gen):
    packed_tc, scales, zeros, bias, packed = _layer(256, 512, 128, torch.bfloat16, gen, "cuda")
    x = torch.randn(2, 3, 512, generator=gen).to("cuda", torch.float16)
    with run_on("cuda"):
        out = ops.int4_weight_only_linear_tc(x, packed_tc, scales, zeros, 128, bias)
    assert out.shape == (2, 3, 256) and out.dtype == torch.float16
    args = (packed, scales, zeros, 128, bias)
    ref64 = ref.int4_weight_only_linear(x.double(), *args, compute_dtype=torch.float64)
    check_close(out, ref64, ref.int4_weight_only_linear(x, *args))


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tc_kernel_adds_no_measurable_error(dtype, gen):
    """Against the float layer, the kernel's SQNR is the reference's in the same dtype, within
    0.1 dB, at decode and prefill sizes."""
    w = torch.randn(1024, 2048, generator=gen) / 2048**0.5
    for m in (1, 16, 64):
        x = torch.randn(m, 2048, generator=gen)
        float_out = x.double() @ w.double().T
        for group_size in (32, 128):
            packed, scales, zeros = quantize_int4(w, group_size, scale_dtype=torch.bfloat16)
            xc, tensors = x.to("cuda", dtype), [t.cuda() for t in (packed, scales, zeros)]
            with run_on("cuda"):
                out = ops.int4_weight_only_linear_tc(
                    xc, ref.plain_to_tc(tensors[0]), tensors[1], tensors[2], group_size
                )
            want = ref.int4_weight_only_linear(xc, *tensors, group_size)
            assert sqnr(float_out, out.cpu()) >= sqnr(float_out, want.cpu()) - 0.1


@needs_cuda_kernel
def test_tc_kernel_is_deterministic_and_rejects_bad_split(gen):
    packed_tc, scales, zeros, _, _ = _layer(128, 1024, 64, torch.float16, gen, "cuda")
    x = torch.randn(5, 1024, generator=gen).to("cuda", torch.float16)
    run = _ext._C.int4_weight_only_linear_tc_cuda
    first = run(x, packed_tc, scales, zeros, 64, None, 7)
    assert torch.equal(first, run(x, packed_tc, scales, zeros, 64, None, 7))
    with pytest.raises(ValueError, match="split_k must be at most 65535"):
        run(x, packed_tc, scales, zeros, 64, None, 1 << 20)
    with pytest.raises(TypeError, match="x must be float16 or bfloat16"):
        run(x.float(), packed_tc, scales, zeros, 64, None, 0)
