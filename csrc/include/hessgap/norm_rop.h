// Row-wise R-operator pieces of LayerNorm / RMSNorm / GroupNorm (see hessgap/ops/norm_rop.py for the math),
// shared by the CPU and CUDA kernels: argument checks and the per-row formulas.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "hessgap/checks.h"

namespace hessgap {

inline void check_norm_rows(const at::Tensor& xhat, const at::Tensor& rstd, const at::Tensor& dirs, const char* name) {
  check_floating(xhat, "xhat");
  TORCH_CHECK(xhat.dim() == 2, "hessgap: xhat must be (rows, D), got shape ", xhat.sizes());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == xhat.size(0), "hessgap: rstd must be (rows,) = (", xhat.size(0),
              "), got shape ", rstd.sizes());
  TORCH_CHECK(dirs.dim() == 3 && dirs.size(1) == xhat.size(0) && dirs.size(2) == xhat.size(1), "hessgap: ", name,
              " must be (k, rows, D) = (k, ", xhat.size(0), ", ", xhat.size(1), "), got shape ", dirs.sizes());
  for (const at::Tensor* t : {&rstd, &dirs}) {
    TORCH_CHECK(t->scalar_type() == xhat.scalar_type(), "hessgap: every norm_* argument must have xhat's dtype ",
                xhat.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == xhat.device(), "hessgap: every norm_* argument must be on ", xhat.device());
  }
}

}  // namespace hessgap
