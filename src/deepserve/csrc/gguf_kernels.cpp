// deepserve's GGUF block kernels: y = x W^T with W kept in the file's own blocks.
//
// Formats (32 weights per block, as GGUF stores them):
//   Q4_0  fp16 d, 16 bytes of nibbles        w = d * (q - 8)      18 bytes
//   Q4_1  fp16 d, fp16 m, 16 bytes nibbles    w = d * q + m        20 bytes
//   Q8_0  fp16 d, 32 signed bytes             w = d * q            34 bytes
// Nibble i of a block holds weight i (low half) and weight i + 16 (high half).
//
// Q8_0 multiplies float rows (row_dot_q8f), or on AVX-512 and AVX2, interleaved like the
// 4-bit types (type 108), rows split into two 8-bit parts (group_q8x16 on AVX-512,
// group_q8x8 on AVX2, where a 576 x 49152 head ran 1.0-1.7x the float-row kernel's speed
// in two parts and 1.9-2.4x in one, at 1-32 rows; bmm_gguf runs one such matrix
// per head, MLA's W_UK / W_UV); type 208, the same blocks against rows in one 8-bit part
// per block of 32, is for output heads. For Q4_0 / Q4_1 each input row is quantized
// once per call to 8 bits per block of 32 (one float scale and the sum of the block's
// codes), as llama.cpp does, so a block's dot product is an integer dot of 32 bytes
// plus two multiply-adds:
//   sum_i w_i x_i = d_w d_x sum_i q_i c_i + m_w (d_x sum_i c_i)
// (Q4_0 is Q4_1 with m = -8 d). The integer dots use AVX512-VNNI (vpdpbusd), AVX2
// (vpmaddubsw + vpmaddwd), or plain loops, chosen by how this file was compiled (see
// kernels.py: one build per instruction set, picked at run time). Blocks go eight at a
// time, so their scales are applied with vector multiplies, and every weight block is
// unpacked once for up to eight input rows (AVX-512; four on AVX2, which has half the
// registers).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "parallel.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && \
    defined(__AVX512BW__)
#define DSQ_ISA 2  // AVX-512 with VNNI
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DSQ_ISA 1  // AVX2 + FMA + F16C
#else
#define DSQ_ISA 0  // portable C++
#endif

namespace dsq {

constexpr int QK = 32;
// Q5_0, Q5_1, Q4_K and Q6_K name the layouts deepserve rewrites those types into at load,
// exactly (layers/kquants.py), per 32 weights:
//   Q5_0/1  fp16 d, fp16 m, 16 bytes of nibbles, 4 bytes of fifth bits    w = d * q + m
//           (byte j's bit 2t + h: weight 16h + 4t + j)          24 bytes (run interleaved)
//   Q4_K    per 256: fp32 d, fp32 -dmin, 8 byte scales sc_j, 8 byte mins m_j, 128 bytes of
//           nibbles; w = (d sc_j) q - dmin m_j          152 bytes (run interleaved)
//   Q6_K    two halves of fp32 s, 16 int8 codes   w = s * q       40 bytes
enum QType : int64_t {
  kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14
};

inline int64_t block_bytes(int64_t t) {
  switch (t) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ8_0: return 34;
    case kQ4_K: return 19;  // per 32 weights: 152 per super-block of 256
    case kQ5_0: case kQ5_1: return 24;
    case kQ6_K: return 40;
    default: return 0;
  }
}

inline float half_to_float(uint16_t h) {
#if DSQ_ISA >= 1
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ---- activations: float rows -> 8-bit codes, a scale and a code sum per block -----------

struct QRows {
  std::vector<int8_t> q;    // [M, K]
  std::vector<float> d;     // [M, K/32]
  std::vector<float> s;     // [M, K/32]: d * sum of the block's codes
  std::vector<int32_t> n;   // [M, K/32]: the sum of the block's codes
};

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

#if DSQ_ISA >= 1
// 8 or 16 floats of a float or bf16 row (bf16: the 16 bits moved up, exact).
template <typename T>
inline __m256 load8_ps(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// One block of 32 values to codes, as the scalar loop below computes them, bit for bit:
// the same float max, division and products, and vcvtps2dq's round-to-nearest-even is
// nearbyint's under the default rounding mode. The decode step quantizes every layer's
// inputs four times; the scalar loop took about 8% of a 64-row step (Zen 4).
template <typename T>
inline void quantize_block(const T* src, int8_t* q, float& d_out, float& s_out,
                           int32_t& n_out) {
#if DSQ_ISA == 2
  __m512 v0, v1;
  if constexpr (std::is_same_v<T, float>) {
    v0 = _mm512_loadu_ps(src);
    v1 = _mm512_loadu_ps(src + 16);
  } else {
    const __m512i h = _mm512_loadu_si512(src);
    v0 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
    v1 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / 127.f;
  const float inv = d > 0.f ? 1.f / d : 0.f;
  const __m512 vi = _mm512_set1_ps(inv);
  const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vi));
  const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(c0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(c1));
  const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
#else
  __m256 v[4];
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int k = 0; k < 4; ++k) {
    v[k] = load8_ps(src + 8 * k);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float d = amax / 127.f;
  const float inv = d > 0.f ? 1.f / d : 0.f;
  const __m256 vi = _mm256_set1_ps(inv);
  __m256i c[4];
  for (int k = 0; k < 4; ++k) c[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], vi));
  // int32 -> int16 -> int8 packs interleave 128-bit lanes; the permute puts them back
  const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]),
                                       _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m256i t = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
  const int sum = _mm_cvtsi128_si32(t4);
#endif
  d_out = d;
  s_out = d * static_cast<float>(sum);
  n_out = sum;
}
#endif

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, QRows& out) {
  const int64_t nb = K / QK;
  out.q.resize(M * K);
  out.d.resize(M * nb);
  out.s.resize(M * nb);
  out.n.resize(M * nb);
  at::parallel_for(0, M * nb, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* src = x + i * QK;  // rows are contiguous, so block i is at i * 32
#if DSQ_ISA >= 1
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
        quantize_block(src, out.q.data() + i * QK, out.d[i], out.s[i], out.n[i]);
        continue;
      }
#endif
      float v[QK];
      float amax = 0.f;
      for (int j = 0; j < QK; ++j) {
        v[j] = to_f(src[j]);
        amax = std::max(amax, std::fabs(v[j]));
      }
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* q = out.q.data() + i * QK;
      for (int j = 0; j < QK; ++j) {
        const int c = static_cast<int>(std::nearbyint(v[j] * inv));
        q[j] = static_cast<int8_t>(c);
        sum += c;
      }
      out.d[i] = d;
      out.s[i] = d * static_cast<float>(sum);
      out.n[i] = sum;
    }
  });
}

// ---- one weight row against R input rows ----------------------------------------------

// Block b of a weight row: its scale, its offset (m; Q8_0 has none) and its codes.
template <int64_t T>
inline void block_scales(const uint8_t* blk, float& d, float& m) {
  d = half_to_float(load_u16(blk));
  if (T == kQ4_1) m = half_to_float(load_u16(blk + 2));
  else if (T == kQ4_0) m = -8.f * d;
  else m = 0.f;
}

template <int64_t T>
inline const uint8_t* block_codes(const uint8_t* blk) {
  return blk + (T == kQ4_1 ? 4 : 2);
}

#if DSQ_ISA >= 1
// The weight bytes kAhead past a block in use, asked for into L1 while this block is
// computed, and those kFar past it into L2: a decode step streams every weight once,
// mostly from memory, and the hardware prefetchers stop at each 4 KB page. With L1 alone
// one core kept too few lines in flight: a one-row GEMV over weights in memory read
// 12-13 GB/s a core where a plain sum reads 27 (Zen 4); the far L2 requests give 20-22.
constexpr int64_t kAhead = 2048, kFar = 16384;
inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kAhead + o), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + kFar + o), _MM_HINT_T1);
  }
}

// 32 codes of a 4-bit block as unsigned bytes 0..15, in weight order.
inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Integer dot of 32 unsigned 4-bit weight codes with 32 signed activation codes, as 8
// int32 partial sums: AVX512-VNNI's vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd.
inline __m256i dot32(__m256i w, __m256i x) {
#if DSQ_ISA == 2
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

// The eight partial-sum vectors of eight blocks reduced to one vector of eight block sums,
// [sum p0, ..., sum p7]: three rounds of pairwise adds instead of eight horizontal sums, so
// the blocks' scales can then be applied with vector multiplies.
inline __m256i block_sums8(const __m256i* p) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]),
                                      _mm256_hadd_epi32(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]),
                                      _mm256_hadd_epi32(p[6], p[7]));
  // a = [p0..p3 low halves | p0..p3 high halves], b likewise for p4..p7
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                          _mm256_permute2x128_si256(a, b, 0x31));
}
#endif

#if DSQ_ISA >= 1
// Blocks b0 .. b0 + 7 of a weight row against R input rows, added to acc. The eight
// integer dots of an input row become one vector of block sums, multiplied by the eight
// weight scales times the row's eight scales, plus the eight offsets times the row's
// eight scaled code sums (xs).
template <int64_t T, int R>
inline void group8(const uint8_t* wrow, int64_t b0, const int8_t* xq, const float* xd,
                   const float* xs, int64_t nb, __m256* acc) {
  const int64_t bb = block_bytes(T);
  __m256i w[8], p[8];
  for (int j = 0; j < 8; ++j) w[j] = unpack_nibbles(block_codes<T>(wrow + (b0 + j) * bb));
  // the eight blocks' fp16 d (and m) in one gather of their first four bytes
  const __m256i head = _mm256_i32gather_epi32(
      reinterpret_cast<const int*>(wrow + b0 * bb),
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                         _mm256_set1_epi32(static_cast<int>(bb))), 1);
  const __m256i lo = _mm256_and_si256(head, _mm256_set1_epi32(0xffff));
  const __m256i hi = _mm256_srli_epi32(head, 16);
  // per 128-bit lane [lo0-3, hi0-3 | lo4-7, hi4-7] -> [lo0-7 | hi0-7]
  const __m256i halves = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
  const __m256 vd = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  const __m256 vm = T == kQ4_1 ? _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1))
                               : _mm256_mul_ps(vd, _mm256_set1_ps(-8.f));
  for (int r = 0; r < R; ++r) {
    const int64_t xi = r * nb + b0;
    const int8_t* x = xq + xi * QK;
    for (int j = 0; j < 8; ++j)
      p[j] = dot32(w[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j * QK)));
    const __m256 sums = _mm256_cvtepi32_ps(block_sums8(p));
    acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(vd, _mm256_loadu_ps(xd + xi)), acc[r]);
    acc[r] = _mm256_fmadd_ps(vm, _mm256_loadu_ps(xs + xi), acc[r]);
  }
}
#endif

// out[r] = dot(weight row, input row r) for R rows of 8-bit codes, from Q4_0 / Q4_1 blocks.
template <int64_t T, int R>
inline void row_dot(const uint8_t* wrow, const int8_t* xq, const float* xd, const float* xs,
                    int64_t K, float* out, int64_t out_stride) {
  const int64_t nb = K / QK, bb = block_bytes(T);
#if DSQ_ISA >= 1
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  float corr[R] = {};
  int64_t b = 0;
  // Groups of eight pay off from three rows up; for one or two rows their reduction
  // costs more than it saves, and every block goes one at a time (5-10% faster there).
  if (R > 2)
    for (; b + 8 <= nb; b += 8) group8<T, R>(wrow, b, xq, xd, xs, nb, acc);
  for (; b < nb; ++b) {  // the blocks left, one at a time
    const uint8_t* blk = wrow + b * bb;
    float d, m;
    block_scales<T>(blk, d, m);
    const __m256i w = unpack_nibbles(block_codes<T>(blk));
    for (int r = 0; r < R; ++r) {
      const int64_t xi = r * nb + b;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + xi * QK));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(w, x)), _mm256_set1_ps(d * xd[xi]),
                               acc[r]);
      corr[r] += m * xs[xi];
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = hsum8(acc[r]) + corr[r];
#else
  float acc[R];
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * bb;
    float d, m;
    block_scales<T>(blk, d, m);
    const uint8_t* qs = block_codes<T>(blk);
    int8_t wq[QK];
    for (int j = 0; j < 16; ++j) {
      wq[j] = static_cast<int8_t>(qs[j] & 0x0f);
      wq[j + 16] = static_cast<int8_t>(qs[j] >> 4);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t xi = r * nb + b;
      const int8_t* x = xq + xi * QK;
      int32_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int j = 0; j < QK; ++j) s += static_cast<int32_t>(wq[j]) * x[j];
      acc[r] += d * xd[xi] * static_cast<float>(s) + m * xs[xi];
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = acc[r];
#endif
}

inline float load_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

#if DSQ_ISA == 0
// Portable: one block's 32 weights, already as floats, against R float rows.
template <int R>
inline void block_rows_f(const float* w, const float* x, int64_t K, int64_t b, float* acc) {
  for (int r = 0; r < R; ++r) {
    const float* xb = x + r * K + b * QK;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < QK; ++j) s += w[j] * xb[j];
    acc[r] += s;
  }
}
#endif

