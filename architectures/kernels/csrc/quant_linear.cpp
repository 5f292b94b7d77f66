// int8 / int4 linear on CPU, on the layouts architectures/quant.py stores (never rearranged):
//
//   int8: codes int8 [N, K];                 w[n, k] = code[n, k] * scale[n, k / gs]
//   int4: nibbles int8 [N, K / 2], byte j = (code[2j] << 4) | (code[2j + 1] & 0xF), both signed;
//         w[n, k] = code[n, k] * scale[n, k / gs] (+ zero[n, k / gs] for the affine schemes)
//   scale / zero: [N, G] (or [N]: G = 1), gs = K / G, in fp32, bf16 or fp16.
//
// y[m, n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] x[m, k]) + zero[n, g] * (sum_{k in g} x[m, k]) + bias[n]
//
// Few rows (decode, M <= kRowsMax), act_quant (the op's last argument; zoo passes ZOO_QUANT_ACTIVATIONS, on by
// default): llama.cpp Q8_0's arithmetic. Decoding is a chain of matrix-vector products that should run at the
// speed of reading the codes; widening each code to fp32 costs more instructions per byte than that allows on
// AVX2 (no VNNI), integer dot products far fewer (32 codes: ~7 instructions for int8, ~10 for two nibbles). So each
// row of x is quantised to int8 per block of 32 code bytes (int8: 32 columns; int4: the 64 columns its nibbles
// multiply), blocks nested in the weight groups, one fp32 scale d = max|x| / 127 per block, q = round(x / d); a
// block's exact int32 dot product with the codes (AVX2: maddubs / madd, llama.cpp's sign trick for int8; int4 as
// unsigned nibbles + 8, the 8 * sum(q) taken off once per call) is scaled by d in fp32, and each group's sum by
// the weight's scale. Error: each activation moves by at most d / 2 (about 0.5% of a row's output on Gaussian
// activations); act_quant_reference in kernels/dequant_matmul.py computes the same from the same integers.
// The AVX2 and AVX512 builds run the same 256-bit code; the scalar build computes the same integers one at a time;
// they differ by fp32 rounding only. Weight rows are split in contiguous runs per thread (zoo_cpu::parallel_rows),
// each run read as several long sequential streams side by side (dense_rows' layout: four for one row of x), one
// block of each stream per step, so the streams' sums are independent chains.
// Few rows, act_quant off: codes widened to fp32 and multiplied with the exact fp32 activations (no activation
// quantisation: the scheme's reference arithmetic, rounded differently only by the order of the sums), each
// weight row read once for all rows of x. int4 needs no rearranged copy: x is split into its even and odd columns
// once per call, and the high / low nibbles of each byte multiply those. bf16 activations on CPUs with AVX-512
// BF16 (runtime check) take bf16 dot products for int4 instead (rows_kernel_bf16).
// Many rows (prefill), act_quant, SIMD builds, groups of whole blocks: the same arithmetic as an integer GEMM
// (quant_gemm: x quantised once, tiles of weight rows x rows of x, threads over weight rows). Otherwise (act_quant
// off: exact; the scalar build; ragged groups): blocks of weight rows, each thread dequantising its own into its
// own buffer (fp32, or bf16 for bf16 activations on CPUs with native bf16 dot products) and multiplying it by a
// single-threaded at::mm_out straight into its columns of y.
//
// One source for every instruction set: CPU_CAPABILITY_AVX512 / CPU_CAPABILITY_AVX2 (set by cpu_ext's build)
// pick the vector width, otherwise plain C++ the compiler vectorises as it can.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowsMax = 8;  // rows of x the matrix-vector kernel takes; more: dequantise + at::mm

#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t VL = 16;  // fp32 lanes = code bytes per step
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vset1(float s) { return _mm512_set1_ps(s); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline __m512i bytes_i32(const int8_t* p) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vf codes8(const int8_t* p) { return _mm512_cvtepi32_ps(bytes_i32(p)); }
// a nibble's value by table lookup: vpermps reads only the low 4 bits of each lane's index
inline void codes4(const int8_t* p, vf& hi, vf& lo) {
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  __m512i b = bytes_i32(p);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  lo = _mm512_permutexvar_ps(b, table);
}
constexpr float kHiMul = 1.f, kLoMul = 1.f;  // codes4 gives the codes themselves
inline float hi_raw(int8_t b) { return static_cast<float>(b >> 4); }
inline float lo_raw(int8_t b) { return static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(b) << 4) >> 4); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t VL = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vset1(float s) { return _mm256_set1_ps(s); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256i bytes_i32(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline vf codes8(const int8_t* p) { return _mm256_cvtepi32_ps(bytes_i32(p)); }
// the codes times powers of two, one shift or mask each (the activations are pre-multiplied by the inverse,
// exactly): b & ~15 = 16 * high nibble of a sign-extended byte, b << 28 = 2^28 * low nibble
inline void codes4(const int8_t* p, vf& hi, vf& lo) {
  __m256i b = bytes_i32(p);
  hi = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(-16)));
  lo = _mm256_cvtepi32_ps(_mm256_slli_epi32(b, 28));
}
constexpr float kHiMul = 1.f / 16, kLoMul = 1.f / 268435456;  // 2^-4, 2^-28
inline float hi_raw(int8_t b) { return static_cast<float>(static_cast<int32_t>(b) & -16); }
inline float lo_raw(int8_t b) { return static_cast<float>(static_cast<int32_t>(static_cast<uint32_t>(b) << 28)); }
#else
constexpr int64_t VL = 1;
using vf = float;
inline vf vzero() { return 0.f; }
inline vf vload(const float* p) { return *p; }
inline vf vset1(float s) { return s; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline float vsum(vf a) { return a; }
inline vf codes8(const int8_t* p) { return static_cast<float>(*p); }
inline float hi_raw(int8_t b) { return static_cast<float>(b >> 4); }
inline float lo_raw(int8_t b) { return static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(b) << 4) >> 4); }
inline void codes4(const int8_t* p, vf& hi, vf& lo) { hi = hi_raw(*p); lo = lo_raw(*p); }
constexpr float kHiMul = 1.f, kLoMul = 1.f;
#endif

inline int hi_nibble(int8_t b) { return b >> 4; }
inline int lo_nibble(int8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b) << 4) >> 4; }

// The rows kernel's view of one call. xs: per row of x, Kb floats the code bytes multiply (int8: x itself;
// int4: x's even columns then its odd columns, Kb each). xsum: per row, per group, sum of x (affine zero points).
struct Call {
  const int8_t* q;
  int64_t N, Kb, G, gb;  // output rows, code bytes per row, groups per row, code bytes per group
  const float* xs;
  int64_t xs_stride;
  const float* xsum;
  void* y;  // [M, N] in x's dtype
  at::ScalarType ydtype;
  const float* bias;  // [N] or null
  const uint16_t* xb;  // int4 with bf16 dot products: per row, x's even then odd columns as bf16 bits; else null
};

inline void store_y(void* y, at::ScalarType ydtype, const float* bias, int64_t i, int64_t n, float v) {
  if (bias != nullptr) v += bias[n];
  switch (ydtype) {
    case at::kBFloat16: static_cast<at::BFloat16*>(y)[i] = v; break;
    case at::kHalf: static_cast<at::Half*>(y)[i] = v; break;
    default: static_cast<float*>(y)[i] = v;
  }
}

