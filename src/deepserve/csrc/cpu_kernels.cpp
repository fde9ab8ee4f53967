// deepserve CPU kernels, compiled on first use by deepserve/kernels.py.
//
// Two kernels where the torch path measurably loses on CPU:
//
// * linear_small: y = x W^T for a few rows (decode at low concurrency). torch's bf16
//   matmul runs at ~40 GFLOP/s for one row, well below what memory allows; this
//   kernel streams each weight row once, converts it to fp32 in registers and
//   multiplies it with every input row, so it runs at memory speed. Weights may be
//   bf16, fp32, or int8 with one scale per output row (half the bytes of bf16).
//
// * paged_decode_attention: one query token per sequence against its paged KV cache,
//   read in place through the block table (no gather copy of the context), with
//   float32 accumulation and an exact two-pass softmax. K/V may be stored in the
//   compute dtype, int8 with per-slot scales, or fp8 e4m3.
//
// * latent_decode: MLA's decode attention, every query head against one shared latent
//   head, the cache read in place through the block table.
//
// All use at::parallel_for, so they share torch's thread pool and thread count.

#include "parallel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define DS_AVX512 1
#else
#define DS_AVX512 0
#endif
// The AVX2 build (x86-64-v3) gets a hand-written exp for the softmaxes of decode attention
// and sampling and for SwiGLU; its other loops are vectorized by the compiler.
#if !DS_AVX512 && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DS_AVX2 1
#else
#define DS_AVX2 0
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace {

// Denormal floats read and written as zero by the calling thread while in scope (MXCSR's
// FTZ and DAZ bits). A softmax numerator e^-87 times a value scale below one is denormal,
// and every multiply-add with one takes a microcode assist: decode attention on an int8
// cache ran 36x slower on peaked softmaxes (benchmarks/decode_kernels.py --cache int8
// --q-scale 64). As zeros they change nothing above 1e-38.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// ---- row loaders: one row of a weight / cache tensor to fp32 --------------------------

template <typename T>
inline void load_row(const T* src, int64_t n, float* dst, float scale);

template <>
inline void load_row<float>(const float* src, int64_t n, float* dst, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
}

template <>
inline void load_row<at::BFloat16>(const at::BFloat16* src, int64_t n, float* dst,
                                   float scale) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]) * scale;
}

template <>
inline void load_row<at::Half>(const at::Half* src, int64_t n, float* dst, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

template <>
inline void load_row<int8_t>(const int8_t* src, int64_t n, float* dst, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

template <>
inline void load_row<uint8_t>(const uint8_t* src, int64_t n, float* dst, float scale) {
  // fp8 e4m3 stored as raw bytes.
  for (int64_t i = 0; i < n; ++i)
    dst[i] = c10::detail::fp8e4m3fn_to_fp32_value(src[i]) * scale;
}

template <typename T>
inline void store_row(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// ---- linear_small --------------------------------------------------------------------

#if DS_AVX512
// 16 weights of row `w` at column k, as fp32 lanes (masked for the tail).
template <typename W>
inline __m512 load16(const W* w, int64_t k, __mmask16 mask);

template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* w, int64_t k, __mmask16 mask) {
  __m256i h = _mm256_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(w) + k);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <>
inline __m512 load16<float>(const float* w, int64_t k, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, w + k);
}

template <>
inline __m512 load16<int8_t>(const int8_t* w, int64_t k, __mmask16 mask) {
  __m128i b = _mm_maskz_loadu_epi8(mask, w + k);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

// One output row at a time, read front to back (a single sequential stream per thread,
// which the hardware prefetcher follows; interleaving several rows measured 3x slower
// once weights come from DRAM). Four accumulators per input row hide the FMA latency,
// and each weight vector is loaded once for all M input rows.
template <typename W, int M>
void linear_rows_avx512(const float* x, const W* w, int64_t K, int64_t n0, int64_t n1,
                        float* out, int64_t N) {
  const int64_t k_main = K - K % 64;
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * K;
    __m512 acc[4][M];
    for (int a = 0; a < 4; ++a)
      for (int m = 0; m < M; ++m) acc[a][m] = _mm512_setzero_ps();
    const __mmask16 all = static_cast<__mmask16>(0xFFFF);
    for (int64_t k = 0; k < k_main; k += 64) {
      for (int a = 0; a < 4; ++a) {
        __m512 wv = load16<W>(row, k + 16 * a, all);
        for (int m = 0; m < M; ++m)
          acc[a][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * a), acc[a][m]);
      }
    }
    for (int64_t k = k_main; k < K; k += 16) {
      __mmask16 mask = K - k >= 16 ? all : static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 wv = load16<W>(row, k, mask);
      for (int m = 0; m < M; ++m)
        acc[0][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * K + k), acc[0][m]);
    }
    for (int m = 0; m < M; ++m) {
      __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]),
                               _mm512_add_ps(acc[2][m], acc[3][m]));
      out[m * N + n] = _mm512_reduce_add_ps(s);
    }
  }
}
#endif

#if DS_AVX512 && defined(__AVX512BF16__)
// 32 weights as bf16 pairs. int8 values are exact in bf16 (8 significant bits).
template <typename W>
inline __m512bh load32_bf16(const W* row, int64_t k, __mmask32 mask);

template <>
inline __m512bh load32_bf16<at::BFloat16>(const at::BFloat16* row, int64_t k, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(row) + k);
}

template <>
inline __m512bh load32_bf16<int8_t>(const int8_t* row, int64_t k, __mmask32 mask) {
  const __m256i b = _mm256_maskz_loadu_epi8(mask, row + k);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// bf16 inputs: AVX512-BF16 dot instructions multiply bf16 pairs exactly and accumulate
// in float32, 32 weights per instruction (the float path needs a convert and an FMA
// per 16), so more input rows per weight row pay off before a GEMM does.
template <typename W, int M>
void linear_rows_bf16dot(const uint16_t* x, const W* w, int64_t K, int64_t n0, int64_t n1,
                         float* out, int64_t N) {
  const __mmask32 all = ~static_cast<__mmask32>(0);
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * K;
    __m512 acc[2][M];
    for (int a = 0; a < 2; ++a)
      for (int m = 0; m < M; ++m) acc[a][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      for (int a = 0; a < 2; ++a) {
        const __m512bh wv = load32_bf16<W>(row, k + 32 * a, all);
        for (int m = 0; m < M; ++m)
          acc[a][m] = _mm512_dpbf16_ps(
              acc[a][m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * a));
      }
    }
    for (; k < K; k += 32) {
      const int64_t left = K - k;
      const __mmask32 mask = left >= 32 ? all : static_cast<__mmask32>((1u << left) - 1);
      const __m512bh wv = load32_bf16<W>(row, k, mask);
      for (int m = 0; m < M; ++m)
        acc[0][m] = _mm512_dpbf16_ps(
            acc[0][m], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
    }
    for (int m = 0; m < M; ++m)
      out[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]));
  }
}

template <typename W>
void rows_bf16dot_chunks(const uint16_t* x, const W* w, int64_t M, int64_t K, int64_t b0,
                         int64_t b1, float* out, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const uint16_t* xm = x + m0 * K;
    float* om = out + m0 * N;
    switch (std::min<int64_t>(8, M - m0)) {
#define DS_CASE(c) \
  case c: linear_rows_bf16dot<W, c>(xm, w, K, b0, b1, om, N); break;
      DS_CASE(1) DS_CASE(2) DS_CASE(3) DS_CASE(4) DS_CASE(5) DS_CASE(6) DS_CASE(7)
      default: linear_rows_bf16dot<W, 8>(xm, w, K, b0, b1, om, N); break;
#undef DS_CASE
    }
  }
}

template <typename W>
void linear_dispatch_bf16(const uint16_t* x, const W* w, int64_t M, int64_t K, int64_t N,
                          float* out) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    // Blocks of 16 output rows, all input rows for each: the block's weights stay in L1
    // while up to 8 input rows at a time go through them.
    // (Converting an int8 block to bf16 once, as linear_int4 does, measured no faster:
    // int8 -> bf16 is cheap enough to redo per chunk of input rows.)
    for (int64_t b0 = n0; b0 < n1; b0 += 16) {
      const int64_t b1 = std::min(b0 + 16, n1);
      rows_bf16dot_chunks(x, w, M, K, b0, b1, out, N);
    }
  });
}
#endif

#if DS_AVX512 && defined(__AVX512BF16__)
// int4 weights, asymmetric groups of 32: w = q * scale + low, q in 0..15. A group's 32
// values take 16 bytes, byte i holding q[i] (low nibble) and q[i + 16] (high nibble),
// so one 16-byte load unpacks into two 16-lane halves in order. 0.625 bytes per weight
// with the group's float32 scale and low (bf16: 2 bytes; int8: 1 byte plus 4 per row).
template <int M>
void linear_rows_int4(const uint16_t* x, const uint8_t* q, const float* scales,
                      const float* lows, int64_t K, int64_t n0, int64_t n1, float* out,
                      int64_t N) {
  const int64_t groups = K / 32;
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = q + n * (K / 2);
    const float* sr = scales + n * groups;
    const float* lr = lows + n * groups;
    __m512 acc[2][M];
    for (int a = 0; a < 2; ++a)
      for (int m = 0; m < M; ++m) acc[a][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + 16 * g));
      const __m128i lo = _mm_and_si128(b, nib);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
      const __m512 s = _mm512_set1_ps(sr[g]), l = _mm512_set1_ps(lr[g]);
      const __m512 flo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s, l);
      const __m512 fhi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s, l);
      const __m512bh wv = _mm512_cvtne2ps_pbh(fhi, flo);
      const int a = static_cast<int>(g & 1);
      for (int m = 0; m < M; ++m)
        acc[a][m] = _mm512_dpbf16_ps(acc[a][m], wv,
                                     (__m512bh)_mm512_loadu_si512(x + m * K + 32 * g));
    }
    for (int m = 0; m < M; ++m)
      out[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]));
  }
}
#endif

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& lows, const c10::optional<at::Tensor>& bias) {
#if DS_AVX512 && defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "linear_int4: x bf16 [M,K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(K % 32 == 0 && packed.size(1) == K / 2 && packed.scalar_type() == at::kByte,
              "linear_int4: packed must be uint8 [N, K/2] with K a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && lows.scalar_type() == at::kFloat &&
                  scales.size(1) == K / 32 && lows.size(1) == K / 32,
              "linear_int4: scales and lows must be float32 [N, K/32]");
  at::Tensor xc = x.contiguous(), qc = packed.contiguous(), sc = scales.contiguous(),
             lc = lows.contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* lp = lc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    std::vector<uint16_t> block;
    for (int64_t b0 = n0; b0 < n1; b0 += 16) {
      const int64_t b1 = std::min(b0 + 16, n1);
      if (M > 8) {
        // Many input rows: unpack the block's 16 weight rows to bf16 once (L1-sized),
        // then run the bf16 kernel over it for every chunk of 8 input rows.
        block.resize((b1 - b0) * K);
        const __m128i nib = _mm_set1_epi8(0x0F);
        for (int64_t n = b0; n < b1; ++n)
          for (int64_t g = 0; g < K / 32; ++g) {
            const __m128i b = _mm_loadu_si128(
                reinterpret_cast<const __m128i*>(qp + n * (K / 2) + 16 * g));
            const __m512 s = _mm512_set1_ps(sp[n * (K / 32) + g]);
            const __m512 l = _mm512_set1_ps(lp[n * (K / 32) + g]);
            const __m512 flo = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, nib))), s, l);
            const __m512 fhi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                                   _mm_and_si128(_mm_srli_epi16(b, 4), nib))),
                                               s, l);
            _mm512_storeu_si512(block.data() + (n - b0) * K + 32 * g,
                                (__m512i)_mm512_cvtne2ps_pbh(fhi, flo));
          }
        const auto* wb = reinterpret_cast<const at::BFloat16*>(block.data()) - b0 * K;
        rows_bf16dot_chunks(xp, wb, M, K, b0, b1, op, N);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const uint16_t* xm = xp + m0 * K;
        float* om = op + m0 * N;
        switch (std::min<int64_t>(8, M - m0)) {
#define DS_CASE(c) \
  case c: linear_rows_int4<c>(xm, qp, sp, lp, K, b0, b1, om, N); break;
          DS_CASE(1) DS_CASE(2) DS_CASE(3) DS_CASE(4) DS_CASE(5) DS_CASE(6) DS_CASE(7)
          default: linear_rows_int4<8>(xm, qp, sp, lp, K, b0, b1, om, N); break;
#undef DS_CASE
        }
      }
    }
  });
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
#else
  TORCH_CHECK(false, "linear_int4 needs a CPU with AVX512-BF16");
  return at::Tensor();
#endif
}

bool has_avx512_bf16() {
#if DS_AVX512 && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// Portable path: convert a weight row to fp32, then one dot product per input row.
template <typename W>
void linear_rows_generic(const float* x, const W* w, int64_t M, int64_t K, int64_t n0,
                         int64_t n1, float* out, int64_t N) {
  std::vector<float> row(K);
  for (int64_t n = n0; n < n1; ++n) {
    load_row<W>(w + n * K, K, row.data(), 1.0f);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += row[k] * xm[k];
      out[m * N + n] = acc;
    }
  }
}

template <typename W>
void linear_dispatch(const float* x, const W* w, int64_t M, int64_t K, int64_t N,
                     float* out) {
  // Chunks of 64 output rows: enough work per task, and a few tasks per thread.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
#if DS_AVX512
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xm = x + m0 * K;
      float* om = out + m0 * N;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: linear_rows_avx512<W, 1>(xm, w, K, n0, n1, om, N); break;
        case 2: linear_rows_avx512<W, 2>(xm, w, K, n0, n1, om, N); break;
        case 3: linear_rows_avx512<W, 3>(xm, w, K, n0, n1, om, N); break;
        default: linear_rows_avx512<W, 4>(xm, w, K, n0, n1, om, N); break;
      }
    }
#else
    linear_rows_generic<W>(x, w, M, K, n0, n1, out, N);
#endif
  });
}

at::Tensor linear_small(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& row_scale,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "linear_small: x [M,K] and weight [N,K]");
  TORCH_CHECK(x.size(1) == weight.size(1), "linear_small: in_features mismatch");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_small: CPU only");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  bool done = false;
#if DS_AVX512 && defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16 &&
      (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kChar)) {
    at::Tensor xc = x.contiguous();
    auto* xp16 = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    if (w.scalar_type() == at::kBFloat16)
      linear_dispatch_bf16(xp16, w.data_ptr<at::BFloat16>(), M, K, N, op);
    else
      linear_dispatch_bf16(xp16, w.data_ptr<int8_t>(), M, K, N, op);
    done = true;
  }
