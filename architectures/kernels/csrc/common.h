// Shared by every zoo_cpu kernel file (architectures/kernels/cpu_ext.py builds them all into one library,
// once per instruction set: CPU_CAPABILITY is AVX512, AVX2 or DEFAULT, set by the build's flags).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <string>

#define ZOO_STR2(x) #x
#define ZOO_STR(x) ZOO_STR2(x)

namespace zoo_cpu {

// The flag set this library was compiled with ("AVX512", "AVX2", "DEFAULT").
inline std::string build_isa() { return ZOO_STR(CPU_CAPABILITY); }

// Whether this CPU has AVX-512 BF16 dot products (vdpbf16ps); only an AVX512 build may use them.
inline bool has_avx512_bf16() {
#if defined(CPU_CAPABILITY_AVX512) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace zoo_cpu