inline void store(const Call& c, int64_t i, int64_t n, float v) { store_y(c.y, c.ydtype, c.bias, i, n, v); }

inline float fp32(const void* p, at::ScalarType t, int64_t i) {
  switch (t) {
    case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
    case at::kHalf: return static_cast<float>(static_cast<const at::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// y[m0 .. m0 + MR, n] for n in [n0, n1). U vectors of codes per step, each with its own accumulators, so that
// at least four independent FMA chains hide the FMA latency.
template <int MR, bool INT4, typename S>
void rows_kernel(const Call& c, const S* scale, const S* zero, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int U = MR >= 4 ? 1 : (MR == 1 ? 4 : 2);
  const float* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = c.xs + (m0 + r) * c.xs_stride;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qn = c.q + n * c.Kb;
    vf tot[MR];
    float tail[MR];
    for (int r = 0; r < MR; ++r) { tot[r] = vzero(); tail[r] = 0.f; }
    for (int64_t g = 0; g < c.G; ++g) {
      const int64_t j0 = g * c.gb, j1 = j0 + c.gb;
      vf acc[U][MR];
      float sacc[MR];
      for (int r = 0; r < MR; ++r) {
        for (int u = 0; u < U; ++u) acc[u][r] = vzero();
        sacc[r] = 0.f;
      }
      auto step = [&](int u, int64_t j) {
        if constexpr (INT4) {
          vf hi, lo;
          codes4(qn + j, hi, lo);
          for (int r = 0; r < MR; ++r) {
            acc[u][r] = vfma(hi, vload(xr[r] + j), acc[u][r]);
            acc[u][r] = vfma(lo, vload(xr[r] + c.Kb + j), acc[u][r]);
          }
        } else {
          const vf w = codes8(qn + j);
          for (int r = 0; r < MR; ++r) acc[u][r] = vfma(w, vload(xr[r] + j), acc[u][r]);
        }
      };
      int64_t j = j0;
      for (; j + U * VL <= j1; j += U * VL) {
        for (int u = 0; u < U; ++u) step(u, j + u * VL);
      }
      for (; j + VL <= j1; j += VL) step(0, j);
      for (; j < j1; ++j) {  // a group that is not a whole number of vectors
        for (int r = 0; r < MR; ++r) {
          if constexpr (INT4) {
            sacc[r] += hi_raw(qn[j]) * xr[r][j] + lo_raw(qn[j]) * xr[r][c.Kb + j];
          } else {
            sacc[r] += qn[j] * xr[r][j];
          }
        }
      }
      const float s = static_cast<float>(scale[n * c.G + g]);
      const vf sv = vset1(s);
      for (int r = 0; r < MR; ++r) {
        vf a = acc[0][r];
        for (int u = 1; u < U; ++u) a = a + acc[u][r];
        tot[r] = vfma(a, sv, tot[r]);
        tail[r] += s * sacc[r];
      }
    }
    for (int r = 0; r < MR; ++r) {
      float v = vsum(tot[r]) + tail[r];
      if (zero != nullptr) {
        const float* xsr = c.xsum + (m0 + r) * c.G;
        for (int64_t g = 0; g < c.G; ++g) v += static_cast<float>(zero[n * c.G + g]) * xsr[g];
      }
      store(c, (m0 + r) * c.N + n, n, v);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// int4 x bf16 activations on CPUs with AVX-512 BF16 dot products (vdpbf16ps: 32 bf16 products a step, each exact
// in fp32): twice the codes per instruction of the fp32 kernel. The nibbles become bf16 by a table lookup
// (vpermw reads 5 bits of each index: the 16 values twice, so a whole byte indexes its low nibble); x is the bf16
// input itself, so the products are the reference's and only the order of the sums differs.
// Groups a whole number of 32-byte steps (int4-group64 and wider, most int4-row layers).
template <int MR, int NR, typename S>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_kernel_bf16(const Call& c, const S* scale,
                                                                              const S* zero, int64_t m0, int64_t n0,
                                                                              int64_t n1) {
  // NR output rows at once: a group is only two steps, so one row's chains (dot, dot, scale) are latency-bound
  alignas(64) static const uint16_t kTable[32] = {
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80};
  const __m512i table = _mm512_load_si512(kTable);
  const uint16_t* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = c.xb + (m0 + r) * 2 * c.Kb;
  for (int64_t n = n0; n < n1; n += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, n1 - n));
    if (NR > 1 && nr < NR) {  // the last odd row of a task
      rows_kernel_bf16<MR, 1>(c, scale, zero, m0, n, n1);
      return;
    }
    __m512 tot[NR][MR];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < MR; ++r) tot[i][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < c.G; ++g) {
      __m512 acc_hi[NR][MR], acc_lo[NR][MR];
      for (int i = 0; i < NR; ++i)
        for (int r = 0; r < MR; ++r) { acc_hi[i][r] = _mm512_setzero_ps(); acc_lo[i][r] = _mm512_setzero_ps(); }
      for (int64_t j = g * c.gb; j < (g + 1) * c.gb; j += 32) {
        for (int i = 0; i < NR; ++i) {
          const int8_t* qn = c.q + (n + i) * c.Kb;
          const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qn + j)));
          const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
          const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(b, table);
          for (int r = 0; r < MR; ++r) {
            acc_hi[i][r] = _mm512_dpbf16_ps(acc_hi[i][r], hi, (__m512bh)_mm512_loadu_si512(xr[r] + j));
            acc_lo[i][r] = _mm512_dpbf16_ps(acc_lo[i][r], lo, (__m512bh)_mm512_loadu_si512(xr[r] + c.Kb + j));
          }
        }
      }
      for (int i = 0; i < NR; ++i) {
        const __m512 sv = _mm512_set1_ps(static_cast<float>(scale[(n + i) * c.G + g]));
        for (int r = 0; r < MR; ++r)
          tot[i][r] = _mm512_fmadd_ps(_mm512_add_ps(acc_hi[i][r], acc_lo[i][r]), sv, tot[i][r]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      for (int r = 0; r < MR; ++r) {
        float v = _mm512_reduce_add_ps(tot[i][r]);
        if (zero != nullptr) {
          const float* xsr = c.xsum + (m0 + r) * c.G;
          for (int64_t g = 0; g < c.G; ++g) v += static_cast<float>(zero[(n + i) * c.G + g]) * xsr[g];
        }
        store(c, (m0 + r) * c.N + n + i, n + i, v);
      }
    }
  }
}
#endif

template <bool INT4, typename S>
void rows_all(const Call& c, const S* scale, const S* zero, int64_t M) {
  // at least ~64 KiB of codes per task: the small projections (128 x 896) run on one or two threads
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(c.Kb, 1));
  at::parallel_for(0, c.N, grain, [&](int64_t n0, int64_t n1) {
#if defined(CPU_CAPABILITY_AVX512)
    if (INT4 && c.xb != nullptr) {
      for (int64_t m = 0; m < M;) {
        switch (std::min<int64_t>(M - m, 4)) {
          case 4: rows_kernel_bf16<4, 1>(c, scale, zero, m, n0, n1); m += 4; break;
          case 3: rows_kernel_bf16<3, 1>(c, scale, zero, m, n0, n1); m += 3; break;
          case 2: rows_kernel_bf16<2, 2>(c, scale, zero, m, n0, n1); m += 2; break;
          default: rows_kernel_bf16<1, 4>(c, scale, zero, m, n0, n1); m += 1; break;
        }
      }
      return;
    }
#endif
    for (int64_t m = 0; m < M;) {
      switch (std::min<int64_t>(M - m, 4)) {
        case 4: rows_kernel<4, INT4>(c, scale, zero, m, n0, n1); m += 4; break;
        case 3: rows_kernel<3, INT4>(c, scale, zero, m, n0, n1); m += 3; break;
        case 2: rows_kernel<2, INT4>(c, scale, zero, m, n0, n1); m += 2; break;
        default: rows_kernel<1, INT4>(c, scale, zero, m, n0, n1); m += 1; break;
      }
    }
  });
}

