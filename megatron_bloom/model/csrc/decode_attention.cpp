// One query per sequence against the KV cache (a decoding step), bf16, for CPUs with AVX512-BF16.
//
// The eager products (K q, then probabilities times V) go through `bmm` with one column, which costs about
// 0.27 ms a layer at bloom-small's batch of 8 on 2 cores; here each (sequence, head) reads its keys and
// values once, straight from the cache buffers, and keeps the scores in registers and L1. Each step of
// BloomAttention's decoding is reproduced with its roundings: the score q.k rounded to bf16, times the
// scale, plus the ALiBi bias, plus the mask (each rounded to bf16 as the eager bf16 ops do); softmax in
// float32; probabilities rounded to bf16; their sum with the values in float32, rounded to bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "avx512_math.h"

#include <cmath>
#include <vector>

using mbloom_simd::exp_ps;
using mbloom_simd::live_lanes;
using mbloom_simd::load_bf16_masked;
using mbloom_simd::load_bf16;
using mbloom_simd::round_bf16;

// query: [B, H, 1, D]; keys, values: the cache buffers [B, H, capacity, D]; bias: ALiBi [B * H, 1, kv];
// mask: [B or 1, 1, 1, kv] (0 or the dtype's minimum); all bf16, D a multiple of 32. Returns [B, H, 1, D].
at::Tensor decode_attention(const at::Tensor& query_in, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& bias_in, const at::Tensor& mask_in, double scale, int64_t kv_length) {
  TORCH_CHECK(query_in.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
              values.scalar_type() == at::kBFloat16 && bias_in.scalar_type() == at::kBFloat16 &&
              mask_in.scalar_type() == at::kBFloat16, "mbloom::decode_attention: bf16 tensors only");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() && keys.dim() == 4,
              "mbloom::decode_attention: keys and values must be contiguous [B, H, capacity, D] buffers");
  const int64_t batch = keys.size(0), heads = keys.size(1), capacity = keys.size(2), head_dim = keys.size(3);
  TORCH_CHECK(head_dim % 32 == 0, "mbloom::decode_attention: the head size must be a multiple of 32");
  TORCH_CHECK(kv_length >= 1 && kv_length <= capacity, "mbloom::decode_attention: kv_length out of range");
  const at::Tensor query = query_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  const at::Tensor mask = mask_in.reshape({mask_in.size(0), kv_length}).contiguous();
  TORCH_CHECK(query.numel() == batch * heads * head_dim && bias.numel() == batch * heads * kv_length &&
              (mask.size(0) == batch || mask.size(0) == 1), "mbloom::decode_attention: shapes do not match");
  const int64_t mask_stride = mask.size(0) == 1 ? 0 : kv_length;
  at::Tensor context = at::empty({batch, heads, 1, head_dim}, query.options());
  const auto* q_data = reinterpret_cast<const uint16_t*>(query.data_ptr<at::BFloat16>());
  const auto* k_data = reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>());
  const auto* v_data = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
  const auto* bias_data = reinterpret_cast<const uint16_t*>(bias.data_ptr<at::BFloat16>());
  const auto* mask_data = reinterpret_cast<const uint16_t*>(mask.data_ptr<at::BFloat16>());
  auto* out_data = reinterpret_cast<uint16_t*>(context.data_ptr<at::BFloat16>());
  const __m512 scale_v = _mm512_set1_ps(static_cast<float>(scale));
  const int64_t pairs_chunks = head_dim / 32, value_chunks = head_dim / 16;
  const int64_t padded = (kv_length + 15) / 16 * 16;

  at::parallel_for(0, batch * heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scores(padded);
    std::vector<__m512i> q(pairs_chunks);
    std::vector<__m512> acc(value_chunks);
    for (int64_t task = first; task < last; ++task) {
      const uint16_t* k = k_data + task * capacity * head_dim;
      const uint16_t* v = v_data + task * capacity * head_dim;
      const uint16_t* bias_row = bias_data + task * kv_length;
      const uint16_t* mask_row = mask_data + (task / heads) * mask_stride;
      for (int64_t c = 0; c < pairs_chunks; ++c) q[c] = _mm512_loadu_si512(q_data + task * head_dim + c * 32);
      // q.k for every position: bf16 pairs multiplied and summed in float32 (vdpbf16ps)
      for (int64_t j = 0; j < kv_length; ++j) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t c = 0; c < pairs_chunks; ++c)
          dot = _mm512_dpbf16_ps(dot, (__m512bh)q[c], (__m512bh)_mm512_loadu_si512(k + j * head_dim + c * 32));
        scores[j] = _mm512_reduce_add_ps(dot);
      }
      // (((q.k) * scale + bias) + mask), each rounded to bf16 as the eager bf16 ops are
      __m512 best = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < padded; j += 16) {
        const __mmask16 live = live_lanes(j, kv_length);
        __m512 s = round_bf16(_mm512_maskz_loadu_ps(live, scores.data() + j));
        s = round_bf16(_mm512_mul_ps(s, scale_v));
        s = round_bf16(_mm512_add_ps(s, load_bf16_masked(bias_row + j, live)));
        s = round_bf16(_mm512_add_ps(s, load_bf16_masked(mask_row + j, live)));
        s = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), s);
        _mm512_storeu_ps(scores.data() + j, s);
        best = _mm512_max_ps(best, s);
      }
      // softmax in float32, the probabilities rounded to bf16
      const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < padded; j += 16) {
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores.data() + j), top));
        _mm512_storeu_ps(scores.data() + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
      for (int64_t j = 0; j < padded; j += 16)
        _mm512_storeu_ps(scores.data() + j, round_bf16(_mm512_div_ps(_mm512_loadu_ps(scores.data() + j), total)));
      // probabilities times values, in float32
      for (int64_t c = 0; c < value_chunks; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < kv_length; ++j) {
        if (scores[j] == 0.f) continue;  // masked positions
        const __m512 p = _mm512_set1_ps(scores[j]);
        for (int64_t c = 0; c < value_chunks; ++c)
          acc[c] = _mm512_fmadd_ps(p, load_bf16(v + j * head_dim + c * 16), acc[c]);
      }
      for (int64_t c = 0; c < value_chunks; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_data + task * head_dim + c * 16),
                            (__m256i)_mm512_cvtneps_pbh(acc[c]));
    }
  });
  return context;
}

TORCH_LIBRARY_FRAGMENT(mbloom, m) {
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor bias, Tensor mask, float scale, "
        "SymInt kv_length) -> Tensor");
}

TORCH_LIBRARY_IMPL(mbloom, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