#endif
  at::Tensor xf = done ? at::Tensor() : x.to(at::kFloat).contiguous();
  const float* xp = done ? nullptr : xf.data_ptr<float>();
  if (!done) switch (w.scalar_type()) {
    case at::kBFloat16: linear_dispatch(xp, w.data_ptr<at::BFloat16>(), M, K, N, op); break;
    case at::kFloat: linear_dispatch(xp, w.data_ptr<float>(), M, K, N, op); break;
    case at::kChar: linear_dispatch(xp, w.data_ptr<int8_t>(), M, K, N, op); break;
    default: TORCH_CHECK(false, "linear_small: weight dtype ", w.scalar_type(),
                         " is not supported (bfloat16, float32, int8)");
  }
  if (row_scale.has_value()) out.mul_(row_scale->to(at::kFloat));
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

// ---- paged_decode_attention ------------------------------------------------------------

// Per-slot scales of an int8 cache, stored as float32 or bfloat16; absent -> 1.
struct Scales {
  const void* data = nullptr;
  bool bf16 = false;
  float operator()(int64_t i) const {
    if (!data) return 1.0f;
    return bf16 ? bf16_to_float(static_cast<const uint16_t*>(data)[i])
                : static_cast<const float*>(data)[i];
  }
};

Scales scales_of(const c10::optional<at::Tensor>& t) {
  Scales s;
  if (!t.has_value()) return s;
  TORCH_CHECK(t->is_contiguous(), "paged_decode_attention: scales must be contiguous");
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
              "paged_decode_attention: scales must be float32 or bfloat16");
  s.data = t->data_ptr();
  s.bf16 = t->scalar_type() == at::kBFloat16;
  return s;
}

// e^x as x = n ln2 + r, e^r by a degree-6 polynomial (relative error about 1e-7 for
// |r| <= ln2/2), times 2^n: the constants both vector widths use. ln2 is split in two
// so n ln2 is exact; kExpPoly runs from the highest power down.
constexpr float kLog2e = 1.4426950409f, kLn2Hi = 0.693145751953125f,
                kLn2Lo = 1.428606765330187e-06f;
constexpr float kExpPoly[7] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};

#if DS_AVX512
// e^x for x <= 0 (max-subtracted scores), 16 lanes; 2^n by scalef.
inline __m512 exp_nonpos_unclamped(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  return _mm512_scalef_ps(p, n);
}

inline __m512 exp_nonpos(__m512 x) {
  return exp_nonpos_unclamped(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)));
}

// In place: x[i] = exp(x[i] - mx); returns the sum.
inline float exp_sub_sum(float* x, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + i), m));
    _mm512_mask_storeu_ps(x + i, mask, e);
    sum = _mm512_mask_add_ps(sum, mask, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

template <typename C>
constexpr bool kVectorCache =
    std::is_same_v<C, float> || std::is_same_v<C, at::BFloat16> || std::is_same_v<C, int8_t>;
#endif

#if DS_AVX2
// exp(x), eight lanes: exp_nonpos's polynomial, with 2^n built from exponent bits (AVX2
// has no scalef). The clamp to [-87, 88] keeps n in -126..127, a normal float.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float hsum8f(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline float exp_sub_sum_scalar(float* x, int64_t n, float mx) {
  float sum = 0.f;
  int64_t i = 0;
#if DS_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
    _mm256_storeu_ps(x + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  sum = hsum8f(vsum);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  return sum;
}

#if DS_AVX512
// n bytes from p asked for into L1 (hint 0) or L2 (1)
inline void prefetch_bytes(const void* p, int64_t n, int hint) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < n; off += 64) {
    if (hint == 0) _mm_prefetch(c + off, _MM_HINT_T0);
    else _mm_prefetch(c + off, _MM_HINT_T1);
  }
}

// r[j] = sum of the 16 lanes of v[j], for 16 vectors at once (a transpose-and-add tree:
// 3 shuffles/adds per vector instead of a full horizontal reduction each).
inline __m512 hsum16(const __m512* v) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(y[2], y[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#if DS_AVX512
// 16 values of an 8-bit cache row as float32: int8 codes (their token's scale applied by
// the caller), or fp8 e4m3 bytes: a normal value's exponent and mantissa bits placed in a
// float's with the exponent rebased (exact), a subnormal's mantissa times 2^-9 (exact, and
// never a denormal float, which FlushDenormals would read as zero); 0x7F / 0xFF read as
// NaN, as torch reads them.
template <typename C>
inline __m512 cache16(const C* p);

template <>
inline __m512 cache16<int8_t>(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <>
inline __m512 cache16<uint8_t>(const uint8_t* p) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
  const __m512 normal = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(0x1p-9f));
  __m512 v = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)), normal,
                                  sub);
  v = _mm512_or_ps(v, _mm512_castsi512_ps(
                          _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24)));
  return _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)),
                            _mm512_set1_ps(NAN));
}
#endif

#if DS_AVX512 && defined(__AVX512BF16__)
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// P.V for heads g0 .. g0 + GN of one query group: two tokens per AVX512-BF16
// dot instruction against the numerators rounded to bf16 (stride apart, zero-padded to
// an even count), divided by the denominators, written as bf16 rows of out.
template <int GN, int DP>
void pv_heads_bf16(int g0, const uint16_t* vp, const int64_t* rows, int64_t ctx,
                   const uint16_t* probs, int64_t stride, const float* denom, uint16_t* out) {
  constexpr int64_t D = 32 * DP;
  __m512 acc[GN][2 * DP];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < 2 * DP; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ctx; t += 2) {
    const bool pair = t + 1 < ctx;
    const uint16_t* r0 = vp + rows[t];
    const uint16_t* r1 = pair ? vp + rows[t + 1] : nullptr;
    __m512bh pg[GN];
    for (int g = 0; g < GN; ++g) {
      int32_t both;
      std::memcpy(&both, probs + (g0 + g) * stride + t, sizeof(both));
      pg[g] = (__m512bh)_mm512_set1_epi32(both);
    }
    for (int c = 0; c < DP; ++c) {
      const __m512i a = _mm512_loadu_si512(r0 + 32 * c);
      const __m512i bb = pair ? _mm512_loadu_si512(r1 + 32 * c) : _mm512_setzero_si512();
      const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, bb);
      const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(a, bb);
      for (int g = 0; g < GN; ++g) {
        acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], lo, pg[g]);
        acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], hi, pg[g]);
      }
    }
  }
  // 128-bit lane L of acc[g][2c] holds d = 32c + 8L + 0..3, of acc[g][2c+1]
  // d = 32c + 8L + 4..7: two permutes put them in order, then 32 at a time to bf16
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21,
                                          22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int g = 0; g < GN; ++g) {
    uint16_t* orow = out + (g0 + g) * D;
    const __m512 inv = _mm512_set1_ps(1.0f / denom[g0 + g]);
    for (int c = 0; c < DP; ++c) {
      const __m512 lo = _mm512_mul_ps(
          _mm512_permutex2var_ps(acc[g][2 * c], first, acc[g][2 * c + 1]), inv);
      const __m512 hi = _mm512_mul_ps(
          _mm512_permutex2var_ps(acc[g][2 * c], second, acc[g][2 * c + 1]), inv);
      _mm512_storeu_si512(orow + 32 * c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
}

// A task's scores on AMX tiles (defined with the prompt kernel below): where
// decode_tiles(block_size) holds, every 16 of its tokens are 16 consecutive cache rows.
bool decode_tiles(int64_t block_size);
void decode_tiles_begin(int G, int DP);
void decode_tiles_end();
void decode_scores_tiles(int G, int DP, const uint16_t* q, const uint16_t* kp,
                         const uint16_t* vp, const int64_t* rows, int64_t ctx, float scale,
                         float* scores);

// bf16 q and cache, head_dim = 32 * DP: products with AVX512-BF16 dot instructions, which
// multiply bf16 pairs exactly and accumulate in float32 (as torch's bf16 matmuls do).
// Scores for 16 tokens are reduced together; P.V takes two tokens per instruction, the
// probabilities rounded to bf16 as the torch path does before its P.V matmul. The cache
// is far larger than the CPU caches and rows are scattered by block, so the next rows
// are prefetched while the current ones are used (measured 1.3x on the real engine).
// An 8-bit cache (C = int8_t with per-slot scales ks / vs, or uint8_t: fp8 e4m3) runs the
// same loops: a task's K and V rows are first widened to bf16 (exact: at most 8
// significant bits) in a scratch that stays in L1 / L2, each score is multiplied by its
// key's scale and each numerator by its value's scale before rounding. The float loop
// (decode_attention_8bit) took two multiply-adds for every product.
template <typename C, int G, int DP>
void decode_attention_bf16(const uint16_t* qp, const C* kc, const C* vc, Scales ks,
                           Scales vs, const int64_t* table, int64_t width,
                           const int64_t* ctx_lens, int64_t block_size, float scale,
                           uint16_t* op, int64_t B, int64_t KVH, int64_t S) {
  constexpr int64_t D = 32 * DP;
  constexpr bool wide = std::is_same_v<C, uint16_t>;  // a bf16 cache, read in place
  const int64_t H = KVH * G;
  // pieces of about an eighth of a thread's share (contexts differ from row to row)
  const int64_t piece = B * KVH / (8 * at::get_num_threads()) + 1;
  const bool tiles = wide && decode_tiles(block_size);
  ds_parallel::pieces(0, B * KVH, piece, [&](int64_t t0, int64_t t1) {
    struct Keep {};  // a bf16 cache: the float state as it is
    const std::conditional_t<wide, Keep, FlushDenormals> ftz{};  // numerators x tiny scales
    (void)ftz;
    if (tiles) decode_tiles_begin(G, DP);
    std::vector<float> scores, vscale;
    std::vector<uint16_t> probs;  // the numerators rounded to bf16, an even stride per head
    std::vector<uint16_t> kw, vw;  // an 8-bit task's rows widened to bf16
    std::vector<int64_t> rows, slot;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t ctx = ctx_lens[b], stride = (ctx + 1) & ~int64_t{1};
      const int64_t* blocks = table + b * width;
      scores.resize(G * ctx);
      probs.resize(G * stride);
      rows.resize(ctx + 1);
      for (int64_t t = 0, blk = 0; t < ctx; ++blk) {  // block by block: no division a row
        const int64_t base = (h * S + blocks[blk] * block_size) * D;
        for (int64_t i = 0, n = std::min(block_size, ctx - t); i < n; ++i, ++t)
          rows[t] = base + i * D;
      }
      const uint16_t *kp, *vp;
      if constexpr (wide) {
        kp = kc;
        vp = vc;
      } else {
        kw.resize(ctx * D);
        vw.resize(ctx * D);
        slot.resize(ctx);
        vscale.resize(stride);
        for (int64_t j = 0; j < std::min<int64_t>(ctx, 8); ++j) {
          prefetch_bytes(kc + rows[j], D, 0);
          prefetch_bytes(vc + rows[j], D, 0);
        }
        for (int64_t t = 0; t < ctx; ++t) {
          if (t + 8 < ctx) {
            prefetch_bytes(kc + rows[t + 8], D, 0);
            prefetch_bytes(vc + rows[t + 8], D, 0);
          }
          for (int c = 0; c < DP; ++c) {
            const C* k8 = kc + rows[t] + 32 * c;
            const C* v8 = vc + rows[t] + 32 * c;
            _mm512_storeu_si512(kw.data() + t * D + 32 * c,
                                (__m512i)_mm512_cvtne2ps_pbh(cache16<C>(k8 + 16), cache16<C>(k8)));
            _mm512_storeu_si512(vw.data() + t * D + 32 * c,
                                (__m512i)_mm512_cvtne2ps_pbh(cache16<C>(v8 + 16), cache16<C>(v8)));
          }
          slot[t] = rows[t] / D;
          vscale[t] = vs(slot[t]);
          rows[t] = t * D;
        }
        if (stride > ctx) vscale[ctx] = 0.f;
        kp = kw.data();
        vp = vw.data();
      }
      for (int64_t j = 0; j < std::min<int64_t>(ctx, 16); ++j)
        prefetch_bytes(kp + rows[j], 2 * D, 0);
      __m512bh qv[G][DP];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < DP; ++c)
          qv[g][c] = (__m512bh)_mm512_loadu_si512(qp + (b * H + h * G + g) * D + 32 * c);
      // 1. scores, 16 tokens at a time
      const __m512 sc = _mm512_set1_ps(scale);
      if (tiles)
        decode_scores_tiles(G, DP, qp + (b * H + h * G) * D, kp, vp, rows.data(), ctx, scale,
                            scores.data());
      for (int64_t base = 0; base < (tiles ? 0 : ctx); base += 16) {
        const int64_t n = std::min<int64_t>(16, ctx - base);
        const __mmask16 mask = n == 16 ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << n) - 1);
        if constexpr (wide) {
          for (int64_t j = base + 16; j < std::min<int64_t>(ctx, base + 32); ++j)
            prefetch_bytes(kp + rows[j], 2 * D, 0);
          for (int64_t j = base; j < base + n; ++j) prefetch_bytes(vp + rows[j], 2 * D, 1);
        }
        __m512 ksc = sc;
        if constexpr (!wide) {
          alignas(64) float k16[16] = {};
          for (int64_t j = 0; j < n; ++j) k16[j] = ks(slot[base + j]);
          ksc = _mm512_mul_ps(sc, _mm512_load_ps(k16));
        }
        for (int g = 0; g < G; ++g) {
          __m512 part[16];
          for (int64_t j = 0; j < 16; ++j) {
            __m512 acc = _mm512_setzero_ps();
            if (j < n) {
              const uint16_t* krow = kp + rows[base + j];
              for (int c = 0; c < DP; ++c)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(krow + 32 * c),
                                       qv[g][c]);
            }
            part[j] = acc;
          }
          _mm512_mask_storeu_ps(scores.data() + g * ctx + base, mask,
                                _mm512_mul_ps(hsum16(part), ksc));
        }
      }
      // 2. softmax numerators and denominators; the numerators rounded to bf16 (as the
      // torch path rounds them before its P.V matmul), 16 at a time; an 8-bit cache's
      // numerators times their value's scale first
      float denom[G];
      for (int g = 0; g < G; ++g) {
        float* sg = scores.data() + g * ctx;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < ctx; t += 16) {
          const __mmask16 mask = ctx - t >= 16 ? static_cast<__mmask16>(0xFFFF)
                                               : static_cast<__mmask16>((1u << (ctx - t)) - 1);
          mv = _mm512_mask_max_ps(mv, mask, mv, _mm512_maskz_loadu_ps(mask, sg + t));
        }
        denom[g] = exp_sub_sum(sg, ctx, _mm512_reduce_max_ps(mv));
        uint16_t* pb = probs.data() + g * stride;
        for (int64_t t = 0; t < ctx; t += 16) {
          const __mmask16 mask = ctx - t >= 16 ? static_cast<__mmask16>(0xFFFF)
                                               : static_cast<__mmask16>((1u << (ctx - t)) - 1);
          __m512 p = _mm512_maskz_loadu_ps(mask, sg + t);
          if constexpr (!wide) p = _mm512_mul_ps(p, _mm512_maskz_loadu_ps(mask, vscale.data() + t));
          _mm256_mask_storeu_epi16(pb + t, mask, (__m256i)_mm512_cvtneps_pbh(p));
        }
        if (stride > ctx) pb[ctx] = 0;
      }
      // 3. P.V, two tokens per dot instruction, for at most 4 heads at a time (their
      // accumulators fill the registers; more heads read the V rows again, from L1)
      constexpr int GC = 8 / DP;  // 16 accumulators
      for (int g0 = 0; g0 < G; g0 += GC) {
        const int n = std::min(GC, G - g0);
        auto run = [&](auto heads) {
          pv_heads_bf16<decltype(heads)::value, DP>(g0, vp, rows.data(), ctx, probs.data(),
                                                    stride, denom, op + (b * H + h * G) * D);
        };
        if (n >= 4) run(std::integral_constant<int, 4>{});
        else if (n == 3) run(std::integral_constant<int, 3>{});
        else if (n == 2) run(std::integral_constant<int, 2>{});
        else run(std::integral_constant<int, 1>{});
      }
    }
    if (tiles) decode_tiles_end();
  });
}