// ---- activation-quantised rows (Q8_0's arithmetic): integer dot products -----------------------------------
//
// Each row of x is quantised per block of kQB code bytes (int8: 32 columns; int4: 64 columns, the even and odd
// ones that a block's 32 bytes of nibbles multiply), blocks restarting at every weight group (the last block of a
// group may be shorter): d = max|x| / 127, q = round(x / d) (as x * (1 / d), ties to even). Per block the codes
// and q give an exact int32 dot product, scaled by d in fp32; per group that sum is scaled by the weight's scale.
// AVX2 (and the AVX512 build, on the same 256-bit instructions): int8 by llama.cpp's sign trick
// (maddubs(|w|, sign(q, w)), then madd to int32); int4 reads each nibble as an unsigned 0..15 (code + 8: one xor
// with 0x88) and subtracts 8 * sum(q) per block once per call (xcorr); both convert the int32 lanes to fp32 and
// accumulate d * lanes. The scalar build computes the same integers directly. Only fp32 rounding differs.

constexpr int64_t kQB = 32;  // code bytes per activation block

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kIntSimd = true;
using qv = __m256;
inline qv qzero() { return _mm256_setzero_ps(); }
inline qv qfma(qv a, qv b, qv c) { return _mm256_fmadd_ps(a, b, c); }
inline qv qset1(float s) { return _mm256_set1_ps(s); }
inline float qsum(qv a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr bool kIntSimd = false;
using qv = float;
inline qv qzero() { return 0.f; }
inline qv qfma(qv a, qv b, qv c) { return a * b + c; }
inline qv qset1(float s) { return s; }
inline float qsum(qv a) { return a; }
#endif

// The quantised-activation kernel's view of one call.
struct QCall {
  const int8_t* q;
  int64_t N, Kb, G, gb, nbg;  // output rows, code bytes per row, groups, code bytes per group, blocks per group
  const int8_t* xq;  // per row, xq_stride bytes: int8: q [Kb]; int4: q of x's even columns [Kb], then odd [Kb]
  int64_t xq_stride;
  const float* xd;  // per row, G * nbg block scales d
  const float* xcorr;  // int4, SIMD builds: per row, per group: -8 * sum over its whole blocks of d * sum(q)
  const float* xsum;  // per row, per group: sum of x (affine zero points), exact fp32
  void* y;
  at::ScalarType ydtype;
  const float* bias;
};

// the exact integer dot product of code bytes [j0, j1) of one weight row with the quantised activations
template <bool INT4>
inline int32_t block_dot(const int8_t* qn, const int8_t* xe, const int8_t* xo, int64_t j0, int64_t j1) {
  int32_t s = 0;
  for (int64_t j = j0; j < j1; ++j) {
    if constexpr (INT4) {
      s += hi_nibble(qn[j]) * xe[j] + lo_nibble(qn[j]) * xo[j];
    } else {
      s += qn[j] * xe[j];
    }
  }
  return s;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// One whole block of 32 code bytes, the one loop body every SIMD kernel below shares. codes() readies the bytes
// once for all rows of x: int8 |w| and w (whose signs go onto x: llama.cpp's trick, since maddubs takes one
// unsigned operand); int4 each nibble + 8 (one xor with 0x88 makes both unsigned 0..15), high and low nibbles apart.
// lanes() is then the block's exact int32 dot product with one row's quantised x (int4: xv its even columns, xw
// its odd ones), as 8 partial sums in fp32 lanes (|sums| < 2^17: exact).
struct QBlock {
  __m256i a, b;
};

template <bool INT4>
inline QBlock codes(const int8_t* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (INT4) {
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    const __m256i u = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x88)));
    return {_mm256_and_si256(_mm256_srli_epi16(u, 4), m0f), _mm256_and_si256(u, m0f)};
  } else {
    return {_mm256_sign_epi8(w, w), w};
  }
}

template <bool INT4>
inline __m256 lanes(const QBlock& w, __m256i xv, __m256i xw) {
  __m256i p;
  if constexpr (INT4) {
    p = _mm256_add_epi16(_mm256_maddubs_epi16(w.a, xv), _mm256_maddubs_epi16(w.b, xw));
  } else {
    p = _mm256_maddubs_epi16(w.a, _mm256_sign_epi8(xv, w.b));
  }
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// a weight scale / zero point broadcast to 8 fp32 lanes (bf16: the 16 bits into the high half of each lane)
template <typename S>
inline __m256 bcast(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_broadcast_ss(p);
  } else if constexpr (std::is_same_v<S, at::BFloat16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi16(static_cast<int16_t>(p->x)), 16));
  } else {
    return _mm256_set1_ps(static_cast<float>(*p));
  }
}
#endif

