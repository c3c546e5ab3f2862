// CUDA kernels of torch.ops.hessgap.hvp_* (schemas and CPU twins in csrc/hvp_pointwise.cpp).
// Each thread owns batch elements and walks the k directions, so σ'(z), σ''(z) are computed once per
// element; softmax-CE uses one warp per (direction, row) with a shuffle reduction for the row's dot.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "hessgap/checks.h"
#include "hessgap/hvp_activation.h"
#include "hessgap/hvp_checks.h"

namespace hessgap {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t max_blocks = 65535LL * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

template <typename scalar_t>
__global__ void act_jvp_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ t,
                               scalar_t* __restrict__ out, int64_t n, int64_t k, HvpActivation act,
                               scalar_t slope) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    scalar_t d1, d2;
    hvp_activation_derivatives<scalar_t>(act, slope, z[i], d1, d2);
    for (int64_t j = 0; j < k; ++j) out[j * n + i] = d1 * t[j * n + i];
  }
}

template <typename scalar_t>
__global__ void act_rbackward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ g,
                                     const scalar_t* __restrict__ rz, const scalar_t* __restrict__ rg,
                                     scalar_t* __restrict__ out, int64_t n, int64_t k, HvpActivation act,
                                     scalar_t slope) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    scalar_t d1, d2;
    hvp_activation_derivatives<scalar_t>(act, slope, z[i], d1, d2);
    const scalar_t d2g = d2 * g[i];
    for (int64_t j = 0; j < k; ++j) out[j * n + i] = d1 * rg[j * n + i] + d2g * rz[j * n + i];
  }
}

template <typename scalar_t>
__global__ void softmax_ce_rgrad_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ rz,
                                        scalar_t* __restrict__ out, int64_t rows, int64_t batch, int64_t classes,
                                        scalar_t scale) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32;
  for (int64_t r = blockIdx.x * warps_per_block + threadIdx.x / 32; r < rows; r += int64_t(gridDim.x) * warps_per_block) {
    const scalar_t* prow = p + (r % batch) * classes;
    const scalar_t* rrow = rz + r * classes;
    scalar_t* orow = out + r * classes;
    double dot = 0;
    for (int64_t c = lane; c < classes; c += 32) dot += double(prow[c]) * double(rrow[c]);
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    const scalar_t d = static_cast<scalar_t>(dot);
    for (int64_t c = lane; c < classes; c += 32) orow[c] = scale * prow[c] * (rrow[c] - d);
  }
}

at::Tensor act_jvp_cuda(const at::Tensor& z, const at::Tensor& t, c10::string_view kind, double slope) {
  check_directions(z, "z", t, "t");
  const HvpActivation act = hvp_activation_from_name(std::string(kind));
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), tc = t.contiguous();
  at::Tensor out = at::empty_like(tc, at::MemoryFormat::Contiguous);
  const int64_t n = zc.numel(), k = tc.size(0);
  if (n == 0 || k == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "hvp_act_jvp_cuda", [&] {
    act_jvp_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        zc.const_data_ptr<scalar_t>(), tc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, k, act,
        static_cast<scalar_t>(slope));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor act_rbackward_cuda(const at::Tensor& z, const at::Tensor& g, const at::Tensor& rz, const at::Tensor& rg,
                              c10::string_view kind, double slope) {
  check_act_rbackward_args(z, g, rz, rg);
  const HvpActivation act = hvp_activation_from_name(std::string(kind));
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), gc = g.contiguous(), rzc = rz.contiguous(), rgc = rg.contiguous();
  at::Tensor out = at::empty_like(rgc, at::MemoryFormat::Contiguous);
  const int64_t n = zc.numel(), k = rzc.size(0);
  if (n == 0 || k == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "hvp_act_rbackward_cuda", [&] {
    act_rbackward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        zc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), rzc.const_data_ptr<scalar_t>(),
        rgc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, k, act, static_cast<scalar_t>(slope));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor softmax_ce_rgrad_cuda(const at::Tensor& p, const at::Tensor& rz, double scale) {
  check_softmax_ce_args(p, rz);
  const c10::cuda::CUDAGuard guard(p.device());
  const at::Tensor pc = p.contiguous(), rzc = rz.contiguous();
  at::Tensor out = at::empty_like(rzc, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const int64_t batch = pc.size(0), classes = pc.size(1), rows = rzc.size(0) * batch;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hvp_softmax_ce_rgrad_cuda", [&] {
    softmax_ce_rgrad_kernel<scalar_t><<<blocks_for(rows * 32), kThreads, 0, stream>>>(
        pc.const_data_ptr<scalar_t>(), rzc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows,
        batch, classes, static_cast<scalar_t>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hessgap, CUDA, m) {
  m.impl("hvp_act_jvp", &act_jvp_cuda);
  m.impl("hvp_act_rbackward", &act_rbackward_cuda);
  m.impl("hvp_softmax_ce_rgrad", &softmax_ce_rgrad_cuda);
}

}  // namespace hessgap