template <int DP, typename C>
bool decode_attention_bf16_g(int64_t G, const uint16_t* qp, const C* kp, const C* vp,
                             Scales ks, Scales vs, const int64_t* table, int64_t width,
                             const int64_t* ctx, int64_t bs, float scale, uint16_t* op,
                             int64_t B, int64_t KVH, int64_t S) {
  switch (G) {
#define DS_CASE(g)                                                                          \
  case g:                                                                                   \
    decode_attention_bf16<C, g, DP>(qp, kp, vp, ks, vs, table, width, ctx, bs, scale, op, B, \
                                    KVH, S);                                                \
    return true;
    DS_CASE(1) DS_CASE(2) DS_CASE(3) DS_CASE(4) DS_CASE(5) DS_CASE(6) DS_CASE(7) DS_CASE(8)
#undef DS_CASE
    default: return false;
  }
}
#endif

#if DS_AVX512
// 8-bit caches (int8 with a scale per token and head, or fp8), head_dim 16 * DV: the
// portable loop's float arithmetic in the bf16 kernel's shape. Each K row is widened
// once for all G query heads and 16 tokens' scores are reduced together; P.V keeps up to
// 16 accumulators in registers while the V rows stream by; the next rows are prefetched.
// Results differ from the portable loop only in the order of each score's float sum.
// (The portable loop reduced every score on its own, and took 1.5x the bf16 cache's time
// at 64 rows for half its bytes.)
template <typename C, typename Q, int DV>
void decode_attention_8bit(const Q* qp, const C* kp, const C* vp, Scales ks, Scales vs,
                           const int64_t* table, int64_t width, const int64_t* ctx_lens,
                           int64_t block_size, float scale, Q* op, int64_t B, int64_t G,
                           int64_t KVH, int64_t S) {
  constexpr int64_t D = 16 * DV;
  constexpr int GC = std::max(1, 16 / DV);  // query heads a P.V pass
  const int64_t H = KVH * G;
  const int64_t piece = B * KVH / (8 * at::get_num_threads()) + 1;
  ds_parallel::pieces(0, B * KVH, piece, [&](int64_t t0, int64_t t1) {
    const FlushDenormals ftz;
    std::vector<float> scores, vscale, qf(G * D), row(D);
    std::vector<int64_t> idx;
    std::vector<__m512> part(16 * G);
    std::vector<float> denom(G);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KVH, h = task % KVH, ctx = ctx_lens[b];
      const int64_t* blocks = table + b * width;
      scores.resize(G * ctx);
      vscale.resize(ctx);
      idx.resize(ctx);
      for (int64_t t = 0, blk = 0; t < ctx; ++blk) {
        const int64_t base = h * S + blocks[blk] * block_size;
        for (int64_t i = 0, n = std::min(block_size, ctx - t); i < n; ++i, ++t)
          idx[t] = base + i;
      }
      for (int64_t g = 0; g < G; ++g)
        load_row<Q>(qp + (b * H + h * G + g) * D, D, qf.data() + g * D, scale);
      for (int64_t j = 0; j < std::min<int64_t>(ctx, 16); ++j)
        prefetch_bytes(kp + idx[j] * D, D, 0);
      // 1. scores, 16 tokens at a time
      for (int64_t base = 0; base < ctx; base += 16) {
        const int64_t n = std::min<int64_t>(16, ctx - base);
        for (int64_t j = base + 16; j < std::min<int64_t>(ctx, base + 32); ++j)
          prefetch_bytes(kp + idx[j] * D, D, 0);
        for (int64_t j = base; j < base + n; ++j) prefetch_bytes(vp + idx[j] * D, D, 1);
        alignas(64) float ksc[16] = {};
        for (int64_t j = 0; j < 16; ++j) {
          if (j >= n) {
            for (int64_t g = 0; g < G; ++g) part[g * 16 + j] = _mm512_setzero_ps();
            continue;
          }
          const C* krow = kp + idx[base + j] * D;
          __m512 kv[DV];
          for (int c = 0; c < DV; ++c) kv[c] = cache16<C>(krow + 16 * c);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            __m512 acc = _mm512_mul_ps(kv[0], _mm512_loadu_ps(qg));
            for (int c = 1; c < DV; ++c)
              acc = _mm512_fmadd_ps(kv[c], _mm512_loadu_ps(qg + 16 * c), acc);
            part[g * 16 + j] = acc;
          }
          ksc[j] = ks(idx[base + j]);
        }
        const __mmask16 mask = n == 16 ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << n) - 1);
        for (int64_t g = 0; g < G; ++g)
          _mm512_mask_storeu_ps(scores.data() + g * ctx + base, mask,
                                _mm512_mul_ps(hsum16(part.data() + g * 16),
                                              _mm512_load_ps(ksc)));
      }
      // 2. softmax numerators and denominators, per query head
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * ctx;
        float mx = -INFINITY;
        for (int64_t t = 0; t < ctx; ++t) mx = std::max(mx, sg[t]);
        denom[g] = exp_sub_sum(sg, ctx, mx);
      }
      for (int64_t t = 0; t < ctx; ++t) vscale[t] = vs(idx[t]);
      // 3. P.V, GC heads at a time
      for (int64_t g0 = 0; g0 < G; g0 += GC) {
        auto pv = [&](auto heads) {
          constexpr int GN = decltype(heads)::value;
          __m512 acc[GN][DV];
          for (int g = 0; g < GN; ++g)
            for (int c = 0; c < DV; ++c) acc[g][c] = _mm512_setzero_ps();
          for (int64_t t = 0; t < ctx; ++t) {
            const C* vrow = vp + idx[t] * D;
            __m512 vv[DV];
            for (int c = 0; c < DV; ++c) vv[c] = cache16<C>(vrow + 16 * c);
            for (int g = 0; g < GN; ++g) {
              const __m512 p = _mm512_set1_ps(scores[(g0 + g) * ctx + t] * vscale[t]);
              for (int c = 0; c < DV; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
            }
          }
          for (int g = 0; g < GN; ++g) {
            const __m512 inv = _mm512_set1_ps(1.0f / denom[g0 + g]);
            for (int c = 0; c < DV; ++c)
              _mm512_storeu_ps(row.data() + 16 * c, _mm512_mul_ps(acc[g][c], inv));
            store_row<Q>(row.data(), D, op + (b * H + h * G + g0 + g) * D);
          }
        };
        switch (std::min<int64_t>(GC, G - g0)) {
          case 1: pv(std::integral_constant<int, 1>{}); break;
          case 2: pv(std::integral_constant<int, 2>{}); break;
          case 3: pv(std::integral_constant<int, (GC >= 3 ? 3 : 1)>{}); break;
          default: pv(std::integral_constant<int, GC>{}); break;
        }
      }
    }
  });
}
#endif

template <typename C, typename Q>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, Scales k_scale, Scales v_scale,
                           const int64_t* table, int64_t width, const int64_t* ctx_lens,
                           int64_t block_size, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(0), S = k_cache.size(1);
  const int64_t G = H / KVH;
  const C* kp = k_cache.data_ptr<C>();
  const C* vp = v_cache.data_ptr<C>();
  const Q* qp = q.data_ptr<Q>();
  Q* op = out.data_ptr<Q>();
#if DS_AVX512 && defined(__AVX512BF16__)
  // bf16 queries on a bf16 cache (no scales), or on an 8-bit one (int8 with its scales,
  // fp8): the bf16 dot-product kernel
  constexpr bool eight = std::is_same_v<C, int8_t> || std::is_same_v<C, uint8_t>;
  if constexpr ((std::is_same_v<C, at::BFloat16> || eight) && std::is_same_v<Q, at::BFloat16>) {
    if ((eight || !k_scale.data) && (D == 64 || D == 128)) {
      using K = std::conditional_t<eight, C, uint16_t>;
      auto* q16 = reinterpret_cast<const uint16_t*>(qp);
      auto* k16 = reinterpret_cast<const K*>(kp);
      auto* v16 = reinterpret_cast<const K*>(vp);
      auto* o16 = reinterpret_cast<uint16_t*>(op);
      const bool done =
          D == 64 ? decode_attention_bf16_g<2, K>(G, q16, k16, v16, k_scale, v_scale, table,
                                                  width, ctx_lens, block_size, scale, o16, B,
                                                  KVH, S)
                  : decode_attention_bf16_g<4, K>(G, q16, k16, v16, k_scale, v_scale, table,
                                                  width, ctx_lens, block_size, scale, o16, B,
                                                  KVH, S);
      if (done) return;
    }
  }
#endif
#if DS_AVX512
  if constexpr ((std::is_same_v<C, int8_t> || std::is_same_v<C, uint8_t>) &&
                (std::is_same_v<Q, at::BFloat16> || std::is_same_v<Q, float>)) {
    if (D == 64) {
      return decode_attention_8bit<C, Q, 4>(qp, kp, vp, k_scale, v_scale, table, width,
                                            ctx_lens, block_size, scale, op, q.size(0), G,
                                            KVH, S);
    }
    if (D == 128) {
      return decode_attention_8bit<C, Q, 8>(qp, kp, vp, k_scale, v_scale, table, width,
                                            ctx_lens, block_size, scale, op, q.size(0), G,
                                            KVH, S);
    }
  }
#endif
#if DS_AVX512
  const bool vec = kVectorCache<C> && D % 16 == 0;
#elif DS_AVX2
  // AVX2: a float32 cache (what --dtype auto picks there) or a float16 one (--kv-cache-dtype
  // fp16, converted by F16C as it is read) in place, 8 lanes
  constexpr bool kLanes8 = std::is_same_v<C, float> || std::is_same_v<C, at::Half>;
  const bool vec8 = kLanes8 && D % 8 == 0;
  auto load8 = [](const C* p) {
    if constexpr (std::is_same_v<C, at::Half>)
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  };
#endif
  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    const FlushDenormals ftz;
    std::vector<float> qf(G * D), acc(G * D), row(D), scores, denom(G);
    std::vector<int64_t> rows_at;  // the AVX2 path's cache rows, one per token
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      const int64_t ctx = ctx_lens[b];
      scores.resize(G * ctx);
      for (int64_t g = 0; g < G; ++g)
        load_row<Q>(qp + (b * H + h * G + g) * D, D, qf.data() + g * D, scale);
      const int64_t* blocks = table + b * width;
      auto index = [&](int64_t t) {
        return h * S + blocks[t / block_size] * block_size + t % block_size;
      };
      // 1. Scores q . k for every cached token, read in place from its block.
#if DS_AVX512
      if (vec) {
        const __mmask16 all = static_cast<__mmask16>(0xFFFF);
        for (int64_t t = 0; t < ctx; ++t) {
          const int64_t idx = index(t);
          const C* krow = kp + idx * D;
          const float ks = k_scale(idx);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            __m512 a = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16)
              a = _mm512_fmadd_ps(load16<C>(krow, d, all), _mm512_loadu_ps(qg + d), a);
            scores[g * ctx + t] = _mm512_reduce_add_ps(a) * ks;
          }
        }
      } else
#elif DS_AVX2
      if (vec8) {
        for (int64_t t = 0; t < ctx; ++t) {
          const int64_t idx = index(t);
          const C* krow = kp + idx * D;
          const float ks = k_scale(idx);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();  // two FMA chains
            int64_t d = 0;
            for (; d + 16 <= D; d += 16) {
              a = _mm256_fmadd_ps(load8(krow + d), _mm256_loadu_ps(qg + d), a);
              b = _mm256_fmadd_ps(load8(krow + d + 8), _mm256_loadu_ps(qg + d + 8), b);
            }
            if (d < D) a = _mm256_fmadd_ps(load8(krow + d), _mm256_loadu_ps(qg + d), a);
            scores[g * ctx + t] = hsum8f(_mm256_add_ps(a, b)) * ks;
          }
        }
      } else
#endif
      {
        for (int64_t t = 0; t < ctx; ++t) {
          const int64_t idx = index(t);
          load_row<C>(kp + idx * D, D, row.data(), k_scale(idx));
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * row[d];
            scores[g * ctx + t] = s;
          }
        }
      }
      // 2. Softmax per query head (max-subtracted, exact up to float rounding).
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * ctx;
        float mx = -INFINITY;
        for (int64_t t = 0; t < ctx; ++t) mx = std::max(mx, sg[t]);
#if DS_AVX512
        denom[g] = exp_sub_sum(sg, ctx, mx);
#else
        denom[g] = exp_sub_sum_scalar(sg, ctx, mx);
#endif
      }
      // 3. Probability-weighted sum of V rows.
      std::fill(acc.begin(), acc.end(), 0.f);
#if DS_AVX512
      if (vec) {
        const __mmask16 all = static_cast<__mmask16>(0xFFFF);
        for (int64_t t = 0; t < ctx; ++t) {
          const int64_t idx = index(t);
          const C* vrow = vp + idx * D;
          const float vs = v_scale(idx);
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 v = load16<C>(vrow, d, all);
            for (int64_t g = 0; g < G; ++g) {
              float* ag = acc.data() + g * D + d;
              const __m512 p = _mm512_set1_ps(scores[g * ctx + t] * vs);
              _mm512_storeu_ps(ag, _mm512_fmadd_ps(p, v, _mm512_loadu_ps(ag)));
            }
          }
        }
      } else