// y[m0 .. m0 + MR, n] for n in [n0, n1), NR weight rows at a time (independent chains; x's blocks loaded once):
// any group size (blocks cut short at a group's end summed in scalar code), and every row count of the scalar build.
template <int MR, int NR, bool INT4, typename S>
void qrows_kernel(const QCall& c, const S* scale, const S* zero, int64_t m0, int64_t n0, int64_t n1) {
  const int8_t* xe[MR];
  const int8_t* xo[MR];
  const float* xd[MR];
  for (int r = 0; r < MR; ++r) {
    xe[r] = c.xq + (m0 + r) * c.xq_stride;
    xo[r] = xe[r] + c.Kb;
    xd[r] = c.xd + (m0 + r) * c.G * c.nbg;
  }
  for (int64_t n = n0; n < n1; n += NR) {
    if (NR > 1 && n1 - n < NR) {  // the last rows of a run
      qrows_kernel<MR, 1, INT4>(c, scale, zero, m0, n, n1);
      return;
    }
    const int8_t* qn[NR];
    for (int i = 0; i < NR; ++i) qn[i] = c.q + (n + i) * c.Kb;
    qv tot[NR][MR];
    float tail[NR][MR];
    for (int i = 0; i < NR; ++i)
      for (int r = 0; r < MR; ++r) { tot[i][r] = qzero(); tail[i][r] = 0.f; }
    for (int64_t g = 0; g < c.G; ++g) {
      qv acc[NR][MR];
      float sacc[NR][MR];
      for (int i = 0; i < NR; ++i)
        for (int r = 0; r < MR; ++r) { acc[i][r] = qzero(); sacc[i][r] = 0.f; }
      for (int64_t b = 0; b < c.nbg; ++b) {
        const int64_t j0 = g * c.gb + b * kQB, j1 = std::min(j0 + kQB, (g + 1) * c.gb);
        if (kIntSimd && j1 - j0 == kQB) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
          for (int i = 0; i < NR; ++i) {
            const QBlock w = codes<INT4>(qn[i] + j0);
            for (int r = 0; r < MR; ++r) {
              const __m256 d = _mm256_set1_ps(xd[r][g * c.nbg + b]);
              acc[i][r] = _mm256_fmadd_ps(lanes<INT4>(w, load32(xe[r] + j0), INT4 ? load32(xo[r] + j0) : w.b), d,
                                          acc[i][r]);
            }
          }
#endif
        } else {
          for (int i = 0; i < NR; ++i)
            for (int r = 0; r < MR; ++r)
              sacc[i][r] += xd[r][g * c.nbg + b] * static_cast<float>(block_dot<INT4>(qn[i], xe[r], xo[r], j0, j1));
        }
      }
      for (int i = 0; i < NR; ++i) {
        const float s = static_cast<float>(scale[(n + i) * c.G + g]);
        const qv sv = qset1(s);
        for (int r = 0; r < MR; ++r) {
          tot[i][r] = qfma(acc[i][r], sv, tot[i][r]);
          float t = sacc[i][r];
          if constexpr (INT4 && kIntSimd) t += c.xcorr[(m0 + r) * c.G + g];
          tail[i][r] += s * t;
        }
      }
    }
    for (int i = 0; i < NR; ++i) {
      for (int r = 0; r < MR; ++r) {
        float v = qsum(tot[i][r]) + tail[i][r];
        if (zero != nullptr) {
          const float* xsr = c.xsum + (m0 + r) * c.G;
          for (int64_t g = 0; g < c.G; ++g) v += static_cast<float>(zero[(n + i) * c.G + g]) * xsr[g];
        }
        store_y(c.y, c.ydtype, c.bias, (m0 + r) * c.N + n + i, n + i, v);
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Weight streams per thread for MR rows of x (qrows_simd): R * MR accumulator chains, within the 16 registers.
template <int MR>
constexpr int streams() { return MR == 1 ? 4 : (MR == 2 ? 2 : 1); }

// Software prefetch distance within each stream (as dense_rows': the hardware prefetcher does most of the work).
constexpr int64_t kQAheadBytes = 512;

// The same for groups of whole blocks (every int8-row and int4-group64/128 layer of a model), the rows [n0, n1)
// read as R long sequential streams side by side (R contiguous sub-runs; step i: row i of each), as dense_rows
// reads bf16 weights (dense.cpp: DRAM serves several long streams per core faster than one): R independent weight
// rows per step are also R independent accumulator chains, where one row's blocks were a chain of dependent FMAs.
// The leftover rows (fewer than R) one at a time after. int4's -8 * sum(q) (xcorr) and an affine layer's
// zero * sum(x) enter lane 0 of each group's sums, so nothing is left to do per row but one horizontal sum.
template <int MR, int R, bool INT4, typename S>
void qrows_simd(const QCall& c, const S* scale, const S* zero, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t G = c.G, gb = c.gb, nbg = c.nbg, Kb = c.Kb;
  const int8_t* xe[MR];
  const float* xd[MR];
  for (int r = 0; r < MR; ++r) {
    xe[r] = c.xq + (m0 + r) * c.xq_stride;
    xd[r] = c.xd + (m0 + r) * G * nbg;
  }
  const int64_t q = (n1 - n0) / R;  // rows per stream
  for (int64_t i = 0; i < q; ++i) {
    int64_t rows[R];
    const int8_t* qn[R];
    for (int s = 0; s < R; ++s) {
      rows[s] = n0 + i + s * q;
      qn[s] = c.q + rows[s] * Kb;
    }
    __m256 tot[R][MR];
    for (int s = 0; s < R; ++s)
      for (int r = 0; r < MR; ++r) tot[s][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[R][MR];
      for (int r = 0; r < MR; ++r) {
        // lane 0 of the group's sum starts at int4's correction (times the scale with the rest)
        const __m256 a0 = INT4 ? _mm256_setr_ps(c.xcorr[(m0 + r) * G + g], 0, 0, 0, 0, 0, 0, 0) : _mm256_setzero_ps();
        for (int s = 0; s < R; ++s) acc[s][r] = a0;
      }
      for (int64_t b = 0; b < nbg; ++b) {
        const int64_t j = g * gb + b * kQB;
        __m256i xv[MR], xw[MR];
        __m256 dv[MR];
        for (int r = 0; r < MR; ++r) {
          xv[r] = load32(xe[r] + j);
          if constexpr (INT4) xw[r] = load32(xe[r] + Kb + j);
          dv[r] = _mm256_broadcast_ss(xd[r] + g * nbg + b);
        }
        for (int s = 0; s < R; ++s) {
          _mm_prefetch(reinterpret_cast<const char*>(qn[s] + j + kQAheadBytes), _MM_HINT_T0);
          const QBlock w = codes<INT4>(qn[s] + j);
          for (int r = 0; r < MR; ++r)
            acc[s][r] = _mm256_fmadd_ps(lanes<INT4>(w, xv[r], INT4 ? xw[r] : w.b), dv[r], acc[s][r]);
        }
      }
      for (int s = 0; s < R; ++s) {
        const __m256 sv = bcast(scale + rows[s] * G + g);
        for (int r = 0; r < MR; ++r) tot[s][r] = _mm256_fmadd_ps(acc[s][r], sv, tot[s][r]);
        if (zero != nullptr) {
          const __m256 zv = bcast(zero + rows[s] * G + g);
          for (int r = 0; r < MR; ++r)
            tot[s][r] = _mm256_fmadd_ps(zv, _mm256_setr_ps(c.xsum[(m0 + r) * G + g], 0, 0, 0, 0, 0, 0, 0), tot[s][r]);
        }
      }
    }
    for (int s = 0; s < R; ++s)
      for (int r = 0; r < MR; ++r)
        store_y(c.y, c.ydtype, c.bias, (m0 + r) * c.N + rows[s], rows[s], qsum(tot[s][r]));
  }
  if constexpr (R > 1) {
    if (n0 + R * q < n1) qrows_simd<MR, 1, INT4>(c, scale, zero, m0, n0 + R * q, n1);
  }
}
#endif

template <bool INT4, typename S>
void qrows_all(const QCall& c, const S* scale, const S* zero, int64_t M) {
  // one contiguous run of rows per thread, small weights on the calling thread
  zoo_cpu::parallel_rows(c.N, c.Kb, 1, [&](int64_t n0, int64_t n1) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (c.gb % kQB == 0) {
      for (int64_t m = 0; m < M;) {
        switch (std::min<int64_t>(M - m, 4)) {
          case 4: qrows_simd<4, streams<4>(), INT4>(c, scale, zero, m, n0, n1); m += 4; break;
          case 3: qrows_simd<3, streams<3>(), INT4>(c, scale, zero, m, n0, n1); m += 3; break;
          case 2: qrows_simd<2, streams<2>(), INT4>(c, scale, zero, m, n0, n1); m += 2; break;
          default: qrows_simd<1, streams<1>(), INT4>(c, scale, zero, m, n0, n1); m += 1; break;
        }
      }
      return;
    }
#endif
    for (int64_t m = 0; m < M;) {
      switch (std::min<int64_t>(M - m, 4)) {
        case 4: qrows_kernel<4, 1, INT4>(c, scale, zero, m, n0, n1); m += 4; break;
        case 3: qrows_kernel<3, 1, INT4>(c, scale, zero, m, n0, n1); m += 3; break;
        case 2: qrows_kernel<2, 2, INT4>(c, scale, zero, m, n0, n1); m += 2; break;
        default: qrows_kernel<1, 4, INT4>(c, scale, zero, m, n0, n1); m += 1; break;
      }
    }
  });
}

// One block of activations quantised: n values of a (and n of b, int4's odd columns, where b is not null) share
// d = max|v| / 127; q = round(v * (1 / d)), ties to even (0 where the block is all zeros). Returns sum(q).
inline int32_t quantise_block(const float* a, const float* b, int64_t n, int8_t* qa, int8_t* qb, float& d) {
  float amax = 0.f;
  for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(a[j]));
  if (b != nullptr)
    for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(b[j]));
  d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int v = static_cast<int>(std::nearbyint(a[j] * id));
    qa[j] = static_cast<int8_t>(v);
    sum += v;
  }
  if (b != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const int v = static_cast<int>(std::nearbyint(b[j] * id));
      qb[j] = static_cast<int8_t>(v);
      sum += v;
    }
  }
  return sum;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// quantise_block for a whole block (32 values of a, and 32 of b where not null), vectorised: the same arithmetic