// Q6_K as deepserve keeps it: 32 weights as two halves of (fp32 scale, 16 int8 codes),
// each block turned into scaled floats once, then multiplied into R float rows.
template <int R>
inline void row_dot_q6f(const uint8_t* wrow, const float* x, int64_t K, float* out,
                        int64_t out_stride) {
  const int64_t nb = K / QK, bb = block_bytes(kQ6_K);
#if DSQ_ISA == 2
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * bb;
    __m512 w[2];
    for (int h = 0; h < 2; ++h)
      w[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                               reinterpret_cast<const __m128i*>(blk + 20 * h + 4)))),
                           _mm512_set1_ps(load_f32(blk + 20 * h)));
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * K + b * QK;
      acc[r] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xb), acc[r]);
      acc[r] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xb + 16), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = _mm512_reduce_add_ps(acc[r]);
#elif DSQ_ISA == 1
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * bb;
    __m256 w[4];
    for (int j = 0; j < 4; ++j) {
      const uint8_t* half = blk + 20 * (j / 2);
      w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                               reinterpret_cast<const __m128i*>(half + 4 + 8 * (j % 2))))),
                           _mm256_set1_ps(load_f32(half)));
    }
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * K + b * QK;
      for (int j = 0; j < 4; ++j)
        acc[r] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xb + 8 * j), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = hsum8(acc[r]);
#else
  float acc[R];
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * bb;
    float w[QK];
    for (int h = 0; h < 2; ++h) {
      const float sc = load_f32(blk + 20 * h);
      const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 20 * h + 4);
      for (int j = 0; j < 16; ++j) w[16 * h + j] = sc * qs[j];
    }
    block_rows_f<R>(w, x, K, b, acc);
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = acc[r];
#endif
}

// Q8_0 against float rows: each block's 32 codes become floats in registers, so the
// only rounding is float32's (greedy decoding matches a float32 matmul over the same
// dequantized weights; 8-bit activations did not, on 3 of 7 test prompts). A block's
// codes times x are summed first and scaled by its d once.
template <int R>
inline void row_dot_q8f(const uint8_t* wrow, const float* x, int64_t K, float* out,
                        int64_t out_stride) {
  const int64_t nb = K / QK, bb = block_bytes(kQ8_0);
#if DSQ_ISA == 2
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * bb;
    const __m512 d = _mm512_set1_ps(half_to_float(load_u16(blk)));
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * K + b * QK;
      const __m512 p = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16),
                                       _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
      acc[r] = _mm512_fmadd_ps(p, d, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = _mm512_reduce_add_ps(acc[r]);
#elif DSQ_ISA == 1
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * bb;
    const __m256 d = _mm256_set1_ps(half_to_float(load_u16(blk)));
    __m256 w[4];
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * j))));
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * K + b * QK;
      __m256 p = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
      for (int j = 1; j < 4; ++j) p = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xb + 8 * j), p);
      acc[r] = _mm256_fmadd_ps(p, d, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = hsum8(acc[r]);
#else
  float acc[R];
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * bb;
    const float d = half_to_float(load_u16(blk));
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
    float w[QK];
    for (int j = 0; j < QK; ++j) w[j] = d * qs[j];
    block_rows_f<R>(w, x, K, b, acc);
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = acc[r];
#endif
}

// The loop both formats share: input rows in tiles that stay in L1 while every weight
// row passes, weight rows split over threads with enough rows per task to pay for it and
// several tasks per thread, and `dot(n, m, rows)` for up to kRows input rows at a time
// against weight row n. (Float rows for Q8_0 take four times the bytes of 8-bit codes:
// with 64-row tiles they spilled to L2 and halved the speed at 32 rows and more.) Rows
// as 8-bit codes take tiles of up to kCodeTile bytes, from L2: with 24 KB tiles a 2048-wide
// layer ran 8 rows a pass, and a 1.1B model's weights were read from memory four times
// for 32 rows (10% slower a GEMM; BENCHMARKS.md, "Weights read once a step").
constexpr int64_t kRows = DSQ_ISA == 2 ? 8 : 4;
constexpr int64_t kCodeTile = 262144;

// f(std::integral_constant<int, R>{}) for R = rows, 1 .. kRows: the microkernels take their
// row count as a template parameter.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
#if DSQ_ISA == 2
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
#else
    default: f(std::integral_constant<int, 4>{}); break;
#endif
  }
}


template <typename Dot>
void for_row_tiles(int64_t M, int64_t N, int64_t x_row_bytes, Dot dot,
                   int64_t tile_bytes = 24576) {
  // as many input rows as keep `tile_bytes` of them in cache while weight rows stream by
  const int64_t kTile =
      std::max(kRows, std::min<int64_t>(64, tile_bytes / x_row_bytes / kRows * kRows));
  for (int64_t t0 = 0; t0 < M; t0 += kTile) {
    const int64_t t1 = std::min(M, t0 + kTile);
    const int64_t per_thread = N / (4 * at::get_num_threads()) + 1;
    const int64_t grain =
        std::min(per_thread, std::max<int64_t>(8, 1024 / std::max<int64_t>(1, t1 - t0)));
    const auto run = [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = t0; m < t1; m += kRows) dot(n, m, std::min<int64_t>(kRows, t1 - m));
    };
    // One tile of 16 rows or more (a batch's decode step): weight rows handed out piece by
    // piece, so a thread descheduled a while holds no share the other waits for (a 64-row
    // decode step 3-9% faster on Zen 4). Several tiles: equal shares, each thread's weight
    // rows staying in its L2 from tile to tile. Fewer rows stream the weights: equal
    // shares read them in two long runs (one row of a 2048 x 11264 layer, 0.15-0.18 ms
    // so against 0.21-0.22 handed out).
    if (M >= 16 && M <= kTile) ds_parallel::pieces(0, N, grain, run);
    else at::parallel_for(0, N, grain, run);
  }
}

// Weights against float rows: Q8_0 blocks, or Q6_K as deepserve keeps it.
template <int64_t T, int R>
inline void row_dot_f(const uint8_t* wrow, const float* x, int64_t K, float* out,
                      int64_t out_stride) {
  if constexpr (T == kQ6_K) row_dot_q6f<R>(wrow, x, K, out, out_stride);
  else row_dot_q8f<R>(wrow, x, K, out, out_stride);
}

template <int64_t T>
void linear_q8f(const float* x, const uint8_t* w, int64_t M, int64_t K, int64_t N,
                float* out) {
  const int64_t row_bytes = K / QK * block_bytes(T);
  for_row_tiles(M, N, K * 4, [&](int64_t n, int64_t m, int64_t rows) {
    const uint8_t* wrow = w + n * row_bytes;
    const float* xm = x + m * K;
    float* o = out + m * N + n;
    with_rows(rows, [&](auto r) { row_dot_f<T, decltype(r)::value>(wrow, xm, K, o, N); });
  });
}

template <int64_t T>
void linear_blocks(const QRows& xq, const uint8_t* w, int64_t M, int64_t K, int64_t N,
                   float* out) {
  const int64_t nb = K / QK, row_bytes = nb * block_bytes(T);
  for_row_tiles(M, N, K + nb * 8, [&](int64_t n, int64_t m, int64_t rows) {
    const uint8_t* wrow = w + n * row_bytes;
    const int8_t* q = xq.q.data() + m * K;
    const float* d = xq.d.data() + m * nb;
    const float* s = xq.s.data() + m * nb;
    float* o = out + m * N + n;
    with_rows(rows, [&](auto r) { row_dot<T, decltype(r)::value>(wrow, q, d, s, K, o, N); });
  }, kCodeTile);
}

// ---- 4-bit blocks interleaved eight weight rows at a time ("x8" layouts) --------------
//
// The same Q4_0 / Q4_1 blocks, only reordered at load (no requantization): weight rows
// 8g .. 8g + 7 keep block b together as one chunk of 8 x block_bytes bytes,
//   8 fp16 d, then (Q4_1) 8 fp16 m, then four 32-byte code vectors, where 4-byte word r of
//   vector t is row r's code bytes 4t .. 4t + 3.
// Low nibbles of vector t are codes 4t .. 4t + 3 of each row, high nibbles codes
// 16 + 4t .. 19 + 4t. One input row's four codes, broadcast, meet eight weight rows' four
// codes in one multiply-add, so the eight dot products come out as the eight lanes of a
// vector: no horizontal sums, and one scale multiply serves eight blocks. On AVX2 the 16
// products of a row's eight steps add up in int16 lanes (at most 16 * 15 * 127 = 30480).
constexpr int64_t kQ4_0x8 = 102, kQ4_1x8 = 103, kQ5_0x8 = 106, kQ5_1x8 = 107, kQ4_Kx8 = 112;
// Q8_0 interleaved the same way (8 fp16 d, then eight code vectors, word r of vector t
// holding row r's codes 4t .. 4t + 3): the output head's copy for batches, AVX-512 only
// (group_q8x16).
constexpr int64_t kQ8_0x8 = 108;
// The same blocks against rows in one 8-bit part (output heads).
constexpr int64_t kQ8_0x8One = 208;

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Kept Q5_0 / Q5_1 chunks are Q4_1's (8 fp16 d, 8 fp16 m, four nibble vectors) followed by
// one 32-byte vector of fifth bits: byte 4r + j holds, in bit 2t + h, the fifth bit of row
// r's weight 16h + 4t + j, i.e. of the code in the low (h = 0) or high (h = 1) nibble of
// byte j of that row's word in vector t. A shift and a mask put it on bit 4 of the code.
// Kept Q4_K interleaves by super-block: 8 fp32 d, 8 fp32 -dmin, then for each of the 8
// sub-blocks the 8 rows' byte scales, then their byte mins (64 + 64 bytes), then each
// sub-block's four nibble vectors. Sub-block j's scales are d * sc_j and -dmin * m_j.
constexpr int64_t kQ4KChunk = 8 * 152;

#if DSQ_ISA >= 1
inline __m256 bytes_ps(const uint8_t* p) {  // 8 unsigned bytes -> 8 floats
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

inline __m256i fifth_bits(__m256i h, __m256i h4, int k) {
  // bit k of every byte moved to bit 4 (h4 = h << 4 within 16-bit lanes, for k < 4; what
  // spills into a neighbouring byte never lands on its bit 4)
  const __m256i v = k < 4 ? _mm256_srli_epi16(h4, k) : _mm256_srli_epi16(h, k - 4);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}
#endif

// Output columns 8g .. 8g + 7 for R input rows; wg is group g's first chunk. T is kQ4_0,
// kQ4_1, kQ4_K or kQ5_0 (the kept Q5_0 / Q5_1 layout, whose codes run 0..31).
template <int64_t T, int R>
inline void group_x8(const uint8_t* wg, const int8_t* xq, const float* xd, const float* xs,
                     const int32_t* xn, int64_t nb, float* out, int64_t out_stride) {
  constexpr bool q5 = T == kQ5_0, f16m = T == kQ4_1 || q5;
  const int64_t cb = 8 * block_bytes(T), hb = f16m ? 32 : 16;
#if DSQ_ISA >= 1
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* c;  // the block's code vectors
    __m256 vd, vm;
    if (T == kQ4_K) {  // sub-block b % 8 of a super-block chunk: fp32 d and -dmin times
      const uint8_t* u = wg + (b >> 3) * kQ4KChunk;  // its byte scale and min
      const int64_t j = b & 7;
      prefetch_ahead(u + j * (kQ4KChunk / 8), kQ4KChunk / 8);
      vd = _mm256_mul_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(u)),
                         bytes_ps(u + 64 + 8 * j));
      vm = _mm256_mul_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(u + 32)),
                         bytes_ps(u + 128 + 8 * j));
      c = u + 192 + 128 * j;
    } else {
      const uint8_t* u = wg + b * cb;
      prefetch_ahead(u, cb);
      vd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
      vm = f16m ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 16)))
                : _mm256_mul_ps(vd, _mm256_set1_ps(-8.f));
      c = u + hb;
    }
    __m256i h = _mm256_setzero_si256(), h4 = h;
    if (q5) {
      h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 128));
      h4 = _mm256_slli_epi16(h, 4);
    }
    // Q4_0's offset (-8 d per weight) in the integer sums: they start at -8 times the
    // row's code sum, and the block's float work is one multiply-add, not two
    __m256i s[R];
    for (int r = 0; r < R; ++r)
      s[r] = _mm256_set1_epi32(T == kQ4_0 ? -8 * xn[r * nb + b] : 0);
#if DSQ_ISA == 1
    // int16 partial sums: 4-bit codes fill at most 16 * 15 * 127 = 30480 over a block,
    // 5-bit codes 8 * 31 * 127 = 31496 over half of one
    __m256i s16[R];
    for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
#endif
    for (int t = 0; t < 4; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * t));
      __m256i lo = _mm256_and_si256(v, low);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      if (q5) {
        lo = _mm256_or_si256(lo, fifth_bits(h, h4, 2 * t));
        hi = _mm256_or_si256(hi, fifth_bits(h, h4, 2 * t + 1));
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x = xq + (r * nb + b) * QK + 4 * t;
        const __m256i x0 = _mm256_set1_epi32(load_i32(x));
        const __m256i x1 = _mm256_set1_epi32(load_i32(x + 16));
#if DSQ_ISA == 2
        s[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(s[r], lo, x0), hi, x1);
#else
        s16[r] = _mm256_add_epi16(s16[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0),
                                                           _mm256_maddubs_epi16(hi, x1)));
