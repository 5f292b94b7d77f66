// The small elementwise and per-row ops of one decoding step on CPU, each one call instead of several aten ops:
// at batch 1 a decoder layer's norms, rotary, activation and attention are tiny tensors whose cost is almost all
// per-op overhead (dispatch, allocation, Python), not arithmetic.
//
//   zoo_cpu::rms_norm(x, w, eps)           w * cast(x / sqrt(mean(x^2) + eps)) over the last dim (kernels/rmsnorm.py)
//   zoo_cpu::rotary(x, cos, sin)           half-split rotary over the first d = cos.size(-1) dims (kernels/rotary.py)
//   zoo_cpu::rotary_pair(q, k, cos, sin)   the same for q and k in one call
//   zoo_cpu::silu_mul(gate, up)            silu(gate) * up (kernels/swiglu.py)
//   zoo_cpu::decode_attention(q, k, v, mask)  softmax(q k^T / sqrt(d), masked) v for ONE query per head against
//                                          the KV cache, grouped-query heads, fp32 accumulation (layers.Attention)
//   zoo_cpu::add_rms_norm(x, r, w, eps)    (h, rms_norm(h)) for h = x + r: a residual add and the norm after it
//   zoo_cpu::attention_step(q, k, v, cos, sin, k_cache, v_cache, pos, mask)
//                                          one decoding token's attention from the projections' outputs: rotary on
//                                          q and k, k and v written into the cache at `pos`, decode_attention over
//                                          slots 0..pos; returns [B, 1, H * d] for the output projection
//   zoo_cpu::argmax_last(x)                torch.argmax(x, -1) (greedy decoding's pick over the vocabulary)
//
// Each reproduces its PyTorch reference's rounding: every op the reference runs in the tensor dtype rounds to that
// dtype here at the same point, so bf16/fp16 results equal the reference's (rms_norm: up to the order of the sum
// of squares; silu_mul: the same exp as torch's kernel, vectorised where torch's is). The callers check dtypes,
// devices and shapes; these ops TORCH_CHECK them again so a direct call cannot read out of bounds.
#include "common.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace zoo_cpu {
namespace {

using Vec = at::vec::Vectorized<float>;

// v, as a value the compiler must have computed: the multiply that produced it cannot be fused into the add that
// follows (GCC contracts a * b + c into one FMA in C++ by default, -ffp-contract=fast), so each fp32 product rounds
// as the reference's separate aten op rounds it. (A file-wide `#pragma GCC optimize("fp-contract=off")` would stop
// GCC inlining at::vec's functions into this file's: measured 2x slower.)
inline float rounded(float v) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(v));
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
  asm("" : "+w"(v));
#else
  volatile float kept = v;
  v = kept;
#endif
  return v;
}

bool float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// The inputs of an elementwise op of two tensors (add_rms_norm's x and r, silu_mul's gate and up), checked (CPU
// tensors of one shape and one float dtype; `what` names the op and the two) and contiguous, and its output.
struct Elementwise {
  at::Tensor a, b, out;
};

Elementwise elementwise(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && float_type(a.scalar_type()), what,
              " must have one shape and one of fp32, bf16, fp16");
  return {a.contiguous(), b.contiguous(), at::empty(a.sizes(), a.options())};
}

// Dispatch over the three float dtypes, binding `T` to the C++ type.
template <typename F>
void with_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": dtype ", t, " not supported (fp32, bf16, fp16)");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm. Reference: h = x.float(); h = h * rsqrt(h.pow(2).mean(-1) + eps); weight * h.to(x.dtype)
// (mean = sum / D in fp32; the product with the weight in the promoted dtype, rounded once).

