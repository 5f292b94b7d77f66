// Dense linear layers for CPU inference: y = x W^T (+ b), W [N, K] row-major in bf16, fp16 or fp32.
//
//   zoo_cpu::dense_rows(x, w, bias)   few rows of x (decoding: one token per sequence, beams, small batches).
//       Memory-bound: one pass over W, each W row widened to fp32 in registers and multiplied into every row of
//       x (so W streams once for all M rows), fp32 accumulators, threads over contiguous runs of output rows. Each
//       thread reads its run as R long sequential streams side by side (R contiguous sub-runs, step i: row i of
//       each), not R adjacent rows: DRAM serves several long streams per core faster than one, and far faster than
//       R streams of one short row each (Qwen2-0.5B's K = 896 bf16 is 1.8 KiB a row, too short for the hardware
//       prefetcher). Measured on the 2-core AMD EPYC (Zen 3, AVX2), bf16, one row of x, weights from memory, best
//       call on a shared machine: 4864x896 on 2 threads 44-51 GB/s against 23-24 for R adjacent rows and 28-34 for
//       a plain one-stream read of the same bytes (1 thread: 25-28 against 12-14 and 15-17); 896x4864 41 against
//       33; 6 streams, 2 lines a step, NTA or T1 hints or prefetch distances from 0 to 4 KiB: the same within noise.
//       On an AVX-512 build on a CPU with AVX-512 BF16, bf16 x and bf16 W take vdpbf16ps (pairs of bf16 products
//       summed in fp32) instead of widening: fewer instructions per byte of W (that kernel still reads R adjacent
//       rows with block prefetch: not measured on an AVX-512 machine since).
//   zoo_cpu::dense_widened(x, w, bias)  many rows (prefill) on CPUs without native bf16 arithmetic: W widened
//       to fp32 a block of rows at a time (a block that stays in cache), each block through fp32 GEMM (at::mm).
//
// Both take x [M, K] of any float dtype and return y [M, N] in x's dtype (fp32 accumulation throughout).
#include "common.h"

#include <ATen/cpu/vec/functional.h>
#include <c10/core/InferenceMode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace zoo_cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kMaxRows = 8;  // rows of x per pass over W (larger M: several passes)

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Software prefetch distance within each of rows_pass's streams of W (the hardware prefetcher does most of the work
// on streams this long: measured the same within noise from none to 1 KiB ahead).
constexpr int64_t kAheadBytes = 512;

// How far ahead (elements of W) the AVX-512 BF16 kernel prefetches: whole blocks of R rows (so every line of a block is prefetched once,
// by the same position of an earlier block), at least 4 KiB.
template <int R>
inline int64_t prefetch_ahead(int64_t K, int64_t elem_size) {
  int64_t block = R * K;
  return block * ((4096 / elem_size + block - 1) / block);
}

// Two fp32 vectors of W at p (2 * Vec::size() elements), widened from bf16/fp16 in registers.
template <typename W>
inline void load2(const W* p, Vec& w0, Vec& w1) {
  if constexpr (std::is_same_v<W, float>) {
    w0 = Vec::loadu(p);
    w1 = Vec::loadu(p + Vec::size());
  } else {
    std::tie(w0, w1) = at::vec::convert_to_float<W>(at::vec::Vectorized<W>::loadu(p));
  }
}