#endif
      }
#if DSQ_ISA == 1
      if (t == 3 || (q5 && t == 1)) {
        for (int r = 0; r < R; ++r) {
          s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(s16[r], _mm256_set1_epi16(1)));
          s16[r] = _mm256_setzero_si256();
        }
      }
#endif
    }
    for (int r = 0; r < R; ++r) {
      const int64_t xi = r * nb + b;
      const __m256 sum = _mm256_cvtepi32_ps(s[r]);
      acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(vd, _mm256_set1_ps(xd[xi])), acc[r]);
      if (T != kQ4_0) acc[r] = _mm256_fmadd_ps(vm, _mm256_set1_ps(xs[xi]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * out_stride, acc[r]);
#else
  float acc[R][8] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* u = wg + (T == kQ4_K ? (b >> 3) * kQ4KChunk : b * cb);
    const int64_t j = b & 7;
    const uint8_t* c = T == kQ4_K ? u + 192 + 128 * j : u + hb;
    float d[8], m[8];
    for (int l = 0; l < 8; ++l) {
      if (T == kQ4_K) {
        d[l] = load_f32(u + 4 * l) * u[64 + 8 * j + l];
        m[l] = load_f32(u + 32 + 4 * l) * u[128 + 8 * j + l];
      } else {
        d[l] = half_to_float(load_u16(u + 2 * l));
        m[l] = f16m ? half_to_float(load_u16(u + 16 + 2 * l)) : -8.f * d[l];
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t xi = r * nb + b;
      const int8_t* x = xq + xi * QK;
      for (int l = 0; l < 8; ++l) {
        int32_t s = T == kQ4_0 ? -8 * xn[xi] : 0;
        for (int t = 0; t < 4; ++t)
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = c[32 * t + 4 * l + i];
            const int fifth = q5 ? c[128 + 4 * l + i] >> (2 * t) : 0;
            s += ((byte & 0x0f) | (fifth & 1) << 4) * x[4 * t + i] +
                 ((byte >> 4) | (fifth & 2) << 3) * x[16 + 4 * t + i];
          }
        acc[r][l] += d[l] * xd[xi] * static_cast<float>(s) + (T == kQ4_0 ? 0.f : m[l] * xs[xi]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < 8; ++l) out[r * out_stride + l] = acc[r][l];
#endif
}

#if DSQ_ISA == 2
// AVX-512: two neighbouring groups of eight rows side by side in 512-bit vectors, so one
// vpdpbusd does 16 output columns' work and each block's scales, conversions and
// activation broadcasts serve twice the columns (a 256-bit version left the multiply
// units idle about half the time on batches; BENCHMARKS.md, "Batched GEMM on blocks").
// Output columns 16p .. 16p + 15; wg is group 2p's first chunk, group 2p + 1's follows
// `chunk` bytes later. Same arithmetic as group_x8, lane for lane.
inline __m512i cat256(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

inline __m512 cat_ps(__m256 a, __m256 b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
}

inline __m512 halves_ps(const uint8_t* a, const uint8_t* b) {  // 8 + 8 fp16 -> 16 floats
  return _mm512_cvtph_ps(_mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)),
                                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(a))));
}

inline __m512i fifth_bits16(__m512i h, __m512i h4, int k) {
  const __m512i v = k < 4 ? _mm512_srli_epi16(h4, k) : _mm512_srli_epi16(h, k - 4);
  return _mm512_and_si512(v, _mm512_set1_epi8(0x10));
}

// Block b of two neighbouring groups of eight rows (wg, wg2): the 16 rows' scales and
// offsets (Q4_0: -8 d) and each group's code vectors. T as group_x8.
template <int64_t T>
inline void block16(const uint8_t* wg, const uint8_t* wg2, int64_t b, __m512& vd, __m512& vm,
                    const uint8_t*& c, const uint8_t*& c2) {
  constexpr bool f16m = T == kQ4_1 || T == kQ5_0;
  const int64_t cb = 8 * block_bytes(T), hb = f16m ? 32 : 16;
  if (T == kQ4_K) {
    const int64_t off = (b >> 3) * kQ4KChunk, j = b & 7;
    const uint8_t *u = wg + off, *u2 = wg2 + off;
    prefetch_ahead(u + j * (kQ4KChunk / 8), kQ4KChunk / 8);  // an eighth of a chunk a block
    prefetch_ahead(u2 + j * (kQ4KChunk / 8), kQ4KChunk / 8);
    vd = _mm512_mul_ps(cat_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(u)),
                              _mm256_loadu_ps(reinterpret_cast<const float*>(u2))),
                       cat_ps(bytes_ps(u + 64 + 8 * j), bytes_ps(u2 + 64 + 8 * j)));
    vm = _mm512_mul_ps(cat_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(u + 32)),
                              _mm256_loadu_ps(reinterpret_cast<const float*>(u2 + 32))),
                       cat_ps(bytes_ps(u + 128 + 8 * j), bytes_ps(u2 + 128 + 8 * j)));
    c = u + 192 + 128 * j;
    c2 = u2 + 192 + 128 * j;
  } else {
    const uint8_t *u = wg + b * cb, *u2 = wg2 + b * cb;
    prefetch_ahead(u, cb);
    prefetch_ahead(u2, cb);
    vd = halves_ps(u, u2);
    vm = f16m ? halves_ps(u + 16, u2 + 16) : _mm512_mul_ps(vd, _mm512_set1_ps(-8.f));
    c = u + hb;
    c2 = u2 + hb;
  }
}

template <int64_t T, int R>
inline void group_x16(const uint8_t* wg, int64_t chunk, const int8_t* xq, const float* xd,
                      const float* xs, const int32_t* xn, int64_t nb, float* out,
                      int64_t out_stride,
                      uint16_t* out16 = nullptr) {
  constexpr bool q5 = T == kQ5_0;
  const uint8_t* wg2 = wg + chunk;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t *c, *c2;
    __m512 vd, vm;
    block16<T>(wg, wg2, b, vd, vm, c, c2);
    __m512i h = _mm512_setzero_si512(), h4 = h;
    if (q5) {
      h = cat256(c + 128, c2 + 128);
      h4 = _mm512_slli_epi16(h, 4);
    }
    __m512i s[R];  // Q4_0's offset in the integer sums, as group_x8
    for (int r = 0; r < R; ++r)
      s[r] = _mm512_set1_epi32(T == kQ4_0 ? -8 * xn[r * nb + b] : 0);
    for (int t = 0; t < 4; ++t) {
      const __m512i v = cat256(c + 32 * t, c2 + 32 * t);
      __m512i lo = _mm512_and_si512(v, low);
      __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      if (q5) {
        lo = _mm512_or_si512(lo, fifth_bits16(h, h4, 2 * t));
        hi = _mm512_or_si512(hi, fifth_bits16(h, h4, 2 * t + 1));
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x = xq + (r * nb + b) * QK + 4 * t;
        s[r] = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(s[r], lo, _mm512_set1_epi32(load_i32(x))), hi,
            _mm512_set1_epi32(load_i32(x + 16)));
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t xi = r * nb + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]),
                               _mm512_mul_ps(vd, _mm512_set1_ps(xd[xi])), acc[r]);
      if (T != kQ4_0) acc[r] = _mm512_fmadd_ps(vm, _mm512_set1_ps(xs[xi]), acc[r]);
    }
  }
  if (out16)  // bf16 outputs, rounded to nearest even as torch's conversion rounds
    for (int r = 0; r < R; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out16 + r * out_stride),
                          (__m256i)_mm512_cvtneps_pbh(acc[r]));
  else
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * out_stride, acc[r]);
}

// Interleaved Q8_0 against rows quantized to 8 bits per block of 32, in two parts (Q8_0
// layers, and MLA's absorbed W_UK / W_UV through bmm_gguf) or in one (kQ8_0x8One: an
// output head, as llama.cpp computes a Q8_0 head, at half the instructions). Two parts
// are x = d1 c1 + d2 c2 per block, c2 the codes of what c1 left (at most d1 / 2 per value,
// so about 15 bits). vpdpbusd multiplies unsigned by signed bytes, so the codes come with
// 128 added (a sign-bit flip) and each block's dots lose 128 times the sum of its weight
// codes: one more vpdpbusd per code vector, shared by every row. 16 output columns as
// group_x16: weight rows 16p .. 16p + 15.
template <int R, bool Two>
inline void group_q8x16(const uint8_t* wg, int64_t chunk, const int8_t* xq, const float* xd,
                        const int8_t* xq2, const float* xd2, int64_t nb, float* out,
                        int64_t out_stride) {
  const int64_t cb = 8 * block_bytes(kQ8_0);
  const uint8_t* wg2 = wg + chunk;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t *u = wg + b * cb, *u2 = wg2 + b * cb;
    prefetch_ahead(u, cb);
    prefetch_ahead(u2, cb);
    const __m512 vd = halves_ps(u, u2);
    __m512i corr = _mm512_setzero_si512(), s[R], s2[R];
    for (int r = 0; r < R; ++r) s[r] = s2[r] = _mm512_setzero_si512();
    for (int t = 0; t < 8; ++t) {
      const __m512i v = cat256(u + 16 + 32 * t, u2 + 16 + 32 * t);
      corr = _mm512_dpbusd_epi32(corr, flip, v);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (r * nb + b) * QK + 4 * t;
        s[r] = _mm512_dpbusd_epi32(s[r], _mm512_set1_epi32(load_i32(xq + at)), v);
        if constexpr (Two)
          s2[r] = _mm512_dpbusd_epi32(s2[r], _mm512_set1_epi32(load_i32(xq2 + at)), v);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t xi = r * nb + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[r], corr)),
                               _mm512_mul_ps(vd, _mm512_set1_ps(xd[xi])), acc[r]);
      if constexpr (Two)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s2[r], corr)),
                                 _mm512_mul_ps(vd, _mm512_set1_ps(xd2[xi])), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * out_stride, acc[r]);
}

#endif

#if DSQ_ISA == 1
// AVX2: the same arithmetic eight output columns at a time (one interleaved group), with
// vpmaddubsw for vpdpbusd. It multiplies unsigned by signed bytes: the weight codes'
// magnitudes against the activation codes given the weights' signs (vpsignb). Activation
// codes lie within +-127, so a pair's sum stays within 2 * 128 * 127, clear of int16
// saturation; each block's integer dots are exact, as the AVX-512 kernel's.
template <int R, bool Two>
inline void group_q8x8(const uint8_t* wg, const int8_t* xq, const float* xd,
                       const int8_t* xq2, const float* xd2, int64_t nb, float* out,
                       int64_t out_stride) {
  const int64_t cb = 8 * block_bytes(kQ8_0);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* u = wg + b * cb;
    prefetch_ahead(u, cb);
    const __m256 vd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
    __m256i s[R], s2[R];
    for (int r = 0; r < R; ++r) s[r] = s2[r] = _mm256_setzero_si256();
    for (int t = 0; t < 8; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 16 + 32 * t));
      const __m256i mag = _mm256_abs_epi8(v);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (r * nb + b) * QK + 4 * t;
        s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(_mm256_maddubs_epi16(
            mag, _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xq + at)), v)), ones));
        if constexpr (Two)
          s2[r] = _mm256_add_epi32(s2[r], _mm256_madd_epi16(_mm256_maddubs_epi16(
              mag, _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xq2 + at)), v)), ones));
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t xi = r * nb + b;
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]),
                               _mm256_mul_ps(vd, _mm256_set1_ps(xd[xi])), acc[r]);
      if constexpr (Two)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2[r]),
                                 _mm256_mul_ps(vd, _mm256_set1_ps(xd2[xi])), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * out_stride, acc[r]);
}
#endif

#if DSQ_ISA >= 1
// y[h] = x[h] W[h]^T for H heads (H = 1: one matrix) of interleaved Q8_0 (N a multiple of
// 16) and float rows x [H * M, K], as group_q8x16 (AVX-512, 16 columns a call) and
// group_q8x8 (AVX2, 8) describe (`two`: two 8-bit parts); W [H, N, bytes], y [H * M, N].
// Every head's column groups share one parallel loop.
template <typename T>
void bmm_q8x16(const T* x, int64_t H, int64_t M, int64_t K, const uint8_t* w, int64_t N,
               float* out, bool two = true) {
  constexpr int64_t cols = DSQ_ISA == 2 ? 16 : 8;
  const int64_t nb = K / QK, chunk = 8 * nb * block_bytes(kQ8_0), R = H * M;
  const int64_t per_head = N * nb * block_bytes(kQ8_0), G = N / cols;
  QRows q, q2;
  quantize_rows(x, R, K, q);
  if (two) {
    std::vector<float> rest(R * K);
    at::parallel_for(0, R * nb, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int j = 0; j < QK; ++j)
          rest[i * QK + j] =
              to_f(x[i * QK + j]) - q.d[i] * static_cast<float>(q.q[i * QK + j]);
    });
    quantize_rows(rest.data(), R, K, q2);
