// Argument checks shared by hessgap's ops: each failure names the argument and says how to fix it.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace hessgap {

// All tensors of `list` (named `name` in messages) have the device and dtype of `ref`.
inline void check_same_device_dtype(const at::TensorList list, const at::Tensor& ref, const char* name) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].device() == ref.device(), "hessgap: ", name, "[", i, "] is on ", list[i].device(),
                " but the other tensors are on ", ref.device(), "; move all inputs to one device");
    TORCH_CHECK(list[i].scalar_type() == ref.scalar_type(), "hessgap: ", name, "[", i, "] has dtype ",
                list[i].scalar_type(), " but the other tensors have ", ref.scalar_type(),
                "; cast all inputs to one floating dtype");
  }
}

// `a` and `b` are lists of the same length whose tensors have pairwise equal sizes.
inline void check_matching_lists(const at::TensorList a, const char* name_a, const at::TensorList b,
                                 const char* name_b) {
  TORCH_CHECK(a.size() == b.size(), "hessgap: ", name_a, " has ", a.size(), " tensors but ", name_b, " has ",
              b.size(), "; pass one tensor per parameter in both");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].sizes() == b[i].sizes(), "hessgap: ", name_a, "[", i, "] has shape ", a[i].sizes(),
                " but ", name_b, "[", i, "] has shape ", b[i].sizes(), "; shapes must match per parameter");
  }
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "hessgap: ", name,
              " has dtype ", t.scalar_type(), "; only float32 and float64 are supported");
}

}  // namespace hessgap
