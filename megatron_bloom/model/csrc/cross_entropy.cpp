// The two passes of the vocabulary-parallel cross-entropy over bf16 logits, for CPUs with AVX512-BF16.
//
// Torch's chunked passes spend most of their time in float32 temporaries and its exp (112 ms forward and
// backward for bloom-small's [2048, 32000] logits on 2 cores). Here a row is widened in registers: the forward
// reads it twice (its max, then the sum of exponentials, the second time from L2) and the backward reads it
// once and writes the gradient once. Results are the chunked passes' own: the max exactly, sums of float32
// exponentials (summed in another order, so within float32 rounding), the gradient rounded once to bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "avx512_math.h"

#include <cmath>
#include <tuple>

using mbloom_simd::exp_ps;
using mbloom_simd::live_lanes;
using mbloom_simd::load_bf16_masked;
using mbloom_simd::store_bf16_masked;

namespace {

constexpr int64_t kRowsPerTask = 16;

inline __m512 load_or(const uint16_t* data, __mmask16 live, float missing) {  // `missing` in the other lanes
  return _mm512_mask_blend_ps(live, _mm512_set1_ps(missing), load_bf16_masked(data, live));
}

void check_rows(const at::Tensor& rows, int64_t real_columns, const char* name) {
  TORCH_CHECK(rows.scalar_type() == at::kBFloat16 && rows.dim() == 2 && rows.stride(1) == 1,
              name, ": bf16 [rows, columns] logits with contiguous rows");
  TORCH_CHECK(real_columns >= 1 && real_columns <= rows.size(1), name, ": real_columns out of range");
}

}  // namespace

// Each row's max over its first `real_columns` columns and the sum of e^(x - max) there, float32 [rows].
std::tuple<at::Tensor, at::Tensor> cross_entropy_max_sum_exp(const at::Tensor& rows, int64_t real_columns) {
  check_rows(rows, real_columns, "mbloom::cross_entropy_max_sum_exp");
  const int64_t num_rows = rows.size(0), stride = rows.stride(0);
  at::Tensor row_max = at::empty({num_rows}, rows.options().dtype(at::kFloat));
  at::Tensor sum_exp = at::empty({num_rows}, rows.options().dtype(at::kFloat));
  const auto* data = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
  float* max_out = row_max.data_ptr<float>();
  float* sum_out = sum_exp.data_ptr<float>();
  at::parallel_for(0, num_rows, kRowsPerTask, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const uint16_t* row = data + r * stride;
      __m512 best = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < real_columns; j += 16)
        best = _mm512_max_ps(best, load_or(row + j, live_lanes(j, real_columns), -INFINITY));
      const float top = _mm512_reduce_max_ps(best);
      const __m512 top_v = _mm512_set1_ps(top);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < real_columns; j += 16) {
        const __mmask16 live = live_lanes(j, real_columns);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(load_or(row + j, live, top),
                                                                                  top_v))));
      }
      max_out[r] = top;
      sum_out[r] = _mm512_reduce_add_ps(sum);
    }
  });
  return {row_max, sum_exp};
}

// grad[r, j] = e^(x - log_sum_exp[r]) * grad_loss[r] for the real columns, plus target_grad[r] at column
// local_target[r], rounded to bf16; 0 in the padding columns. Written into `grad` (same shape as `rows`).
void cross_entropy_logits_grad(at::Tensor grad, const at::Tensor& rows, const at::Tensor& log_sum_exp,
                               const at::Tensor& grad_loss, const at::Tensor& local_target,
                               const at::Tensor& target_grad, int64_t real_columns) {
  check_rows(rows, real_columns, "mbloom::cross_entropy_logits_grad");
  const int64_t num_rows = rows.size(0), columns = rows.size(1);
  TORCH_CHECK(grad.scalar_type() == at::kBFloat16 && grad.sizes() == rows.sizes() && grad.is_contiguous(),
              "mbloom::cross_entropy_logits_grad: grad must be a contiguous bf16 tensor shaped like the logits");
  const at::Tensor lse = log_sum_exp.to(at::kFloat).contiguous(), scale = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor target = local_target.to(at::kLong).contiguous(), extra = target_grad.to(at::kFloat).contiguous();
  TORCH_CHECK(lse.numel() == num_rows && scale.numel() == num_rows && target.numel() == num_rows &&
              extra.numel() == num_rows, "mbloom::cross_entropy_logits_grad: one value per row expected");
  const int64_t stride = rows.stride(0);
  const auto* data = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
  auto* out = reinterpret_cast<uint16_t*>(grad.data_ptr<at::BFloat16>());
  const float* lse_data = lse.data_ptr<float>();
  const float* scale_data = scale.data_ptr<float>();
  const int64_t* target_data = target.data_ptr<int64_t>();
  const float* extra_data = extra.data_ptr<float>();
  at::parallel_for(0, num_rows, kRowsPerTask, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const uint16_t* row = data + r * stride;
      uint16_t* out_row = out + r * columns;
      const __m512 lse_v = _mm512_set1_ps(lse_data[r]), scale_v = _mm512_set1_ps(scale_data[r]);
      const int64_t t = target_data[r];
      for (int64_t j = 0; j < real_columns; j += 16) {
        const __mmask16 live = live_lanes(j, real_columns);
        __m512 g = _mm512_mul_ps(exp_ps(_mm512_sub_ps(load_bf16_masked(row + j, live), lse_v)), scale_v);
        if (t >= j && t < j + 16) {  // the target's column: its one-hot term, added in float32
          const __mmask16 at_target = static_cast<__mmask16>(1u << (t - j));
          g = _mm512_mask_add_ps(g, at_target, g, _mm512_set1_ps(extra_data[r]));
        }
        store_bf16_masked(out_row + j, live, g);
      }
      for (int64_t j = real_columns; j < columns; ++j) out_row[j] = 0;
    }
  });
}

TORCH_LIBRARY_FRAGMENT(mbloom, m) {
  m.def("cross_entropy_max_sum_exp(Tensor rows, int real_columns) -> (Tensor, Tensor)");
  m.def("cross_entropy_logits_grad(Tensor(a!) grad, Tensor rows, Tensor log_sum_exp, Tensor grad_loss, "
        "Tensor local_target, Tensor target_grad, int real_columns) -> ()");
}

TORCH_LIBRARY_IMPL(mbloom, CPU, m) {
  m.impl("cross_entropy_max_sum_exp", &cross_entropy_max_sum_exp);
  m.impl("cross_entropy_logits_grad", &cross_entropy_logits_grad);
}
