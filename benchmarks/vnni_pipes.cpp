// Which vector instructions run beside AVX512-VNNI's vpdpbusd on this CPU, one core.
//
// The VNNI GEMMs (group_x16 in csrc/gguf_kernels.cpp) do, per input row, 16 output
// columns and block of 32 weights: 8 vpdpbusd, then converting the int32 sums to float
// and scaling them (one multiply and one multiply-add; Q4_1 / Q5_x one multiply-add
// more), plus the nibble unpacking and activation broadcasts the rows share. Each loop
// below is 8 independent vpdpbusd (8 accumulators, register operands) plus the named
// extra instructions, all independent of each other; it prints ns per loop. Where an
// extra kind takes no time of its own it runs on other pipes; where it adds its count
// in cycles it takes the multiplies' pipes, and bounds the kernel below the vpdpbusd
// rate (8 / (8 + 2) = 80% for Q4_0, 8 / 11 for Q4_1).
//
//   g++ -O2 -march=x86-64-v4 -mavx512vnni -o /tmp/vnni_pipes benchmarks/vnni_pipes.cpp
//   /tmp/vnni_pipes
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {

alignas(64) int32_t xs[64];

#define DP8                                                                             \
  "vpdpbusd %%zmm16,%%zmm17,%%zmm0\n vpdpbusd %%zmm16,%%zmm17,%%zmm1\n"                 \
  "vpdpbusd %%zmm16,%%zmm17,%%zmm2\n vpdpbusd %%zmm16,%%zmm17,%%zmm3\n"                 \
  "vpdpbusd %%zmm16,%%zmm17,%%zmm4\n vpdpbusd %%zmm16,%%zmm17,%%zmm5\n"                 \
  "vpdpbusd %%zmm16,%%zmm17,%%zmm6\n vpdpbusd %%zmm16,%%zmm17,%%zmm7\n"
#define EMB8                                                                            \
  "vpdpbusd (%1)%{1to16%},%%zmm17,%%zmm0\n vpdpbusd 4(%1)%{1to16%},%%zmm17,%%zmm1\n"    \
  "vpdpbusd 8(%1)%{1to16%},%%zmm17,%%zmm2\n vpdpbusd 12(%1)%{1to16%},%%zmm17,%%zmm3\n"  \
  "vpdpbusd 16(%1)%{1to16%},%%zmm17,%%zmm4\n vpdpbusd 20(%1)%{1to16%},%%zmm17,%%zmm5\n" \
  "vpdpbusd 24(%1)%{1to16%},%%zmm17,%%zmm6\n vpdpbusd 28(%1)%{1to16%},%%zmm17,%%zmm7\n"
#define AND4                                                                            \
  "vpandd %%zmm18,%%zmm19,%%zmm20\n vpandd %%zmm18,%%zmm19,%%zmm21\n"                   \
  "vpandd %%zmm18,%%zmm19,%%zmm22\n vpandd %%zmm18,%%zmm19,%%zmm23\n"
#define SRL2 "vpsrlw $4,%%zmm19,%%zmm24\n vpsrlw $4,%%zmm19,%%zmm25\n"
#define FMA4                                                                            \
  "vfmadd231ps %%zmm18,%%zmm19,%%zmm8\n vfmadd231ps %%zmm18,%%zmm19,%%zmm9\n"           \
  "vfmadd231ps %%zmm18,%%zmm19,%%zmm10\n vfmadd231ps %%zmm18,%%zmm19,%%zmm11\n"
#define MUL4                                                                            \
  "vmulps %%zmm18,%%zmm19,%%zmm12\n vmulps %%zmm18,%%zmm19,%%zmm13\n"                   \
  "vmulps %%zmm18,%%zmm19,%%zmm14\n vmulps %%zmm18,%%zmm19,%%zmm15\n"
#define CVT4                                                                            \
  "vcvtdq2ps %%zmm19,%%zmm26\n vcvtdq2ps %%zmm19,%%zmm27\n"                             \
  "vcvtdq2ps %%zmm19,%%zmm28\n vcvtdq2ps %%zmm19,%%zmm29\n"
#define BCAST8                                                                          \
  "vpbroadcastd (%1),%%zmm20\n vpbroadcastd 4(%1),%%zmm21\n"                            \
  "vpbroadcastd 8(%1),%%zmm22\n vpbroadcastd 12(%1),%%zmm23\n"                          \
  "vpbroadcastd 16(%1),%%zmm24\n vpbroadcastd 20(%1),%%zmm25\n"                         \
  "vpbroadcastd 24(%1),%%zmm26\n vpbroadcastd 28(%1),%%zmm27\n"
#define INS2 "vinserti64x4 $1,(%1),%%zmm19,%%zmm28\n vinserti64x4 $1,32(%1),%%zmm19,%%zmm29\n"

#define LOOP(NAME, BODY)                                                                \
  double NAME(long n) {                                                                 \
    const auto t0 = std::chrono::steady_clock::now();                                   \
    __asm__ volatile("1:\n" BODY "dec %0\n jnz 1b\n"                                    \
                     : "+r"(n)                                                          \
                     : "r"(xs)                                                          \
                     : "memory", "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", \
                       "zmm7", "zmm8", "zmm9", "zmm10", "zmm11", "zmm12", "zmm13",      \
                       "zmm14", "zmm15", "zmm20", "zmm21", "zmm22", "zmm23", "zmm24",   \
                       "zmm25", "zmm26", "zmm27", "zmm28", "zmm29");                    \
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); \
  }

LOOP(dp, DP8)
LOOP(dp_and_srl, DP8 AND4 SRL2)
LOOP(dp_cvt, DP8 CVT4)
LOOP(dp_bcast, DP8 BCAST8)
LOOP(dp_insert, DP8 INS2)
LOOP(dp_fma, DP8 FMA4)
LOOP(dp_mul, DP8 MUL4)
LOOP(emb, EMB8)
LOOP(fma_only, FMA4 FMA4)

}  // namespace

int main() {
  struct Case {
    const char* name;
    double (*fn)(long);
  } cases[] = {{"8 vpdpbusd", dp},
               {"+ 4 vpandd, 2 vpsrlw (unpacking)", dp_and_srl},
               {"+ 4 vcvtdq2ps (int32 sums to float)", dp_cvt},
               {"+ 8 vpbroadcastd from memory", dp_bcast},
               {"+ 2 vinserti64x4 from memory", dp_insert},
               {"+ 4 vfmadd231ps", dp_fma},
               {"+ 4 vmulps", dp_mul},
               {"8 vpdpbusd, broadcast operand {1to16}", emb},
               {"8 vfmadd231ps alone", fma_only}};
  const long n = 20000000;
  double base = 0;
  for (const auto& c : cases) {
    c.fn(n / 10);  // warm up (clock, caches)
    double best = 1e9;
    for (int r = 0; r < 3; ++r) best = std::min(best, c.fn(n));
    const double ns = best / n * 1e9;
    if (base == 0) base = ns;
    std::printf("%-40s %6.3f ns a loop (%.2fx the 8 vpdpbusd)\n", c.name, ns, ns / base);
  }
}
