// Python module entry of both compiled extensions (lps_fast._C and lps_fast._C_cuda).
// Importing the module runs the TORCH_LIBRARY_IMPL blocks of its sources, which register the
// kernels under the lps_fast:: schemas declared in lps_fast/_ops.py.
#include <torch/extension.h>

#ifdef LPS_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lps_fast compiled kernels";
  // The torch the binary was compiled against; a different torch at run time is refused by
  // the loader, since the C++ ABI of torch changes between releases.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
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