// out[r * M + m] = dot(W row at w + r * stride, x row m) for R rows of W, one from each of R streams (rows_pass).
// Where registers allow
// (R * M <= 4), the two halves of each step go to separate accumulators: two FMA dependency chains, not one.
template <int M, int R, typename W>
inline void rows_dot(const float* x, const W* w, int64_t K, int64_t stride, float* out) {
  constexpr int64_t V = Vec::size();
  constexpr bool kSplit = R * M <= 4;
  constexpr int64_t ahead = kAheadBytes / sizeof(W);
  Vec acc[R][M], acc2[kSplit ? R : 1][kSplit ? M : 1];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = Vec(0.f);
  if constexpr (kSplit)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc2[r][m] = Vec(0.f);
  int64_t k = 0;
  for (; k + 2 * V <= K; k += 2 * V) {
    for (int r = 0; r < R; ++r) {
      Vec w0, w1;
      __builtin_prefetch(w + r * stride + k + ahead);
      load2(w + r * stride + k, w0, w1);
      for (int m = 0; m < M; ++m) {
        acc[r][m] = at::vec::fmadd(w0, Vec::loadu(x + m * K + k), acc[r][m]);
        if constexpr (kSplit)
          acc2[r][m] = at::vec::fmadd(w1, Vec::loadu(x + m * K + k + V), acc2[r][m]);
        else
          acc[r][m] = at::vec::fmadd(w1, Vec::loadu(x + m * K + k + V), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      if constexpr (kSplit) acc[r][m] = acc[r][m] + acc2[r][m];
      float s = hsum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[r * stride + kk]) * x[m * K + kk];
      out[r * M + m] = s;
    }
}

// Rows of W handled together for M rows of x: enough independent accumulators, within the vector registers.
template <int M>
constexpr int rows_per_step() { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

template <typename Out>
inline void store(Out* y, int64_t N, int64_t n, int M, const float* dots, int R, const float* bias) {
  for (int r = 0; r < R; ++r) {
    float b = bias ? bias[n + r] : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + n + r] = static_cast<Out>(dots[r * M + m] + b);
  }
}

// Each thread's rows [begin, end) as R contiguous runs of q rows read side by side (step i: row i of every run),
// so W streams through R long sequential reads per thread; the leftover rows (fewer than R) one at a time after.
// dot(std::integral_constant<int, R>{}, w, stride, out): a kernel's rows_dot<M, R> of R rows `stride` apart
// (the generic and the AVX2 kernels share this loop).
template <int M, typename W, typename Out, typename Dot>
void rows_runs(const W* w, const float* bias, Out* y, int64_t N, int64_t K, const Dot& dot) {
  constexpr int R = rows_per_step<M>();
  parallel_rows(N, K * sizeof(W), 1, [&](int64_t begin, int64_t end) {
    float dots[R * M];
    const int64_t q = (end - begin) / R;
    for (int64_t i = 0; i < q; ++i) {
      const int64_t n = begin + i;
      dot(std::integral_constant<int, R>{}, w + n * K, q * K, dots);
      for (int r = 0; r < R; ++r) store(y, N, n + r * q, M, dots + r * M, 1, bias);
    }
    for (int64_t n = begin + R * q; n < end; ++n) {
      dot(std::integral_constant<int, 1>{}, w + n * K, K, dots);
      store(y, N, n, M, dots, 1, bias);
    }
  });
}

template <int M, typename W, typename Out>
void rows_pass(const float* x, const W* w, const float* bias, Out* y, int64_t N, int64_t K) {
  rows_runs<M>(w, bias, y, N, K, [&](auto r, const W* wr, int64_t stride, float* out) {
    rows_dot<M, decltype(r)::value, W>(x, wr, K, stride, out);
  });
}

// Calls pass(std::integral_constant<int, M>{}) for the run-time row count M (1..8, more: 8): each row count is its
// own instantiation, so the rows' accumulators stay in registers.
template <typename Pass>
void with_rows(int64_t M, Pass&& pass) {
  switch (M) {
    case 1: return pass(std::integral_constant<int, 1>{});
    case 2: return pass(std::integral_constant<int, 2>{});
    case 3: return pass(std::integral_constant<int, 3>{});
    case 4: return pass(std::integral_constant<int, 4>{});
    case 5: return pass(std::integral_constant<int, 5>{});
    case 6: return pass(std::integral_constant<int, 6>{});
    case 7: return pass(std::integral_constant<int, 7>{});
    default: return pass(std::integral_constant<int, 8>{});
  }
}

template <typename W, typename Out>
void rows_any(const float* x, const W* w, const float* bias, Out* y, int64_t M, int64_t N, int64_t K) {
  with_rows(M, [&](auto rows) { rows_pass<decltype(rows)::value>(x, w, bias, y, N, K); });
}

#if defined(CPU_CAPABILITY_AVX2)
// The AVX2 build's few-rows kernel: each step reads one 64-byte line of each of R rows of W (one row from each of
// rows_pass's R streams), widened into fp32 vectors in the order the x buffer was laid out in (lay_out), one
// prefetch per line, 2 accumulators per (row of W, row of x) where registers allow.
namespace avx2 {

template <typename W>
struct Line;

// bf16 is the top half of an fp32, so a 32-bit lane holding elements (2i, 2i+1) widens with one shift (element 2i)
// and one mask (element 2i+1), no shuffles: x is laid out evens-then-odds per 16 elements to match.
template <>
struct Line<c10::BFloat16> {
  static constexpr int kElems = 32, kVecs = 4;
  static inline void load(const c10::BFloat16* p, __m256 v[kVecs]) {
    const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(a, top));
    v[2] = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
    v[3] = _mm256_castsi256_ps(_mm256_and_si256(b, top));
  }
  static constexpr int slot(int i) { return i / 16 * 16 + i % 2 * 8 + i % 16 / 2; }
};

template <>
struct Line<c10::Half> {
  static constexpr int kElems = 32, kVecs = 4;
  static inline void load(const c10::Half* p, __m256 v[kVecs]) {
    for (int j = 0; j < kVecs; ++j)
      v[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * j)));
  }
  static constexpr int slot(int i) { return i; }
};

