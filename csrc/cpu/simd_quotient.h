// round(x / scale) half to even, bit for bit as the divide gives it, without a divide per
// element (kQuotientSlack in simd.h), in AVX-512 registers, for the levels that have AVX-512
// (included inside their namespace, after simd.h).
#pragma once

// inv = 1 / scale, with any rounding.
inline __m512 round_quotient_ps(__m512 x, __m512 scale, __m512 inv) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 q = _mm512_mul_ps(x, inv);
  const __m512 r = _mm512_roundscale_ps(q, kNearest);
  const __m512 margin = _mm512_fmadd_ps(_mm512_abs_ps(q), _mm512_set1_ps(kQuotientSlack),
                                        _mm512_abs_ps(_mm512_sub_ps(q, r)));
  if (_mm512_cmp_ps_mask(margin, _mm512_set1_ps(0.5f), _CMP_NLT_UQ) == 0) return r;
  return _mm512_roundscale_ps(_mm512_div_ps(x, scale), kNearest);
}