inline int32_t quantise_block32(const float* a, const float* b, int8_t* qa, int8_t* qb, float& d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[8];
  const int nv = b != nullptr ? 8 : 4;
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(a + 8 * i);
  if (b != nullptr)
    for (int i = 0; i < 4; ++i) v[4 + i] = _mm256_loadu_ps(b + 8 * i);
  __m256 mx = _mm256_andnot_ps(sign, v[0]);
  for (int i = 1; i < nv; ++i) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  d = _mm_cvtss_f32(m) / 127.f;
  const __m256 iv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i sum = _mm256_setzero_si256();
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int h = 0; h < nv / 4; ++h) {
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(
          _mm256_round_ps(_mm256_mul_ps(v[4 * h + i], iv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      sum = _mm256_add_epi32(sum, q[i]);
    }
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h == 0 ? qa : qb), _mm256_permutevar8x32_epi32(p, perm));
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}
#endif

// sum of n floats (8 lanes at a time in SIMD builds: another order than one by one, within fp32 rounding)
inline float sum_floats(const float* a, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_add_ps(acc0, _mm256_loadu_ps(a + j));
    acc1 = _mm256_add_ps(acc1, _mm256_loadu_ps(a + j + 8));
  }
  for (; j + 8 <= n; j += 8) acc0 = _mm256_add_ps(acc0, _mm256_loadu_ps(a + j));
  s = qsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; j < n; ++j) s += a[j];
  return s;
}

// One row of x as fp32 into xf (int4: its even columns, then its odd ones), and its per-group sums where wanted
// (from xf: independent sums, not one long chain of dependent adds, a few microseconds on K = 4864). bf16 in SIMD
// builds: a bf16 is the high half of its fp32, so 8 pairs of columns split into even and odd by one shift and one mask.
template <typename T>
void stage_row(const T* x, int64_t K, bool split, int64_t G, float* xf, float* xsum) {
  const int64_t Kb = K / 2;
  int64_t k = 0;  // columns done by the vector loops
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const auto* p = reinterpret_cast<const uint16_t*>(x);
    if (split) {
      const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
      for (; k + 16 <= K; k += 16) {  // 32-bit lane i: column 2i in its low half, 2i + 1 in its high half
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k));
        _mm256_storeu_ps(xf + k / 2, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        _mm256_storeu_ps(xf + Kb + k / 2, _mm256_castsi256_ps(_mm256_and_si256(v, high)));
      }
    } else {
      for (; k + 8 <= K; k += 8) {
        const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)));
        _mm256_storeu_ps(xf + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
      }
    }
  }
#endif
  if (split) {
    for (; k < K; k += 2) {
      xf[k / 2] = static_cast<float>(x[k]);
      xf[Kb + k / 2] = static_cast<float>(x[k + 1]);
    }
  } else {
    for (; k < K; ++k) xf[k] = static_cast<float>(x[k]);
  }
  if (xsum != nullptr) {
    const int64_t gs = K / G;
    for (int64_t g = 0; g < G; ++g) {
      xsum[g] = split ? sum_floats(xf + g * gs / 2, gs / 2) + sum_floats(xf + Kb + g * gs / 2, gs / 2)
                      : sum_floats(xf + g * gs, gs);
    }
  }
}

// Rows [n0, n1) of the weight, dequantised (fp32 arithmetic, rounded once to T) into buf [n1 - n0, K]. int4 rows
// come out with their columns permuted (the even ones, then the odd ones: two contiguous stores the compiler
// vectorises), which the caller matches by permuting x's columns alike.
template <bool INT4, typename S, typename T>
void dequant_rows(const int8_t* q, const S* scale, const S* zero, int64_t Kb, int64_t G, int64_t n0, int64_t n1,
                  T* buf) {
  const int64_t K = INT4 ? 2 * Kb : Kb, gs = K / G;
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const int8_t* qn = q + n * Kb;
      T* out = buf + (n - n0) * K;
      for (int64_t g = 0; g < G; ++g) {
        const float s = static_cast<float>(scale[n * G + g]);
        const float z = zero != nullptr ? static_cast<float>(zero[n * G + g]) : 0.f;
        const int64_t k0 = g * gs, k1 = k0 + gs;
        if constexpr (INT4) {
          int64_t j = k0 / 2;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
          if constexpr (std::is_same_v<T, float>) {  // 8 bytes a step: sign-extended, arithmetic shifts
            const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
            for (; j + 8 <= k1 / 2; j += 8) {
              const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qn + j)));
              const __m256 hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
              const __m256 lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
              _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_mul_ps(hi, sv), zv));  // as the scalar loop rounds
              _mm256_storeu_ps(out + Kb + j, _mm256_add_ps(_mm256_mul_ps(lo, sv), zv));
            }
          }
#endif
          for (; j < k1 / 2; ++j) {
            out[j] = static_cast<T>(hi_nibble(qn[j]) * s + z);
            out[Kb + j] = static_cast<T>(lo_nibble(qn[j]) * s + z);
          }
        } else {
          for (int64_t k = k0; k < k1; ++k) out[k] = static_cast<T>(qn[k] * s + z);
        }
      }
    }
  });
}

// ---- many rows, activation-quantised (prefill with act_quant): an integer GEMM ------------------------------
//
// The few-rows kernel's arithmetic for any number of rows: x quantised per block of kQB code bytes exactly as
// there (quantise_block32: d = max|x| / 127, q = round(x / d)), each block's int32 dot product with the codes
// exact (int8: maddubs(|w|, sign(q, w)); int4: maddubs of the unsigned nibbles + 8), times d in fp32, per group
// times the weight's scale. What differs is the order of the work: a tile of NR weight rows (int4: its nibbles
// unpacked once into unsigned bytes, for all rows of x) against MR rows of x at a time, one 8-lane fp32
// accumulator per (row of x, row of W), so every code byte loaded feeds MR rows and every activation block NR
// weight rows; threads own contiguous runs of weight rows (no fork-join per block, no dequantised weight).
// The terms that do not depend on the codes, int4's -8 * d * sum(q) per block and the affine zero points, are
// one small product per call, [x rows, groups] x [groups, W rows] (at::mm), added at the store.
// SIMD builds, groups of whole blocks only (every int8-row and int4-group64/128 layer); otherwise the caller keeps
// the exact dequantise + at::mm path.

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
struct QGemm {
  const int8_t* q;     // codes [N, Kb]
  int64_t N, Kb, G, gb, nbg;  // output rows, code bytes per row, groups, code bytes per group, blocks per group
  const int8_t* xq;    // [M, Kb] (int4: [M, 2 * Kb], q of x's even columns, then its odd ones)
  const float* xd;     // [M, G * nbg] block scales
  const float* corr;   // [M, N] the codes-independent terms, or null
  void* y;             // [M, N] in ydtype
  at::ScalarType ydtype;
  const float* bias;   // [N] or null
};

