// Softmax attention and its R-operator (see hessgap/ops/attention_rop.py for the math): the argument checks
// shared by the CPU and CUDA kernels, and the view of an optional additive bias broadcast to (B, H, Tq, Tk).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "hessgap/checks.h"

namespace hessgap {

struct BiasView {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
};

// q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv); the bias broadcastable to (B, H, Tq, Tk).
inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& bias) {
  check_floating(q, "q");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "hessgap: q, k, v must be (batch, heads, T, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.sizes().slice(0, 3) == v.sizes().slice(0, 3) &&
                  q.size(3) == k.size(3),
              "hessgap: attention shapes do not fit: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "hessgap: q, k, v must share dtype and device");
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == q.scalar_type() && bias->device() == q.device(),
                "hessgap: the attention bias must have q's dtype and device (convert boolean masks to 0/-inf)");
    TORCH_CHECK(bias->dim() == 4 && bias->size(2) == q.size(2) && bias->size(3) == k.size(2) &&
                    (bias->size(0) == q.size(0) || bias->size(0) == 1) && (bias->size(1) == q.size(1) || bias->size(1) == 1),
                "hessgap: the attention bias must broadcast to (B, H, Tq, Tk) = (", q.size(0), ", ", q.size(1), ", ",
                q.size(2), ", ", k.size(2), "), got ", bias->sizes());
  }
}

inline void check_stack(const at::Tensor& base, const at::Tensor& dirs, const char* name, int64_t k) {
  TORCH_CHECK(dirs.dim() == base.dim() + 1 && dirs.sizes().slice(1) == base.sizes() && dirs.size(0) == k,
              "hessgap: ", name, " must be (k, *", base.sizes(), ") with k = ", k, ", got ", dirs.sizes());
  TORCH_CHECK(dirs.scalar_type() == base.scalar_type() && dirs.device() == base.device(), "hessgap: ", name,
              " must have the dtype and device of the primal tensors");
}

inline BiasView bias_view(const c10::optional<at::Tensor>& bias) {
  BiasView view;
  if (!bias.has_value() || !bias->defined()) return view;
  const at::Tensor& b = *bias;
  view.data = b.const_data_ptr();
  view.sb = b.size(0) == 1 ? 0 : b.stride(0);
  view.sh = b.size(1) == 1 ? 0 : b.stride(1);
  view.si = b.stride(2);
  view.sj = b.stride(3);
  return view;
}

}  // namespace hessgap
