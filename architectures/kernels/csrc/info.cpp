// What the loaded library was built for: the tests and the dispatch ask it (zoo_cpu::build_isa, zoo_cpu::features).
#include "common.h"

namespace zoo_cpu {

std::string features() { return has_avx512_bf16() ? "avx512_bf16" : ""; }

}  // namespace zoo_cpu

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("build_isa() -> str", &zoo_cpu::build_isa);
  m.def("features() -> str", &zoo_cpu::features);
}