#if DSQ_ISA == 2
    for (auto& c : q2.q) c = static_cast<int8_t>(static_cast<uint8_t>(c) ^ 0x80u);
#endif
  }
#if DSQ_ISA == 2
  for (auto& c : q.q) c = static_cast<int8_t>(static_cast<uint8_t>(c) ^ 0x80u);
#endif
  const int64_t parts = two ? 2 : 1;
  for_row_tiles(M, H * G, parts * (K + nb * 4), [&](int64_t hp, int64_t m, int64_t rows) {
    const int64_t h = hp / G, p = hp % G, r0 = h * M + m;
    const uint8_t* wg = w + h * per_head + cols / 8 * p * chunk;
    float* o = out + r0 * N + cols * p;
    const int8_t* c1 = q.q.data() + r0 * K;
    const float* d1 = q.d.data() + r0 * nb;
    const int8_t* c2 = two ? q2.q.data() + r0 * K : nullptr;
    const float* d2 = two ? q2.d.data() + r0 * nb : nullptr;
    with_rows(rows, [&](auto r) {
      constexpr int Rn = decltype(r)::value;
#if DSQ_ISA == 2
      if (two) group_q8x16<Rn, true>(wg, chunk, c1, d1, c2, d2, nb, o, N);
      else group_q8x16<Rn, false>(wg, chunk, c1, d1, nullptr, nullptr, nb, o, N);
#else
      if (two) group_q8x8<Rn, true>(wg, c1, d1, c2, d2, nb, o, N);
      else group_q8x8<Rn, false>(wg, c1, d1, nullptr, nullptr, nb, o, N);
#endif
    });
  }, kCodeTile);
}

template <typename T>
void linear_q8x16(const T* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, float* out,
                  bool two) {
  bmm_q8x16(x, 1, M, K, w, N, out, two);
}
#endif

// ---- AMX tiles for batches (Intel Xeon since Sapphire Rapids) ----------------------------
//
// Interleaved blocks (Q4_0, Q4_1, Q5_0 / Q5_1 and Q4_K as kept, Q8_0 against rows in one
// part: heads) against kAmxRows bf16 input rows and more run on the tile unit: each panel
// of 16 output columns is dequantized once per call into bf16 B tiles (per block of 32: 16
// rows of 16 columns x 2 weights, d * q + m rounded to nearest even, as a bf16 copy of the
// weights would hold them), then every 16 input rows (packed as tiles load them) run
// tdpbf16ps against it, accumulating in float32 tiles over the whole row. The vector units
// only dequantize, once per 16 columns for all the rows; nothing is scaled per block.
// (8-bit tiles, tdpbsud on the blocks' own codes, must take every block's 16 x 16 integer
// sums out through memory to scale them: that bound them at 1.1-1.5x the VNNI kernel;
// BENCHMARKS.md, "AMX tiles".) Two panels and two row tiles go together (four accumulator
// tiles); the first two row tiles dequantize block by block as they go, so their B tiles
// come from L1 (1.2x a whole-panel dequantization first), later row tiles read the panel's
// tiles again. A pair's results leave the tiles through memory and are written out a few
// rows at a time between the next pair's multiplies (the vector units and the tile unit
// then work side by side; all at once they cost 40% of a 2048-row call), by streaming
// stores where the output outgrows the L2s. When the rows take several L2 chunks of 128
// rows or more, every panel is dequantized once ahead and the chunks read its tiles (the
// next pair's fetched into L2 while a pair runs). Linux grants the tile registers per
// process on request (arch_prctl); where
// that fails (no AMX, an old kernel) or set_amx(false) was called, the VNNI kernels run.
// The build needs GCC 11+ (the tile intrinsics); other compilers leave AMX out.
#if DSQ_ISA == 2 && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define DSQ_AMX 1
#else
#define DSQ_AMX 0
#endif

bool amx_permitted() {
#if DSQ_AMX
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

std::atomic<bool> g_amx{false};

// cpu_kernels.cpp: SwiGLU of a tile's gate and up sums, rounded as silu_mul rounds them
void swiglu_tile_bf16(const float* gate, const float* up, int64_t rows, uint16_t* out,
                      int64_t ld);

// Turns the tile kernels on (where this process may use them) or off; returns whether
// they are on.
bool set_amx(bool on) {
  g_amx = on && amx_permitted();
  return g_amx;
}

// Input rows from which a block matrix runs on tiles (below, the VNNI kernels were as fast
// or faster: BENCHMARKS.md, "AMX tiles").
constexpr int64_t kAmxRows = 12;
constexpr int64_t kAmxChunk = 1 << 20;

#if DSQ_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512vbmi")

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Byte indices for a vpermb that puts one code byte in byte `at` of each int32 lane: lane
// 2n' + j' of half h takes byte 4(8h + n') + 2j + j' (pair j of column 8h + n').
inline __m512i pair_bytes(int j, int h, int at = 0) {
  alignas(64) int8_t idx[64] = {};
  for (int lane = 0; lane < 16; ++lane)
    idx[4 * lane + at] = static_cast<int8_t>(4 * (8 * h + lane / 2) + 2 * j + lane % 2);
  return _mm512_load_si512(idx);
}

// The same bytes in each lane's top byte (signed codes).
inline __m512i top_bytes(int j, int h) { return pair_bytes(j, h, 3); }

// Q8_0: eight code vectors a block, signed codes (put in each lane's top byte).
inline void amx_dequant_q8(const uint8_t* wg, int64_t chunk, int64_t b0, int64_t b1,
                           uint16_t* out) {
  const int64_t cb = 8 * block_bytes(kQ8_0);
  const uint8_t* wg2 = wg + chunk;
  const __m512i pick[2][2] = {{top_bytes(0, 0), top_bytes(0, 1)},
                              {top_bytes(1, 0), top_bytes(1, 1)}};
  const __m512i half0 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i half1 = _mm512_add_epi32(half0, _mm512_set1_epi32(8));
  constexpr __mmask64 every4 = 0x8888888888888888ULL;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t *u = wg + b * cb, *u2 = wg2 + b * cb;
    prefetch_ahead(u, cb);
    prefetch_ahead(u2, cb);
    // codes in each lane's top byte read as q 2^24, exactly: times d 2^-24
    const __m512 vd = _mm512_mul_ps(halves_ps(u, u2), _mm512_set1_ps(1.f / 16777216.f));
    const __m512 d0 = _mm512_permutexvar_ps(half0, vd), d1 = _mm512_permutexvar_ps(half1, vd);
    uint16_t* o = out + 512 * b;
    for (int t = 0; t < 8; ++t) {  // codes 4t .. 4t + 3: rows 2t and 2t + 1
      const __m512i v = cat256(u + 16 + 32 * t, u2 + 16 + 32 * t);
      for (int j = 0; j < 2; ++j) {
        const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(
            _mm512_maskz_permutexvar_epi8(every4, pick[j][0], v)), d0);
        const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(
            _mm512_maskz_permutexvar_epi8(every4, pick[j][1], v)), d1);
        _mm512_store_si512(o + 32 * (2 * t + j), (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
      }
    }
  }
}

// Blocks b0 .. b1 - 1 of panel wg (group 2p's first chunk; group 2p + 1 is `chunk` bytes
// on) as bf16 B tiles, 1 KB a block from out + 512 b.
template <int64_t T>
void amx_dequant(const uint8_t* wg, int64_t chunk, int64_t b0, int64_t b1, uint16_t* out) {
  if constexpr (T == kQ8_0) return amx_dequant_q8(wg, chunk, b0, b1, out);
  constexpr bool q5 = T == kQ5_0;
  const uint8_t* wg2 = wg + chunk;
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i pick[2][2] = {{pair_bytes(0, 0, 2), pair_bytes(0, 1, 2)},
                              {pair_bytes(1, 0, 2), pair_bytes(1, 1, 2)}};
  const __m512i half0 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i half1 = _mm512_add_epi32(half0, _mm512_set1_epi32(8));
  const __m512i two = _mm512_set1_epi32(0x40000000);  // 2.0f: byte 2 is zero
  constexpr __mmask64 byte2 = 0x4444444444444444ULL;  // byte 2 of each lane
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t *c, *c2;
    __m512 vd, vm;
    block16<T>(wg, wg2, b, vd, vm, c, c2);
    // a code q (< 32) put in byte 2 of 2.0f's pattern reads as f = 2 + q / 64, so
    // d q + m = f (64 d) + (m - 128 d): one multiply-add a value (m - 128 d is rounded
    // once, 2^-20 of the weight's scale, far below bf16's 2^-9)
    const __m512 d0 = _mm512_mul_ps(_mm512_permutexvar_ps(half0, vd), _mm512_set1_ps(64.f));
    const __m512 d1 = _mm512_mul_ps(_mm512_permutexvar_ps(half1, vd), _mm512_set1_ps(64.f));
    const __m512 m0 = _mm512_fnmadd_ps(d0, _mm512_set1_ps(2.f), _mm512_permutexvar_ps(half0, vm));
    const __m512 m1 = _mm512_fnmadd_ps(d1, _mm512_set1_ps(2.f), _mm512_permutexvar_ps(half1, vm));
    __m512i h = _mm512_setzero_si512(), h4 = h;
    if (q5) {
      h = cat256(c + 128, c2 + 128);
      h4 = _mm512_slli_epi16(h, 4);
    }
    uint16_t* o = out + 512 * b;  // 16 rows of 32 bf16
    for (int t = 0; t < 4; ++t) {
      const __m512i v = cat256(c + 32 * t, c2 + 32 * t);
      __m512i nib[2] = {_mm512_and_si512(v, low),
                        _mm512_and_si512(_mm512_srli_epi16(v, 4), low)};
      if (q5) {
        nib[0] = _mm512_or_si512(nib[0], fifth_bits16(h, h4, 2 * t));
        nib[1] = _mm512_or_si512(nib[1], fifth_bits16(h, h4, 2 * t + 1));
      }
      for (int hi = 0; hi < 2; ++hi)    // codes 4t .. 4t + 3, or 16 + 4t .. 19 + 4t
        for (int j = 0; j < 2; ++j) {  // the pair (4t + 2j, 4t + 2j + 1): row 2t + j
          const __m512 w0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(
              two, byte2, pick[j][0], nib[hi])), d0, m0);
          const __m512 w1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(
              two, byte2, pick[j][1], nib[hi])), d1, m1);
          _mm512_store_si512(o + 32 * (8 * hi + 2 * t + j),
                             (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
        }
    }
  }
}

// Tiles 0-3: C (16 x 16 float32), 4 / 5: A (16 rows x 32 bf16), 6 / 7: B (16 x 32 bf16).
inline void amx_bf16_configure() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// Panel pairs q0 .. q1 - 1 (output columns 32q .. 32q + 31) against every row tile of a
// (ARows, below); one thread's share.
// Where a pair's two panels start: pair q's first panel at w + q * step, its second
// `second` bytes on (two neighbouring panels, or a gate panel and its up panel).
struct PanelPairs {
  const uint8_t* w;
  int64_t step, second;
  const uint8_t* first(int64_t q) const { return w + q * step; }
};

// Pair q's two panels as B tiles: 2 x nb tiles of 1 KB, from out.
template <int64_t T>
void amx_dequant_pair(const PanelPairs& pp, int64_t chunk, int64_t nb, int64_t q,
                      uint16_t* out) {
  amx_dequant<T>(pp.first(q), chunk, 0, nb, out);
  amx_dequant<T>(pp.first(q) + pp.second, chunk, 0, nb, out + 512 * nb);
}

// A row-tile pair's four accumulator tiles, stored, whose rows are still to be written:
// each pair's rows go out a few at a time between the next pair's tile multiplies (the
// vector units work while the tile unit does), not all at once while the tiles wait.
struct AmxPending {
  alignas(64) float c[4][256];
  int64_t mt = -1, q = 0, next = 0, rows = 0;  // rows: 16 or 32, less past M
};

// A thread's greedy pick for each row, in place of the row's outputs (argmax_gguf): the
// largest value so far and its first column, or the first NaN (as torch.argmax).
struct RowBest {
  float* val;
  int64_t* idx;  // -1: none yet
  uint8_t* nan;
};

// Row `row`'s 32 outputs of pair q (lo: columns 32q .. 32q + 15, hi: the next 16) into best.
inline void best_of_pair(const RowBest& best, int64_t row, int64_t q, __m512 lo, __m512 hi) {
  const __mmask16 nlo = _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q);
  const __mmask16 nhi = _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q);
  if (nlo | nhi) {  // columns only grow within a thread: the row's first NaN is its pick
    if (!best.nan[row]) {
      best.nan[row] = 1;
      best.idx[row] = 32 * q + (nlo ? __builtin_ctz(nlo) : 16 + __builtin_ctz(nhi));
    }
    return;
  }
  const float m = _mm512_reduce_max_ps(_mm512_max_ps(lo, hi));
  if (best.nan[row] || !(m > best.val[row])) return;  // ties keep the earlier column
  const __m512 mv = _mm512_set1_ps(m);
  const __mmask16 elo = _mm512_cmp_ps_mask(lo, mv, _CMP_EQ_OQ);
  best.val[row] = m;
  best.idx[row] = 32 * q + (elo ? __builtin_ctz(elo)
                                : 16 + __builtin_ctz(_mm512_cmp_ps_mask(hi, mv, _CMP_EQ_OQ)));
}