#elif DS_AVX2
      if (vec8) {
        // Each 8-wide slice of the output in registers for up to four query heads while
        // the context streams by (the V rows stay in cache between slices).
        rows_at.resize(ctx);
        for (int64_t t = 0; t < ctx; ++t) {
          rows_at[t] = index(t);
          const float vs = v_scale(rows_at[t]);
          for (int64_t g = 0; g < G; ++g) scores[g * ctx + t] *= vs;
        }
        const C* vbase = vp;
        // GN query heads at once (a compile-time count, so the accumulators stay in
        // registers), two sets of them (even and odd tokens): 2 x GN FMA chains in flight
        auto heads_pv = [&](auto gn, int64_t g0) {
          constexpr int GN = decltype(gn)::value;
          const float* p0 = scores.data() + g0 * ctx;
          for (int64_t d = 0; d < D; d += 8) {
            __m256 a[2][GN];
            for (auto& set : a)
              for (auto& r : set) r = _mm256_setzero_ps();
            auto step = [&](int k, int64_t t) {
              const __m256 v = load8(vbase + rows_at[t] * D + d);
              for (int i = 0; i < GN; ++i)
                a[k][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p0 + i * ctx + t), v, a[k][i]);
            };
            int64_t t = 0;
            for (; t + 2 <= ctx; t += 2) {
              step(0, t);
              step(1, t + 1);
            }
            if (t < ctx) step(0, t);
            for (int i = 0; i < GN; ++i)
              _mm256_storeu_ps(acc.data() + (g0 + i) * D + d, _mm256_add_ps(a[0][i], a[1][i]));
          }
        };
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
          switch (std::min<int64_t>(4, G - g0)) {
            case 1: heads_pv(std::integral_constant<int, 1>{}, g0); break;
            case 2: heads_pv(std::integral_constant<int, 2>{}, g0); break;
            case 3: heads_pv(std::integral_constant<int, 3>{}, g0); break;
            default: heads_pv(std::integral_constant<int, 4>{}, g0); break;
          }
        }
      } else
#endif
      {
        for (int64_t t = 0; t < ctx; ++t) {
          const int64_t idx = index(t);
          load_row<C>(vp + idx * D, D, row.data(), v_scale(idx));
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * ctx + t];
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * row[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* ag = acc.data() + g * D;
        const float inv = 1.0f / denom[g];
        for (int64_t d = 0; d < D; ++d) ag[d] *= inv;
        store_row<Q>(ag, D, op + (b * H + h * G + g) * D);
      }
    }
  });
}

template <typename Q>
void decode_attention_cache(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, Scales ks, Scales vs,
                            const int64_t* table, int64_t width, const int64_t* ctx,
                            int64_t bs, float scale, at::Tensor& out) {
  switch (k_cache.scalar_type()) {
    case at::kBFloat16:
      decode_attention_impl<at::BFloat16, Q>(q, k_cache, v_cache, ks, vs, table, width, ctx,
                                             bs, scale, out);
      break;
    case at::kFloat:
      decode_attention_impl<float, Q>(q, k_cache, v_cache, ks, vs, table, width, ctx, bs,
                                      scale, out);
      break;
    case at::kHalf:
      decode_attention_impl<at::Half, Q>(q, k_cache, v_cache, ks, vs, table, width, ctx, bs,
                                         scale, out);
      break;
    case at::kChar:
      decode_attention_impl<int8_t, Q>(q, k_cache, v_cache, ks, vs, table, width, ctx, bs,
                                       scale, out);
      break;
    case at::kByte:
      decode_attention_impl<uint8_t, Q>(q, k_cache, v_cache, ks, vs, table, width, ctx, bs,
                                        scale, out);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: cache dtype ", k_cache.scalar_type(),
                  " is not supported");
  }
}

// Runs of rows that are one prompt's consecutive tokens (contexts c + 1, c + 2, ...,
// c + R on the same blocks): the whole prompt when c = 0, else a chunk after its cached
// prefix or earlier chunks. Each run attends as one causal block, not row by row (where
// each row rereads its context). On AMX tiles (prompt_attention_amx) a run of kTileRun
// rows or more; else one causal SDPA call for a whole prompt of kSdpaRun tokens or more.
// Shorter prompts go row by row: on Zen 4 (AVX-512, no AMX) a prefill step of 16 x 128
// tokens took 0.98-1.03 s against 1.17-1.28 s with SDPA, 4 x 512 1.11 against 1.42-1.59,
// 2 x 1024 about the same, 1 x 2048 2.3-2.5 against 2.2-2.4 s (benchmarks/prefill_step.py).
constexpr int64_t kSdpaRun = 1024, kTileRun = 16;

std::vector<std::pair<int64_t, int64_t>> prompt_runs(const int64_t* ctx, const int64_t* table,
                                                     int64_t B, int64_t width,
                                                     int64_t block_size, bool whole_only,
                                                     int64_t min_rows) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t i = 0; i < B;) {
    int64_t j = i + 1;
    while (j < B && ctx[j] == ctx[j - 1] + 1 && table[j * width] == table[i * width]) ++j;
    if (j - i >= min_rows && (ctx[i] == 1 || !whole_only)) {
      // every row reads the same blocks for the keys the last row sees
      const int64_t blocks = std::min(width, (ctx[j - 1] + block_size - 1) / block_size);
      bool same = true;
      for (int64_t r = i + 1; r < j && same; ++r)
        same = std::memcmp(table + r * width, table + i * width, blocks * 8) == 0;
      if (same) runs.emplace_back(i, j - i);
    }
    i = j;
  }
  return runs;
}

// ---- prompt attention on AMX tiles ------------------------------------------------------
// A run's rows against its keys as tile multiplies: per KV head, the run's keys are
// packed once as B tiles (K^T: per 16 keys, rows of 16 dimension pairs; V: per 32 keys,
// rows of 16 key pairs, for each 16 dimensions). Then each task (run, KV head, 16 rows)
// takes kKeyChunk keys at a time for every query head of its group: 16 x 16 score tiles,
// a running softmax per row in float32 with the causal limit, P in bf16, and P.V
// accumulated in float32 tiles, the earlier chunks' outputs rescaled. torch's flash SDPA
// ran this at 0.1-0.5 TF/s on a 2-core AMX Xeon, the tiles at 0.3-1.1
// (benchmarks/prompt_attention.py).
#if DS_AVX512 && defined(__AVX512BF16__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 11
#define DS_AMX 1
#else
#define DS_AMX 0
#endif

}  // namespace
namespace dsq {
extern std::atomic<bool> g_amx;  // gguf_kernels.cpp: the tiles are granted and turned on
}
namespace {

#if DS_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

// Every tile 16 rows of 64 bytes (as gguf_kernels.cpp's amx_bf16_configure sets them).
struct alignas(64) AttnTiles {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  AttnTiles() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};

// r[0..15] (16 x 16 int32) transposed in place: 32-bit, then 64-bit interleaves within
// 128-bit lanes, then the 4 x 4 lanes of each group of four.
inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i u[16];  // u[4g + k]: rows 4g .. 4g + 3 at column 4L + k, in lane L
  for (int g = 0; g < 4; ++g) {
    u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
    const __m512i x3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
}

// Keys 0 .. S - 1 of one KV head (cache rows kh / vh, slots through trow) as B tiles:
// kt per 16 keys D / 2 rows of 16 x (dimension pair), vv per 32 keys D / 16 tiles of
// 16 rows x 16 x (key pair). Keys past S are zeros.
void pack_keys(const uint16_t* kh, const uint16_t* vh, const int64_t* trow, int64_t bs,
               int64_t S, int64_t D, uint32_t* kt, uint16_t* vv) {
  const auto slot = [&](int64_t t) { return trow[t / bs] * bs + t % bs; };
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < (S + 63) / 64 * 4; ++kb) {  // whole groups of 4 key blocks
    uint32_t* o = kt + kb * 8 * D;
    for (int64_t c = 0; c < D / 32; ++c) {  // 16 dimension pairs of 16 keys at a time
      __m512i r[16];
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t t = 16 * kb + j;
        r[j] = t < S ? _mm512_loadu_si512(kh + slot(t) * D + 32 * c) : zero;
      }
      transpose16x16(r);
      for (int64_t p = 0; p < 16; ++p) _mm512_storeu_si512(o + (16 * c + p) * 16, r[p]);
    }
  }
  alignas(64) static const uint16_t pick[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37,
                                                6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43,
                                                12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(pick);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t b = 0; b < (S + 31) / 32; ++b) {
    uint16_t* o = vv + b * 32 * D;
    for (int64_t tp = 0; tp < 16; ++tp) {
      const int64_t t = 32 * b + 2 * tp;
      const uint16_t* r0 = t < S ? vh + slot(t) * D : nullptr;
      const uint16_t* r1 = t + 1 < S ? vh + slot(t + 1) * D : nullptr;
      for (int64_t d = 0; d < D; d += 32) {  // dimensions d .. d + 31 of both keys
        const __m512i a = r0 ? _mm512_loadu_si512(r0 + d) : zero;
        const __m512i e = r1 ? _mm512_loadu_si512(r1 + d) : zero;
        _mm512_storeu_si512(o + (d / 16) * 512 + tp * 32, _mm512_permutex2var_epi16(a, lo, e));
        _mm512_storeu_si512(o + (d / 16 + 1) * 512 + tp * 32,
                            _mm512_permutex2var_epi16(a, hi, e));
      }
    }
  }
}

// 2^y for y <= 0 to bf16's precision: y = n + f (|f| <= 1/2), 2^f by its degree-4 Taylor
// polynomial (relative error 4e-5, against bf16's 4e-3 rounding), times 2^n. Below 2^-126
// the result is denormal or zero (the caller flushes denormals).
inline __m512 exp2_bf16(__m512 y) {
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(0.0096181291f);  // ln2^k / k!, k = 4 .. 0
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0555041087f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265070f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471806f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Keys a task takes at a time: their packed tiles (128 KB at head size 64) stay in L2 from
// query head to query head of a group, their scores and probabilities (32 + 16 KB) in L1
// or L2, and the running softmax rescales the float32 outputs once per chunk. (128 and 256
// keys measured the same or slower on a 2048-token prompt.)
constexpr int64_t kKeyChunk = 512;

// One key chunk's scores as the tiles stored them (sb: per 16 keys, 16 rows x 16 floats,
// key blocks kb0 .. kb0 + n16 - 1 of the run) -> P = 2^(l s - the row's running max), l =
// scale log2(e), in bf16 (pb: per 32 keys, 16 rows x 32), zero past each row's causal
// limit (row r sees keys 0 .. pos0 + r) and on rows n .. 15. Updates each row's running
// max mx (in base 2) and sum sm, and returns in alpha the factor its earlier outputs take.
// Blocks of 1 KB, so the tiles load and store them with a 64-byte stride (rows a
// power-of-two apart would share cache sets).
void causal_softmax_chunk(const float* sb, int64_t kb0, int64_t n16, uint16_t* pb, int64_t n,
                          int64_t pos0, float scale, float* mx, float* sm, float* alpha) {
  // blocks before `open` have every key visible to every row (the diagonal comes later)
  const int64_t open = n == 16 ? std::clamp<int64_t>((pos0 + 1) / 16 - kb0, 0, n16) : 0;
  const auto valid = [&](int64_t kb, int64_t r) -> __mmask16 {
    const int64_t c = r < n ? std::clamp<int64_t>(pos0 + r + 1 - 16 * (kb0 + kb), 0, 16) : 0;
    return static_cast<__mmask16>((1u << c) - 1);
  };
  const float l = scale * kLog2e;
  const __m512 lv = _mm512_set1_ps(l);
  for (int r = 0; r < 16; ++r) {  // row by row: its max and sum stay in registers
    const float* x = sb + r * 16;
    uint16_t* o = pb + r * 32;
    if (r >= n) {  // no query here: zeros, and nothing to rescale
      for (int64_t kb = 0; kb < (n16 + 1) / 2 * 2; ++kb)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + kb / 2 * 512 + kb % 2 * 16),
                            _mm256_setzero_si256());
      alpha[r] = 1.0f;
      continue;
    }
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t kb = 0; kb < open; ++kb) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + kb * 256));
    for (int64_t kb = open; kb < n16; ++kb)
      mv = _mm512_mask_max_ps(mv, valid(kb, r), mv, _mm512_loadu_ps(x + kb * 256));
    // a row without keys in this chunk keeps its max (and its e^-inf terms are zeros)
    const float seen = std::max(mx[r], l * _mm512_reduce_max_ps(mv));
    alpha[r] = std::exp2(mx[r] - seen);
    mx[r] = seen;
    const __m512 neg = _mm512_set1_ps(-seen);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < (n16 + 1) / 2 * 2; ++kb) {
      const __mmask16 v = kb < open ? __mmask16(0xFFFF) : kb < n16 ? valid(kb, r) : __mmask16(0);
      const __m512 e = _mm512_maskz_mov_ps(
          v, exp2_bf16(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(v, x + kb * 256), lv, neg)));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + kb / 2 * 512 + kb % 2 * 16),
                          (__m256i)_mm512_cvtneps_pbh(e));
    }
    sm[r] = sm[r] * alpha[r] + _mm512_reduce_add_ps(sum);
  }
}

struct PromptBuffers {
  std::vector<float> s, o, t, state;
  std::vector<uint16_t> p, q;
};

