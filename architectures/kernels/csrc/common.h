// Shared by every zoo_cpu kernel file (architectures/kernels/cpu_ext.py builds them all into one library,
// once per instruction set: CPU_CAPABILITY is AVX512, AVX2 or DEFAULT, set by the build's flags).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
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

// Weights smaller than this are multiplied on the calling thread alone: waking the other threads costs more than
// they save. Measured for one row of bf16 against a weight streamed from memory on the 2-core AVX2 machine (per call,
// median): 224 KiB 33 us on 1 thread, 28 us on 2; 448 KiB 51 vs 38 us. In cache 224 KiB is faster on 1 thread.
// With dense_rows' streams (best call, kernel alone, threads already spinning): 224 KiB 8.2-8.6 us on 1 thread,
// 6.3-6.7 on 2, about what opening a parallel region costs, so the threshold stays. A call after small aten ops
// costs ~3 us more than back to back, on 1 thread as on 2 (the calling thread's caches, not the threads' wake-up);
// on a machine busy with other processes a parallel region can wait milliseconds for a descheduled worker.
constexpr int64_t kSerialBytes = int64_t{128} << 10;

// fn(begin, end) over rows [0, n) of a weight of row_bytes bytes per row: on the calling thread when the weight is
// under kSerialBytes, else one contiguous run of rows per thread (a multiple of `align` rows, e.g. a kernel's rows
// per step, so only the last run has leftover rows; dense_rows passes 1), each at least kSerialBytes / 2.
template <typename Fn>
inline void parallel_rows(int64_t n, int64_t row_bytes, int64_t align, const Fn& fn) {
  const int64_t bytes = n * row_bytes;
  int64_t runs = std::min<int64_t>(at::get_num_threads(), bytes / (kSerialBytes / 2));
  if (bytes < kSerialBytes || runs <= 1 || at::in_parallel_region()) return fn(int64_t{0}, n);
  const int64_t per = (n + runs - 1) / runs;
  const int64_t step = (per + align - 1) / align * align;
  runs = (n + step - 1) / step;
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r * step, std::min(n, (r + 1) * step));
  });
}

}  // namespace zoo_cpu
