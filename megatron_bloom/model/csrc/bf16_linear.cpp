// y = x W^T + b in bf16 for CPUs with AVX512-BF16, written for the few rows of a decoding step.
//
// W is packed as [N / 32, K / 2, 32, 2]: for each block of 32 outputs, the K inputs in pairs, which is the
// operand layout of vdpbf16ps (it multiplies bf16 pairs and adds both products to a float32 lane). Each
// 32-output block of W is read once, as one contiguous stream, for up to 8 rows of x at a time: at 8 rows
// this keeps a decoding step at the memory's bandwidth, where oneDNN's kernel reads its blocked weights at
// about 60% of it. Products accumulate in float32 along K in order, the bias is added in float32 and the
// sum rounded to nearest-even bf16, as torch's bf16 F.linear does (which, splitting a long K into blocks,
// can round a few outputs to the neighbouring value).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kBlock = 32;        // outputs per block: two 16-lane float32 accumulators a row
constexpr int64_t kRowsAtOnce = 8;    // 8 rows x 2 accumulators: 16 of the 32 vector registers
constexpr int64_t kPrefetchPairs = 16;  // how far ahead (in K pairs, 128 bytes each) W is prefetched

template <int Rows>
inline void block_product(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t k_pairs,
                          const float* bias, uint16_t* y, int64_t y_stride) {
  __m512 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  const int32_t* x_pairs = reinterpret_cast<const int32_t*>(x);
  const int64_t x_pair_stride = x_stride / 2;
  for (int64_t kp = 0; kp < k_pairs; ++kp) {
    const uint16_t* ahead = w + (kp + kPrefetchPairs) * 2 * kBlock;
    _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(ahead + kBlock), _MM_HINT_T0);
    const __m512bh w_low = (__m512bh)_mm512_loadu_si512(w + kp * 2 * kBlock);
    const __m512bh w_high = (__m512bh)_mm512_loadu_si512(w + kp * 2 * kBlock + kBlock);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const __m512bh x_pair = (__m512bh)_mm512_set1_epi32(x_pairs[r * x_pair_stride + kp]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x_pair, w_low);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x_pair, w_high);
    }
  }
  const __m512 bias_low = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 bias_high = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < Rows; ++r) {
    const __m256bh low = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][0], bias_low));
    const __m256bh high = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][1], bias_high));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride), (__m256i)low);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride + 16), (__m256i)high);
  }
}

using BlockProduct = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*, uint16_t*, int64_t);
constexpr BlockProduct kByRows[kRowsAtOnce + 1] = {
    nullptr, block_product<1>, block_product<2>, block_product<3>, block_product<4>,
    block_product<5>, block_product<6>, block_product<7>, block_product<8>};

}  // namespace

// x: [..., K] bf16; packed: [N / 32, K / 2, 32, 2] bf16; bias: [N] float32 or None. Returns [..., N].
at::Tensor bf16_linear(const at::Tensor& x_in, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && x_in.dim() >= 1, "mbloom::bf16_linear: x must be bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlock && packed.size(3) == 2 && packed.is_contiguous() &&
              packed.scalar_type() == at::kBFloat16, "mbloom::bf16_linear: packed must be a contiguous "
              "[N/32, K/2, 32, 2] bf16 tensor");
  const int64_t k = x_in.size(-1), blocks = packed.size(0), k_pairs = packed.size(1), n = blocks * kBlock;
  TORCH_CHECK(k == 2 * k_pairs, "mbloom::bf16_linear: x has ", k, " features, the weight ", 2 * k_pairs);
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == n,
                "mbloom::bf16_linear: bias must be a contiguous float32 [N] tensor");
    bias_data = bias->data_ptr<float>();
  }
  const at::Tensor x = x_in.reshape({-1, k}).contiguous();
  const int64_t rows = x.size(0);
  std::vector<int64_t> out_shape = x_in.sizes().vec();
  out_shape.back() = n;
  at::Tensor y = at::empty(out_shape, x_in.options());
  const auto* x_data = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* w_data = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto* y_data = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const uint16_t* w = w_data + block * k_pairs * 2 * kBlock;
      const float* b = bias_data ? bias_data + block * kBlock : nullptr;
      for (int64_t row = 0; row < rows; row += kRowsAtOnce) {
        const int64_t count = std::min(kRowsAtOnce, rows - row);
        kByRows[count](x_data + row * k, k, w, k_pairs, b, y_data + row * n + block * kBlock, n);
      }
    }
  });
  return y;
}

// An operator of the dispatcher, so that eager calls and torch.compile's graphs reach it without Python.
TORCH_LIBRARY_FRAGMENT(mbloom, m) {
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(mbloom, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
}
