// CUDA kernels of torch.ops.hessgap.norm_rforward / norm_rbackward (schemas and CPU twins in csrc/norm_rop.cpp;
// math in hessgap/ops/norm_rop.py). One block per (direction, row): the row's sums are block reductions in
// double, then the block writes the row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "hessgap/norm_rop.h"

namespace hessgap {
namespace {

constexpr int kThreads = 256;

// Sum of v over the block (every thread gets the result); `shared` holds kThreads / 32 doubles.
__device__ double block_sum(double v, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

template <typename T>
__global__ void norm_rforward_kernel(const T* __restrict__ xhat, const T* __restrict__ rstd, const T* __restrict__ rx,
                                     T* __restrict__ rxhat, T* __restrict__ m1, int64_t tasks, int64_t rows, int64_t d,
                                     bool center) {
  __shared__ double shared[kThreads / 32];
  for (int64_t t = blockIdx.x; t < tasks; t += gridDim.x) {
    const int64_t row = t % rows;
    const T* x = xhat + row * d;
    const T* r = rx + t * d;
    double sum = 0, dot = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      sum += double(r[i]);
      dot += double(x[i]) * double(r[i]);
    }
    sum = block_sum(sum, shared);
    dot = block_sum(dot, shared);
    const T mean = center ? T(sum / d) : T(0);
    const T m = T(dot / d);
    const T s = rstd[row];
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) rxhat[t * d + i] = s * (r[i] - mean - x[i] * m);
    if (threadIdx.x == 0) m1[t] = m;
  }
}

template <typename T>
__global__ void norm_rbackward_kernel(const T* __restrict__ xhat, const T* __restrict__ rstd, const T* __restrict__ a,
                                      const T* __restrict__ ra, const T* __restrict__ rxhat, const T* __restrict__ m1,
                                      T* __restrict__ out, int64_t tasks, int64_t rows, int64_t d, bool center) {
  __shared__ double shared[kThreads / 32];
  for (int64_t t = blockIdx.x; t < tasks; t += gridDim.x) {
    const int64_t row = t % rows;
    const T* x = xhat + row * d;
    const T* av = a + row * d;
    const T* rav = ra + t * d;
    const T* rxv = rxhat + t * d;
    double sa = 0, sax = 0, sra = 0, srax = 0, sarx = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      sa += double(av[i]);
      sax += double(av[i]) * double(x[i]);
      sra += double(rav[i]);
      srax += double(rav[i]) * double(x[i]);
      sarx += double(av[i]) * double(rxv[i]);
    }
    sa = block_sum(sa, shared);
    sax = block_sum(sax, shared);
    sra = block_sum(sra, shared);
    srax = block_sum(srax, shared);
    sarx = block_sum(sarx, shared);
    const T ma = center ? T(sa / d) : T(0), mra = center ? T(sra / d) : T(0);
    const T max_ = T(sax / d), mrx = T((srax + sarx) / d);
    const T r = rstd[row];
    const T r2m = r * r * m1[t];
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const T c = av[i] - ma - x[i] * max_;
      const T rc = rav[i] - mra - rxv[i] * max_ - x[i] * mrx;
      out[t * d + i] = r * rc - r2m * c;
    }
  }
}

int blocks_for(int64_t tasks) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tasks, 65535LL * 16))); }

std::tuple<at::Tensor, at::Tensor> norm_rforward_cuda(const at::Tensor& xhat, const at::Tensor& rstd,
                                                      const at::Tensor& rx, bool center) {
  check_norm_rows(xhat, rstd, rx, "rx");
  const c10::cuda::CUDAGuard guard(xhat.device());
  const at::Tensor xc = xhat.contiguous(), rc = rstd.contiguous(), rxc = rx.contiguous();
  at::Tensor rxhat = at::empty_like(rxc, at::MemoryFormat::Contiguous);
  at::Tensor m1 = at::zeros({rxc.size(0), rxc.size(1)}, rxc.options());
  const int64_t tasks = rxc.size(0) * rxc.size(1), rows = xc.size(0), d = xc.size(1);
  if (rxhat.numel() == 0) return {rxhat, m1};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(xhat.scalar_type(), "norm_rforward_cuda", [&] {
    norm_rforward_kernel<scalar_t><<<blocks_for(tasks), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(), rxc.const_data_ptr<scalar_t>(),
        rxhat.mutable_data_ptr<scalar_t>(), m1.mutable_data_ptr<scalar_t>(), tasks, rows, d, center);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rxhat, m1};
}

at::Tensor norm_rbackward_cuda(const at::Tensor& xhat, const at::Tensor& rstd, const at::Tensor& a, const at::Tensor& ra,
                               const at::Tensor& rxhat, const at::Tensor& m1, bool center) {
  check_norm_rows(xhat, rstd, ra, "ra");
  check_norm_rows(xhat, rstd, rxhat, "rxhat");
  TORCH_CHECK(a.sizes() == xhat.sizes() && a.scalar_type() == xhat.scalar_type(),
              "hessgap: a must be like xhat (rows, D), got ", a.sizes());
  TORCH_CHECK(ra.size(0) == rxhat.size(0) && m1.dim() == 2 && m1.size(0) == ra.size(0) && m1.size(1) == xhat.size(0),
              "hessgap: ra, rxhat and m1 must hold the same k directions: (k, rows, D), (k, rows, D), (k, rows)");
  const c10::cuda::CUDAGuard guard(xhat.device());
  const at::Tensor xc = xhat.contiguous(), rc = rstd.contiguous(), ac = a.contiguous(), rac = ra.contiguous(),
                   rxc = rxhat.contiguous(), mc = m1.contiguous();
  at::Tensor out = at::empty_like(rac, at::MemoryFormat::Contiguous);
  const int64_t tasks = rac.size(0) * rac.size(1), rows = xc.size(0), d = xc.size(1);
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(xhat.scalar_type(), "norm_rbackward_cuda", [&] {
    norm_rbackward_kernel<scalar_t><<<blocks_for(tasks), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(),
        rac.const_data_ptr<scalar_t>(), rxc.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), tasks, rows, d, center);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hessgap, CUDA, m) {
  m.impl("norm_rforward", &norm_rforward_cuda);
  m.impl("norm_rbackward", &norm_rbackward_cuda);
}

}  // namespace hessgap
