"""Correctness rules shared by the tests and the benchmarks.

- Integer results (codes, int32 accumulators) must equal the reference exactly.
- Float results are compared with the reference computed in float64. A kernel passes when its
  max error is at most ``factor`` × the max error of the reference run in the same low precision
  (the flash-attention rule), plus a floor of a few ulps of the output's magnitude (so an exact
  low-precision reference does not demand bit-exactness).
- Quantized layers are judged against the float layer by SQNR in dB.
"""

from __future__ import annotations

import math

import torch

# Shape catalogue (the GUIDE's list): M covers decode (1..16), tile edges and odd sizes.
M_FULL = (0, 1, 2, 3, 7, 16, 33, 128, 513)
M_QUICK = (0, 1, 3, 17, 33)
# (N, K): none a multiple of any tile, plus degenerate and aligned cases.
NK_FULL = ((1, 1), (7, 13), (64, 96), (65, 257), (111, 1025), (256, 512), (59, 4099))
NK_QUICK = ((1, 1), (7, 13), (65, 257), (111, 1025))

ULPS_FLOOR = 4.0


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def max_abs_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.to(torch.float64) - ref64).abs().max().item()


def check_close(
    out: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowp: torch.Tensor,
    *,
    factor: float = 2.0,
    name: str = "output",
) -> None:
    """Raises AssertionError unless ``out`` meets the flash-attention rule (module docstring).

    Args:
        out: the kernel's result.
        ref64: the reference computed in float64.
        ref_lowp: the reference computed in the kernel's precision.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}")
    if out.numel() == 0:
        return
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad} (unwritten or out-of-bounds)")
    err = max_abs_error(out, ref64)
    ref_err = max_abs_error(ref_lowp, ref64)
    floor = ULPS_FLOOR * eps(out.dtype) * ref64.abs().max().item() + 1e-30
    bound = factor * ref_err + floor
    if not err <= bound:
        raise AssertionError(
            f"{name}: max error {err:.3e} > {factor} × reference error {ref_err:.3e} "
            f"+ floor {floor:.3e} (dtype {out.dtype})"
        )


def sqnr(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(‖signal‖ / ‖signal − approx‖)."""
    s = signal.to(torch.float64)
    noise = (s - approx.to(torch.float64)).norm().item()
    return math.inf if noise == 0 else 20.0 * math.log10(s.norm().item() / noise)


def nan_padded(x: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """A copy of 2-D ``x`` as a view into a NaN-filled buffer with ``pad`` extra columns on each
    side (127 for integer codes), so a kernel that reads outside its rows or assumes contiguous
    rows fails."""
    m, k = x.shape
    fill = float("nan") if x.is_floating_point() else 127
    buf = torch.full((m, k + 2 * pad), fill, dtype=x.dtype, device=x.device)
    view = buf[:, pad : pad + k]
    view.copy_(x)
    return view


def near_half_codes(m: int, k: int, run: int, generator: torch.Generator) -> torch.Tensor:
    """(m, k) fp32 activations whose int8 quantization per run of ``run`` values (scale =
    max |x| / 127 over the run) divides out to within 3 ulps of a half-integer, or onto one:
    where a quantizer that does not compute round(x / scale) exactly (a multiply by 1 / scale,
    say) rounds the other way. Each run holds its max at a random column."""
    x = torch.empty(m, k)
    for k0 in range(0, k, run):
        n = min(run, k - k0)
        amax = torch.rand(m, 1, generator=generator) * 1.5 + 0.5
        scale = amax / torch.full_like(amax, 127.0)
        half = torch.randint(-127, 127, (m, n), generator=generator).float() + 0.5
        v = half * scale
        ulps = torch.randint(-3, 4, (m, n), generator=generator, dtype=torch.int32)
        v = (v.view(torch.int32) + ulps).view(torch.float32)  # |v| < amax: same sign, a few ulps
        v.scatter_(1, torch.randint(0, n, (m, 1), generator=generator), amax)
        x[:, k0 : k0 + n] = v
    return x


def random_int8(*shape: int, generator: torch.Generator | None = None, device="cpu"):
    """Uniform int8 codes in [-127, 127] (the symmetric range every torchslim format uses)."""
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=generator, device=device)


def tiny_llama(tie_word_embeddings: bool = False) -> torch.nn.Module:
    """A randomly initialised 2-layer Llama (Hugging Face transformers; grouped KV heads: 4
    query heads, 2 KV heads), in eval mode; with ``tie_word_embeddings`` its output head holds
    the input embeddings' weight, as SmolLM2's does. Needs transformers."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert() -> torch.nn.Module:
    """A randomly initialised 2-layer BERT encoder (Hugging Face transformers), in eval mode.
    Needs transformers."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()