// The sum of x_k^2 (each square rounded to fp32) in the order of torch's sum over a contiguous last dim
// (aten/src/ATen/native/cpu/SumKernel.cpp, vectorized_inner_sum / row_sum / multi_row_sum): vectors of W lanes
// (W = Vec::size(), or 1 below one vector) taken four at a time into four accumulators, those cascaded every 16
// steps into a second level, the leftover vectors into the first accumulator, the four summed in order, then
// the scalar tail and the lanes one by one. Matching it makes the variance, and so the output, bit-identical.
template <int64_t W, typename X>
float sum_of_squares(const X* x, int64_t D) {
  constexpr int64_t kIlp = 4, kLevels = 4, kStep = 16;  // torch: ilp_factor, num_levels, 1 << level_power
  auto add_vec = [x](float* acc, int64_t vec) {
    for (int64_t l = 0; l < W; ++l) {
      const float v = static_cast<float>(x[vec * W + l]);
      acc[l] += rounded(v * v);  // pow(2), then the sum
    }
  };
  const int64_t nvec = D / W, rows = nvec / kIlp;
  float acc[kLevels][kIlp][W] = {};
  int64_t i = 0;
  while (i + kStep <= rows) {
    for (int64_t j = 0; j < kStep; ++j, ++i)
      for (int64_t k = 0; k < kIlp; ++k) add_vec(acc[0][k], i * kIlp + k);
    for (int64_t level = 1; level < kLevels; ++level) {
      for (int64_t k = 0; k < kIlp; ++k)
        for (int64_t l = 0; l < W; ++l) {
          acc[level][k][l] += acc[level - 1][k][l];
          acc[level - 1][k][l] = 0.0f;
        }
      if ((i & ((kStep - 1) << (level * 4))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int64_t k = 0; k < kIlp; ++k) add_vec(acc[0][k], i * kIlp + k);
  for (int64_t level = 1; level < kLevels; ++level)
    for (int64_t k = 0; k < kIlp; ++k)
      for (int64_t l = 0; l < W; ++l) acc[0][k][l] += acc[level][k][l];
  for (int64_t vec = rows * kIlp; vec < nvec; ++vec) add_vec(acc[0][0], vec);
  for (int64_t k = 1; k < kIlp; ++k)
    for (int64_t l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  if constexpr (W == 1) return acc[0][0][0];
  float total = 0.0f;
  for (int64_t e = nvec * W; e < D; ++e) {
    const float v = static_cast<float>(x[e]);
    total += rounded(v * v);
  }
  for (int64_t l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

template <typename X, typename W, typename O>
void rms_norm_rows(const X* x, const W* w, O* y, int64_t rows, int64_t D, float eps) {
  constexpr int64_t V = Vec::size();
  for (int64_t r = 0; r < rows; ++r) {
    const X* xr = x + r * D;
    O* yr = y + r * D;
    const float sum = D >= V ? sum_of_squares<V>(xr, D) : sum_of_squares<1>(xr, D);
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(D) + eps);
    for (int64_t j = 0; j < D; ++j) {
      const X normed = static_cast<X>(static_cast<float>(xr[j]) * inv);  // h.to(x.dtype)
      yr[j] = static_cast<O>(static_cast<float>(w[j]) * static_cast<float>(normed));
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), "rms_norm: weight must be [", x.size(-1),
              "], got ", w.sizes());
  TORCH_CHECK(float_type(x.scalar_type()) && float_type(w.scalar_type()), "rms_norm: fp32, bf16 or fp16 only");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = w.contiguous();
  const auto out_type = c10::promoteTypes(x.scalar_type(), w.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_type));
  const int64_t D = x.size(-1);
  const int64_t rows = D ? x.numel() / D : 0;
  if (rows == 0 || D == 0) return y;
  const float e = static_cast<float>(eps);
  with_dtype(x.scalar_type(), "rms_norm", [&](auto xt) {
    using X = decltype(xt);
    with_dtype(w.scalar_type(), "rms_norm", [&](auto wt) {
      using W = decltype(wt);
      with_dtype(out_type, "rms_norm", [&](auto ot) {
        using O = decltype(ot);
        const X* xp = xc.data_ptr<X>();
        const W* wp = wc.data_ptr<W>();
        O* yp = y.data_ptr<O>();
        // rows in parallel only for a whole prompt: one token's rows are a few microseconds
        at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / D), [&](int64_t r0, int64_t r1) {
          rms_norm_rows<X, W, O>(xp + r0 * D, wp, yp + r0 * D, r1 - r0, D, e);
        });
      });
    });
  });
  return y;
}

// h = x + r rounded to the dtype (torch's add: both widened to fp32, summed, rounded once), then rms_norm(h).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w,
                                                double eps) {
  const Elementwise e = elementwise(x, r, "add_rms_norm: x and r");
  const at::Tensor &xc = e.a, &rc = e.b, &h = e.out;
  with_dtype(x.scalar_type(), "add_rms_norm", [&](auto t) {
    using T = decltype(t);
    const T* a = xc.data_ptr<T>();
    const T* b = rc.data_ptr<T>();
    T* o = h.data_ptr<T>();
    const int64_t n = x.numel();
    int64_t i = 0;
    if constexpr (std::is_same_v<T, float>) {
      for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(a + i) + Vec::loadu(b + i)).store(o + i);
    } else {
      using VT = at::vec::Vectorized<T>;
      for (; i + VT::size() <= n; i += VT::size()) {
        auto [a0, a1] = at::vec::convert_to_float<T>(VT::loadu(a + i));
        auto [b0, b1] = at::vec::convert_to_float<T>(VT::loadu(b + i));
        at::vec::convert_from_float<T>(a0 + b0, a1 + b1).store(o + i);
      }
    }
    for (; i < n; ++i) o[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
  });
  return {h, rms_norm(h, w, eps)};
}

// ---------------------------------------------------------------------------------------------------------------
// Rotary. Reference, per element of the first d dims (h = d / 2), every op rounding to the dtype:
//   y_j     = x_j * cos_j         + (-x_{j+h}) * sin_j          j < h
//   y_{j+h} = x_{j+h} * cos_{j+h} + x_j * sin_{j+h}
// and y = x on the dims past d. x [B, H, T, hd] (any strides, last 1), cos and sin [B, T, d] (last stride 1).

template <typename T>
inline T rnd(float v) {
  if constexpr (std::is_same_v<T, float>) return rounded(v);
  else return static_cast<T>(v);
}

// one head's row: xr -> yr (hd values, the first d rotated by c, s)
template <typename T>
inline void rotary_row(const T* xr, const T* c, const T* s, T* yr, int64_t d, int64_t hd) {
  const int64_t h = d / 2;
  for (int64_t j = 0; j < h; ++j) {
    const float x1 = static_cast<float>(xr[j]), x2 = static_cast<float>(xr[j + h]);
    const float a = static_cast<float>(rnd<T>(x1 * static_cast<float>(c[j])));
    const float bneg = static_cast<float>(rnd<T>(-x2 * static_cast<float>(s[j])));
    const float a2 = static_cast<float>(rnd<T>(x2 * static_cast<float>(c[j + h])));
    const float b2 = static_cast<float>(rnd<T>(x1 * static_cast<float>(s[j + h])));
    yr[j] = rnd<T>(a + bneg);
    yr[j + h] = rnd<T>(a2 + b2);
  }
  for (int64_t j = d; j < hd; ++j) yr[j] = xr[j];
}

template <typename T>
void rotary_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), hd = x.size(3), d = cos.size(-1);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < S; ++t) {
      const T* c = cp + b * cos.stride(0) + t * cos.stride(1);
      const T* s = sp + b * sin.stride(0) + t * sin.stride(1);
      for (int64_t hh = 0; hh < H; ++hh) {
        rotary_row<T>(xp + b * x.stride(0) + hh * x.stride(1) + t * x.stride(2), c, s,
                      yp + b * y.stride(0) + hh * y.stride(1) + t * y.stride(2), d, hd);
      }
    }
  }
}

