// y = x W^T + b in bf16 for CPUs with AVX512-BF16, written for the few rows of a decoding step; W in bf16
// (mbloom::bf16_linear) or in int8 with a scale per output (mbloom::int8_linear).
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
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead W is prefetched

// The K pair `kp` of a block's 32 outputs, as two vectors of 16 bf16 pairs (outputs 0-15, 16-31).
inline void load_pairs(const uint16_t* w, int64_t kp, __m512bh& low, __m512bh& high) {
  low = (__m512bh)_mm512_loadu_si512(w + kp * 2 * kBlock);
  high = (__m512bh)_mm512_loadu_si512(w + kp * 2 * kBlock + kBlock);
}

inline __m512 int8_to_float(const int8_t* w) {  // 16 int8 values
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

inline __m512bh int8_to_bf16(const int8_t* w) {  // 32 int8 values, exactly (|v| <= 127 fits bf16's 8 bits)
  return _mm512_cvtne2ps_pbh(int8_to_float(w + 16), int8_to_float(w));
}

inline void load_pairs(const int8_t* w, int64_t kp, __m512bh& low, __m512bh& high) {
  low = int8_to_bf16(w + kp * 2 * kBlock);
  high = int8_to_bf16(w + kp * 2 * kBlock + kBlock);
}

// y[r, 0:32] = (x[r] . W block) * scale + bias for `Rows` rows; scale is null for bf16 weights.
template <typename Weight, int Rows>
inline void block_product(const uint16_t* x, int64_t x_stride, const Weight* w, int64_t k_pairs,
                          const float* scale, const float* bias, uint16_t* y, int64_t y_stride) {
  __m512 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  const int32_t* x_pairs = reinterpret_cast<const int32_t*>(x);
  const int64_t x_pair_stride = x_stride / 2;
  const char* bytes = reinterpret_cast<const char*>(w);
  const int64_t pair_bytes = 2 * kBlock * sizeof(Weight);
  for (int64_t kp = 0; kp < k_pairs; ++kp) {
    _mm_prefetch(bytes + kp * pair_bytes + kPrefetchBytes, _MM_HINT_T0);
    if (pair_bytes > 64) _mm_prefetch(bytes + kp * pair_bytes + kPrefetchBytes + 64, _MM_HINT_T0);
    __m512bh w_low, w_high;
    load_pairs(w, kp, w_low, w_high);
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const __m512bh x_pair = (__m512bh)_mm512_set1_epi32(x_pairs[r * x_pair_stride + kp]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x_pair, w_low);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x_pair, w_high);
    }
  }
  const __m512 scale_low = scale ? _mm512_loadu_ps(scale) : _mm512_set1_ps(1.f);
  const __m512 scale_high = scale ? _mm512_loadu_ps(scale + 16) : _mm512_set1_ps(1.f);
  const __m512 bias_low = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 bias_high = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < Rows; ++r) {
    __m512 low = acc[r][0], high = acc[r][1];
    if (scale) {
      low = _mm512_mul_ps(low, scale_low);
      high = _mm512_mul_ps(high, scale_high);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(low, bias_low)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride + 16),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(high, bias_high)));
  }
}

template <typename Weight>
void linear(const uint16_t* x, const Weight* w, const float* scale, const float* bias, uint16_t* y,
            int64_t rows, int64_t k, int64_t blocks) {
  using BlockProduct = void (*)(const uint16_t*, int64_t, const Weight*, int64_t, const float*, const float*,
                                uint16_t*, int64_t);
  constexpr BlockProduct by_rows[kRowsAtOnce + 1] = {
      nullptr, block_product<Weight, 1>, block_product<Weight, 2>, block_product<Weight, 3>,
      block_product<Weight, 4>, block_product<Weight, 5>, block_product<Weight, 6>, block_product<Weight, 7>,
      block_product<Weight, 8>};
  const int64_t k_pairs = k / 2, n = blocks * kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const Weight* w_block = w + block * k_pairs * 2 * kBlock;
      const float* s = scale ? scale + block * kBlock : nullptr;
      const float* b = bias ? bias + block * kBlock : nullptr;
      for (int64_t row = 0; row < rows; row += kRowsAtOnce) {
        const int64_t count = std::min(kRowsAtOnce, rows - row);
        by_rows[count](x + row * k, k, w_block, k_pairs, s, b, y + row * n + block * kBlock, n);
      }
    }
  });
}

// Checks the arguments; returns x as contiguous rows [M, K] and the output [..., N].
std::pair<at::Tensor, at::Tensor> rows_and_output(const at::Tensor& x, const at::Tensor& packed,
                                                  at::ScalarType weight_type, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 1, name, ": x must be bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlock && packed.size(3) == 2 && packed.is_contiguous() &&
              packed.scalar_type() == weight_type, name, ": the weight must be packed as a contiguous "
              "[N/32, K/2, 32, 2] tensor of ", weight_type);
  const int64_t k = x.size(-1);
  TORCH_CHECK(k == 2 * packed.size(1), name, ": x has ", k, " features, the weight ", 2 * packed.size(1));
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = packed.size(0) * kBlock;
  return {x.reshape({-1, k}).contiguous(), at::empty(out_shape, x.options())};
}

const float* float_vector(const c10::optional<at::Tensor>& vector, int64_t n, const char* name) {
  if (!vector.has_value()) return nullptr;
  TORCH_CHECK(vector->is_contiguous() && vector->scalar_type() == at::kFloat && vector->numel() == n, name,
              ": bias and scales must be contiguous float32 [N] tensors");
  return vector->data_ptr<float>();
}

inline const uint16_t* bf16_data(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

}  // namespace

// x: [..., K] bf16; packed: [N / 32, K / 2, 32, 2] bf16; bias: [N] float32 or None. Returns [..., N].
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  auto [rows, y] = rows_and_output(x, packed, at::kBFloat16, "mbloom::bf16_linear");
  linear(bf16_data(rows), bf16_data(packed), nullptr, float_vector(bias, y.size(-1), "mbloom::bf16_linear"),
         reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), rows.size(0), rows.size(1), packed.size(0));
  return y;
}

// The same with int8 weights and one float32 scale per output: y = (x . w_int8) * scale + bias, the int8
// values widened to bf16 exactly in registers, so the weights stream at half bf16's bytes.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  auto [rows, y] = rows_and_output(x, packed, at::kChar, "mbloom::int8_linear");
  const int64_t n = y.size(-1);
  linear(bf16_data(rows), packed.data_ptr<int8_t>(), float_vector(scales, n, "mbloom::int8_linear"),
         float_vector(bias, n, "mbloom::int8_linear"), reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()),
         rows.size(0), rows.size(1), packed.size(0));
  return y;
}

// Operators of the dispatcher, so that eager calls and torch.compile's graphs reach them without Python.
TORCH_LIBRARY_FRAGMENT(mbloom, m) {
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(mbloom, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
  m.impl("int8_linear", &int8_linear);
}