// Rows next .. r1 - 1 of a stored pair (row r of its 32: tile pair r / 16, row r % 16).
inline void amx_write_rows(AmxPending& p, int64_t r1, int64_t N, float* out, uint16_t* out16,
                           bool swiglu, bool stream, const RowBest* best = nullptr) {
  for (r1 = std::min(r1, p.rows); p.next < r1; ++p.next) {
    const int64_t i = p.next / 16, r = p.next % 16, row = 16 * p.mt + p.next;
    const float* lo_row = p.c[2 * i] + 16 * r;
    const float* hi_row = p.c[2 * i + 1] + 16 * r;
    if (best) {
      best_of_pair(*best, row, p.q, _mm512_load_ps(lo_row), _mm512_load_ps(hi_row));
      continue;
    }
    if (swiglu) {  // gate columns 16q .. 16q + 15 and their up columns, a tile's rows
      const int64_t n = std::min(r1, 16 * (i + 1)) - p.next;
      swiglu_tile_bf16(lo_row, hi_row, n, out16 + row * (N / 2) + 16 * p.q, N / 2);
      p.next += n - 1;
      continue;
    }
    const __m512 lo = _mm512_load_ps(lo_row), hi = _mm512_load_ps(hi_row);
    if (out16) {
      const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      uint16_t* o = out16 + row * N + 32 * p.q;
      if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(o), v);
      else _mm512_storeu_si512(o, v);
    } else {
      float* o = out + row * N + 32 * p.q;
      if (stream) {
        _mm512_stream_ps(o, lo);
        _mm512_stream_ps(o + 16, hi);
      } else {
        _mm512_storeu_ps(o, lo);
        _mm512_storeu_ps(o + 16, hi);
      }
    }
  }
}

// A tiles: 16 rows x 32 values of block b, loaded straight from the bf16 rows (x, K to a
// row, 64-byte aligned: each tile row is one cache line) with a stride of a row; the last
// tile's rows, where M is not a multiple of 16, from `tail` (16 zero-padded rows, as x).
// (The rows were packed into 1 KB tiles first: 2% of a 64-row decode step's samples and
// 5% of a prefill step's. Strided loads made qkv, o and down 10-20% faster at 64 rows,
// o and down at 1408; BENCHMARKS.md, twelfth session.)
struct ARows {
  const uint16_t* x;
  const uint16_t* tail;
  int64_t K, full;  // full: row tiles of x with all 16 rows
  const uint16_t* tile(int64_t mt) const { return mt < full ? x + 16 * mt * K : tail; }
};

template <int64_t T>
void amx_bf16_panels(const ARows& a, int64_t tiles, int64_t M, const PanelPairs& pp,
                     int64_t K, int64_t N, int64_t q0, int64_t q1, float* out, uint16_t* out16,
                     const uint16_t* pre, int64_t pre_q0, bool swiglu, bool stream,
                     const RowBest* best = nullptr) {
  const int64_t nb = K / QK, chunk = 8 * nb * block_bytes(T);
  // Without panels dequantized ahead: two pairs' B tiles. The first pair is dequantized
  // up front; each next one block by block between this pair's tile multiplies, so the
  // vector units dequantize while the tile unit multiplies (dequantizing each block just
  // before its multiply left the tile unit waiting on it: 2x slower at 64 rows).
  uint16_t* own = pre ? nullptr
                      : static_cast<uint16_t*>(std::aligned_alloc(64, 4 * nb * 1024));
  if (own) amx_dequant_pair<T>(pp, chunk, nb, q0, own);
  const int64_t iters = (tiles + 1) / 2 * nb;  // tile steps a pair
  AmxPending pend[2];
  int cur = 0;
  // rows of the pending pair written per block of the next one: all of them by block 16
  const int64_t per_block = std::max<int64_t>(2, (32 + nb - 1) / nb);
  // panels dequantized ahead are read from L3 or memory at each pair's first row tiles;
  // the next pair's lines are fetched into L2 while this pair's rows run (so many a block)
  const int64_t lines = 2 * nb * 1024 * 2 / 64, steps = (tiles + 1) / 2 * nb;
  const int64_t fetch = pre ? (lines + steps - 1) / steps : 0;
  amx_bf16_configure();
  for (int64_t q = q0; q < q1; ++q) {
    // B tiles: dequantized for every pair beforehand (pre), or during the pair before
    uint16_t* bt = pre ? const_cast<uint16_t*>(pre) + 1024 * nb * (q - pre_q0)
                       : own + 1024 * nb * ((q - q0) & 1);
    uint16_t* bt2 = bt + 512 * nb;
    const char* ahead_next =
        pre && q + 1 < q1 ? reinterpret_cast<const char*>(bt + 1024 * nb) : nullptr;
    uint16_t* next = own && q + 1 < q1 ? own + 1024 * nb * ((q + 1 - q0) & 1) : nullptr;
    const uint8_t* wn = next ? pp.first(q + 1) : nullptr;
    int64_t fetched = 0, made = 0, step = 0;
    // the blocks of the pair after next, fetched into L2 while this pair's rows run (the
    // next pair's are being read by its dequantization): a step's weights come from
    // memory, and the hardware's prefetcher stops at each 4 KB page (a 64-row decode step
    // 3.9% faster, the head from memory 10%: BENCHMARKS.md, twelfth session)
    const uint8_t* w2 = own && q + 2 < q1 ? pp.first(q + 2) : nullptr;
    const int64_t raw_lines = 2 * chunk / 64;  // lines of one panel (two groups of 8)
    const int64_t raw_per = w2 ? (2 * raw_lines + iters - 1) / iters : 0;
    int64_t raw_done = 0;
    for (int64_t mt = 0; mt < tiles; mt += 2) {
      const bool two = mt + 1 < tiles;
      const uint16_t* a0 = a.tile(mt);
      const uint16_t* a1 = two ? a.tile(mt + 1) : a0;
      const int64_t lda = 2 * K;
      AmxPending& prev = pend[cur ^ 1];
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t b = 0; b < nb; ++b) {
        _tile_loadd(4, a0 + 32 * b, lda);
        _tile_loadd(6, bt + 512 * b, 64);
        _tile_loadd(7, bt2 + 512 * b, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, a1 + 32 * b, lda);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        // the next pair's blocks (its first panel's, then its second's), spread evenly
        for (const int64_t want = next ? 2 * nb * ++step / iters : 0; made < want; ++made) {
          const int64_t j = made % nb, second = made < nb ? 0 : 1;
          amx_dequant<T>(wn + second * pp.second, chunk, j, j + 1, next + second * 512 * nb);
        }
        if (prev.mt >= 0)
          amx_write_rows(prev, (b + 1) * per_block, N, out, out16, swiglu, stream, best);
        if (fetch && ahead_next)
          for (int64_t f = 0; f < fetch && fetched < lines; ++f, ++fetched)
            _mm_prefetch(ahead_next + 64 * fetched, _MM_HINT_T1);
        for (int64_t f = 0; f < raw_per && raw_done < 2 * raw_lines; ++f, ++raw_done) {
          const int64_t second = raw_done < raw_lines ? 0 : 1;
          _mm_prefetch(reinterpret_cast<const char*>(w2 + second * pp.second) +
                           64 * (raw_done - second * raw_lines), _MM_HINT_T1);
        }
      }
      if (prev.mt >= 0) amx_write_rows(prev, 32, N, out, out16, swiglu, stream, best);
      AmxPending& p = pend[cur];
      _tile_stored(0, p.c[0], 64);
      _tile_stored(1, p.c[1], 64);
      if (two) {
        _tile_stored(2, p.c[2], 64);
        _tile_stored(3, p.c[3], 64);
      }
      p.mt = mt, p.q = q, p.next = 0;
      p.rows = std::min<int64_t>(two ? 32 : 16, M - 16 * mt);
      prev.mt = -1;
      cur ^= 1;
    }
  }
  AmxPending& last = pend[cur ^ 1];
  if (last.mt >= 0) amx_write_rows(last, 32, N, out, out16, swiglu, stream, best);
  if (stream) _mm_sfence();  // the streamed rows visible before the caller reads them
  _tile_release();
  std::free(own);
}

#pragma GCC pop_options

// The rows of x as ARows: x itself where it is 64-byte aligned (torch's allocations are),
// a copy where not; the rows of a last partial tile zero-padded in `keep`.
ARows amx_rows(const at::Tensor& x, int64_t M, int64_t K, at::Tensor& copy, at::Tensor& keep) {
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  if (reinterpret_cast<uintptr_t>(xp) % 64) {
    copy = x.clone();
    xp = reinterpret_cast<const uint16_t*>(copy.data_ptr<at::BFloat16>());
  }
  const int64_t full = M / 16, rest = M % 16;
  const uint16_t* tail = nullptr;
  if (rest) {
    keep = at::zeros({16 * K}, at::TensorOptions().dtype(at::kShort));
    auto* t = reinterpret_cast<uint16_t*>(keep.data_ptr<int16_t>());
    std::memcpy(t, xp + 16 * full * K, rest * K * sizeof(uint16_t));
    tail = t;
  }
  return ARows{xp, tail, K, full};
}

// Whether every float is a bf16 value (its low 16 bits zero).
inline bool bf16_exact(const float* x, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
  uint32_t low = 0;
  for (int64_t i = 0; i < n; ++i) low |= u[i] & 0xFFFFu;
  return low == 0;
}

// Bytes of B tiles dequantized ahead when the rows take several chunks (each chunk then
// reads them instead of dequantizing again); wider weights take several passes.
constexpr int64_t kAmxAhead = 16 << 20;
constexpr int64_t kAmxAheadRows = 128;
constexpr int64_t kAmxStreamBytes = 4 << 20;

// y = x W^T on AMX-BF16 tiles: x bf16 [M, K], N % 32 == 0; false for a type it lacks.
// With swiglu (W the fused gate and up rows, N = 2I, I % 16 == 0; bf16 out16 [M, I]):
// silu(gate) * up instead, as silu_mul gives it from a bf16 gate_up.
// With picks (argmax_gguf: out and out16 null), each row's greedy pick instead, as
// argmax_rows would give it from the outputs: picks[M], int64.
bool linear_amx_bf16(const at::Tensor& x, const uint8_t* w, int64_t qtype, int64_t M,
                     int64_t K, int64_t N, float* out, uint16_t* out16, bool swiglu = false,
                     int64_t* picks = nullptr) {
  int64_t base;
  switch (qtype) {
    case kQ4_0x8: base = kQ4_0; break;
    case kQ4_1x8: base = kQ4_1; break;
    case kQ4_Kx8: base = kQ4_K; break;
    case kQ5_0x8: case kQ5_1x8: base = kQ5_0; break;
    case kQ8_0x8: base = kQ8_0; break;  // one part (208)
    default: return false;
  }
  at::Tensor copy, keep;
  const ARows a = amx_rows(x, M, K, copy, keep);
  const int64_t nb = K / QK, Q = N / 32;
  const int64_t grain = std::max<int64_t>(1, Q / (4 * at::get_num_threads()));
  // rows in chunks of about kAmxChunk bytes of bf16, which stay in L2 while every panel
  // passes (2048 rows in one went 2x slower). 1 MB rather than 512 KB: long rows (a 1.1B
  // model's down projection, K = 5632) then take 64-row chunks, not 32, and each panel
  // dequantized for a chunk serves twice the rows (1.1B at 2048 rows: down 1.35x, gate_up
  // and qkv 1.1x faster; the default model's shapes unchanged)
  const int64_t chunk = std::max<int64_t>(32, kAmxChunk / (2 * K) / 32 * 32);
  // outputs larger than the L2s go out by streaming stores (no read for ownership)
  const bool stream = !picks && M * N * (out16 ? 2 : 4) > kAmxStreamBytes;
  // picks: each thread's best per row (its own columns), merged after the GEMM
  const int64_t threads = picks ? at::get_num_threads() : 0;
  std::vector<float> best_val(threads * M, -INFINITY);
  std::vector<int64_t> best_idx(threads * M, -1);
  std::vector<uint8_t> best_nan(threads * M, 0);
  auto run = [&](auto t) {
    constexpr int64_t TT = decltype(t)::value;
    const int64_t wchunk = 8 * nb * block_bytes(TT);  // one group of 8 columns
    // pair q: panels 2q and 2q + 1, or gate panel q and up panel q + I / 16
    const PanelPairs pp = swiglu ? PanelPairs{w, 2 * wchunk, N / 16 * wchunk}
                                 : PanelPairs{w, 4 * wchunk, 2 * wchunk};
    const int64_t pair = 1024 * nb;  // uint16 of one pair's B tiles
    // ahead where the rows take several chunks of kAmxAheadRows or more: each chunk reads
    // every pair's bf16 tiles again, which a short chunk (long rows) does too often (4x
    // the bytes of the blocks it would dequantize instead)
    const bool pre = M > chunk && chunk >= kAmxAheadRows;
    const int64_t per = pre ? std::clamp<int64_t>(kAmxAhead / (2 * pair), 1, Q) : Q;
    uint16_t* ahead =
        pre ? static_cast<uint16_t*>(std::aligned_alloc(64, 2 * pair * per)) : nullptr;
    for (int64_t p0 = 0; p0 < Q; p0 += per) {
      const int64_t p1 = std::min(Q, p0 + per);
      if (ahead)
        at::parallel_for(p0, p1, 1, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q)
            amx_dequant_pair<TT>(pp, wchunk, nb, q, ahead + (q - p0) * pair);
        });
      for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t rows = std::min(chunk, M - m0);
        const ARows am{a.x + m0 * K, a.tail, K, a.full - m0 / 16};
        const int64_t ld = swiglu ? N / 2 : N;
        float* om = out ? out + m0 * ld : nullptr;
        uint16_t* om16 = out16 ? out16 + m0 * ld : nullptr;
        // each thread the same pairs for every chunk (a static split): their B tiles, which
        // it dequantized ahead, stay in its L2 (pairs handed out as asked: 8-12% slower)
        at::parallel_for(p0, p1, grain, [&](int64_t q0, int64_t q1) {
          const int64_t t = picks ? at::get_thread_num() * M + m0 : 0;
          const RowBest best{best_val.data() + t, best_idx.data() + t, best_nan.data() + t};
          amx_bf16_panels<TT>(am, (rows + 15) / 16, rows, pp, K, N, q0, q1, om, om16,
                              ahead, p0, swiglu, stream, picks ? &best : nullptr);
        });
      }
    }
    std::free(ahead);
  };
  switch (base) {
    case kQ4_0: run(std::integral_constant<int64_t, kQ4_0>{}); break;
    case kQ4_1: run(std::integral_constant<int64_t, kQ4_1>{}); break;
    case kQ4_K: run(std::integral_constant<int64_t, kQ4_K>{}); break;
    case kQ5_0: run(std::integral_constant<int64_t, kQ5_0>{}); break;
    default: run(std::integral_constant<int64_t, kQ8_0>{}); break;
  }
  for (int64_t r = 0; picks && r < M; ++r) {  // a NaN first, else the largest, earliest
    int64_t pick = -1;
    bool nan = false;
    float val = -INFINITY;
    for (int64_t t = 0; t < threads; ++t) {
      const int64_t j = t * M + r, c = best_idx[j];
      if (c < 0) continue;
      const bool n = best_nan[j];
      if (pick < 0 || (n && (!nan || c < pick)) ||
          (!n && !nan && (best_val[j] > val || (best_val[j] == val && c < pick)))) {
        pick = c, nan = n, val = best_val[j];
      }
    }
    picks[r] = pick < 0 ? 0 : pick;  // every value -inf: the first, as torch.argmax
  }
  return true;
}