template <>
struct Line<float> {
  static constexpr int kElems = 16, kVecs = 2;
  static inline void load(const float* p, __m256 v[kVecs]) {
    v[0] = _mm256_loadu_ps(p);
    v[1] = _mm256_loadu_ps(p + 8);
  }
  static constexpr int slot(int i) { return i; }
};

// x [M, K] as fp32 in W's line order: whole lines permuted by Line<W>::slot, the K tail in natural order. Per call
// for every projection, so vectorised where it is a plain widening: bf16 x for bf16 W is W's own shift and mask
// (evens then odds), fp16 and fp32 W keep x's order (at::vec::convert); a scalar loop took ~1 ns per element.
template <typename W, typename X>
void lay_out(const X* x, int64_t M, int64_t K, float* dst) {
  using L = Line<W>;
  const int64_t whole = K / L::kElems * L::kElems;
  for (int64_t m = 0; m < M; ++m) {
    const X* src = x + m * K;
    float* out = dst + m * K;
    if constexpr (std::is_same_v<W, c10::BFloat16> && std::is_same_v<X, c10::BFloat16>) {
      const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
      for (int64_t k = 0; k < whole; k += 16) {
        __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_slli_epi32(a, 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k + 8), _mm256_and_si256(a, top));
      }
    } else if constexpr (!std::is_same_v<W, c10::BFloat16>) {
      at::vec::convert(src, out, whole);  // Line<W>::slot is the identity
    } else {
      for (int64_t k = 0; k < whole; k += L::kElems)
        for (int i = 0; i < L::kElems; ++i) out[k + L::slot(i)] = static_cast<float>(src[k + i]);
    }
    for (int64_t k = whole; k < K; ++k) out[k] = static_cast<float>(src[k]);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[r * M + m] = dot(W row at w + r * stride, x row m) for R rows of W, one from each of R streams `stride`
// elements apart; x laid out by lay_out<W>.
template <int M, int R, typename W>
inline void rows_dot(const float* x, const W* w, int64_t K, int64_t stride, float* out) {
  using L = Line<W>;
  constexpr int A = R * M <= 4 ? 2 : 1;  // accumulators per (r, m): independent FMA chains
  __m256 acc[R][M][A];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[r][m][a] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + L::kElems <= K; k += L::kElems) {
    // Fully unrolled (GCC's own limit stops short at R * M * kVecs > 16): the accumulators must stay registers.
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const W* p = w + r * stride + k;
      _mm_prefetch(reinterpret_cast<const char*>(p) + kAheadBytes, _MM_HINT_T0);
      __m256 v[L::kVecs];
      L::load(p, v);
#pragma GCC unroll 8
      for (int j = 0; j < L::kVecs; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
          acc[r][m][j % A] = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(x + m * K + k + 8 * j), acc[r][m][j % A]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[r][m][0];
      if constexpr (A == 2) a = _mm256_add_ps(a, acc[r][m][1]);
      float s = hsum(a);
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[r * stride + kk]) * x[m * K + kk];
      out[r * M + m] = s;
    }
}

// rows_runs (above: R long sequential streams of W per thread) with this kernel's dot products
template <int M, typename W, typename Out>
void rows_pass(const float* x, const W* w, const float* bias, Out* y, int64_t N, int64_t K) {
  rows_runs<M>(w, bias, y, N, K, [&](auto r, const W* wr, int64_t stride, float* out) {
    rows_dot<M, decltype(r)::value, W>(x, wr, K, stride, out);
  });
}

}  // namespace avx2
#endif