// One task: rows q .. q + n - 1 (n <= 16, positions pos0 ..) of query heads h0 .. h0 + G - 1
// against the packed keys, kKeyChunk keys at a time, each chunk for every head of the group
// in turn (its keys' tiles stay in L2 from head to head); out has q's layout (row stride
// H * D).
template <int D>
void prompt_block(const uint16_t* q, uint16_t* out, int64_t n, int64_t H, int64_t h0,
                  int64_t G, int64_t pos0, const uint32_t* kt, const uint16_t* vv,
                  float scale, PromptBuffers& buf) {
  static_assert(D == 64 || D == 128, "head size 64 or 128");
  const int64_t nk = pos0 + n;
  buf.s.resize(kKeyChunk * 16);
  buf.p.resize(kKeyChunk * 16);
  buf.o.resize(G * 16 * D);
  buf.t.resize(16 * D);
  float* s = buf.s.data();
  uint16_t* pb = buf.p.data();
  float* tmp = buf.t.data();
  if (n < 16) {  // A tiles from a copy padded with zero rows
    buf.q.assign(G * 16 * D, 0);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < n; ++r)
        std::memcpy(&buf.q[(g * 16 + r) * D], q + (r * H + h0 + g) * D, D * 2);
  }
  // per head: each row's running max, sum, and this chunk's factor for the earlier outputs
  std::vector<float>& state = buf.state;
  state.assign(G * 48, 0.0f);
  for (int64_t g = 0; g < G; ++g) std::fill_n(state.begin() + g * 48, 16, -INFINITY);
  const AttnTiles cfg;
  _tile_loadconfig(&cfg);
  for (int64_t c0 = 0; c0 < nk; c0 += kKeyChunk) {
    const int64_t nc = std::min(kKeyChunk, nk - c0), n16 = (nc + 15) / 16, n32 = (nc + 31) / 32;
    const uint32_t* ktc = kt + c0 / 16 * 8 * D;
    const uint16_t* vvc = vv + c0 / 32 * 32 * D;
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* qa = n < 16 ? &buf.q[g * 16 * D] : q + (h0 + g) * D;
      const int64_t qs = n < 16 ? D * 2 : H * D * 2;
      // scores: four key blocks at a time (accumulators 4-7, so the tile unit has four
      // independent sums in flight), the group's Q tile reloaded for each 32 dimensions
      for (int64_t kb = 0; kb < n16; kb += 4) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t c = 0; c < D / 32; ++c) {
          const uint32_t* b = ktc + kb * 8 * D + 256 * c;
          _tile_loadd(0, qa + 32 * c, qs);
          _tile_loadd(1, b, 64);
          _tile_dpbf16ps(4, 0, 1);
          _tile_loadd(2, b + 8 * D, 64);
          _tile_dpbf16ps(5, 0, 2);
          _tile_loadd(3, b + 16 * D, 64);
          _tile_dpbf16ps(6, 0, 3);
          _tile_loadd(1, b + 24 * D, 64);
          _tile_dpbf16ps(7, 0, 1);
        }
        _tile_stored(4, s + 256 * kb, 64);
        _tile_stored(5, s + 256 * kb + 256, 64);
        _tile_stored(6, s + 256 * kb + 512, 64);
        _tile_stored(7, s + 256 * kb + 768, 64);
      }
      float* st = state.data() + g * 48;
      causal_softmax_chunk(s, c0 / 16, n16, pb, n, pos0, scale, st, st + 16, st + 32);
      // P.V: 64 output dimensions at a time in accumulators 4-7, stored as the head's
      // outputs (the first chunk) or added to the earlier chunks' rescaled
      float* o = &buf.o[g * 16 * D];
      float* to = c0 == 0 ? o : tmp;
      for (int64_t half = 0; half < D / 64; ++half) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t t = 0; t < n32; ++t) {
          const uint16_t* b = vvc + t * 32 * D + half * 2048;
          _tile_loadd(0, pb + 512 * t, 64);
          _tile_loadd(1, b, 64);
          _tile_loadd(2, b + 512, 64);
          _tile_dpbf16ps(4, 0, 1);
          _tile_loadd(3, b + 1024, 64);
          _tile_dpbf16ps(5, 0, 2);
          _tile_loadd(1, b + 1536, 64);
          _tile_dpbf16ps(6, 0, 3);
          _tile_dpbf16ps(7, 0, 1);
        }
        _tile_stored(4, to + 64 * half, D * 4);
        _tile_stored(5, to + 64 * half + 16, D * 4);
        _tile_stored(6, to + 64 * half + 32, D * 4);
        _tile_stored(7, to + 64 * half + 48, D * 4);
      }
      for (int64_t r = 0; r < n && c0 > 0; ++r) {
        const __m512 a = _mm512_set1_ps(st[32 + r]);
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(o + r * D + d, _mm512_fmadd_ps(_mm512_loadu_ps(o + r * D + d), a,
                                                          _mm512_loadu_ps(tmp + r * D + d)));
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < n; ++r) {
      const __m512 inv = _mm512_set1_ps(1.0f / state[g * 48 + 16 + r]);
      const float* o = &buf.o[(g * 16 + r) * D];
      for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r * H + h0 + g) * D + d),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d), inv)));
    }
}

// Whether prompt_attention_amx takes runs of this head size.
bool prompt_tiles(int64_t D) { return dsq::g_amx && (D == 64 || D == 128); }

// ---- decode scores on AMX tiles ---------------------------------------------------------
// One decode task's G query heads against its keys: every 16 keys are 16 consecutive
// cache rows (block_size a multiple of 16), loaded as an A tile in place (16 keys x 32
// dimensions, the row stride D), against the heads' q as B tiles (16 dimension pairs x G
// heads, built once a task): C holds 16 keys x G scores in float32, read back per head
// by a gather. A tile multiply costs the same for G rows as for 16, and replaces the
// 2 G dot instructions a key plus their horizontal sums: the kernel alone 1.05-1.1x, a
// 64-row step about 3% (BENCHMARKS.md, "Where a 64-stream decode step goes on AMX"; the
// attention there mostly waits on memory). Keys past ctx in the last block are
// multiplied and never read back.
bool decode_tiles(int64_t block_size) { return dsq::g_amx && block_size % 16 == 0; }

// A thread's tiles for decode_scores_tiles, from its first task to decode_tiles_end: 0 C,
// 16 keys x G; 1 A, 16 keys x 32 dimensions; 2 .. 1 + DP: B, q per 32 dimensions.
void decode_tiles_begin(int G, int DP) {
  AttnTiles cfg;
  cfg.colsb[0] = 4 * G;
  for (int c = 0; c < DP; ++c) cfg.colsb[2 + c] = 4 * G;
  asm volatile("" : : "m"(cfg) : "memory");  // (GCC 12 dropped the stores ldtilecfg reads)
  _tile_loadconfig(&cfg);
}

void decode_tiles_end() { _tile_release(); }

void decode_scores_tiles(int G, int DP, const uint16_t* q, const uint16_t* kp,
                         const uint16_t* vp, const int64_t* rows, int64_t ctx, float scale,
                         float* scores) {
  const int64_t D = 32 * DP;  // DP 2 or 4; G at most 8 (tiles as decode_tiles_begin set)
  alignas(64) uint32_t qt[4][16 * 8];  // row r of B tile c: dims 32c + 2r, +1 of each head
  const uint32_t* q32 = reinterpret_cast<const uint32_t*>(q);
  for (int c = 0; c < DP; ++c)
    for (int r = 0; r < 16; ++r)
      for (int g = 0; g < G; ++g) qt[c][r * G + g] = q32[g * (D / 2) + 16 * c + r];
  _tile_loadd(2, qt[0], 4 * G);
  _tile_loadd(3, qt[1], 4 * G);
  if (DP == 4) {
    _tile_loadd(4, qt[2], 4 * G);
    _tile_loadd(5, qt[3], 4 * G);
  }
  alignas(64) float cb[16 * 8];
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(G));
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t base = 0; base < ctx; base += 16) {
    const int64_t n = std::min<int64_t>(16, ctx - base);
    for (int64_t j = base + 16; j < std::min<int64_t>(ctx, base + 32); ++j)
      prefetch_bytes(kp + rows[j], 2 * D, 0);
    for (int64_t j = base; j < base + n; ++j) prefetch_bytes(vp + rows[j], 2 * D, 1);
    const uint16_t* k0 = kp + rows[base];
    _tile_zero(0);
    _tile_loadd(1, k0, 2 * D);
    _tile_dpbf16ps(0, 1, 2);
    _tile_loadd(1, k0 + 32, 2 * D);
    _tile_dpbf16ps(0, 1, 3);
    if (DP == 4) {
      _tile_loadd(1, k0 + 64, 2 * D);
      _tile_dpbf16ps(0, 1, 4);
      _tile_loadd(1, k0 + 96, 2 * D);
      _tile_dpbf16ps(0, 1, 5);
    }
    _tile_stored(0, cb, 4 * G);
    const __mmask16 mask = n == 16 ? static_cast<__mmask16>(0xFFFF)
                                   : static_cast<__mmask16>((1u << n) - 1);
    for (int g = 0; g < G; ++g) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask,
                                                _mm512_add_epi32(lanes, _mm512_set1_epi32(g)),
                                                cb, 4);
      _mm512_mask_storeu_ps(scores + g * ctx + base, mask, _mm512_mul_ps(v, sc));
    }
  }
}

// Every run on the tiles; false (nothing written) where they cannot take them.
bool prompt_attention_amx(const at::Tensor& qc, const at::Tensor& k_cache,
                          const at::Tensor& v_cache,
                          const std::vector<std::pair<int64_t, int64_t>>& runs,
                          const int64_t* ctx, const int64_t* table, int64_t width,
                          int64_t bs, float scale, at::Tensor& out) {
  const int64_t H = qc.size(1), D = qc.size(2), KVH = k_cache.size(0), G = H / KVH;
  if (!prompt_tiles(D)) return false;
  // per (run, KV head): where its packed keys start (in uint16s), and its tasks
  std::vector<int64_t> offs(runs.size() * KVH + 1, 0);
  struct Task {
    int64_t run, g, first;
  };
  std::vector<Task> tasks;
  for (size_t r = 0; r < runs.size(); ++r) {
    const auto [i0, R] = runs[r];
    const int64_t S = ctx[i0 + R - 1];
    for (int64_t g = 0; g < KVH; ++g) {
      const size_t k = r * KVH + g;
      offs[k + 1] = offs[k] + ((S + 63) / 64 * 64 + (S + 31) / 32 * 32) * D;
      for (int64_t f = 0; f < R; f += 16) tasks.push_back({static_cast<int64_t>(r), g, f});
    }
  }
  // KV head by KV head (both threads read one head's packed keys, which then stay in
  // their L2s), the longest first within each, so the last pieces handed out are short
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    if (a.g != b.g) return a.g < b.g;
    return ctx[runs[a.run].first + a.first] > ctx[runs[b.run].first + b.first];
  });
  // (uninitialized: pack_keys writes every entry, zeros past each run's keys)
  const at::Tensor packed_keys = at::empty({offs.back()}, at::kShort);
  uint16_t* const packed = reinterpret_cast<uint16_t*>(packed_keys.data_ptr<int16_t>());
  const auto* kc = static_cast<const uint16_t*>(k_cache.data_ptr());
  const auto* vc = static_cast<const uint16_t*>(v_cache.data_ptr());
  const int64_t head = k_cache.size(1) * D;
  ds_parallel::pieces(0, static_cast<int64_t>(runs.size()) * KVH, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const auto [i0, R] = runs[k / KVH];
      const int64_t g = k % KVH, S = ctx[i0 + R - 1];
      uint16_t* base = packed + offs[k];
      pack_keys(kc + g * head, vc + g * head, table + (i0 + R - 1) * width, bs, S, D,
                reinterpret_cast<uint32_t*>(base), base + (S + 63) / 64 * 64 * D);
    }
  });
  const auto* qp = static_cast<const uint16_t*>(qc.data_ptr());
  auto* op = static_cast<uint16_t*>(out.data_ptr());
  ds_parallel::pieces(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t e) {
    FlushDenormals flush;
    thread_local PromptBuffers buf;
    for (int64_t i = b; i < e; ++i) {
      const Task& t = tasks[i];
      const auto [i0, R] = runs[t.run];
      const int64_t row = i0 + t.first, n = std::min<int64_t>(16, R - t.first);
      const size_t k = t.run * KVH + t.g;
      const uint16_t* base = packed + offs[k];
      const auto* kt = reinterpret_cast<const uint32_t*>(base);
      const uint16_t* vv = base + (ctx[i0 + R - 1] + 63) / 64 * 64 * D;
      if (D == 64)
        prompt_block<64>(qp + row * H * D, op + row * H * D, n, H, t.g * G, G, ctx[row] - 1,
                         kt, vv, scale, buf);
      else
        prompt_block<128>(qp + row * H * D, op + row * H * D, n, H, t.g * G, G, ctx[row] - 1,
                          kt, vv, scale, buf);
    }
    _tile_release();  // (as the GEMMs do: the thread's context switches then skip the tiles)
  });
  return true;
}

#pragma GCC pop_options
#else
bool prompt_tiles(int64_t) { return false; }
bool decode_tiles(int64_t) { return false; }
void decode_tiles_begin(int, int) {}
void decode_tiles_end() {}
void decode_scores_tiles(int, int, const uint16_t*, const uint16_t*, const uint16_t*,
                         const int64_t*, int64_t, float, float*) {}
bool prompt_attention_amx(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::vector<std::pair<int64_t, int64_t>>&, const int64_t*,
                          const int64_t*, int64_t, int64_t, float, at::Tensor&) {
  return false;
}
#endif

at::Tensor decode_attention_rows(const at::Tensor& qc, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const Scales& ksp,
                                 const Scales& vsp, const at::Tensor& table,
                                 const at::Tensor& ctx, int64_t block_size, float sc);

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache,
                                  const c10::optional<at::Tensor>& k_scale,
                                  const c10::optional<at::Tensor>& v_scale,
                                  const at::Tensor& block_table, const at::Tensor& ctx_lens,
                                  int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "paged_decode_attention: q [B,H,D], caches [KVH,slots,D]");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong,
              "block_table and ctx_lens must be int64");
  at::Tensor qc = q.contiguous();
  at::Tensor table = block_table.contiguous();
  at::Tensor ctx = ctx_lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const Scales ksp = scales_of(k_scale), vsp = scales_of(v_scale);
  const float sc = static_cast<float>(scale);
  const int64_t B = qc.size(0), width = table.size(1);
  const bool bf16 = qc.scalar_type() == at::kBFloat16 &&
                    k_cache.scalar_type() == at::kBFloat16 && !ksp.data && !vsp.data;
  const bool tiles = bf16 && prompt_tiles(qc.size(2));
  const int64_t least = tiles ? kTileRun : kSdpaRun;
  const auto runs = bf16 && B >= least
      ? prompt_runs(ctx.data_ptr<int64_t>(), table.data_ptr<int64_t>(), B, width, block_size,
                    !tiles, least)
      : std::vector<std::pair<int64_t, int64_t>>{};
  if (runs.empty()) return decode_attention_rows(qc, k_cache, v_cache, ksp, vsp, table, ctx,
                                                 block_size, sc);
  at::Tensor out = at::empty_like(qc);
  std::vector<int64_t> rest;  // rows the row-by-row kernel takes
  const int64_t H = qc.size(1), KVH = k_cache.size(0);
  const int64_t* tp = table.data_ptr<int64_t>();
  if (tiles) prompt_attention_amx(qc, k_cache, v_cache, runs, ctx.data_ptr<int64_t>(), tp,
                                  width, block_size, sc, out);
  int64_t next = 0;
  for (const auto& [i0, R] : runs) {
    for (; next < i0; ++next) rest.push_back(next);
    next = i0 + R;
    if (tiles) continue;
    std::vector<int64_t> slots(R);
    for (int64_t t = 0; t < R; ++t)
      slots[t] = tp[i0 * width + t / block_size] * block_size + t % block_size;
    const at::Tensor idx = at::from_blob(slots.data(), {R}, at::kLong);
    const at::Tensor k = k_cache.index_select(1, idx).unsqueeze(0);  // [1, KVH, R, D]
    const at::Tensor v = v_cache.index_select(1, idx).unsqueeze(0);
    const at::Tensor qr = qc.narrow(0, i0, R).permute({1, 0, 2}).unsqueeze(0);
    const at::Tensor o = at::scaled_dot_product_attention(qr, k, v, c10::nullopt, 0.0, true,
                                                          scale, H != KVH);
    out.narrow(0, i0, R).copy_(o[0].permute({1, 0, 2}));
  }
  for (; next < B; ++next) rest.push_back(next);
  if (!rest.empty()) {
    const at::Tensor idx =
        at::from_blob(rest.data(), {static_cast<int64_t>(rest.size())}, at::kLong).clone();
    out.index_copy_(0, idx, decode_attention_rows(qc.index_select(0, idx), k_cache, v_cache,
                                                  ksp, vsp, table.index_select(0, idx),
                                                  ctx.index_select(0, idx), block_size, sc));
  }
  return out;
}

