// CUDA registration of torch.ops.hessgap.linear_ce_forward / linear_ce_rgrad. The kernels are chunked
// compositions of ATen ops (cuBLAS matmuls, element-wise ops), shared with the CPU build:
// csrc/linear_ce_rop.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "hessgap/linear_ce_rop.h"

namespace hessgap {

TORCH_LIBRARY_IMPL(hessgap, CUDA, m) {
  m.impl("linear_ce_forward", &linear_ce_forward);
  m.impl("linear_ce_rgrad", &linear_ce_rgrad);
}

}  // namespace hessgap
