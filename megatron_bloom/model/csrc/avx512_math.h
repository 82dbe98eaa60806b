// Float32 vector helpers for bf16 data on CPUs with AVX512-BF16, shared by the kernels in this folder.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace mbloom_simd {

inline __m512 widen(__m256i bf16) {  // 16 bf16 values to float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

inline __m512 load_bf16(const uint16_t* data) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(data)));
}

// The lanes of the 16 values from position i on that lie before n (all of them but at the end).
inline __mmask16 live_lanes(int64_t i, int64_t n) {
  return i + 16 <= n ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

inline __m512 load_bf16_masked(const uint16_t* data, __mmask16 live) {  // 0 in the other lanes
  return widen(_mm256_maskz_loadu_epi16(live, data));
}

inline void store_bf16_masked(uint16_t* data, __mmask16 live, __m512 value) {  // rounded to nearest even
  _mm256_mask_storeu_epi16(data, live, (__m256i)_mm512_cvtneps_pbh(value));
}

inline __m512 round_bf16(__m512 x) {  // to the nearest bf16 (even on ties), kept as float32
  return widen((__m256i)_mm512_cvtneps_pbh(x));
}

// exp for float32 (Cephes' method: 2^n times a degree-5 polynomial of the rest; within 2 ulp). Inputs are
// scores minus their maximum, so at most 0; below -87.3 (masked positions among them) the result is 0,
// where torch's exp gives 0 or a denormal (a probability of no weight against the maximum's 1).
inline __m512 exp_ps(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(y, n));
}

}  // namespace mbloom_simd