// y[m0 .. m0 + MR, n0 .. n0 + NR]. wt: int4: the tile's nibbles + 8 as bytes, per row its high nibbles [Kb] then
// its low ones [Kb]; int8: the codes' rows themselves (stride Kb). ONE_GROUP: the scale applied once at the end.
template <int MR, int NR, bool INT4, bool ONE_GROUP, typename S>
inline void qgemm_tile(const QGemm& c, const int8_t* wt, int64_t wstride, const S* scale, int64_t m0, int64_t n0) {
  const int64_t G = c.G, gb = c.gb, nbg = c.nbg, Kb = c.Kb;
  const int64_t xstride = INT4 ? 2 * Kb : Kb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR][NR], tot[MR][NR];  // tot: the sum over groups (unused with ONE_GROUP)
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < NR; ++i) tot[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < NR; ++i) acc[r][i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nbg; ++b) {
      const int64_t j = g * gb + b * kQB;
      if constexpr (INT4) {
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const int8_t* xr = c.xq + (m0 + r) * xstride + j;
          const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
          const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + Kb));
          const __m256 dv = _mm256_broadcast_ss(c.xd + (m0 + r) * G * nbg + g * nbg + b);
#pragma GCC unroll 4
          for (int i = 0; i < NR; ++i) {
            const int8_t* w = wt + i * wstride + j;
            const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
            const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + Kb));
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(hi, xe), _mm256_maddubs_epi16(lo, xo));
            acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), dv, acc[r][i]);
          }
        }
      } else {
        __m256i w[NR], aw[NR];
        for (int i = 0; i < NR; ++i) {
          w[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + i * wstride + j));
          aw[i] = _mm256_sign_epi8(w[i], w[i]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.xq + (m0 + r) * xstride + j));
          const __m256 dv = _mm256_broadcast_ss(c.xd + (m0 + r) * G * nbg + g * nbg + b);
#pragma GCC unroll 4
          for (int i = 0; i < NR; ++i) {
            const __m256i p = _mm256_maddubs_epi16(aw[i], _mm256_sign_epi8(xv, w[i]));
            acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), dv, acc[r][i]);
          }
        }
      }
    }
    if constexpr (!ONE_GROUP) {
      for (int i = 0; i < NR; ++i) {
        const __m256 sv = _mm256_set1_ps(static_cast<float>(scale[(n0 + i) * G + g]));
        for (int r = 0; r < MR; ++r) tot[r][i] = _mm256_fmadd_ps(acc[r][i], sv, tot[r][i]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int i = 0; i < NR; ++i) {
      const int64_t m = m0 + r, n = n0 + i;
      float v = ONE_GROUP ? qsum(acc[r][i]) * static_cast<float>(scale[n]) : qsum(tot[r][i]);
      if (c.corr != nullptr) v += c.corr[m * c.N + n];
      store_y(c.y, c.ydtype, c.bias, m * c.N + n, n, v);
    }
  }
}

// Rows of x MR at a time against NR weight rows (the leftovers of both: smaller tiles).
constexpr int kGemmMR = 4, kGemmNR = 2;

template <int NR, bool INT4, bool ONE_GROUP, typename S>
inline void qgemm_rows(const QGemm& c, const int8_t* wt, int64_t wstride, const S* scale, int64_t m0, int64_t m1,
                       int64_t n0) {
  for (; m0 + kGemmMR <= m1; m0 += kGemmMR) qgemm_tile<kGemmMR, NR, INT4, ONE_GROUP>(c, wt, wstride, scale, m0, n0);
  switch (m1 - m0) {
    case 3: qgemm_tile<3, NR, INT4, ONE_GROUP>(c, wt, wstride, scale, m0, n0); break;
    case 2: qgemm_tile<2, NR, INT4, ONE_GROUP>(c, wt, wstride, scale, m0, n0); break;
    case 1: qgemm_tile<1, NR, INT4, ONE_GROUP>(c, wt, wstride, scale, m0, n0); break;
    default: break;
  }
}

// Rows of quantised x each pass over the weight takes: at most ~384 KiB of them, so that they stay in the core's
// L2 while every tile of weight rows runs through them (a 64-token prompt is one pass for Qwen2-0.5B's shapes;
// long prompts several, rather than streaming all of x from memory for every tile).
constexpr int64_t kGemmXBytes = int64_t{384} << 10;

// y = the whole product: contiguous runs of kGemmNR-row tiles per thread; int4 tiles unpacked into the thread's
// buffer (nibble + 8, high nibbles then low ones per row: the bytes maddubs takes as unsigned) once per pass.
template <bool INT4, bool ONE_GROUP, typename S>
void qgemm_all(const QGemm& c, const S* scale, int64_t M) {
  constexpr int NR = kGemmNR;
  const int64_t tiles = (c.N + NR - 1) / NR;
  const int64_t xbytes = INT4 ? 2 * c.Kb : c.Kb;
  const int64_t mc = std::max<int64_t>(kGemmMR, kGemmXBytes / xbytes / kGemmMR * kGemmMR);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> wbuf(INT4 ? NR * 2 * c.Kb : 0);
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    const __m256i m88 = _mm256_set1_epi8(static_cast<char>(0x88));
    for (int64_t ma = 0; ma < M; ma += mc) {
      const int64_t mb = std::min(M, ma + mc);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * NR, nr = std::min<int64_t>(NR, c.N - n0);
        const int8_t* wt = c.q + n0 * c.Kb;
        int64_t wstride = c.Kb;
        if constexpr (INT4) {
          for (int64_t i = 0; i < nr; ++i) {
            const int8_t* src = c.q + (n0 + i) * c.Kb;
            int8_t* dst = wbuf.data() + i * 2 * c.Kb;
            for (int64_t j = 0; j < c.Kb; j += 32) {
              const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j)), m88);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm256_and_si256(_mm256_srli_epi16(u, 4), m0f));
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c.Kb + j), _mm256_and_si256(u, m0f));
            }
          }
          wt = wbuf.data();
          wstride = 2 * c.Kb;
        }
        if (nr == NR) {
          qgemm_rows<NR, INT4, ONE_GROUP>(c, wt, wstride, scale, ma, mb, n0);
        } else {
          for (int64_t i = 0; i < nr; ++i)
            qgemm_rows<1, INT4, ONE_GROUP>(c, wt + i * wstride, wstride, scale, ma, mb, n0 + i);
        }
      }
    }
  });
}