at::Tensor rotary(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x_in.device().is_cpu() && cos_in.device().is_cpu() && sin_in.device().is_cpu(),
              "rotary: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 4 && cos_in.dim() == 3 && sin_in.sizes() == cos_in.sizes(),
              "rotary: x must be [B, H, T, hd] and cos, sin [B, T, d]");
  TORCH_CHECK(cos_in.size(0) == x_in.size(0) && cos_in.size(1) == x_in.size(2) && cos_in.size(2) <= x_in.size(3) &&
                  cos_in.size(2) % 2 == 0, "rotary: cos ", cos_in.sizes(), " does not fit x ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == cos_in.scalar_type() && x_in.scalar_type() == sin_in.scalar_type() &&
                  float_type(x_in.scalar_type()), "rotary: x, cos and sin must share one of fp32, bf16, fp16");
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor cos = cos_in.stride(-1) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor sin = sin_in.stride(-1) == 1 ? sin_in : sin_in.contiguous();
  // the layout of x where it is dense (q, k are transposed views of the projections), as the reference's output
  at::Tensor y = at::empty_like(x);
  if (y.stride(-1) != 1) y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  with_dtype(x.scalar_type(), "rotary", [&](auto xt) { rotary_into<decltype(xt)>(x, cos, sin, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> rotary_pair(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                               const at::Tensor& sin) {
  return {rotary(q, cos, sin), rotary(k, cos, sin)};
}

// ---------------------------------------------------------------------------------------------------------------
// silu(gate) * up. torch's silu kernel computes g / (1 + exp(-g)) in fp32 (widened from bf16/fp16), vectorised in
// steps of two vectors of the dtype with at::vec's exp and the rest of the flat range one by one with std::exp;
// the result rounds to the dtype, then the product with up rounds again. Done the same way here over the same
// flat range, so even the exp's last bit agrees (the callers route only tensors torch handles in one range).

template <typename T>
void silu_mul_range(const T* g, const T* u, T* y, int64_t n) {
  using VT = at::vec::Vectorized<T>;
  const Vec one(1.0f);
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t o = i + half * Vec::size();
        const Vec x = Vec::loadu(g + o);
        const Vec s = x / (one + x.neg().exp());
        (s * Vec::loadu(u + o)).store(y + o);
      }
    }
  } else {
    for (; i + 2 * VT::size() <= n; i += 2 * VT::size()) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t o = i + half * VT::size();
        auto [x0, x1] = at::vec::convert_to_float<T>(VT::loadu(g + o));
        const VT s = at::vec::convert_from_float<T>(x0 / (one + x0.neg().exp()), x1 / (one + x1.neg().exp()));
        auto [s0, s1] = at::vec::convert_to_float<T>(s);
        auto [u0, u1] = at::vec::convert_to_float<T>(VT::loadu(u + o));
        at::vec::convert_from_float<T>(s0 * u0, s1 * u1).store(y + o);
      }
    }
  }
  for (; i < n; ++i) {
    const float x = static_cast<float>(g[i]);
    const T s = static_cast<T>(x / (1.0f + std::exp(-x)));
    y[i] = static_cast<T>(static_cast<float>(s) * static_cast<float>(u[i]));
  }
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  const Elementwise e = elementwise(gate, up, "silu_mul: gate and up");
  const at::Tensor &g = e.a, &u = e.b, &y = e.out;
  with_dtype(g.scalar_type(), "silu_mul", [&](auto t) {
    using T = decltype(t);
    silu_mul_range<T>(g.data_ptr<T>(), u.data_ptr<T>(), y.data_ptr<T>(), g.numel());
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// One-query attention. q [B, H, 1, d]; k, v [B, Hkv, L, d] (H a multiple of Hkv; any strides, last 1: the cache
// hands a view of its first L slots); mask: None (attend to all) or bool [B or 1, 1, 1, L], True = attend.
// Per head: scores in fp32 (q widened and scaled once), a max-subtracted softmax, the weighted sum of v rows in fp32,
// the result rounded once to q's dtype. A head whose keys are all masked gets zeros.

// dst[0:d] = src[0:d] widened to fp32
template <typename T>
inline void widen(const T* src, float* dst, int64_t d) {
  int64_t j = 0;
  if constexpr (!std::is_same_v<T, float>) {
    using VT = at::vec::Vectorized<T>;
    for (; j + VT::size() <= d; j += VT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(src + j));
      lo.store(dst + j);
      hi.store(dst + j + Vec::size());
    }
  }
  for (; j < d; ++j) dst[j] = static_cast<float>(src[j]);
}

inline float dot(const float* a, const float* b, int64_t d) {
  int64_t j = 0;
  Vec acc0(0.0f), acc1(0.0f);
  for (; j + 2 * Vec::size() <= d; j += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + j + Vec::size()), Vec::loadu(b + j + Vec::size()), acc1);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc0 + acc1);
  for (; j < d; ++j) s += a[j] * b[j];
  return s;
}