// The row-by-row kernel: each row of q against its own context.
at::Tensor decode_attention_rows(const at::Tensor& qc, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const Scales& ksp,
                                 const Scales& vsp, const at::Tensor& table,
                                 const at::Tensor& ctx, int64_t block_size, float sc) {
  at::Tensor out = at::empty_like(qc);
  const int64_t width = table.size(1);
  switch (qc.scalar_type()) {
    case at::kBFloat16:
      decode_attention_cache<at::BFloat16>(qc, k_cache, v_cache, ksp, vsp,
                                           table.data_ptr<int64_t>(), width,
                                           ctx.data_ptr<int64_t>(), block_size, sc, out);
      break;
    case at::kFloat:
      decode_attention_cache<float>(qc, k_cache, v_cache, ksp, vsp, table.data_ptr<int64_t>(),
                                    width, ctx.data_ptr<int64_t>(), block_size, sc, out);
      break;
    case at::kHalf:
      decode_attention_cache<at::Half>(qc, k_cache, v_cache, ksp, vsp,
                                       table.data_ptr<int64_t>(), width,
                                       ctx.data_ptr<int64_t>(), block_size, sc, out);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: query dtype ", qc.scalar_type(),
                  " is not supported");
  }
  return out;
}

// ---- fused per-layer element-wise ops ---------------------------------------------------
// Each replaces several torch ops of a decoder layer (one dispatch instead of 4-10) and
// rounds to the compute dtype at the same points as the torch code in models/llama.py,
// so bf16 results match it up to the order of float32 sums.

#if DS_AVX512
// e^x for any float x (clamped to the finite range), by the same polynomial.
inline __m512 exp_any(__m512 x) {
  return exp_nonpos_unclamped(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)),
                                            _mm512_set1_ps(88.0f)));
}

// 16 floats -> 16 bf16, round to nearest even (NaN is not expected here).
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// v rounded to the nearest bf16 (ties to even), kept in float lanes: to_bf16's rounding
// add, then the low half cleared
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(-65536)));
}
#endif

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

// out = weight * dtype(x * rsqrt(mean(x^2) + eps)); with a residual, x = dtype(x + residual)
// first, and that sum is returned too (the next residual stream).
#if DS_AVX512
template <typename T>
inline void store16(T* dst, __m512 v);
template <>
inline void store16<float>(float* dst, __m512 v) {
  _mm512_storeu_ps(dst, v);
}
template <>
inline void store16<at::BFloat16>(at::BFloat16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), to_bf16(v));
}
template <typename T>
inline __m512 round_to_vec(__m512 v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) return round_bf16(v);
  return v;
}

// store16 of values already rounded to T (round_to_vec): a bf16 is the float's high half
template <typename T>
inline void store16_rounded(T* dst, __m512 v) {
  if constexpr (std::is_same_v<T, at::BFloat16>)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
  else
    store16<T>(dst, v);
}
#endif

#if DS_AVX512 && defined(__AVX512BF16__)
// 32 bf16 (one 64-byte vector) as two float vectors, values 0-15 and 16-31
inline void bf16x32_to_float(__m512i v, __m512& lo, __m512& hi) {
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}

// rms_norm_impl for bf16 rows of a multiple of 32: 32 values a step, each rounding one
// vcvtne2ps2bf16 (nearest even, as round_bf16) rather than five integer operations a 16,
// the weight widened to float once a call. The same arithmetic in the same order.
void rms_norm_bf16x32(const uint16_t* x, const uint16_t* res, const uint16_t* w,
                      uint16_t* out, uint16_t* sum, int64_t rows, int64_t dim, float eps) {
  std::vector<float> wf(dim);
  for (int64_t i = 0; i < dim; i += 32) {
    __m512 lo, hi;
    bf16x32_to_float(_mm512_loadu_si512(w + i), lo, hi);
    _mm512_storeu_ps(wf.data() + i, lo);
    _mm512_storeu_ps(wf.data() + i + 16, hi);
  }
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(dim);
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* xr = x + r * dim;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < dim; i += 32) {
        __m512 lo, hi;
        bf16x32_to_float(_mm512_loadu_si512(xr + i), lo, hi);
        if (res) {
          __m512 rlo, rhi;
          bf16x32_to_float(_mm512_loadu_si512(res + r * dim + i), rlo, rhi);
          const __m512i s16 = (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(hi, rhi),
                                                           _mm512_add_ps(lo, rlo));
          _mm512_storeu_si512(sum + r * dim + i, s16);
          bf16x32_to_float(s16, lo, hi);
        }
        _mm512_storeu_ps(buf.data() + i, lo);
        _mm512_storeu_ps(buf.data() + i + 16, hi);
        ss = _mm512_fmadd_ps(lo, lo, ss);
        ss = _mm512_fmadd_ps(hi, hi, ss);
      }
      const __m512 inv = _mm512_set1_ps(
          1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(dim) + eps));
      for (int64_t i = 0; i < dim; i += 32) {
        __m512 lo, hi;
        bf16x32_to_float(
            (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(buf.data() + i + 16), inv),
                                         _mm512_mul_ps(_mm512_loadu_ps(buf.data() + i), inv)),
            lo, hi);
        _mm512_storeu_si512(out + r * dim + i, (__m512i)_mm512_cvtne2ps_pbh(
            _mm512_mul_ps(_mm512_loadu_ps(wf.data() + i + 16), hi),
            _mm512_mul_ps(_mm512_loadu_ps(wf.data() + i), lo)));
      }
    }
  });
}
#endif

template <typename T>
void rms_norm_impl(const T* x, const T* res, const T* w, T* out, T* sum, int64_t rows,
                   int64_t dim, float eps) {
#if DS_AVX512 && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (dim % 32 == 0)
      return rms_norm_bf16x32(reinterpret_cast<const uint16_t*>(x),
                              reinterpret_cast<const uint16_t*>(res),
                              reinterpret_cast<const uint16_t*>(w),
                              reinterpret_cast<uint16_t*>(out),
                              reinterpret_cast<uint16_t*>(sum), rows, dim, eps);
#endif
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(dim);
    for (int64_t r = r0; r < r1; ++r) {
#if DS_AVX512
      if (dim % 16 == 0) {
        const __mmask16 all = static_cast<__mmask16>(0xFFFF);
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) {
          __m512 v = load16<T>(x + r * dim, i, all);
          if (res) {
            v = round_to_vec<T>(_mm512_add_ps(v, load16<T>(res + r * dim, i, all)));
            store16_rounded<T>(sum + r * dim + i, v);
          }
          _mm512_storeu_ps(buf.data() + i, v);
          ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 inv = _mm512_set1_ps(
            1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(dim) + eps));
        for (int64_t i = 0; i < dim; i += 16) {
          const __m512 n = round_to_vec<T>(_mm512_mul_ps(_mm512_loadu_ps(buf.data() + i), inv));
          store16<T>(out + r * dim + i, _mm512_mul_ps(load16<T>(w, i, all), n));
        }
        continue;
      }
#endif
      const T* xr = x + r * dim;
      if (res) {
        for (int64_t i = 0; i < dim; ++i) {
          const T s = round_to<T>(static_cast<float>(xr[i]) + static_cast<float>(res[r * dim + i]));
          sum[r * dim + i] = s;
          buf[i] = static_cast<float>(s);
        }
      } else {
        for (int64_t i = 0; i < dim; ++i) buf[i] = static_cast<float>(xr[i]);
      }
      // one sum of squares for both: the compiler contracted it into multiply-adds in
      // one version of a shared loop and not in the other, so norm(x + r) differed from
      // norm of the same sum passed in (float32, AVX2: a one-call step against its layers)
      float ss = 0.f;
      for (int64_t i = 0; i < dim; ++i) ss += buf[i] * buf[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
      T* o = out + r * dim;
      for (int64_t i = 0; i < dim; ++i)
        o[i] = round_to<T>(static_cast<float>(w[i]) *
                           static_cast<float>(round_to<T>(buf[i] * inv)));
    }
  });
}

std::vector<at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rms_norm: x must be contiguous [T, dim]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight dtype must match x");
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor out = at::empty_like(x);
  at::Tensor sum;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual must match x");
    sum = at::empty_like(x);
  }
  at::Tensor w = weight.contiguous();
  if (x.scalar_type() == at::kBFloat16) {
    using T = at::BFloat16;
    rms_norm_impl<T>(x.data_ptr<T>(), residual ? residual->data_ptr<T>() : nullptr,
                     w.data_ptr<T>(), out.data_ptr<T>(), sum.defined() ? sum.data_ptr<T>() : nullptr,
                     rows, dim, static_cast<float>(eps));
  } else if (x.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(x.data_ptr<float>(), residual ? residual->data_ptr<float>() : nullptr,
                         w.data_ptr<float>(), out.data_ptr<float>(),
                         sum.defined() ? sum.data_ptr<float>() : nullptr, rows, dim,
                         static_cast<float>(eps));
  } else {
    TORCH_CHECK(false, "rms_norm: dtype ", x.scalar_type(), " is not supported");
  }
  if (!sum.defined()) return {out};
  return {out, sum};
}

// Rotary embedding (half-rotation layout) on the q and k parts of a fused qkv row, with
// k and v written to the layer's KV cache at their slots. Returns rotated q and k.
// The cache row: the compute dtype's bytes; (--kv-cache-dtype fp16) each value rounded to
// float16; (int8, C = int8_t) codes round(x / s), s = max |x| / 127 in float32 (at least
// 1e-8), clamped to +-127, s kept at `scale` in the compute dtype; (fp8, C = uint8_t)
// each value's e4m3 bits. The 8-bit rows are LayerKV._encode's, bit for bit.
template <typename T, typename C>
inline void store_cache_row(C* dst, const T* src, int64_t dim, T* scale) {
  if constexpr (std::is_same_v<T, C>) {
    std::memcpy(dst, src, dim * sizeof(T));
  } else if constexpr (std::is_same_v<C, int8_t>) {
    float amax = 0.f;
    for (int64_t i = 0; i < dim; ++i) amax = std::max(amax, std::fabs(static_cast<float>(src[i])));
    const float s = std::max(amax / 127.0f, 1e-8f);
    for (int64_t i = 0; i < dim; ++i) {
      const float c = std::nearbyint(static_cast<float>(src[i]) / s);  // half to even
      dst[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, c)));
    }
    *scale = static_cast<T>(s);
  } else if constexpr (std::is_same_v<C, uint8_t>) {
    for (int64_t i = 0; i < dim; ++i)
      dst[i] = c10::Float8_e4m3fn(static_cast<float>(src[i])).x;
  } else {
    for (int64_t i = 0; i < dim; ++i) dst[i] = static_cast<C>(static_cast<float>(src[i]));
  }
}

template <typename T, typename C>
void rope_write_impl(const T* qkv, const T* cos, const T* sin, const int64_t* slots,
                     C* kc, C* vc, T* ks, T* vs, T* q_out, T* k_out, int64_t rows,
                     int64_t heads, int64_t kv_heads, int64_t dim, int64_t num_slots) {
  const int64_t width = (heads + 2 * kv_heads) * dim, half = dim / 2;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = qkv + r * width;
      const T* c = cos + r * dim;
      const T* s = sin + r * dim;
      auto rotate = [&](const T* src, T* dst) {
#if DS_AVX512
        if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, float>) {
          if (half % 16 == 0) {  // 16 pairs (i, i + half) at a time, rounded as below
            const __mmask16 all = static_cast<__mmask16>(0xFFFF);
            for (int64_t i = 0; i < half; i += 16) {
              const __m512 x1 = load16<T>(src, i, all), x2 = load16<T>(src, i + half, all);
              const __m512 lo = round_to_vec<T>(_mm512_add_ps(
                  round_to_vec<T>(_mm512_mul_ps(x1, load16<T>(c, i, all))),
                  round_to_vec<T>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2),
                                                load16<T>(s, i, all)))));
              const __m512 hi = round_to_vec<T>(_mm512_add_ps(
                  round_to_vec<T>(_mm512_mul_ps(x2, load16<T>(c, i + half, all))),
                  round_to_vec<T>(_mm512_mul_ps(x1, load16<T>(s, i + half, all)))));
              store16<T>(dst + i, lo);
              store16<T>(dst + i + half, hi);
            }
            return;
          }
        }
#endif
        for (int64_t i = 0; i < dim; ++i) {
          const float rot = i < half ? -static_cast<float>(src[i + half])
                                     : static_cast<float>(src[i - half]);
          const T a = round_to<T>(static_cast<float>(src[i]) * static_cast<float>(c[i]));
          const T b = round_to<T>(rot * static_cast<float>(s[i]));
          dst[i] = round_to<T>(static_cast<float>(a) + static_cast<float>(b));
        }
      };
      for (int64_t h = 0; h < heads; ++h) rotate(row + h * dim, q_out + (r * heads + h) * dim);
      const int64_t slot = slots[r];
      for (int64_t h = 0; h < kv_heads; ++h) {
        T* kd = k_out + (r * kv_heads + h) * dim;
        rotate(row + (heads + h) * dim, kd);
        const int64_t at = h * num_slots + slot;
        store_cache_row(kc + at * dim, kd, dim, ks ? ks + at : nullptr);
        store_cache_row(vc + at * dim, row + (heads + kv_heads + h) * dim, dim,
                        vs ? vs + at : nullptr);
      }
    }
  });
}