#endif

template <int64_t T>
void linear_x8(const QRows& xq, const uint8_t* w, int64_t M, int64_t K, int64_t N,
               float* out, uint16_t* out16 = nullptr) {  // out16: N % 16 == 0, AVX-512
  const int64_t nb = K / QK, chunk = 8 * nb * block_bytes(T);
  int64_t g0 = 0;  // the first group left for the eight-column kernel
#if DSQ_ISA == 2
  g0 = N / 16 * 2;
  for_row_tiles(M, N / 16, K + nb * 8, [&](int64_t p, int64_t m, int64_t rows) {
    const uint8_t* wg = w + 2 * p * chunk;
    const int8_t* q = xq.q.data() + m * K;
    const float* d = xq.d.data() + m * nb;
    const float* s = xq.s.data() + m * nb;
    const int32_t* c = xq.n.data() + m * nb;
    float* o = out16 ? nullptr : out + m * N + 16 * p;
    uint16_t* o16 = out16 ? out16 + m * N + 16 * p : nullptr;
    with_rows(rows, [&](auto r) {
      group_x16<T, decltype(r)::value>(wg, chunk, q, d, s, c, nb, o, N, o16);
    });
  }, kCodeTile);
  if (g0 == N / 8) return;
#endif
  for_row_tiles(M, N / 8 - g0, K + nb * 8, [&](int64_t g, int64_t m, int64_t rows) {
    g += g0;
    const uint8_t* wg = w + g * chunk;
    const int8_t* q = xq.q.data() + m * K;
    const float* d = xq.d.data() + m * nb;
    const float* s = xq.s.data() + m * nb;
    const int32_t* c = xq.n.data() + m * nb;
    float* o = out + m * N + 8 * g;
    with_rows(rows, [&](auto r) {
      group_x8<T, decltype(r)::value>(wg, q, d, s, c, nb, o, N);
    });
  }, kCodeTile);
}

// Rows already rounded to 8-bit codes against a 4-bit block matrix of kernel type `qtype`.
// out16 (interleaved types only, N % 16 == 0, AVX-512): the outputs as bf16 there.
void linear_codes(const QRows& q, const uint8_t* w, int64_t M, int64_t K, int64_t N,
                  int64_t qtype, float* out, uint16_t* out16 = nullptr) {
  switch (qtype) {
    case kQ4_0: linear_blocks<kQ4_0>(q, w, M, K, N, out); break;
    case kQ4_0x8: linear_x8<kQ4_0>(q, w, M, K, N, out, out16); break;
    case kQ4_1x8: linear_x8<kQ4_1>(q, w, M, K, N, out, out16); break;
    case kQ4_Kx8: linear_x8<kQ4_K>(q, w, M, K, N, out, out16); break;
    case kQ5_0x8: case kQ5_1x8: linear_x8<kQ5_0>(q, w, M, K, N, out, out16); break;
    default: linear_blocks<kQ4_1>(q, w, M, K, N, out); break;
  }
}

// silu(gate) * up of a fused gate_up projection on AMX tiles, where they take it: bf16
// rows x [M, K] (M >= kAmxRows) against interleaved gate and up rows [2I, K] (I a multiple
// of 16), the result [M, I] bf16 exactly as silu_mul(linear_gguf(x, weight)) gives it.
// Undefined (run the two steps) anywhere else: the gate_up sums never leave the tiles.
#if DSQ_AMX
// Whether the AMX tiles take rows x [M, K] against interleaved blocks of kernel type qtype
// (Q8_0 in one part only) at all: tiles in use, 12 rows or more, a multiple of 32 columns
// and blocks that match K. (Each caller adds the row types it takes.)
bool tiles_take(const at::Tensor& x, const at::Tensor& weight, int64_t qtype) {
  const bool x8 = qtype == kQ4_0x8 || qtype == kQ4_1x8 || qtype == kQ5_0x8 ||
                  qtype == kQ5_1x8 || qtype == kQ4_Kx8 || qtype == kQ8_0x8One;
  return g_amx && x8 && x.dim() == 2 && x.size(0) >= kAmxRows && weight.dim() == 2 &&
         weight.size(0) % 32 == 0 && weight.scalar_type() == at::kByte &&
         x.size(1) % QK == 0 && weight.size(1) == x.size(1) / QK * block_bytes(qtype % 100);
}
#endif

at::Tensor swiglu_gguf(const at::Tensor& x, const at::Tensor& weight, int64_t qtype) {
#if DSQ_AMX
  if (tiles_take(x, weight, qtype) && x.scalar_type() == at::kBFloat16) {
    const int64_t M = x.size(0), N = weight.size(0);
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    at::Tensor o = at::empty({M, N / 2}, xc.options());
    if (linear_amx_bf16(xc, wc.data_ptr<uint8_t>(), qtype == kQ8_0x8One ? kQ8_0x8 : qtype, M,
                        xc.size(1), N, nullptr,
                        reinterpret_cast<uint16_t*>(o.data_ptr<at::BFloat16>()), true))
      return o;
  }
#endif
  return at::Tensor();
}

at::Tensor linear_gguf(const at::Tensor& x, const at::Tensor& weight, int64_t qtype,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "linear_gguf: x [M,K] and weight [N,bytes]");
  const bool one_part = qtype == kQ8_0x8One;
  if (one_part) qtype = kQ8_0x8;
  TORCH_CHECK(weight.scalar_type() == at::kByte, "linear_gguf: weight must be uint8 blocks");
  TORCH_CHECK(qtype != kQ8_0x8 || (DSQ_ISA >= 1 && weight.size(0) % 16 == 0),
              "linear_gguf: interleaved Q8_0 (108, 208) runs on the AVX-512 and AVX2 kernels "
              "only, with a multiple of 16 rows");
  const bool x8 = qtype == kQ4_0x8 || qtype == kQ4_1x8 || qtype == kQ5_0x8 ||
                  qtype == kQ5_1x8 || qtype == kQ4_Kx8 || qtype == kQ8_0x8;
  const int64_t base = x8 ? qtype - 100 : qtype;
  const bool x8_only = base == kQ5_0 || base == kQ5_1 || base == kQ4_K;
  const int64_t bb = x8_only && !x8 ? 0 : block_bytes(base);
  TORCH_CHECK(bb > 0, "linear_gguf: GGUF type ", qtype,
              " is not Q4_0 (2), Q4_1 (3), Q8_0 (8), Q6_K as kept (14), or an interleaved Q4_0 / "
              "Q4_1 / Q5_0 / Q5_1 / Q4_K / Q8_0 (102, 103, 106, 107, 112, 108; 208 one part)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(!x8 || N % 8 == 0, "linear_gguf: interleaved blocks need a multiple of 8 rows, "
              "not ", N);
  TORCH_CHECK(base != kQ4_K || K % 256 == 0, "linear_gguf: Q4_K rows are whole super-blocks "
              "of 256, not ", K);
  TORCH_CHECK(K % QK == 0 && weight.size(1) == K / QK * bb,
              "linear_gguf: in_features ", K, " does not match weight rows of ", weight.size(1),
              " bytes");
  at::Tensor xc = x.contiguous();
  at::Tensor wc = weight.contiguous();
  if (qtype == kQ8_0 || qtype == kQ6_K) {
    at::Tensor xf = xc.to(at::kFloat).contiguous();
    at::Tensor out = at::empty({M, N}, xf.options());
    if (qtype == kQ8_0)
      linear_q8f<kQ8_0>(xf.data_ptr<float>(), wc.data_ptr<uint8_t>(), M, K, N, out.data_ptr<float>());
    else
      linear_q8f<kQ6_K>(xf.data_ptr<float>(), wc.data_ptr<uint8_t>(), M, K, N, out.data_ptr<float>());
    if (bias.has_value()) out.add_(bias->to(at::kFloat));
    return xc.scalar_type() == at::kFloat ? out : out.to(xc.scalar_type());
  }
