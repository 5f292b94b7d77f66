// Several linear layers that read the same x, in one call from Python: a decoder layer's q, k and v projections,
// its gate and up projections (kernels/linear.py dense_many, quant.py PackedLinear.many). Each output is the op a
// single call runs (zoo_cpu::dense_rows, zoo_cpu::quant_linear, called here through the dispatcher), so the outputs
// equal the separate calls' bit for bit; the call saves Python's cost per op (argument parsing, the dispatch
// decision in Python, the boxing), about 5-10 us each at batch 1.
//
//   zoo_cpu::dense_rows_many(x, ws, biases)      [dense_rows(x, ws[i], biases[i]) for each i]
//   zoo_cpu::quant_linear_many(x, qs, scales, zeros, biases, bits, act_quant)
//                                                [quant_linear(x, qs[i], scales[i], zeros[i], biases[i], bits,
//                                                 act_quant) for each i]
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

namespace zoo_cpu {
namespace {

using Opt = std::optional<at::Tensor>;
using OptList = c10::List<std::optional<at::Tensor>>;

// The number of layers, checked against every per-layer list.
int64_t layers(int64_t n, std::initializer_list<int64_t> sizes, const char* op) {
  for (int64_t s : sizes) TORCH_CHECK(s == n, op, ": the per-layer lists must have one length (", n, " vs ", s, ")");
  return n;
}

std::vector<at::Tensor> dense_rows_many(const at::Tensor& x, at::TensorList ws, const OptList& biases) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("zoo_cpu::dense_rows", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&)>();
  const int64_t n = layers(static_cast<int64_t>(ws.size()), {static_cast<int64_t>(biases.size())},
                           "zoo_cpu::dense_rows_many");
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(op.call(x, ws[i], biases.get(i)));
  return out;
}

std::vector<at::Tensor> quant_linear_many(const at::Tensor& x, at::TensorList qs, at::TensorList scales,
                                          const OptList& zeros, const OptList& biases, int64_t bits, bool act_quant) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("zoo_cpu::quant_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, int64_t,
                            bool)>();
  const int64_t n = layers(static_cast<int64_t>(qs.size()),
                           {static_cast<int64_t>(scales.size()), static_cast<int64_t>(zeros.size()),
                            static_cast<int64_t>(biases.size())},
                           "zoo_cpu::quant_linear_many");
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(op.call(x, qs[i], scales[i], zeros.get(i), biases.get(i), bits, act_quant));
  }
  return out;
}

}  // namespace
}  // namespace zoo_cpu

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("dense_rows_many(Tensor x, Tensor[] ws, Tensor?[] biases) -> Tensor[]");
  m.def("quant_linear_many(Tensor x, Tensor[] qs, Tensor[] scales, Tensor?[] zeros, Tensor?[] biases, int bits, "
        "bool act_quant=False) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("dense_rows_many", &zoo_cpu::dense_rows_many);
  m.impl("quant_linear_many", &zoo_cpu::quant_linear_many);
}
