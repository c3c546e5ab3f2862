// Python module of the hessgap extension. The ops themselves register with the dispatcher
// (TORCH_LIBRARY_FRAGMENT in each op's source); this file only tells Python what was built.
#include <torch/extension.h>

#ifndef HESSGAP_VERSION
#define HESSGAP_VERSION "unknown"
#endif
#ifndef HESSGAP_CUDA_ARCHS
#define HESSGAP_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hessgap's fused CPU and CUDA kernels (registered as torch.ops.hessgap.*)";
  m.attr("version") = HESSGAP_VERSION;
#ifdef HESSGAP_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = HESSGAP_CUDA_ARCHS;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
  m.attr("built_with_openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
}