#if DSQ_AMX
  // bf16 rows, or float32 rows that bf16 holds exactly (a bf16 model's hidden states given
  // to its head as floats, for float32 logits); other float32 rows asked for float32
  // precision, which bf16 tiles would drop
  // not Q8_0 in two parts (about 15 bits of each row, for MLA's absorbed W_UK / W_UV),
  // which bf16 rows would cut to 8
  if (g_amx && x8 && !(qtype == kQ8_0x8 && !one_part) && M >= kAmxRows && N % 32 == 0 &&
      (xc.scalar_type() == at::kBFloat16 ||
       (xc.scalar_type() == at::kFloat && bf16_exact(xc.data_ptr<float>(), M * K)))) {
    const bool bf16_in = xc.scalar_type() == at::kBFloat16;
    const bool bf16_out = bf16_in && !bias.has_value();
    const at::Tensor xb = bf16_in ? xc : xc.to(at::kBFloat16);
    at::Tensor o = at::empty({M, N}, xc.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
    float* op = bf16_out ? nullptr : o.data_ptr<float>();
    uint16_t* o16 = bf16_out ? reinterpret_cast<uint16_t*>(o.data_ptr<at::BFloat16>()) : nullptr;
    if (linear_amx_bf16(xb, wc.data_ptr<uint8_t>(), qtype, M, K, N, op, o16)) {
      if (bf16_out) return o;
      if (bias.has_value()) o.add_(bias->to(at::kFloat));
      return bf16_in ? o.to(at::kBFloat16) : o;
    }
  }
#endif
#if DSQ_ISA >= 1
  if (qtype == kQ8_0x8) {
    at::Tensor out = at::empty({M, N}, xc.options().dtype(at::kFloat));
    const uint8_t* wp = wc.data_ptr<uint8_t>();
    float* op = out.data_ptr<float>();
    switch (xc.scalar_type()) {
      case at::kFloat: linear_q8x16(xc.data_ptr<float>(), M, K, wp, N, op, !one_part); break;
      case at::kBFloat16:
        linear_q8x16(xc.data_ptr<at::BFloat16>(), M, K, wp, N, op, !one_part);
        break;
      case at::kHalf: linear_q8x16(xc.data_ptr<at::Half>(), M, K, wp, N, op, !one_part); break;
      default: TORCH_CHECK(false, "linear_gguf: x must be float32, bfloat16 or float16");
    }
    if (bias.has_value()) out.add_(bias->to(at::kFloat));
    return xc.scalar_type() == at::kFloat ? out : out.to(xc.scalar_type());
  }
#endif
  QRows q;
  switch (xc.scalar_type()) {
    case at::kFloat: quantize_rows(xc.data_ptr<float>(), M, K, q); break;
    case at::kBFloat16: quantize_rows(xc.data_ptr<at::BFloat16>(), M, K, q); break;
    case at::kHalf: quantize_rows(xc.data_ptr<at::Half>(), M, K, q); break;
    default: TORCH_CHECK(false, "linear_gguf: x must be float32, bfloat16 or float16");
  }
  const uint8_t* wp = wc.data_ptr<uint8_t>();
#if DSQ_ISA == 2
  if (x8 && N % 16 == 0 && !bias.has_value() && xc.scalar_type() == at::kBFloat16) {
    // bf16 rows out of the 16-column kernel itself: no float [M, N] and no second pass
    at::Tensor out16 = at::empty({M, N}, xc.options());
    linear_codes(q, wp, M, K, N, qtype, nullptr,
                 reinterpret_cast<uint16_t*>(out16.data_ptr<at::BFloat16>()));
    return out16;
  }
#endif
  at::Tensor out = at::empty({M, N}, xc.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  linear_codes(q, wp, M, K, N, qtype, op);
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return xc.scalar_type() == at::kFloat ? out : out.to(xc.scalar_type());
}

// y [M, N] = x [M, K] (float rows) times a block matrix of kernel type `qtype`, as
// linear_gguf computes it: Q8_0 / Q6_K against the float rows, the 4-bit types against the
// rows rounded to 8-bit codes.
void linear_rows(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                 int64_t qtype, float* out) {
  if (qtype == kQ8_0) { linear_q8f<kQ8_0>(x, w, M, K, N, out); return; }
  if (qtype == kQ6_K) { linear_q8f<kQ6_K>(x, w, M, K, N, out); return; }
  QRows q;
  quantize_rows(x, M, K, q);
  linear_codes(q, w, M, K, N, qtype, out);
}

// Bytes per 32 weights of a kernel type; 0 for Q5_0 / Q5_1 / Q4_K not interleaved (their
// kernels read only the interleaved order).
int64_t kernel_block_bytes(int64_t qtype) {
  const int64_t base = qtype > 100 ? qtype - 100 : qtype;
  if (qtype == base && (base == kQ5_0 || base == kQ5_1 || base == kQ4_K)) return 0;
  return block_bytes(base);
}

// A mixture-of-experts MLP in one call: the batch's rows grouped by the experts chosen
// for them (ids [T, k]), each chosen expert's SwiGLU run once over its rows on its
// blocks (gate_up [E, 2I, bytes], down [E, H, bytes]), and the results added back
// weighted (weights [T, k]). Only chosen experts' blocks are read. Returns [T, H] in x's
// dtype; intermediate values stay float32. With `up`, gate_up holds the gate's rows
// alone [E, I, bytes] and `up` the up projection's: the file's own tensors, as mapped.
at::Tensor moe_gguf(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                    const at::Tensor& gate_up, int64_t gu_type, const at::Tensor& down,
                    int64_t down_type, const c10::optional<at::Tensor>& up) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes() &&
                  ids.size(0) == x.size(0),
              "moe_gguf: x [T,H], ids and weights [T,k]");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "moe_gguf: ids must be int64");
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.scalar_type() == at::kByte &&
                  down.scalar_type() == at::kByte && gate_up.size(0) == down.size(0),
              "moe_gguf: gate_up [E,2I,bytes] and down [E,H,bytes] uint8 blocks");
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1), E = gate_up.size(0);
  const bool split = up.has_value();
  TORCH_CHECK(!split || (up->dim() == 3 && up->sizes() == gate_up.sizes() &&
                         up->scalar_type() == at::kByte),
              "moe_gguf: gate and up blocks [E, I, bytes] of one shape");
  const int64_t N1 = split ? 2 * gate_up.size(1) : gate_up.size(1), I = N1 / 2;
  TORCH_CHECK(kernel_block_bytes(gu_type) > 0 && kernel_block_bytes(down_type) > 0,
              "moe_gguf: expert types ", gu_type, " / ", down_type, " are not ones the kernels "
              "read (Q5_x and Q4_K only interleaved: 106, 107, 112)");
  TORCH_CHECK(down.size(1) == H && H % QK == 0 && I % QK == 0 &&
                  gate_up.size(2) == H / QK * kernel_block_bytes(gu_type) &&
                  down.size(2) == I / QK * kernel_block_bytes(down_type),
              "moe_gguf: expert blocks do not match hidden ", H, " and intermediate ", I);
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor idc = ids.contiguous();
  at::Tensor wf = weights.to(at::kFloat).contiguous();
  at::Tensor gu = gate_up.contiguous(), dn = down.contiguous();
  at::Tensor upc = split ? up->contiguous() : gu;
  const int64_t* idp = idc.data_ptr<int64_t>();
  const float* wp = wf.data_ptr<float>();
  // rows of each expert, in token order
  std::vector<std::vector<int64_t>> rows(E);
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t e = idp[i];
    TORCH_CHECK(e >= 0 && e < E, "moe_gguf: expert id ", e, " out of range");
    rows[e].push_back(i);
  }
  at::Tensor out = at::zeros({T, H}, xf.options());
  float* op = out.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  const int64_t gu_stride = gu.size(1) * gu.size(2), dn_stride = dn.size(1) * dn.size(2);
  std::vector<float> xe, h, act, y;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = static_cast<int64_t>(rows[e].size());
    if (!n) continue;
    xe.resize(n * H);
    h.resize(n * N1);
    act.resize(n * I);
    y.resize(n * H);
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(xe.data() + r * H, xp + rows[e][r] / k * H, H * sizeof(float));
    // rows of h: [gate | up] per token, or (split) every token's gate then every up
    linear_rows(xe.data(), n, H, gu.data_ptr<uint8_t>() + e * gu_stride, split ? I : N1,
                gu_type, h.data());
    if (split)
      linear_rows(xe.data(), n, H, upc.data_ptr<uint8_t>() + e * gu_stride, I, gu_type,
                  h.data() + n * I);
    for (int64_t r = 0; r < n; ++r) {
      const float* g = h.data() + r * (split ? I : N1);
      const float* u = split ? h.data() + (n + r) * I : g + I;
      float* a = act.data() + r * I;
      for (int64_t j = 0; j < I; ++j) a[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
    }
    linear_rows(act.data(), n, I, dn.data_ptr<uint8_t>() + e * dn_stride, H, down_type,
                y.data());
    for (int64_t r = 0; r < n; ++r) {
      const int64_t slot = rows[e][r];
      const float wgt = wp[slot];
      float* o = op + slot / k * H;
      const float* yr = y.data() + r * H;
      for (int64_t j = 0; j < H; ++j) o[j] += wgt * yr[j];
    }
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// A mixture-of-experts router's choice, per row of logits [T, E] (float32): softmax or
// sigmoid scores; with groups, only the `topk_group` best groups are eligible (a group
// ranks by its best score, or with `top2` by the sum of its best two); an optional
// correction bias moves the choice but not the weights; the k chosen scores, optionally
// renormalised, times `scale`. Returns [weights [T, k] float32, ids [T, k] int64].
std::vector<at::Tensor> moe_route(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                  int64_t k, bool sigmoid, int64_t n_group, int64_t topk_group,
                                  bool top2, bool norm, double scale) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "moe_route: logits must be float32 [T, E]");
  at::Tensor lc = logits.contiguous();
  const int64_t T = lc.size(0), E = lc.size(1);
  TORCH_CHECK(k >= 1 && k <= E && n_group >= 1 && E % n_group == 0 && topk_group >= 1 &&
                  topk_group <= n_group,
              "moe_route: bad k, n_group or topk_group for ", E, " experts");
  at::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value()) {
    bc = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bc.numel() == E, "moe_route: bias must have one value per expert");
    bp = bc.data_ptr<float>();
  }
  at::Tensor w = at::empty({T, k}, lc.options());
  at::Tensor ids = at::empty({T, k}, lc.options().dtype(at::kLong));
  const float* lp = lc.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t per = E / n_group;
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> score(E), choice(E), gscore(n_group);
    std::vector<int64_t> order(std::max(E, n_group));
    for (int64_t t = t0; t < t1; ++t) {
      const float* l = lp + t * E;
      if (sigmoid) {
        for (int64_t e = 0; e < E; ++e) score[e] = 1.f / (1.f + std::exp(-l[e]));
      } else {
        float mx = l[0];
        for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
        float sum = 0.f;
        for (int64_t e = 0; e < E; ++e) sum += (score[e] = std::exp(l[e] - mx));
        for (int64_t e = 0; e < E; ++e) score[e] /= sum;
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = score[e] + (bp ? bp[e] : 0.f);
      if (n_group > 1) {
        for (int64_t g = 0; g < n_group; ++g) {
          float a = -INFINITY, b = -INFINITY;  // best two of the group
          for (int64_t e = g * per; e < (g + 1) * per; ++e) {
            const float v = choice[e];
            if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
          }
          gscore[g] = top2 ? a + (per > 1 ? b : 0.f) : a;
        }
        for (int64_t g = 0; g < n_group; ++g) order[g] = g;
        std::partial_sort(order.begin(), order.begin() + topk_group, order.begin() + n_group,
                          [&](int64_t x, int64_t y) { return gscore[x] > gscore[y]; });
        std::vector<char> keep(n_group, 0);
        for (int64_t i = 0; i < topk_group; ++i) keep[order[i]] = 1;
        for (int64_t e = 0; e < E; ++e)
          if (!keep[e / per]) choice[e] = -INFINITY;
      }
      for (int64_t e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + k, order.begin() + E,
                        [&](int64_t x, int64_t y) { return choice[x] > choice[y]; });
      float sum = 0.f;
      for (int64_t i = 0; i < k; ++i) sum += score[order[i]];
      const float mul = static_cast<float>(scale) / (norm ? sum + 1e-20f : 1.f);
      for (int64_t i = 0; i < k; ++i) {
        ip[t * k + i] = order[i];
        wp[t * k + i] = score[order[i]] * mul;
      }
    }
  });
  return {w, ids};
}

// Blocks [A, R, bytes] (R a multiple of 8; any outer strides, e.g. a view of a mapped
// file) reordered into `out` (the same shape, any outer strides) eight rows at a time as
// gguf_linear.interleave documents: per group of 8 rows and unit, each header field
// (count x size bytes) of rows 0..7, then 4-byte code words of rows 0..7. One pass with
// fixed-size copies (a call to memcpy per 4 bytes ran at 1 GB/s), so an expert tensor
// goes from the mapped file to its kernel layout with one copy.
template <int S>
inline uint8_t* put(uint8_t* o, const uint8_t* const* rows, int64_t at) {
  for (int r = 0; r < 8; ++r, o += S) std::memcpy(o, rows[r] + at, S);
  return o;
}

// W code words of rows 0..7 as W runs of 8 words (a fixed-size transpose the compiler
// turns into vector shuffles: 2.5x the bandwidth of a copy per word).
template <int W>
inline uint8_t* put_words(uint8_t* o, const uint8_t* const* rows, int64_t at) {
  uint32_t in[8][W], out[W][8];
  for (int r = 0; r < 8; ++r) std::memcpy(in[r], rows[r] + at, 4 * W);
  for (int w = 0; w < W; ++w)
    for (int r = 0; r < 8; ++r) out[w][r] = in[r][w];
  std::memcpy(o, out, 32 * W);
  return o + 32 * W;
}

void interleave_into(const at::Tensor& blocks, at::Tensor& out, std::vector<int64_t> fields,
                     int64_t units, int64_t unit_bytes) {
  TORCH_CHECK(blocks.dim() == 3 && out.dim() == 3 && blocks.sizes() == out.sizes() &&
                  blocks.scalar_type() == at::kByte && out.scalar_type() == at::kByte &&
                  blocks.size(1) % 8 == 0 && blocks.stride(2) == 1 && out.stride(2) == 1 &&
                  blocks.size(2) == units * unit_bytes && fields.size() % 2 == 0,
              "interleave_blocks: blocks and out [A, 8n, units * unit_bytes] uint8, rows "
              "in place");
  int64_t hb = 0;
  for (size_t i = 0; i < fields.size(); i += 2) {
    TORCH_CHECK(fields[i + 1] == 1 || fields[i + 1] == 2 || fields[i + 1] == 4,
                "interleave_blocks: header fields are 1, 2 or 4 bytes");
    hb += fields[i] * fields[i + 1];
  }
  TORCH_CHECK(hb <= unit_bytes && (unit_bytes - hb) % 4 == 0,
              "interleave_blocks: fields do not fit the unit");
  const int64_t A = blocks.size(0), G = blocks.size(1) / 8;
  const int64_t s0 = blocks.stride(0), s1 = blocks.stride(1);
  const int64_t d0 = out.stride(0), d1 = out.stride(1);
  TORCH_CHECK(d1 == units * unit_bytes, "interleave_blocks: out's rows must be packed");
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  // one task per 8-row group: its rows are read front to back, its output written once
  at::parallel_for(0, A * G, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t a = i / G, g = i % G;
      const uint8_t* base = src + a * s0 + 8 * g * s1;
      uint8_t* o = dst + a * d0 + 8 * g * d1;  // the group's 8 rows are contiguous in out
      const uint8_t* rows[8];
      for (int64_t u = 0; u < units; ++u) {
        for (int r = 0; r < 8; ++r) rows[r] = base + r * s1 + u * unit_bytes;
        int64_t at = 0;
        for (size_t f = 0; f < fields.size(); f += 2) {
          const int64_t cnt = fields[f], size = fields[f + 1];
          for (int64_t c = 0; c < cnt; ++c, at += size)
            o = size == 2 ? put<2>(o, rows, at) : size == 4 ? put<4>(o, rows, at)
                                                            : put<1>(o, rows, at);
        }
        int64_t w = hb;
        for (; w + 16 <= unit_bytes; w += 16) o = put_words<4>(o, rows, w);
        for (; w < unit_bytes; w += 4) o = put<4>(o, rows, w);
      }
    }
  });
}