std::vector<at::Tensor> rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos,
                                      const at::Tensor& sin, at::Tensor k_cache,
                                      at::Tensor v_cache, const at::Tensor& slots,
                                      int64_t heads, int64_t kv_heads,
                                      const c10::optional<at::Tensor>& k_scale,
                                      const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "rope_write_kv: qkv [T, width]");
  const int64_t rows = qkv.size(0), kvh = k_cache.size(0), num_slots = k_cache.size(1),
                dim = k_cache.size(2);
  TORCH_CHECK(kvh == kv_heads && qkv.size(1) == (heads + 2 * kv_heads) * dim,
              "rope_write_kv: qkv width does not match heads and the cache");
  const auto ct = k_cache.scalar_type();
  const bool half_cache = ct == at::kHalf && qkv.scalar_type() != at::kHalf;
  const bool int8_cache = ct == at::kChar, fp8_cache = ct == at::kByte;
  TORCH_CHECK((ct == qkv.scalar_type() || half_cache || int8_cache || fp8_cache) &&
                  v_cache.scalar_type() == ct && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "rope_write_kv: caches must be contiguous, in the compute dtype, float16, "
              "int8 or fp8 (uint8)");
  TORCH_CHECK(int8_cache == (k_scale.has_value() && v_scale.has_value()),
              "rope_write_kv: an int8 cache takes k_scale and v_scale, no other cache does");
  for (const auto* t : {&k_scale, &v_scale})
    if (t->has_value())
      TORCH_CHECK((*t)->scalar_type() == qkv.scalar_type() && (*t)->is_contiguous() &&
                      (*t)->numel() == kvh * num_slots,
                  "rope_write_kv: scales [kv_heads, slots, 1], contiguous, in the compute "
                  "dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == rows,
              "rope_write_kv: one int64 slot per row");
  at::Tensor c = cos.reshape({rows, dim}).contiguous(), s = sin.reshape({rows, dim}).contiguous();
  at::Tensor sl = slots.contiguous();
  at::Tensor q = at::empty({rows, heads, dim}, qkv.options());
  at::Tensor k = at::empty({rows, kv_heads, dim}, qkv.options());
  auto run = [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using C = decltype(c_tag);
    rope_write_impl<T, C>(qkv.data_ptr<T>(), c.data_ptr<T>(), s.data_ptr<T>(),
                          sl.data_ptr<int64_t>(), static_cast<C*>(k_cache.data_ptr()),
                          static_cast<C*>(v_cache.data_ptr()),
                          k_scale ? k_scale->data_ptr<T>() : nullptr,
                          v_scale ? v_scale->data_ptr<T>() : nullptr, q.data_ptr<T>(),
                          k.data_ptr<T>(), rows, heads, kv_heads, dim, num_slots);
  };
  auto with_cache = [&](auto t_tag) {
    using T = decltype(t_tag);
    if (half_cache) run(T{}, at::Half{});
    else if (int8_cache) run(T{}, int8_t{});
    else if (fp8_cache) run(T{}, uint8_t{});
    else run(T{}, T{});
  };
  if (qkv.scalar_type() == at::kBFloat16) {
    with_cache(at::BFloat16{});
  } else if (qkv.scalar_type() == at::kFloat) {
    with_cache(float{});
  } else {
    TORCH_CHECK(false, "rope_write_kv: dtype ", qkv.scalar_type(), " is not supported");
  }
  return {q, k};
}


// SwiGLU of one row: o = dtype(silu(g)) * u, over `inter` values.
#if DS_AVX512
// dtype(silu(g)) * u for 16 lanes: silu rounded to bf16 first where the dtype is bf16
template <bool bf>
inline __m512 silu_mul16(__m512 gv, __m512 uv) {
  __m512 act = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                               exp_any(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
  if (bf) act = round_bf16(act);
  return _mm512_mul_ps(act, uv);
}
#endif

template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* o, int64_t inter) {
      int64_t i = 0;
#if DS_AVX512
      if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, float>) {
        constexpr bool bf = std::is_same_v<T, at::BFloat16>;
        const __mmask16 all = static_cast<__mmask16>(0xFFFF);
        for (; i + 16 <= inter; i += 16) {
          const __m512 y = silu_mul16<bf>(load16<T>(g, i, all), load16<T>(u, i, all));
          if constexpr (bf) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), to_bf16(y));
          } else {
            _mm512_storeu_ps(reinterpret_cast<float*>(o + i), y);
          }
        }
      }
#elif DS_AVX2
      if constexpr (std::is_same_v<T, float>) {
        const __m256 one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= inter; i += 8) {
          const __m256 gv = _mm256_loadu_ps(g + i);
          const __m256 act = _mm256_div_ps(
              gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
          _mm256_storeu_ps(o + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
        }
      }
#endif
      for (; i < inter; ++i) {
        const float gv = static_cast<float>(g[i]);
        const T act = round_to<T>(gv / (1.0f + std::exp(-gv)));
        o[i] = round_to<T>(static_cast<float>(act) * static_cast<float>(u[i]));
      }
}

// SwiGLU: dtype(silu(gate)) * up, from the fused [T, 2I] gate_up projection.
template <typename T>
void silu_mul_impl(const T* gu, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      silu_mul_row(gu + r * 2 * inter, gu + r * 2 * inter + inter, out + r * inter, inter);
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be contiguous [T, 2 * intermediate]");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16) {
    silu_mul_impl<at::BFloat16>(gate_up.data_ptr<at::BFloat16>(),
                                out.data_ptr<at::BFloat16>(), rows, inter);
  } else if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_impl<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  } else {
    TORCH_CHECK(false, "silu_mul: dtype ", gate_up.scalar_type(), " is not supported");
  }
  return out;
}

}  // namespace

namespace dsq {  // called by gguf_kernels.cpp's AMX tiles, whose gate_up never leaves them
// SwiGLU of a tile's float32 gate and up sums (16 columns, `rows` rows of 16 floats):
// both rounded to bf16 first, then silu_mul_row's own silu_mul16, so the result is
// silu_mul's on a bf16 gate_up, bit for bit (tests compare the two).
void swiglu_tile_bf16(const float* gate, const float* up, int64_t rows, uint16_t* out,
                      int64_t ld) {
#if DS_AVX512
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 y = silu_mul16<true>(round_bf16(_mm512_loadu_ps(gate + 16 * r)),
                                      round_bf16(_mm512_loadu_ps(up + 16 * r)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ld), to_bf16(y));
  }
#else
  for (int64_t r = 0; r < rows; ++r) {
    at::BFloat16 g[16], u[16];
    for (int i = 0; i < 16; ++i) {
      g[i] = static_cast<at::BFloat16>(gate[16 * r + i]);
      u[i] = static_cast<at::BFloat16>(up[16 * r + i]);
    }
    silu_mul_row(g, u, reinterpret_cast<at::BFloat16*>(out + r * ld), 16);
  }
#endif
}
}  // namespace dsq

namespace {

// ---- sampling ---------------------------------------------------------------------------

// One draw per row from softmax(logits): the row's exp-sum, then a scan of the cumulative
// mass up to u * sum. -inf entries have probability exactly 0. No [N, V] temporaries
// (torch's softmax + cumsum + searchsorted took 5.6 ms at 64 x 49k). AVX-512 computes
// each exp once, keeping the values and their sums per 16 and per 256 entries (in
// double) for the scan, which then steps over whole 256s and 16s: at 64 x 49k, 3.3 ->
// 0.8 ms against recomputing them in a second pass.
at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& uniform) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "sample_rows: logits must be float32 [N, V]");
  TORCH_CHECK(uniform.scalar_type() == at::kFloat && uniform.numel() == logits.size(0),
              "sample_rows: one float32 uniform number per row");
  at::Tensor lc = logits.contiguous(), uc = uniform.contiguous();
  const int64_t rows = lc.size(0), V = lc.size(1);
  at::Tensor out = at::empty({rows}, lc.options().dtype(at::kLong));
  const float* lp = lc.data_ptr<float>();
  const float* up = uc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
#if DS_AVX512
    // one row's exp values, each 16's sum and each 256's (in double), reused by the scan
    const int64_t nblk = (V + 15) / 16, nsup = (nblk + 15) / 16;
    std::vector<float> ev(nblk * 16);
    std::vector<double> blk(nblk), sup(nsup);
#endif
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = lp + r * V;
      float mx = -INFINITY;
#if DS_AVX512
      auto mask_at = [&](int64_t i) {
        return V - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                           : static_cast<__mmask16>((1u << (V - i)) - 1);
      };
      {
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < V; i += 16) {
          const __mmask16 mask = mask_at(i);
          mv = _mm512_mask_max_ps(mv, mask, mv, _mm512_maskz_loadu_ps(mask, x + i));
        }
        mx = _mm512_reduce_max_ps(mv);
      }
#else
      for (int64_t i = 0; i < V; ++i) mx = std::max(mx, x[i]);
#endif
      int64_t pick = 0;
      if (mx == -INFINITY) {  // nothing allowed: keep index 0, as argmax would
        op[r] = 0;
        continue;
      }
#if DS_AVX512
      // 1. exp(x - max), zero where the logit is -inf, stored; sums per 16 and per 256
      const __m512 m = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY);
      double total = 0.0;
      for (int64_t s0 = 0; s0 < nsup; ++s0) {
        __m512d acc = _mm512_setzero_pd();
        for (int64_t k = s0 * 16; k < std::min(nblk, (s0 + 1) * 16); ++k) {
          const int64_t i = k * 16;
          const __mmask16 mask = mask_at(i);
          const __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
          const __mmask16 live = mask & _mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_OQ);
          const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpos(_mm512_sub_ps(v, m)));
          _mm512_storeu_ps(ev.data() + i, e);
          const __m512d wide = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)),
                                             _mm512_cvtps_pd(_mm256_castpd_ps(
                                                 _mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
          blk[k] = _mm512_reduce_add_pd(wide);
          acc = _mm512_add_pd(acc, wide);
        }
        sup[s0] = _mm512_reduce_add_pd(acc);
        total += sup[s0];
      }
      // 2. the first entry where the cumulative mass passes u * total: by 256s, 16s, 1s
      const double target = static_cast<double>(up[r]) * total;
      double run = 0.0;
      int64_t s0 = 0, k = 0, i = 0;
      for (; s0 < nsup && run + sup[s0] <= target; ++s0) run += sup[s0];
      pick = -1;
      if (s0 < nsup) {
        for (k = s0 * 16; k < std::min(nblk, (s0 + 1) * 16) && run + blk[k] <= target; ++k)
          run += blk[k];
        for (i = k * 16; i < V && pick < 0; ++i) {  // (within block k, but for rounding)
          if (ev[i] <= 0.f) continue;
          run += ev[i];
          if (run > target) pick = i;
        }
      }
      if (pick < 0)  // rounding left the target past the last allowed entry: take it
        for (i = V - 1; i >= 0 && pick < 0; --i)
          if (ev[i] > 0.f) pick = i;
#elif DS_AVX2
      const __m256 m = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
      auto block_exp = [&](int64_t i) {  // eight lanes, zero where the logit is -inf
        const __m256 v = _mm256_loadu_ps(x + i);
        return _mm256_and_ps(_mm256_cmp_ps(v, ninf, _CMP_NEQ_OQ),
                             exp8(_mm256_sub_ps(v, m)));
      };
      auto tail_exp = [&](int64_t i) {
        return x[i] == -INFINITY ? 0.0 : static_cast<double>(std::exp(x[i] - mx));
      };
      const int64_t V8 = V / 8 * 8;
      double total = 0.0;
      for (int64_t i = 0; i < V8; i += 8) total += hsum8f(block_exp(i));
      for (int64_t i = V8; i < V; ++i) total += tail_exp(i);
      const double target = static_cast<double>(up[r]) * total;
      double run = 0.0;
      int64_t last_live = -1;
      bool found = false;
      for (int64_t i = 0; i < V8 && !found; i += 8) {
        alignas(32) float e[8];
        _mm256_store_ps(e, block_exp(i));
        const double block = std::accumulate(e, e + 8, 0.0);
        if (run + block <= target) {
          run += block;
          for (int j = 7; j >= 0; --j)
            if (e[j] > 0.f) { last_live = i + j; break; }
          continue;
        }
        for (int j = 0; j < 8; ++j) {
          if (e[j] <= 0.f) continue;
          last_live = i + j;
          run += e[j];
          if (run > target) { found = true; break; }
        }
      }
      for (int64_t i = V8; i < V && !found; ++i) {
        if (x[i] == -INFINITY) continue;
        last_live = i;
        run += tail_exp(i);
        found = run > target;
      }
      pick = last_live;  // rounding can leave the target just past the end: last token
#else
      double total = 0.0;
      for (int64_t i = 0; i < V; ++i) total += x[i] == -INFINITY ? 0.0 : std::exp(x[i] - mx);
      const double target = static_cast<double>(up[r]) * total;
      double run = 0.0;
      for (int64_t i = 0; i < V; ++i) {
        if (x[i] == -INFINITY) continue;
        pick = i;
        run += std::exp(x[i] - mx);
        if (run > target) break;
      }
#endif
      op[r] = pick;
    }
  });
  return out;
}

// Greedy picks: each row's first index of its largest value, as torch.argmax gives it (a
// NaN, which no logit should be, counts as the largest, and the first one wins). One pass
// for the maximum and one for its first position, vectorized; torch.argmax keeps an index
// beside every lane's running maximum (64 x 49152: 2.7 ms against 0.3 ms here).
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "argmax_rows: logits must be float32 [N, V], V > 0");
  at::Tensor lc = logits.contiguous();
  const int64_t rows = lc.size(0), V = lc.size(1);
  at::Tensor out = at::empty({rows}, lc.options().dtype(at::kLong));
  const float* lp = lc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = lp + r * V;
      float mx = -INFINITY;
      bool nan = false;
      int64_t i = 0;
#if DS_AVX512
      __m512 mv = _mm512_set1_ps(-INFINITY);
      __mmask16 unordered = 0;
      for (; i + 16 <= V; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mv = _mm512_max_ps(mv, v);
      }
      mx = _mm512_reduce_max_ps(mv);
      nan = unordered != 0;
#elif DS_AVX2
      __m256 mv = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
      for (; i + 8 <= V; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        mv = _mm256_max_ps(mv, v);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mv);
      for (float v : lanes) mx = std::max(mx, v);
      nan = _mm256_movemask_ps(unordered) != 0;
#endif
      for (; i < V; ++i) {
        nan = nan || std::isnan(x[i]);
        mx = std::max(mx, x[i]);
      }
      int64_t pick = -1;
      i = 0;
      if (nan) {
        while (!std::isnan(x[i])) ++i;
        pick = i;
      }
#if DS_AVX512
      const __m512 target = _mm512_set1_ps(mx);
      for (; i + 16 <= V && pick < 0; i += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
        if (hit) pick = i + __builtin_ctz(hit);
      }
#elif DS_AVX2
      const __m256 target = _mm256_set1_ps(mx);
      for (; i + 8 <= V && pick < 0; i += 8) {
        const int hit = _mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
        if (hit) pick = i + __builtin_ctz(hit);
      }
#endif
      for (; i < V && pick < 0; ++i)
        if (x[i] == mx) pick = i;
      op[r] = pick;
    }
  });
  return out;
}

}  // namespace

namespace dsq {  // gguf_kernels.cpp
at::Tensor linear_gguf(const at::Tensor& x, const at::Tensor& weight, int64_t qtype,
                       const c10::optional<at::Tensor>& bias);
at::Tensor swiglu_gguf(const at::Tensor& x, const at::Tensor& weight, int64_t qtype);
}

