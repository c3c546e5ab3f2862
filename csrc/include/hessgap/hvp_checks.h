// Argument checks of the hvp_* ops (CPU and CUDA): the batch tensors and their k-direction stacks.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "hessgap/checks.h"

namespace hessgap {

// `dirs` stacks k directions of `batch`: shape (k, *batch.shape), same device and floating dtype.
inline void check_directions(const at::Tensor& batch, const char* batch_name, const at::Tensor& dirs,
                             const char* dirs_name) {
  check_floating(batch, batch_name);
  TORCH_CHECK(dirs.dim() == batch.dim() + 1 && dirs.sizes().slice(1) == batch.sizes(), "hessgap: ", dirs_name,
              " has shape ", dirs.sizes(), " but must be (k, *", batch_name, ".shape) = (k, ", batch.sizes(),
              "): one slice per direction");
  TORCH_CHECK(dirs.device() == batch.device(), "hessgap: ", dirs_name, " is on ", dirs.device(), " but ",
              batch_name, " is on ", batch.device(), "; move both to one device");
  TORCH_CHECK(dirs.scalar_type() == batch.scalar_type(), "hessgap: ", dirs_name, " has dtype ",
              dirs.scalar_type(), " but ", batch_name, " has ", batch.scalar_type(), "; cast both to one dtype");
}

// `other` has exactly the shape, device and dtype of `batch`.
inline void check_same_batch(const at::Tensor& batch, const char* batch_name, const at::Tensor& other,
                             const char* other_name) {
  TORCH_CHECK(other.sizes() == batch.sizes(), "hessgap: ", other_name, " has shape ", other.sizes(), " but ",
              batch_name, " has ", batch.sizes(), "; they must match");
  TORCH_CHECK(other.device() == batch.device(), "hessgap: ", other_name, " is on ", other.device(), " but ",
              batch_name, " is on ", batch.device(), "; move both to one device");
  TORCH_CHECK(other.scalar_type() == batch.scalar_type(), "hessgap: ", other_name, " has dtype ",
              other.scalar_type(), " but ", batch_name, " has ", batch.scalar_type(), "; cast both to one dtype");
}

inline void check_act_rbackward_args(const at::Tensor& z, const at::Tensor& g, const at::Tensor& rz,
                                     const at::Tensor& rg) {
  check_directions(z, "z", rz, "rz");
  check_directions(z, "z", rg, "rg");
  check_same_batch(z, "z", g, "g");
  TORCH_CHECK(rz.size(0) == rg.size(0), "hessgap: rz has ", rz.size(0), " directions but rg has ", rg.size(0),
              "; pass the same k directions in both");
}

inline void check_softmax_ce_args(const at::Tensor& p, const at::Tensor& rz) {
  TORCH_CHECK(p.dim() == 2, "hessgap: p must be the (batch, classes) softmax probabilities, got shape ", p.sizes());
  check_directions(p, "p", rz, "rz");
}

}  // namespace hessgap