at::Tensor interleave_blocks(const at::Tensor& blocks, std::vector<int64_t> fields,
                             int64_t units, int64_t unit_bytes) {
  TORCH_CHECK(blocks.dim() == 2, "interleave_blocks: blocks [8n, bytes]");
  at::Tensor out = at::empty(blocks.sizes(), blocks.options().memory_format(
                                                 at::MemoryFormat::Contiguous));
  at::Tensor out3 = out.unsqueeze(0);
  interleave_into(blocks.unsqueeze(0), out3, fields, units, unit_bytes);
  return out;
}

void interleave_blocks_into(const at::Tensor& blocks, const at::Tensor& out,
                            std::vector<int64_t> fields, int64_t units, int64_t unit_bytes) {
  at::Tensor o = out;
  interleave_into(blocks, o, fields, units, unit_bytes);
}

// Q4_K / Q6_K file rows [n, k / 256 * (144 | 210)] -> the kept layout of
// layers/kquants.py (its docstring describes both), byte for byte what its torch
// operations write: one pass over the blocks in C++ (the torch version read 0.15-0.3
// GB/s, about 20 s of an 8B Q4_K_M file's start). The blocks are only read, so a
// mapped file's read-only view will do.
void keep_q4_k(const uint8_t* b, uint8_t* o) {  // 144 -> 152 bytes
  const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
  const float nd = -dmin;
  std::memcpy(o, &d, 4);
  std::memcpy(o + 4, &nd, 4);
  const uint8_t *lo = b + 4, *mn = b + 8, *hi = b + 12;
  for (int j = 0; j < 4; ++j) {
    o[8 + j] = lo[j] & 63;
    o[12 + j] = (hi[j] & 15) | ((lo[j] >> 2) & 48);
    o[16 + j] = mn[j] & 63;
    o[20 + j] = (hi[j] >> 4) | ((mn[j] >> 2) & 48);
  }
  // sub-block 2g + h is nibble h of the file's bytes 32g .. 32g + 31; kept as 16 bytes,
  // weight i in the low half of byte i, weight i + 16 in the high half
  const uint8_t* qs = b + 16;
  uint8_t* c = o + 24;
  for (int g = 0; g < 4; ++g)
    for (int h = 0; h < 2; ++h, c += 16)
      for (int i = 0; i < 16; ++i)
        c[i] = ((qs[32 * g + i] >> (4 * h)) & 15) | (((qs[32 * g + 16 + i] >> (4 * h)) & 15) << 4);
}

void keep_q6_k(const uint8_t* b, uint8_t* o) {  // 210 -> 320 bytes
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_to_float(load_u16(b + 208));
  // weight 128h + 32t + i: nibble t / 2 of ql byte 64h + 32 (t % 2) + i, and bits 2t, 2t + 1
  // of qh byte 32h + i
  int8_t q[256];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 4; ++t)
      for (int i = 0; i < 32; ++i) {
        const int low = (ql[64 * h + 32 * (t & 1) + i] >> (4 * (t >> 1))) & 15;
        const int high = (qh[32 * h + i] >> (2 * t)) & 3;
        q[128 * h + 32 * t + i] = static_cast<int8_t>((low | (high << 4)) - 32);
      }
  for (int j = 0; j < 16; ++j) {  // per 16 weights: fp32 d * scale, then the 16 codes
    const float s = d * static_cast<float>(sc[j]);
    std::memcpy(o + 20 * j, &s, 4);
    std::memcpy(o + 20 * j + 4, q + 16 * j, 16);
  }
}

at::Tensor keep_kquant(const at::Tensor& raw, int64_t qtype, int64_t k) {
  TORCH_CHECK(qtype == kQ4_K || qtype == kQ6_K, "keep_kquant: Q4_K (12) or Q6_K (14)");
  const int64_t in_b = qtype == kQ4_K ? 144 : 210, out_b = qtype == kQ4_K ? 152 : 320;
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && k % 256 == 0 &&
                  raw.size(1) == k / 256 * in_b,
              "keep_kquant: file rows [n, k / 256 * ", in_b, "] uint8 for k = ", k);
  const at::Tensor rc = raw.contiguous();
  const int64_t blocks = rc.size(0) * (k / 256);
  at::Tensor out = at::empty({rc.size(0), k / 256 * out_b}, rc.options());
  const uint8_t* src = rc.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      if (qtype == kQ4_K) keep_q4_k(src + i * in_b, dst + i * out_b);
      else keep_q6_k(src + i * in_b, dst + i * out_b);
    }
  });
  return out;
}

// A batch of block matrices, one per head: x [H, M, K] (any strides) times weight
// [H, N, bytes]^T -> [H, M, N] in x's dtype. MLA's absorbed W_UK / W_UV per head: one
// call a layer instead of a dense bf16 bmm (twice the bytes) or H calls from Python.
at::Tensor bmm_gguf(const at::Tensor& x, const at::Tensor& weight, int64_t qtype) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3 && x.size(0) == weight.size(0),
              "bmm_gguf: x [H, M, K] and weight [H, N, bytes] with the same H");
#if DSQ_ISA >= 1
  if (qtype == kQ8_0x8) {  // every head in one parallel loop
    const int64_t H = x.size(0), M = x.size(1), K = x.size(2), N = weight.size(1);
    TORCH_CHECK(N % 16 == 0 && K % QK == 0 && weight.size(2) == K / QK * block_bytes(kQ8_0),
                "bmm_gguf: interleaved Q8_0 weight [H, 16n, K / 32 * 34] for K = ", K);
    at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    at::Tensor out = at::empty({H, M, N}, xc.options().dtype(at::kFloat));
    const uint8_t* wp = wc.data_ptr<uint8_t>();
    float* op = out.data_ptr<float>();
    switch (xc.scalar_type()) {
      case at::kFloat: bmm_q8x16(xc.data_ptr<float>(), H, M, K, wp, N, op); break;
      case at::kBFloat16: bmm_q8x16(xc.data_ptr<at::BFloat16>(), H, M, K, wp, N, op); break;
      case at::kHalf: bmm_q8x16(xc.data_ptr<at::Half>(), H, M, K, wp, N, op); break;
      default: TORCH_CHECK(false, "bmm_gguf: x must be float32, bfloat16 or float16");
    }
    return xc.scalar_type() == at::kFloat ? out : out.to(xc.scalar_type());
  }
#endif
  at::Tensor out = at::empty({x.size(0), x.size(1), weight.size(1)}, x.options());
  for (int64_t h = 0; h < x.size(0); ++h)
    out[h].copy_(linear_gguf(x[h], weight[h], qtype, c10::nullopt));
  return out;
}

// Rows `ids` of a block matrix as floats (an embedding lookup in a GGUF table).
// swiglu_gguf for Python: an empty tensor where the tiles do not take it.
at::Tensor swiglu_gguf_op(const at::Tensor& x, const at::Tensor& weight, int64_t qtype) {
  const at::Tensor o = swiglu_gguf(x, weight, qtype);
  return o.defined() ? o : at::empty({0}, x.options());
}

// Each row's argmax of linear_gguf(x, weight, qtype) (torch.argmax's pick: the first of
// equal largest values, the first NaN) without writing the outputs: [M] int64, on the AMX
// tiles (greedy decoding's head: 64 x 49152 float32 logits not written and read back);
// an empty tensor where they do not take it (run linear_gguf and argmax_rows then).
at::Tensor argmax_gguf(const at::Tensor& x, const at::Tensor& weight, int64_t qtype) {
#if DSQ_AMX
  if (tiles_take(x, weight, qtype) &&
      (x.scalar_type() == at::kBFloat16 ||
       (x.scalar_type() == at::kFloat && x.is_contiguous() &&
        bf16_exact(x.data_ptr<float>(), x.numel())))) {
    const int64_t M = x.size(0), N = weight.size(0);
    const int64_t base = qtype == kQ8_0x8One ? kQ8_0x8 : qtype;
    const at::Tensor xb = x.to(at::kBFloat16).contiguous(), wc = weight.contiguous();
    at::Tensor picks = at::empty({M}, x.options().dtype(at::kLong));
    if (linear_amx_bf16(xb, wc.data_ptr<uint8_t>(), base, M, xb.size(1), N, nullptr, nullptr,
                        false, picks.data_ptr<int64_t>()))
      return picks;
  }
#endif
  return at::empty({0}, x.options().dtype(at::kLong));
}

at::Tensor gguf_rows(const at::Tensor& weight, const at::Tensor& ids, int64_t qtype, int64_t K) {
  const int64_t bb = qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0 ? block_bytes(qtype) : 0;
  TORCH_CHECK(bb > 0 && K % QK == 0 && weight.size(1) == K / QK * bb,
              "gguf_rows: weight rows do not hold ", K, " values of GGUF type ", qtype,
              " (Q4_0, Q4_1 or Q8_0)");
  at::Tensor wc = weight.contiguous(), ic = ids.to(at::kLong).contiguous();
  const int64_t n = ic.numel(), nb = K / QK, rows = wc.size(0);
  at::Tensor out = at::empty({n, K}, at::kFloat);
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, "gguf_rows: id ", ip[i], " out of range");
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* row = wp + ip[i] * nb * bb;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bb;
        float* o = op + i * K + b * QK;
        const float d = half_to_float(load_u16(blk));
        if (qtype == kQ8_0) {
          const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
          for (int j = 0; j < QK; ++j) o[j] = d * qs[j];
        } else {
          const float m = qtype == kQ4_1 ? half_to_float(load_u16(blk + 2)) : -8.f * d;
          const uint8_t* qs = blk + (qtype == kQ4_1 ? 4 : 2);
          for (int j = 0; j < 16; ++j) {
            o[j] = d * (qs[j] & 0x0f) + m;
            o[j + 16] = d * (qs[j] >> 4) + m;
          }
        }
      }
    }
  });
  return out;
}

int64_t gguf_isa() { return DSQ_ISA; }

bool gguf_set_amx(bool on) { return set_amx(on); }

}  // namespace dsq

#ifndef DS_NS
#define DS_NS deepserve
#endif
#define DSQ_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define DSQ_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

DSQ_FRAGMENT(DS_NS, m) {
  m.def("linear_gguf(Tensor x, Tensor weight, int qtype, Tensor? bias) -> Tensor");
  m.def("gguf_rows(Tensor weight, Tensor ids, int qtype, int k) -> Tensor");
  m.def("swiglu_gguf(Tensor x, Tensor weight, int qtype) -> Tensor");
  m.def("argmax_gguf(Tensor x, Tensor weight, int qtype) -> Tensor");
  m.def("bmm_gguf(Tensor x, Tensor weight, int qtype) -> Tensor");
  m.def("interleave_blocks(Tensor blocks, int[] fields, int units, int unit_bytes) -> Tensor");
  m.def("interleave_blocks_into(Tensor blocks, Tensor(a!) out, int[] fields, int units, "
        "int unit_bytes) -> ()");
  m.def("moe_route(Tensor logits, Tensor? bias, int k, bool sigmoid, int n_group, "
        "int topk_group, bool top2, bool norm, float scale) -> Tensor[]");
  m.def("moe_gguf(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, int gu_type, "
        "Tensor down, int down_type, Tensor? up=None) -> Tensor");
  m.def("keep_kquant(Tensor raw, int qtype, int k) -> Tensor");
  m.def("isa() -> int", &dsq::gguf_isa);
  m.def("set_amx(bool on) -> bool", &dsq::gguf_set_amx);
}

DSQ_IMPL(DS_NS, CPU, m) {
  m.impl("linear_gguf", &dsq::linear_gguf);
  m.impl("gguf_rows", &dsq::gguf_rows);
  m.impl("swiglu_gguf", &dsq::swiglu_gguf_op);
  m.impl("argmax_gguf", &dsq::argmax_gguf);
  m.impl("bmm_gguf", &dsq::bmm_gguf);
  m.impl("moe_gguf", &dsq::moe_gguf);
  m.impl("moe_route", &dsq::moe_route);
  m.impl("interleave_blocks", &dsq::interleave_blocks);
  m.impl("interleave_blocks_into", &dsq::interleave_blocks_into);
  m.impl("keep_kquant", &dsq::keep_kquant);
}