// acc[0:d] += p * v[0:d]
inline void axpy(float p, const float* v, float* acc, int64_t d) {
  int64_t j = 0;
  const Vec pv(p);
  for (; j + Vec::size() <= d; j += Vec::size()) {
    at::vec::fmadd(pv, Vec::loadu(v + j), Vec::loadu(acc + j)).store(acc + j);
  }
  for (; j < d; ++j) acc[j] += p * v[j];
}

// p[0:n] = exp(p[0:n] - top), returning their sum (exp(-inf) = 0: masked positions)
inline float exp_shifted(float* p, int64_t n, float top) {
  int64_t j = 0;
  const Vec shift(top);
  Vec sum(0.0f);
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(p + j) - shift).exp();
    e.store(p + j);
    sum = sum + e;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sum);
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - top);
    total += p[j];
  }
  return total;
}

// The data of a [B, heads, L, d] tensor (last stride 1): element (b, h, l, j) at p[b * sb + h * sh + l * sl + j].
template <typename T>
struct Heads {
  const T* p;
  int64_t sb, sh, sl;
  const T* row(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

template <typename T>
Heads<T> heads_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The G = H / Hkv query heads that share key-value head `kvh` of batch row b, over L cached positions: each key
// and value row is widened once for all G of them (the cache is read once per token, not once per query head).
// The output rows go to out[(b * H + head) * d ...].
template <typename T>
void attend_group(Heads<T> q, Heads<T> k, Heads<T> v, int64_t H, int64_t kv, int64_t L, int64_t d,
                  const bool* mask, int64_t mask_b, int64_t mask_l, T* out, int64_t b, int64_t kvh,
                  std::vector<float>& buf) {
  const int64_t G = H / kv;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  buf.resize(G * d * 2 + G * L + d + 2 * G);
  float* qs = buf.data();      // [G, d] the queries in fp32, scaled
  float* acc = qs + G * d;     // [G, d] the weighted sums of values
  float* p = acc + G * d;      // [G, L] scores, then softmax numerators
  float* row = p + G * L;      // [d] one key or value row in fp32
  float* top = row + d;        // [G] each head's largest score
  float* inv = top + G;        // [G] 1 / each head's softmax denominator (0: every key masked)
  for (int64_t g = 0; g < G; ++g) {
    const T* qr = q.row(b, kvh * G + g, 0);
    for (int64_t j = 0; j < d; ++j) qs[g * d + j] = static_cast<float>(qr[j]) * scale;
    top[g] = kNegInf;
    inv[g] = 0.0f;
  }
  const bool* m = mask ? mask + b * mask_b : nullptr;
  for (int64_t l = 0; l < L; ++l) {
    if (m && !m[l * mask_l]) {
      for (int64_t g = 0; g < G; ++g) p[g * L + l] = kNegInf;
      continue;
    }
    widen<T>(k.row(b, kvh, l), row, d);
    for (int64_t g = 0; g < G; ++g) {
      const float score = dot(qs + g * d, row, d);
      p[g * L + l] = score;
      top[g] = std::max(top[g], score);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    if (top[g] == kNegInf) continue;  // every key masked: zeros
    inv[g] = 1.0f / exp_shifted(p + g * L, L, top[g]);
  }
  std::fill(acc, acc + G * d, 0.0f);
  for (int64_t l = 0; l < L; ++l) {
    if (m && !m[l * mask_l]) continue;
    widen<T>(v.row(b, kvh, l), row, d);
    for (int64_t g = 0; g < G; ++g) {
      if (inv[g] != 0.0f) axpy(p[g * L + l], row, acc + g * d, d);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    T* orow = out + (b * H + kvh * G + g) * d;
    for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<T>(acc[g * d + j] * inv[g]);
  }
}

// Every (batch row, key-value head) group, in parallel only where each thread gets a quarter million multiply-adds
// or more (long caches): one token of a small model's layer (14 heads x 100 positions x 64) is tens of
// microseconds on one core, about what waking the other threads costs, and on a loaded machine a parallel region
// can wait milliseconds for a descheduled thread.
template <typename T>
void attend(Heads<T> q, Heads<T> k, Heads<T> v, int64_t B, int64_t H, int64_t kv, int64_t L, int64_t d,
            const bool* mask, int64_t mask_b, int64_t mask_l, T* out) {
  const int64_t group_work = std::max<int64_t>(1, 2 * (H / kv) * L * d);
  const int64_t grain = std::max<int64_t>(1, 262144 / group_work);
  const bool inference = c10::InferenceMode::is_enabled();  // worker threads do not inherit it
  at::parallel_for(0, B * kv, grain, [&](int64_t i0, int64_t i1) {
    c10::InferenceMode guard(inference);
    std::vector<float> buf;
    for (int64_t i = i0; i < i1; ++i) attend_group<T>(q, k, v, H, kv, L, d, mask, mask_b, mask_l, out, i / kv, i % kv, buf);
  });
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && v_in.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes() && q_in.size(2) == 1,
              "decode_attention: q must be [B, H, 1, d] and k, v [B, Hkv, L, d]");
  TORCH_CHECK(q_in.size(0) == k_in.size(0) && q_in.size(3) == k_in.size(3) && k_in.size(1) > 0 &&
                  q_in.size(1) % k_in.size(1) == 0, "decode_attention: q ", q_in.sizes(), " does not fit k ",
              k_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type() &&
                  float_type(q_in.scalar_type()), "decode_attention: q, k, v must share one of fp32, bf16, fp16");
  const int64_t B = q_in.size(0), H = q_in.size(1), L = k_in.size(2), d = q_in.size(3);
  const at::Tensor q = q_in.stride(-1) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(-1) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(-1) == 1 ? v_in : v_in.contiguous();
  const bool* mp = nullptr;
  int64_t mask_b = 0, mask_l = 0;
  at::Tensor m;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.dim() == 4 && m.size(1) == 1 &&
                    m.size(2) == 1 && m.size(3) == L && (m.size(0) == B || m.size(0) == 1),
                "decode_attention: mask must be bool [B or 1, 1, 1, ", L, "], got ", m.sizes());
    mp = m.data_ptr<bool>();
    mask_b = m.size(0) == 1 ? 0 : m.stride(0);
    mask_l = m.stride(3);
  }
  at::Tensor out = at::empty({B, H, 1, d}, q.options());
  if (out.numel() == 0) return out;
  with_dtype(q.scalar_type(), "decode_attention", [&](auto t) {
    using T = decltype(t);
    attend<T>(heads_of<T>(q), heads_of<T>(k), heads_of<T>(v), B, H, k.size(1), L, d, mp, mask_b, mask_l,
              out.data_ptr<T>());
  });
  return out;
}

// One decoding token's attention, from the projections' outputs q [B, 1, H * d], k, v [B, 1, Hkv * d] (last stride
// 1): q and k rotated as `rotary` rotates them (cos, sin [B, 1, r], r <= d), the rotated k and v written into slot
// `pos` of the caches [B, Hkv, max_len, d] (what KVCache.update does), then decode_attention of the rotated q over
// slots 0..pos (mask: None or bool [B or 1, 1, 1, pos + 1]). Returns [B, 1, H * d]: the same numbers as those ops
// one by one, in one call.
at::Tensor attention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                          const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, int64_t pos,
                          const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu(), "attention_step: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(1) == 1 && k.size(1) == 1 &&
                  q.size(0) == k.size(0), "attention_step: q must be [B, 1, H * d] and k, v [B, 1, Hkv * d]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(0) == q.size(0) &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "attention_step: the caches must be contiguous [B, Hkv, max_len, d] of q's batch");
  const int64_t B = q.size(0), kv = k_cache.size(1), L = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(d > 0 && kv > 0 && k.size(2) == kv * d && q.size(2) % d == 0 && (q.size(2) / d) % kv == 0,
              "attention_step: q ", q.sizes(), " and k ", k.sizes(), " do not fit the cache ", k_cache.sizes());
  TORCH_CHECK(pos >= 0 && pos < L, "attention_step: position ", pos, " outside the cache's ", L, " slots");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(float_type(dtype) && k.scalar_type() == dtype && v.scalar_type() == dtype &&
                  k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "attention_step: q, k, v and the caches must share one of fp32, bf16, fp16");
  const int64_t H = q.size(2) / d, r = cos.dim() == 3 ? cos.size(2) : -1;
  TORCH_CHECK(r >= 0 && sin.sizes() == cos.sizes() && cos.size(0) == B && cos.size(1) == 1 && r <= d &&
                  r % 2 == 0 && cos.scalar_type() == dtype && sin.scalar_type() == dtype && cos.device().is_cpu() &&
                  sin.device().is_cpu(), "attention_step: cos, sin must be [B, 1, r] (r even, at most ", d,
              ") of q's dtype");
  const at::Tensor qc = q.stride(-1) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(-1) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(-1) == 1 ? v : v.contiguous();
  const at::Tensor c = cos.stride(-1) == 1 ? cos : cos.contiguous();
  const at::Tensor s = sin.stride(-1) == 1 ? sin : sin.contiguous();
  const bool* mp = nullptr;
  int64_t mask_b = 0, mask_l = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.dim() == 4 && m.size(1) == 1 &&
                    m.size(2) == 1 && m.size(3) == pos + 1 && (m.size(0) == B || m.size(0) == 1),
                "attention_step: mask must be bool [B or 1, 1, 1, ", pos + 1, "], got ", m.sizes());
    mp = m.data_ptr<bool>();
    mask_b = m.size(0) == 1 ? 0 : m.stride(0);
    mask_l = m.stride(3);
  }
  at::Tensor out = at::empty({B, 1, H * d}, q.options());
  with_dtype(dtype, "attention_step", [&](auto t) {
    using T = decltype(t);
    std::vector<T> qr(B * H * d);  // the rotated queries [B, H, d]
    T* kd = k_cache.data_ptr<T>();
    T* vd = v_cache.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      const T* cb = c.data_ptr<T>() + b * c.stride(0);
      const T* sb = s.data_ptr<T>() + b * s.stride(0);
      for (int64_t h = 0; h < H; ++h)
        rotary_row<T>(qc.data_ptr<T>() + b * qc.stride(0) + h * d, cb, sb, qr.data() + (b * H + h) * d, r, d);
      for (int64_t h = 0; h < kv; ++h) {
        const int64_t slot = ((b * kv + h) * L + pos) * d;
        rotary_row<T>(kc.data_ptr<T>() + b * kc.stride(0) + h * d, cb, sb, kd + slot, r, d);
        const T* vr = vc.data_ptr<T>() + b * vc.stride(0) + h * d;
        std::copy(vr, vr + d, vd + slot);
      }
    }
    const Heads<T> qh{qr.data(), H * d, d, d}, kh{kd, kv * L * d, L * d, d}, vh{vd, kv * L * d, L * d, d};
    attend<T>(qh, kh, vh, B, H, kv, pos + 1, d, mp, mask_b, mask_l, out.data_ptr<T>());
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// argmax over the last dim, as torch.argmax: the first index of the largest value, or of the first NaN if any
// (torch orders NaN above every number). Two passes over each row: its maximum (vectorised; NaN propagates), then
// the first index holding it.

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t i = 0;
  float top = -std::numeric_limits<float>::infinity();
  if constexpr (std::is_same_v<T, float>) {
    Vec m(top);
    for (; i + Vec::size() <= n; i += Vec::size()) m = at::vec::maximum(m, Vec::loadu(x + i));
    top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  } else {
    using VT = at::vec::Vectorized<T>;
    Vec m0(top), m1(top);
    for (; i + VT::size() <= n; i += VT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(x + i));
      m0 = at::vec::maximum(m0, lo);
      m1 = at::vec::maximum(m1, hi);
    }
    top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                         at::vec::maximum(m0, m1));
  }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isnan(v) || std::isnan(top)) top = std::numeric_limits<float>::quiet_NaN();
    else top = std::max(top, v);
  }
  if (std::isnan(top)) {
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(static_cast<float>(x[j]))) return j;
  }
  for (int64_t j = 0; j < n; ++j)
    if (static_cast<float>(x[j]) == top) return j;
  return 0;
}

at::Tensor argmax_last(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && float_type(x_in.scalar_type()) && x_in.dim() >= 1 && x_in.size(-1) > 0,
              "argmax_last: a non-empty CPU tensor of fp32, bf16 or fp16");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  with_dtype(x.scalar_type(), "argmax_last", [&](auto t) {
    using T = decltype(t);
    const T* p = x.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) o[r] = argmax_row<T>(p + r * n, n);
  });
  return out;
}

}  // namespace
}  // namespace zoo_cpu

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rotary_pair(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor r, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("attention_step(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int pos, Tensor? mask=None) -> Tensor");
  m.def("argmax_last(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("rms_norm", &zoo_cpu::rms_norm);
  m.impl("rotary", &zoo_cpu::rotary);
  m.impl("rotary_pair", &zoo_cpu::rotary_pair);
  m.impl("silu_mul", &zoo_cpu::silu_mul);
  m.impl("decode_attention", &zoo_cpu::decode_attention);
  m.impl("add_rms_norm", &zoo_cpu::add_rms_norm);
  m.impl("attention_step", &zoo_cpu::attention_step);
  m.impl("argmax_last", &zoo_cpu::argmax_last);
}