namespace {

// One layer on x, plus `res` where given (the previous layer's MLP output, added here by
// the input norm in the same pass). With gu_w: {x + attention, the MLP's output}, left for
// the caller to add; without: {norm(x + attention), x + attention}.
std::vector<at::Tensor> layer_parts(
    const at::Tensor& x, const c10::optional<at::Tensor>& res, const at::Tensor& in_norm,
    const at::Tensor& post_norm, double eps, const c10::optional<at::Tensor>& q_norm,
    const c10::optional<at::Tensor>& k_norm, const at::Tensor& qkv_w, int64_t qkv_type,
    const c10::optional<at::Tensor>& qkv_bias, const at::Tensor& o_w, int64_t o_type,
    const c10::optional<at::Tensor>& gu_w, int64_t gu_type,
    const c10::optional<at::Tensor>& down_w, int64_t down_type, const at::Tensor& cos,
    const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
    const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
    const at::Tensor& slots, int64_t heads, int64_t kv_heads, const at::Tensor& block_table,
    const at::Tensor& ctx_lens, int64_t block_size, double scale) {
  const int64_t t = x.size(0), dim = k_cache.size(2);
  const auto first = rms_norm(x, res, in_norm, eps);  // [norm(x + res), x + res]
  const at::Tensor& h = first[0];
  const at::Tensor& xs = res.has_value() ? first[1] : x;
  const at::Tensor qkv = dsq::linear_gguf(h, qkv_w, qkv_type, qkv_bias);
  if (q_norm.has_value() && k_norm.has_value()) {
    const int64_t widths[2] = {heads * dim, kv_heads * dim};
    const at::Tensor* norms[2] = {&*q_norm, &*k_norm};
    for (int64_t i = 0, off = 0; i < 2; off += widths[i], ++i) {
      at::Tensor part = qkv.narrow(1, off, widths[i]);
      part.copy_(rms_norm(part.reshape({-1, dim}).contiguous(), c10::nullopt, *norms[i],
                          eps)[0].view({t, -1}));
    }
  }
  const auto qk = rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads,
                                k_scale, v_scale);
  const at::Tensor attn = paged_decode_attention(qk[0], k_cache, v_cache, k_scale, v_scale,
                                                 block_table, ctx_lens, block_size, scale);
  const at::Tensor o = dsq::linear_gguf(attn.reshape({t, -1}), o_w, o_type, c10::nullopt);
  auto hx = rms_norm(xs, o, post_norm, eps);  // [norm(x + o), x + o]
  if (!gu_w.has_value() || !down_w.has_value()) return hx;
  at::Tensor act = dsq::swiglu_gguf(hx[0], *gu_w, gu_type);  // on AMX tiles, in one pass
  if (!act.defined()) act = silu_mul(dsq::linear_gguf(hx[0], *gu_w, gu_type, c10::nullopt));
  return {hx[1], dsq::linear_gguf(act, *down_w, down_type, c10::nullopt)};
}

// One decoder layer of a decode step (one new token per sequence) on GGUF-block
// projections, in one call: the same kernels, in the same order and with the same
// rounding points, as DecoderLayer.forward_fused calls one by one from Python, whose
// ten dispatches per layer cost more than the arithmetic at small batches. With q_norm
// and k_norm (Qwen3) each q and k head is normed before rotary. With gu_w, returns
// [the layer's output rows]; without (a mixture-of-experts layer, whose MLP Python
// runs), [norm(x + attention), x + attention]. k and v are written to the caches.
std::vector<at::Tensor> decode_layer(
    const at::Tensor& x, const at::Tensor& in_norm, const at::Tensor& post_norm, double eps,
    const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
    const at::Tensor& qkv_w, int64_t qkv_type, const c10::optional<at::Tensor>& qkv_bias,
    const at::Tensor& o_w, int64_t o_type, const c10::optional<at::Tensor>& gu_w,
    int64_t gu_type, const c10::optional<at::Tensor>& down_w, int64_t down_type,
    const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
    const at::Tensor& slots, int64_t heads, int64_t kv_heads, const at::Tensor& block_table,
    const at::Tensor& ctx_lens, int64_t block_size, double scale,
    const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale) {
  auto parts = layer_parts(x, c10::nullopt, in_norm, post_norm, eps, q_norm, k_norm, qkv_w,
                           qkv_type, qkv_bias, o_w, o_type, gu_w, gu_type, down_w, down_type,
                           cos, sin, k_cache, v_cache, k_scale, v_scale, slots, heads,
                           kv_heads, block_table, ctx_lens, block_size, scale);
  if (!gu_w.has_value() || !down_w.has_value()) return parts;
  return {parts[0] + parts[1]};
}

// Every layer of a dense model's decode step in one call: decode_layer for layer i on the
// i-th entry of each list, its output the next layer's input. One dispatch a step instead
// of one a layer (each carries 26 arguments through the dispatcher and Python). A layer's
// residual add goes into the next one's input norm (the same sum, one pass fewer).
at::Tensor decode_layers(
    const at::Tensor& x, at::TensorList in_norms, at::TensorList post_norms, double eps,
    const c10::List<c10::optional<at::Tensor>>& q_norms,
    const c10::List<c10::optional<at::Tensor>>& k_norms, at::TensorList qkv_ws,
    at::IntArrayRef qkv_types, const c10::List<c10::optional<at::Tensor>>& qkv_biases,
    at::TensorList o_ws, at::IntArrayRef o_types, at::TensorList gu_ws,
    at::IntArrayRef gu_types, at::TensorList down_ws, at::IntArrayRef down_types,
    const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_caches,
    at::TensorList v_caches, const at::Tensor& slots, int64_t heads, int64_t kv_heads,
    const at::Tensor& block_table, const at::Tensor& ctx_lens, int64_t block_size,
    double scale, const c10::List<c10::optional<at::Tensor>>& k_scales,
    const c10::List<c10::optional<at::Tensor>>& v_scales) {
  const size_t n = in_norms.size();
  TORCH_CHECK(k_scales.size() == v_scales.size() && (k_scales.empty() || k_scales.size() == n),
              "decode_layers: k_scales and v_scales: one entry a layer, or none");
  const auto scale_of = [](const c10::List<c10::optional<at::Tensor>>& l, size_t i) {
    return l.empty() ? c10::optional<at::Tensor>() : l.get(i);
  };
  TORCH_CHECK(post_norms.size() == n && q_norms.size() == n && k_norms.size() == n &&
                  qkv_ws.size() == n && qkv_types.size() == n && qkv_biases.size() == n &&
                  o_ws.size() == n && o_types.size() == n && gu_ws.size() == n &&
                  gu_types.size() == n && down_ws.size() == n && down_types.size() == n &&
                  k_caches.size() == n && v_caches.size() == n,
              "decode_layers: every per-layer list needs one entry a layer");
  at::Tensor h = x;
  c10::optional<at::Tensor> res;
  for (size_t i = 0; i < n; ++i) {
    auto parts = layer_parts(h, res, in_norms[i], post_norms[i], eps, q_norms.get(i),
                             k_norms.get(i), qkv_ws[i], qkv_types[i], qkv_biases.get(i),
                             o_ws[i], o_types[i], gu_ws[i], gu_types[i], down_ws[i],
                             down_types[i], cos, sin, k_caches[i], v_caches[i],
                             scale_of(k_scales, i), scale_of(v_scales, i), slots, heads,
                             kv_heads, block_table, ctx_lens, block_size, scale);
    h = parts[0];
    res = parts[1];
  }
  return res.has_value() ? h + *res : h;
}

// ---- latent_decode ---------------------------------------------------------------------
// MLA decode attention (models/deepseek.py): H query heads [B, H, D] against one shared
// latent head, the cache [slots, D] read in place through the block table; values are the
// first V entries of each cached row. One task per (sequence, 4 heads): each cached row is
// read once for its 4 heads' scores and once for their weighted sum, float32 throughout
// with an exact two-pass softmax. Replaces a gather copy, two bf16 bmm calls and a masked
// softmax (about 200 us a layer at one sequence, most of it per-call cost).
inline float bf16_to_f(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float dot_bf16_rows(const uint16_t* a, const uint16_t* b, int64_t D) {
  int64_t i = 0;
  float s = 0.f;
#if DS_AVX512 && defined(__AVX512BF16__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 32 <= D; i += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + i),
                           (__m512bh)_mm512_loadu_si512(b + i));
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < D; ++i) s += bf16_to_f(a[i]) * bf16_to_f(b[i]);
  return s;
}

inline void add_scaled_bf16_row(float* acc, float p, const uint16_t* row, int64_t V) {
  int64_t i = 0;
#if DS_AVX512
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= V; i += 16) {
    const __m512 r = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i))),
        16));
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, r, _mm512_loadu_ps(acc + i)));
  }
#endif
  for (; i < V; ++i) acc[i] += p * bf16_to_f(row[i]);
}

at::Tensor latent_decode(const at::Tensor& q, const at::Tensor& cache,
                         const at::Tensor& block_table, const at::Tensor& ctx_lens,
                         int64_t block_size, double scale, int64_t value_dim) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 2 && q.size(2) == cache.size(1) &&
                  q.scalar_type() == at::kBFloat16 && cache.scalar_type() == at::kBFloat16 &&
                  value_dim > 0 && value_dim <= q.size(2),
              "latent_decode: q [B, H, D] and cache [slots, D] in bfloat16, 0 < value_dim <= D");
  const at::Tensor qc = q.contiguous(), cc = cache.contiguous();
  const at::Tensor table = block_table.to(at::kLong).contiguous();
  const at::Tensor ctx = ctx_lens.to(at::kLong).contiguous();
  const int64_t B = qc.size(0), H = qc.size(1), D = qc.size(2), V = value_dim;
  const int64_t W = table.size(1), slots = cc.size(0);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == B && ctx.numel() == B,
              "latent_decode: block_table [B, W] and ctx_lens [B]");
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = ctx.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= W * block_size, "latent_decode: context ", lp[b],
                " does not fit the block table");
    for (int64_t j = 0; j < (lp[b] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(tp[b * W + j] >= 0 && (tp[b * W + j] + 1) * block_size <= slots,
                  "latent_decode: block ", tp[b * W + j], " is outside the cache");
  }
  at::Tensor out = at::empty({B, H, V}, qc.options());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cc.data_ptr<at::BFloat16>());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  constexpr int64_t G = 4;
  const int64_t chunks = (H + G - 1) / G;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores, acc;
    std::vector<const uint16_t*> rows;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / chunks, h0 = (task % chunks) * G;
      const int64_t g_n = std::min(G, H - h0), n = lp[b];
      rows.resize(n);
      for (int64_t t = 0; t < n; ++t)
        rows[t] = cp + (tp[b * W + t / block_size] * block_size + t % block_size) * D;
      scores.resize(g_n * n);
      acc.assign(g_n * V, 0.f);
      const uint16_t* qb = qp + (b * H + h0) * D;
      for (int64_t t = 0; t < n; ++t)
        for (int64_t g = 0; g < g_n; ++g)
          scores[g * n + t] = dot_bf16_rows(qb + g * D, rows[t], D) * sc;
      float denom[G];
      for (int64_t g = 0; g < g_n; ++g) {
        float* sg = scores.data() + g * n;
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sg[t]);
#if DS_AVX512
        denom[g] = n ? exp_sub_sum(sg, n, mx) : 1.f;
#else
        denom[g] = n ? exp_sub_sum_scalar(sg, n, mx) : 1.f;
#endif
      }
      int64_t v0 = 0;
#if DS_AVX512
      // 64 values of every head at a time in registers, over all the context's rows
      for (; g_n == G && v0 + 64 <= V; v0 += 64) {
        __m512 a[G][4];
        for (int64_t g = 0; g < G; ++g)
          for (int k = 0; k < 4; ++k) a[g][k] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; ++t) {
          __m512 x[4];
          for (int k = 0; k < 4; ++k)
            x[k] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[t] + v0 + 16 * k))),
                16));
          for (int64_t g = 0; g < G; ++g) {
            const __m512 pg = _mm512_set1_ps(scores[g * n + t]);
            for (int k = 0; k < 4; ++k) a[g][k] = _mm512_fmadd_ps(pg, x[k], a[g][k]);
          }
        }
        for (int64_t g = 0; g < G; ++g)
          for (int k = 0; k < 4; ++k) _mm512_storeu_ps(acc.data() + g * V + v0 + 16 * k, a[g][k]);
      }
#endif
      if (v0 < V)
        for (int64_t t = 0; t < n; ++t)
          for (int64_t g = 0; g < g_n; ++g)
            add_scaled_bf16_row(acc.data() + g * V + v0, scores[g * n + t], rows[t] + v0,
                                V - v0);
      for (int64_t g = 0; g < g_n; ++g) {
        at::BFloat16* orow = op + (b * H + h0 + g) * V;
        const float inv = 1.f / denom[g];
        for (int64_t v = 0; v < V; ++v) orow[v] = at::BFloat16(acc[g * V + v] * inv);
      }
    }
  });
  return out;
}

}  // namespace

// One build per instruction set (kernels.py), each under its own namespace, e.g.
// torch.ops.deepserve_avx2; DS_NS names it (the extra macro level expands it).


#ifndef DS_NS
#define DS_NS deepserve
#endif
#define DS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define DS_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

DS_LIBRARY(DS_NS, m) {
  m.def("linear_small(Tensor x, Tensor weight, Tensor? row_scale, Tensor? bias) -> Tensor");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_scale, "
      "Tensor? v_scale, Tensor block_table, Tensor ctx_lens, int block_size, float scale) "
      "-> Tensor");
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> Tensor[]");
  m.def(
      "rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slots, int heads, int kv_heads, Tensor(c!)? k_scale=None, "
      "Tensor(d!)? v_scale=None) -> Tensor[]");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def(
      "latent_decode(Tensor q, Tensor cache, Tensor block_table, Tensor ctx_lens, "
      "int block_size, float scale, int value_dim) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor packed, Tensor scales, Tensor lows, Tensor? bias) -> Tensor");
  m.def("has_avx512_bf16() -> bool", &has_avx512_bf16);
  m.def("sample_rows(Tensor logits, Tensor uniform) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.def(
      "decode_layer(Tensor x, Tensor in_norm, Tensor post_norm, float eps, Tensor? q_norm, "
      "Tensor? k_norm, Tensor qkv_w, int qkv_type, Tensor? qkv_bias, Tensor o_w, int o_type, "
      "Tensor? gu_w, int gu_type, Tensor? down_w, int down_type, Tensor cos, Tensor sin, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, int heads, int kv_heads, "
      "Tensor block_table, Tensor ctx_lens, int block_size, float scale, "
      "Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None) -> Tensor[]");
  m.def(
      "decode_layers(Tensor x, Tensor[] in_norms, Tensor[] post_norms, float eps, "
      "Tensor?[] q_norms, Tensor?[] k_norms, Tensor[] qkv_ws, int[] qkv_types, "
      "Tensor?[] qkv_biases, Tensor[] o_ws, int[] o_types, Tensor[] gu_ws, int[] gu_types, "
      "Tensor[] down_ws, int[] down_types, Tensor cos, Tensor sin, Tensor(a!)[] k_caches, "
      "Tensor(b!)[] v_caches, Tensor slots, int heads, int kv_heads, Tensor block_table, "
      "Tensor ctx_lens, int block_size, float scale, Tensor?[] k_scales, "
      "Tensor?[] v_scales) -> Tensor");
}

DS_LIBRARY_IMPL(DS_NS, CPU, m) {
  m.impl("linear_small", &linear_small);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_write_kv", &rope_write_kv);
  m.impl("silu_mul", &silu_mul);
  m.impl("latent_decode", &latent_decode);
  m.impl("linear_int4", &linear_int4);
  m.impl("sample_rows", &sample_rows);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_layers", &decode_layers);
}