#if defined(CPU_CAPABILITY_AVX512)
// bf16 x bf16 with vdpbf16ps: 32 products per instruction, pairs summed into 16 fp32 lanes. The K tail is a
// masked load (zeros contribute nothing).
#define ZOO_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

template <int M, int R>
ZOO_BF16_TARGET inline void rows_dot_bf16(const uint16_t* x, const uint16_t* w, int64_t K, float* out) {
  const int64_t ahead = prefetch_ahead<R>(K, 2);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(w + r * K + k + ahead);
      __m512i wv = _mm512_loadu_si512(w + r * K + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv, (__m512bh)xv[m]);
    }
  }
  if (k < K) {
    __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    for (int r = 0; r < R; ++r) {
      __m512i wv = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
      for (int m = 0; m < M; ++m) {
        __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv, (__m512bh)xv);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[r * M + m] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M, typename Out>
ZOO_BF16_TARGET void rows_pass_bf16(const uint16_t* x, const uint16_t* w, const float* bias, Out* y, int64_t N,
                                    int64_t K) {
  constexpr int R = rows_per_step<M>();
  int64_t grain = std::max<int64_t>(R, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    float dots[R * M];
    int64_t n = begin;
    for (; n + R <= end; n += R) {
      rows_dot_bf16<M, R>(x, w + n * K, K, dots);
      store(y, N, n, M, dots, R, bias);
    }
    for (; n < end; ++n) {
      rows_dot_bf16<M, 1>(x, w + n * K, K, dots);
      store(y, N, n, M, dots, 1, bias);
    }
  });
}

template <typename Out>
void rows_any_bf16(const uint16_t* x, const uint16_t* w, const float* bias, Out* y, int64_t M, int64_t N,
                   int64_t K) {
  with_rows(M, [&](auto rows) { rows_pass_bf16<decltype(rows)::value>(x, w, bias, y, N, K); });
}
#endif

void check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D [N, K], got ", w.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), op, ": x must be [M, K] with K = ", w.size(1), ", got ",
              x.sizes());
  auto wt = w.scalar_type();
  TORCH_CHECK(wt == at::kBFloat16 || wt == at::kHalf || wt == at::kFloat, op, ": weight dtype ", wt,
              " not supported (bf16, fp16, fp32)");
  auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kBFloat16 || xt == at::kHalf || xt == at::kFloat, op, ": x dtype ", xt,
              " not supported (bf16, fp16, fp32)");
  if (bias.has_value()) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op, ": bias must be [N]");
}

// fn(static_cast<T*>(nullptr)) for the C++ type T of a float dtype checked by check(): bf16, fp16 or fp32.
template <typename Fn>
void with_type(at::ScalarType t, Fn&& fn) {
  if (t == at::kBFloat16) fn(static_cast<c10::BFloat16*>(nullptr));
  else if (t == at::kHalf) fn(static_cast<c10::Half*>(nullptr));
  else fn(static_cast<float*>(nullptr));
}

}  // namespace

at::Tensor dense_rows(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in) {
  check(x_in, w_in, bias_in, "zoo_cpu::dense_rows");
  const int64_t M = x_in.size(0), N = w_in.size(0), K = w_in.size(1);
  at::Tensor w = w_in.contiguous();
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
#if defined(CPU_CAPABILITY_AVX2)
  {
    // x laid out in W's line order, and the bias as fp32, in buffers this thread keeps: no allocation per call.
    thread_local std::vector<float> xbuf, bbuf;
    at::Tensor x = x_in.contiguous();
    xbuf.resize(M * K);
    with_type(x.scalar_type(), [&](auto* x_tag) {
      using X = std::remove_pointer_t<decltype(x_tag)>;
      with_type(w.scalar_type(), [&](auto* w_tag) {
        avx2::lay_out<std::remove_pointer_t<decltype(w_tag)>>(x.data_ptr<X>(), M, K, xbuf.data());
      });
    });
    const float* bp = nullptr;
    if (bias_in.has_value()) {
      at::Tensor bt = bias_in->contiguous();
      bbuf.resize(N);
      with_type(bt.scalar_type(), [&](auto* b_tag) {
        using B = std::remove_pointer_t<decltype(b_tag)>;
        const B* src = bt.data_ptr<B>();
        for (int64_t n = 0; n < N; ++n) bbuf[n] = static_cast<float>(src[n]);
      });
      bp = bbuf.data();
    }
    with_type(y.scalar_type(), [&](auto* out_tag) {
      using Out = std::remove_pointer_t<decltype(out_tag)>;
      Out* yp = y.data_ptr<Out>();
      with_type(w.scalar_type(), [&](auto* w_tag) {
        using W = std::remove_pointer_t<decltype(w_tag)>;
        const W* wp = w.data_ptr<W>();
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
          int64_t mb = std::min(kMaxRows, M - m0);
          with_rows(mb, [&](auto rows) {
            avx2::rows_pass<decltype(rows)::value>(xbuf.data() + m0 * K, wp, bp, yp + m0 * N, N, K);
          });
        }
      });
    });
    return y;
  }
