// The fused LM head + cross-entropy (projection to the vocabulary, softmax, loss) and its R-gradients,
// computed in chunks of tokens and of the vocabulary: never tokens × vocabulary for all tokens, nor
// k × tokens × vocabulary. Math: hessgap/ops/linear_ce_rop.py. The kernels are compositions of ATen ops on
// chunks (BLAS / cuBLAS matmuls and element-wise ops), so one implementation serves the CPU and CUDA
// registrations (csrc/linear_ce_rop.cpp, csrc/cuda/linear_ce_rop.cu).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace hessgap {

// (loss, lse, grad_h, grad_W, grad_bias): loss = Σ_t w_t (lse_t − z_{t,y_t}), z = h Wᵀ + b.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& token_weights, int64_t token_chunk, int64_t vocab_chunk);

// (R{loss} (k,), R{grad_h} (k, N, d), R{grad_W} (k, V, d), R{grad_bias} (k, V)) along the tangents.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_rgrad(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& token_weights, const at::Tensor& lse, const c10::optional<at::Tensor>& dh,
    const c10::optional<at::Tensor>& dweight, const c10::optional<at::Tensor>& dbias, int64_t token_chunk,
    int64_t vocab_chunk);

}  // namespace hessgap