// x [M, K] quantised for qgemm_all: xq, xd as QGemm wants them; xc [M, G]: int4, -8 * sum over the group's blocks
// of d * sum(q) (the nibbles' + 8); xs [M, G]: the sum of x over each group (zero points), or null.
template <typename T>
void quantise_rows(const T* x, int64_t M, int64_t K, bool int4, int64_t G, int64_t nbg, int8_t* xq, float* xd,
                   float* xc, float* xs) {
  const int64_t Kb = int4 ? K / 2 : K, gb = Kb / G, gs = K / G;
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    std::vector<float> xf(K);
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + m * K;
      for (int64_t k = 0; k < K; ++k) xf[int4 ? (k & 1) * Kb + k / 2 : k] = static_cast<float>(xr[k]);
      if (xs != nullptr) {
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.f;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) acc += static_cast<float>(xr[k]);
          xs[m * G + g] = acc;
        }
      }
      int8_t* qr = xq + m * K;
      for (int64_t g = 0; g < G; ++g) {
        float corr = 0.f;
        for (int64_t b = 0; b < nbg; ++b) {
          const int64_t j = g * gb + b * kQB;
          float d;
          const int32_t sq = quantise_block32(xf.data() + j, int4 ? xf.data() + Kb + j : nullptr, qr + j,
                                              int4 ? qr + Kb + j : nullptr, d);
          xd[(m * G + g) * nbg + b] = d;
          corr += d * static_cast<float>(sq);
        }
        if (xc != nullptr) xc[m * G + g] = -8.f * corr;
      }
    }
  });
}

