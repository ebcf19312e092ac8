// Python module entry of both compiled extensions (lps_fast._C and lps_fast._C_cuda).
// Importing the module runs the TORCH_LIBRARY_IMPL blocks of its sources, which register the
// kernels under the lps_fast:: schemas declared in lps_fast/_ops.py. Only pybind11 is included
// here (not torch/extension.h), which keeps this file quick to compile.
#include <pybind11/pybind11.h>

#include <string>
#include <utility>

#include "grid_plan.h"

#ifdef LPS_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef LPS_FAST_TORCH_VERSION
#error "setup.py defines LPS_FAST_TORCH_VERSION"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lps_fast compiled kernels";
  // The torch the binary was compiled against; the loader refuses a different one, since the
  // C++ ABI of torch changes between releases.
  m.attr("torch_version") = std::string(LPS_FAST_TORCH_VERSION);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  // Whether the CPU kernels' AVX-512 paths are compiled in (-march=native on such a CPU); without
  // them the vector-neuron layers' products fall back to BLAS (csrc/cpu/small_matmul_cpu.cpp).
#if defined(__AVX512F__)
  m.attr("avx512") = true;
#else
  m.attr("avx512") = false;
#endif
  // The CUDA launchers' grid arithmetic, reachable from tests on any machine.
  m.def("grid_plan", [](int64_t total, int64_t extent, int threads, int multiprocessors) {
    const lps_fast::GridPlan plan = lps_fast::plan_grid(total, extent, threads, multiprocessors);
    return std::make_pair(plan.blocks, plan.int32);
  }, "(blocks, int32) of a CUDA grid-stride loop over `total` items addressing `extent` elements");
#ifdef LPS_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_runtime_version", []() {
    int version = 0;
    cudaRuntimeGetVersion(&version);
    return version;
  }, "CUDA runtime version the extension was built against (e.g. 13000)");
#else
  m.attr("with_cuda") = false;
#endif
}
