// Whether AMX tile multiplies and AVX-512 vector work run side by side on this CPU.
//
// The AMX GEMMs (csrc/gguf_kernels.cpp) dequantize the next panel pair between the tile
// multiplies of the current one, on the premise that the tile unit multiplies while the
// vector units dequantize. This times, per step of 18, one core:
//   tiles   4 tile loads (1 KB each, from L1) and 4 tdpbf16ps into 4 accumulators
//           (random bf16 operands: all-zero ones multiply faster on Machine C)
//   vector  one block's worth of dequantization-like work: 32 vpermb, 32 FMAs,
//           16 vcvtne2ps2bf16, 16 64-byte stores
//   both    the two, the vector work after the 4 multiplies (as the kernel orders it)
//   mid     the two, the vector work between the 2nd and 3rd multiply
// If the units overlapped, `both` would be near max(tiles, vector); it is near their sum
// where they do not. Linux only (arch_prctl grants the tile registers); needs AMX-BF16.
//
//   g++ -O2 -march=sapphirerapids -o /tmp/amx_overlap benchmarks/amx_overlap.cpp
//   /tmp/amx_overlap
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>

namespace {

double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr int kSteps = 18;  // blocks of 32 along K = 576 (the default model's hidden size)

// vector work of one block: 16 output rows of 32 bf16, each from two byte permutes, two
// multiply-adds and one conversion
__attribute__((noinline)) void vector_block(const uint8_t* codes, uint16_t* out) {
  const __m512i idx = _mm512_set1_epi32(0x03020100);
  const __m512 d = _mm512_set1_ps(0.01f), m = _mm512_set1_ps(-0.05f);
  for (int t = 0; t < 16; ++t) {
    const __m512i v = _mm512_loadu_si512(codes + 64 * (t & 3));
    const __m512i two = _mm512_set1_epi32(0x40000000);
    const __m512 w0 = _mm512_fmadd_ps(
        _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(two, 0x4444444444444444ULL, idx, v)),
        d, m);
    const __m512 w1 = _mm512_fmadd_ps(
        _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(two, 0x4444444444444444ULL,
                                                         _mm512_add_epi8(idx, _mm512_set1_epi8(t)), v)),
        d, m);
    _mm512_store_si512(out + 32 * t, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
  }
}

}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    std::puts("no AMX tile permission here");
    return 1;
  }
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
  auto* a = static_cast<uint16_t*>(std::aligned_alloc(64, 2 * 1024 * kSteps));
  auto* b = static_cast<uint16_t*>(std::aligned_alloc(64, 2 * 1024 * kSteps));
  auto* codes = static_cast<uint8_t*>(std::aligned_alloc(64, 256));
  auto* out = static_cast<uint16_t*>(std::aligned_alloc(64, 1024));
  // random bf16 values of either sign (around 1 and 0.5): zeros multiply faster here
  for (int i = 0; i < 1024 * kSteps; ++i) {
    a[i] = static_cast<uint16_t>(0x3F80 + (std::rand() & 0x7F) + (std::rand() & 0x8000));
    b[i] = static_cast<uint16_t>(0x3F00 + (std::rand() & 0x7F) + (std::rand() & 0x8000));
  }
  for (int i = 0; i < 256; ++i) codes[i] = static_cast<uint8_t>(std::rand());
  const char* names[] = {"tiles", "vector", "both", "mid"};
  for (int mode = 0; mode < 4; ++mode) {
    double best = 1e9;
    for (int round = 0; round < 5; ++round) {
      const int reps = 20000;
      const double t0 = now();
      for (int r = 0; r < reps; ++r) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int s = 0; s < kSteps; ++s) {
          if (mode != 1) {
            _tile_loadd(4, a + 512 * s, 64);
            _tile_loadd(6, b + 512 * s, 64);
            _tile_loadd(7, b + 512 * (kSteps + s), 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (mode == 3) vector_block(codes, out);
            _tile_loadd(5, a + 512 * (kSteps + s), 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          if (mode == 1 || mode == 2) vector_block(codes, out);
        }
        if (mode != 1) _tile_stored(0, out, 64);
      }
      best = std::min(best, (now() - t0) / (double(reps) * kSteps) * 1e9);
    }
    std::printf("%-6s %5.1f ns a step\n", names[mode], best);
  }
  _tile_release();
  return 0;
}