// The product for many rows with act_quant, groups of whole blocks: y [M, N] in x's dtype.
at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& qc, const at::Tensor& sc, const at::Tensor& zc,
                      const std::optional<at::Tensor>& bias, bool int4, int64_t M, int64_t N, int64_t K) {
  const int64_t Kb = int4 ? K / 2 : K, G = sc.size(1), gb = Kb / G, nbg = gb / kQB;
  const auto xc = x.contiguous();
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  const auto fopt = x.options().dtype(at::kFloat);
  auto xd = at::empty({M, G * nbg}, fopt), xcorr = at::empty({M, G}, fopt), xs = at::empty({M, G}, fopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "zoo_cpu::quant_linear", [&] {
    quantise_rows(xc.data_ptr<scalar_t>(), M, K, int4, G, nbg, xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
                  int4 ? xcorr.data_ptr<float>() : nullptr, zc.defined() ? xs.data_ptr<float>() : nullptr);
  });
  at::Tensor corr;  // [M, N]: sum_g scale * xc (int4) + zero * xs (affine), one small fp32 product
  if (int4 || zc.defined()) {
    std::vector<at::Tensor> a, b;
    if (int4) {
      a.push_back(xcorr);
      b.push_back(sc.to(at::kFloat));
    }
    if (zc.defined()) {
      a.push_back(xs);
      b.push_back(zc.to(at::kFloat));
    }
    corr = at::mm(at::cat(a, 1), at::cat(b, 1).t());
  }
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "zoo_cpu::quant_linear: bias of ", bias->numel(), " for ", N, " outputs");
    bf = bias->to(at::kFloat).contiguous();
  }
  auto y = at::empty({M, N}, x.options());
  QGemm c{qc.data_ptr<int8_t>(), N, Kb, G, gb, nbg, xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
          corr.defined() ? corr.data_ptr<float>() : nullptr, y.data_ptr(), x.scalar_type(),
          bf.defined() ? bf.data_ptr<float>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sc.scalar_type(), "zoo_cpu::quant_linear", [&] {
    const scalar_t* sp = sc.data_ptr<scalar_t>();
    if (int4) {
      G == 1 ? qgemm_all<true, true>(c, sp, M) : qgemm_all<true, false>(c, sp, M);
    } else {
      G == 1 ? qgemm_all<false, true>(c, sp, M) : qgemm_all<false, false>(c, sp, M);
    }
  });
  return y;
}
#endif

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& bias,
                        int64_t bits, bool act_quant) {
  TORCH_CHECK(bits == 8 || bits == 4, "zoo_cpu::quant_linear: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2, "zoo_cpu::quant_linear: codes must be int8 [out, in",
              bits == 4 ? "/2" : "", "], got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu(), "zoo_cpu::quant_linear: CPU tensors only");
  const bool int4 = bits == 4;
  const int64_t N = q.size(0), Kb = q.size(1), K = int4 ? 2 * Kb : Kb;
  TORCH_CHECK(x.size(-1) == K, "zoo_cpu::quant_linear: x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(scale.numel() % N == 0 && scale.numel() > 0, "zoo_cpu::quant_linear: scale of shape ", scale.sizes(),
              " for ", N, " rows");
  const int64_t G = scale.numel() / N;
  TORCH_CHECK(K % G == 0 && (!int4 || (K / G) % 2 == 0), "zoo_cpu::quant_linear: ", G, " groups do not tile ", K,
              " columns");
  const auto qc = q.contiguous();
  const auto sc = scale.contiguous().reshape({N, G});
  at::Tensor zc;
  if (zero.has_value()) {
    TORCH_CHECK(zero->numel() == N * G, "zoo_cpu::quant_linear: zero of shape ", zero->sizes(), ", scale ",
                scale.sizes());
    zc = zero->contiguous().to(sc.scalar_type()).reshape({N, G});
  }
  const int64_t M = x.numel() / K;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "zoo_cpu::quant_linear: x must be fp32, bf16 or fp16, got ", x.scalar_type());
  at::Tensor y;

  if (M <= kRowsMax && act_quant) {
    const auto xc = x.contiguous();
    const void* xp = xc.data_ptr();
    const auto xt = xc.scalar_type();
    const int64_t gb = Kb / G, nbg = (gb + kQB - 1) / kQB;
    thread_local std::vector<float> fwork;
    fwork.resize(K + M * G * (nbg + 2) + N);
    float* xf = fwork.data();  // one row of x in fp32 (int4: its even columns, then its odd ones)
    float* xd = xf + K;
    float* xcorr = xd + M * G * nbg;
    float* xsum = xcorr + M * G;
    float* bf = xsum + M * G;
    thread_local std::vector<int8_t> qwork;
    qwork.resize(M * K);
    for (int64_t m = 0; m < M; ++m) {
      float* xsr = zc.defined() ? xsum + m * G : nullptr;
      switch (xt) {
        case at::kBFloat16: stage_row(static_cast<const at::BFloat16*>(xp) + m * K, K, int4, G, xf, xsr); break;
        case at::kHalf: stage_row(static_cast<const at::Half*>(xp) + m * K, K, int4, G, xf, xsr); break;
        default: stage_row(static_cast<const float*>(xp) + m * K, K, int4, G, xf, xsr);
      }
      int8_t* qr = qwork.data() + m * K;
      for (int64_t g = 0; g < G; ++g) {
        float corr = 0.f;
        for (int64_t b = 0; b < nbg; ++b) {
          const int64_t j0 = g * gb + b * kQB, j1 = std::min(j0 + kQB, (g + 1) * gb);
          float d;
          const float* xb = int4 ? xf + Kb + j0 : nullptr;
          int8_t* qb = int4 ? qr + Kb + j0 : nullptr;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
          const int32_t sq = j1 - j0 == kQB ? quantise_block32(xf + j0, xb, qr + j0, qb, d)
                                            : quantise_block(xf + j0, xb, j1 - j0, qr + j0, qb, d);
#else
          const int32_t sq = quantise_block(xf + j0, xb, j1 - j0, qr + j0, qb, d);
#endif
          xd[(m * G + g) * nbg + b] = d;
          if (j1 - j0 == kQB) corr += d * static_cast<float>(sq);
        }
        xcorr[m * G + g] = -8.f * corr;
      }
    }
    const float* biasp = nullptr;
    at::Tensor bc;
    if (bias.has_value()) {
      bc = bias->contiguous();
      TORCH_CHECK(bc.numel() == N, "zoo_cpu::quant_linear: bias of ", bc.numel(), " for ", N, " outputs");
      for (int64_t n = 0; n < N; ++n) bf[n] = fp32(bc.data_ptr(), bc.scalar_type(), n);
      biasp = bf;
    }
    y = at::empty({M, N}, x.options());
    QCall c{qc.data_ptr<int8_t>(), N, Kb, G, gb, nbg, qwork.data(), K, xd, xcorr, xsum, y.data_ptr(),
            x.scalar_type(), biasp};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sc.scalar_type(), "zoo_cpu::quant_linear", [&] {
      const scalar_t* zp = zc.defined() ? zc.data_ptr<scalar_t>() : nullptr;
      if (int4) {
        qrows_all<true>(c, sc.data_ptr<scalar_t>(), zp, M);
      } else {
        qrows_all<false>(c, sc.data_ptr<scalar_t>(), zp, M);
      }
    });
    return y.view(out_sizes);
  } else if (M <= kRowsMax) {
    // a few plain loops instead of ATen ops: at one token a layer's whole product takes tens of microseconds
    const auto xc = x.contiguous();
    const void* xp = xc.data_ptr();
    const auto xt = xc.scalar_type();
    const int64_t gs = K / G;
    thread_local std::vector<float> work;
    work.resize(M * (K + G) + N);
    float* xs = work.data();  // int8: x; int4: x's even columns, then its odd ones (what the two nibbles multiply),
    float* xsum = xs + M * K;  // times the powers of two codes4's representation of the nibbles asks for (exact)
    float* bf = xsum + M * G;
    for (int64_t m = 0; m < M; ++m) {
      float* row = xs + m * K;
      for (int64_t k = 0; k < K; ++k) {
        const float v = fp32(xp, xt, m * K + k);
        if (int4) {
          row[(k & 1) * Kb + k / 2] = v * ((k & 1) ? kLoMul : kHiMul);
        } else {
          row[k] = v;
        }
      }
      if (zc.defined()) {
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.f;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) acc += fp32(xp, xt, m * K + k);
          xsum[m * G + g] = acc;
        }
      }
    }
    const float* biasp = nullptr;
    at::Tensor bc;
    if (bias.has_value()) {
      bc = bias->contiguous();
      TORCH_CHECK(bc.numel() == N, "zoo_cpu::quant_linear: bias of ", bc.numel(), " for ", N, " outputs");
      for (int64_t n = 0; n < N; ++n) bf[n] = fp32(bc.data_ptr(), bc.scalar_type(), n);
      biasp = bf;
    }
    // bf16 int4 on CPUs with bf16 dot products: x's own bf16 bits, even columns then odd ones
    const uint16_t* xb = nullptr;
    thread_local std::vector<uint16_t> xbits;
    if (int4 && xt == at::kBFloat16 && zoo_cpu::has_avx512_bf16() && (Kb / G) % 32 == 0) {
      xbits.resize(M * K);
      const auto* src = static_cast<const uint16_t*>(xp);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < K; ++k) xbits[m * K + (k & 1) * Kb + k / 2] = src[m * K + k];
      }
      xb = xbits.data();
    }
    y = at::empty({M, N}, x.options());
    Call c{qc.data_ptr<int8_t>(), N, Kb, G, Kb / G, xs, K, xsum, y.data_ptr(), x.scalar_type(), biasp, xb};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sc.scalar_type(), "zoo_cpu::quant_linear", [&] {
      const scalar_t* zp = zc.defined() ? zc.data_ptr<scalar_t>() : nullptr;
      if (int4) {
        rows_all<true>(c, sc.data_ptr<scalar_t>(), zp, M);
      } else {
        rows_all<false>(c, sc.data_ptr<scalar_t>(), zp, M);
      }
    });
    return y.view(out_sizes);
  } else {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (act_quant && (Kb / G) % kQB == 0) return quant_gemm(x, qc, sc, zc, bias, int4, M, N, K).view(out_sizes);
#endif
    // blocks of ~256 KiB of dequantised rows, each a thread's own: dequantised into the thread's buffer (in its
    // L2 for the product), then one single-threaded at::mm_out straight into its columns of y (rows of N apart, as
    // BLAS's ldc allows). One parallel region per call, not a fork and join per block.
    // bf16 activations on a CPU with bf16 dot products: a bf16 buffer and oneDNN's bf16 product (as the
    // reference computes); otherwise fp32 (bf16 GEMMs without native instructions are several times slower)
    const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && zoo_cpu::has_avx512_bf16();
    const auto wdtype = bf16_gemm ? at::kBFloat16 : at::kFloat;
    auto xw = x.reshape({M, K}).to(wdtype);
    xw = (int4 ? at::cat({xw.slice(1, 0, K, 2), xw.slice(1, 1, K, 2)}, 1) : xw).contiguous();  // dequant_rows' order
    const int64_t nb = std::min(N, std::max<int64_t>(16, (int64_t{256} << 10) / (K * (bf16_gemm ? 2 : 4))));
    const int64_t blocks = (N + nb - 1) / nb;
    y = at::empty({M, N}, x.options().dtype(wdtype));
    const bool inference = c10::InferenceMode::is_enabled();  // worker threads do not inherit it
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      c10::InferenceMode guard(inference);
      auto buf = at::empty({nb, K}, x.options().dtype(wdtype));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * nb, n1 = std::min(N, n0 + nb);
        auto w = buf.narrow(0, 0, n1 - n0);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sc.scalar_type(), "zoo_cpu::quant_linear", [&] {
          const scalar_t* zp = zc.defined() ? zc.data_ptr<scalar_t>() : nullptr;
          const int8_t* qp = qc.data_ptr<int8_t>();
          const scalar_t* sp = sc.data_ptr<scalar_t>();
          if (bf16_gemm) {
            auto* bp = w.data_ptr<at::BFloat16>();
            if (int4) dequant_rows<true>(qp, sp, zp, Kb, G, n0, n1, bp);
            else dequant_rows<false>(qp, sp, zp, Kb, G, n0, n1, bp);
          } else {
            auto* bp = w.data_ptr<float>();
            if (int4) dequant_rows<true>(qp, sp, zp, Kb, G, n0, n1, bp);
            else dequant_rows<false>(qp, sp, zp, Kb, G, n0, n1, bp);
          }
        });
        auto yb = y.narrow(1, n0, n1 - n0);
        at::mm_out(yb, xw, w.t());
      }
    });
  }
  if (bias.has_value()) y.add_(*bias);
  return y.to(x.scalar_type()).view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("quant_linear(Tensor x, Tensor q, Tensor scale, Tensor? zero, Tensor? bias, int bits, "
        "bool act_quant=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) { m.impl("quant_linear", &quant_linear); }