#endif
  at::Tensor bias = bias_in.has_value() ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
#if defined(CPU_CAPABILITY_AVX512)
  if (w.scalar_type() == at::kBFloat16 && x_in.scalar_type() == at::kBFloat16 && has_avx512_bf16()) {
    at::Tensor x = x_in.contiguous();
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
    const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
    auto* yp = y.data_ptr<c10::BFloat16>();
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      int64_t mb = std::min(kMaxRows, M - m0);
      rows_any_bf16(xp + m0 * K, wp, b, yp + m0 * N, mb, N, K);
    }
    return y;
  }
#endif
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  with_type(y.scalar_type(), [&](auto* out_tag) {
    using Out = std::remove_pointer_t<decltype(out_tag)>;
    Out* yp = y.data_ptr<Out>();
    auto run = [&](auto* w_tag) {
      using W = std::remove_pointer_t<decltype(w_tag)>;
      const W* wp = w.data_ptr<W>();
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        int64_t mb = std::min(kMaxRows, M - m0);
        rows_any<W, Out>(xp + m0 * K, wp, b, yp + m0 * N, mb, N, K);
      }
    };
    if (w.scalar_type() == at::kBFloat16) run(static_cast<c10::BFloat16*>(nullptr));
    else if (w.scalar_type() == at::kHalf) run(static_cast<c10::Half*>(nullptr));
    else run(static_cast<float*>(nullptr));
  });
  return y;
}

at::Tensor dense_widened(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in,
                         int64_t block_rows) {
  check(x_in, w_in, bias_in, "zoo_cpu::dense_widened");
  const int64_t M = x_in.size(0), N = w_in.size(0), K = w_in.size(1);
  at::Tensor w = w_in.contiguous();
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor yt = at::empty({N, M}, x.options());  // y^T: each block of W rows writes a contiguous block of it
  if (block_rows <= 0) block_rows = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  const int64_t blocks = (N + block_rows - 1) / block_rows;
  at::Tensor xt = x.t();
  const bool inference = c10::InferenceMode::is_enabled();  // worker threads do not inherit it
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);
    // Each thread widens its own blocks into its own buffer, then one single-threaded fp32 GEMM per block.
    at::Tensor buf = at::empty({block_rows, K}, x.options());
    for (int64_t blk = begin; blk < end; ++blk) {
      int64_t n0 = blk * block_rows, nb = std::min(block_rows, N - n0);
      at::Tensor wb = buf.narrow(0, 0, nb);
      float* dst = wb.data_ptr<float>();
      const int64_t count = nb * K;
      if (w.scalar_type() == at::kFloat) {
        wb = w.narrow(0, n0, nb);
      } else if (w.scalar_type() == at::kBFloat16) {
        at::vec::convert(w.data_ptr<c10::BFloat16>() + n0 * K, dst, count);
      } else {
        at::vec::convert(w.data_ptr<c10::Half>() + n0 * K, dst, count);
      }
      at::Tensor out = yt.narrow(0, n0, nb);
      at::mm_out(out, wb, xt);
    }
  });
  at::Tensor y = yt.t();
  if (bias_in.has_value()) y = y.add(bias_in->to(at::kFloat));
  return y.to(x_in.scalar_type()).contiguous();
}

}  // namespace zoo_cpu

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("dense_rows(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("dense_widened(Tensor x, Tensor w, Tensor? bias=None, int block_rows=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("dense_rows", &zoo_cpu::dense_rows);
  m.impl("dense_widened", &zoo_cpu::dense_widened);
}
