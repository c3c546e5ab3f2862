// hessgap::box_ascent_step: the CUDA kernel (schema, argument checks and CPU kernel: csrc/box_ascent.cpp;
// per-element math shared with the CPU kernel: include/hessgap/box_ascent_math.h).
//
// Multi-tensor apply: every tensor is cut into chunks of kChunk elements, one block per chunk, and one
// launch covers up to kMaxTensors tensors, whose pointers travel in the kernel's arguments (no device
// table to copy). Each block reduces its chunk's three sums in double and writes them to its own row of
// a partials buffer, which one at::sum folds into the result: no atomics, so the result is the same at
// every run.
// this file's copy of the shared kernel functions (see box_ascent_math.h)
#define HESSGAP_KERNEL_NS cuda_kernels

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "hessgap/box_ascent.h"
#include "hessgap/box_ascent_math.h"

namespace hessgap {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kMaxTensors = 48;    // per launch; keeps the table well under the 4 KiB argument limit
constexpr int kWarp = 32;

// Pointers of one launch: operand k of tensor t is ptr[k][t]; tensor t owns blocks
// [first_block[t], first_block[t + 1]).
struct LaunchTable {
  enum Operand { kX = 0, kY, kGrad, kParams, kPrev, kOperands };
  void* ptr[kOperands][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t first_block[kMaxTensors + 1];
  int32_t num_tensors;
};
static_assert(sizeof(LaunchTable) + 256 < 4096, "kernel arguments must stay under 4 KiB");

// 16 bytes of S: the vector load/store width used when a chunk's pointers are all 16-byte aligned.
template <typename S>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(S);
  S v[kSize];
};

__device__ inline double warp_sum(double v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums the three per-thread values over the block; thread 0 writes them to out[0..2].
__device__ inline void block_sum3_to(double a, double b, double c, double* out) {
  __shared__ double warp_partials[kThreads / kWarp][kBoxAscentReductions];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    warp_partials[warp][0] = a;
    warp_partials[warp][1] = b;
    warp_partials[warp][2] = c;
  }
  __syncthreads();
  if (warp == 0) {
    constexpr int kWarps = kThreads / kWarp;
    a = lane < kWarps ? warp_partials[lane][0] : 0.0;
    b = lane < kWarps ? warp_partials[lane][1] : 0.0;
    c = lane < kWarps ? warp_partials[lane][2] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
    if (lane == 0) {
      out[0] = a;
      out[1] = b;
      out[2] = c;
    }
  }
}

template <typename S>
__device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// One coordinate: updates y, params (and m), adds to the thread's sums.
template <typename S, bool kMomentum>
__device__ inline void step_one(S x, S& y, S g, S& p, S& m, const BoxAscentConstants<S>& c, double& sq,
                                double& face, double& pred) {
  const BoxAscentElement<S> e = box_ascent_element<kMomentum>(x, y, g, m, c);
  y = e.y_new;
  p = ElementOps<S>::add(x, e.y_new);
  if (kMomentum) m = e.delta;
  const double d = static_cast<double>(e.delta);
  sq += d * d;
  face += static_cast<double>(on_face(e.y_new, e.radius));
  pred += static_cast<double>(g) * d;
}

template <typename S, bool kMomentum>
__global__ void __launch_bounds__(kThreads)
    box_ascent_kernel(const LaunchTable table, const BoxAscentConstants<S> c, double* __restrict__ partials) {
  // This block's tensor: the last t with first_block[t] <= blockIdx.x (at most kMaxTensors entries).
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int t = 0;
  while (t + 1 < table.num_tensors && table.first_block[t + 1] <= block) ++t;
  const int64_t begin = static_cast<int64_t>(block - table.first_block[t]) * kChunk;
  const int64_t n = min(kChunk, table.numel[t] - begin);

  const S* __restrict__ x = static_cast<const S*>(table.ptr[LaunchTable::kX][t]) + begin;
  S* __restrict__ y = static_cast<S*>(table.ptr[LaunchTable::kY][t]) + begin;
  const S* __restrict__ g = static_cast<const S*>(table.ptr[LaunchTable::kGrad][t]) + begin;
  S* __restrict__ p = static_cast<S*>(table.ptr[LaunchTable::kParams][t]) + begin;
  S* __restrict__ m = kMomentum ? static_cast<S*>(table.ptr[LaunchTable::kPrev][t]) + begin : nullptr;

  double sq = 0.0, face = 0.0, pred = 0.0;
  int64_t scalar_from = 0;
  const bool vectorizable = aligned16<S>(x) && aligned16<S>(y) && aligned16<S>(g) && aligned16<S>(p) &&
                            (!kMomentum || aligned16<S>(m));
  if (vectorizable) {
    using P = Pack<S>;
    const int64_t packs = n / P::kSize;
    for (int64_t k = threadIdx.x; k < packs; k += kThreads) {
      const P xv = reinterpret_cast<const P*>(x)[k];
      P yv = reinterpret_cast<const P*>(y)[k];
      const P gv = reinterpret_cast<const P*>(g)[k];
      P mv;
      if (kMomentum) mv = reinterpret_cast<const P*>(m)[k];
      P pv;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) {
        S mj = kMomentum ? mv.v[j] : S(0);
        step_one<S, kMomentum>(xv.v[j], yv.v[j], gv.v[j], pv.v[j], mj, c, sq, face, pred);
        if (kMomentum) mv.v[j] = mj;
      }
      reinterpret_cast<P*>(y)[k] = yv;
      reinterpret_cast<P*>(p)[k] = pv;
      if (kMomentum) reinterpret_cast<P*>(m)[k] = mv;
    }
    scalar_from = packs * P::kSize;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += kThreads) {
    S yi = y[i], pi, mi = kMomentum ? m[i] : S(0);
    step_one<S, kMomentum>(x[i], yi, g[i], pi, mi, c, sq, face, pred);
    y[i] = yi;
    p[i] = pi;
    if (kMomentum) m[i] = mi;
  }
  block_sum3_to(sq, face, pred, partials + static_cast<int64_t>(block) * kBoxAscentReductions);
}

template <typename S, bool kMomentum>
void launch_all(const DenseOperands& t, const BoxAscentConstants<S>& c, double* partials) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LaunchTable table{};
  int64_t blocks_done = 0;  // rows of `partials` written by earlier launches
  auto launch = [&] {
    const int32_t blocks = table.first_block[table.num_tensors];
    if (blocks > 0) {
      box_ascent_kernel<S, kMomentum><<<blocks, kThreads, 0, stream>>>(
          table, c, partials + blocks_done * kBoxAscentReductions);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    blocks_done += blocks;
    table.num_tensors = 0;
    table.first_block[0] = 0;
  };
  for (size_t i = 0; i < t.size(); ++i) {
    const int64_t n = t.x[i].numel();
    if (n == 0) continue;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    const int32_t first = table.first_block[table.num_tensors];
    // Block indices are int32 and a grid holds at most 2^31 - 1 blocks: start a new launch before either overflows.
    if (static_cast<int64_t>(first) + chunks > INT32_MAX) launch();
    TORCH_CHECK(chunks <= INT32_MAX, "hessgap: parameter ", i, " has ", n,
                " elements, more than box_ascent_step's CUDA kernel can address");
    const int k = table.num_tensors;
    table.ptr[LaunchTable::kX][k] = t.x[i].data_ptr();
    table.ptr[LaunchTable::kY][k] = t.y[i].data_ptr();
    table.ptr[LaunchTable::kGrad][k] = t.grad[i].data_ptr();
    table.ptr[LaunchTable::kParams][k] = t.params[i].data_ptr();
    table.ptr[LaunchTable::kPrev][k] = kMomentum ? t.prev_step[i].data_ptr() : nullptr;
    table.numel[k] = n;
    table.first_block[k + 1] = table.first_block[k] + static_cast<int32_t>(chunks);
    table.num_tensors = k + 1;
    if (table.num_tensors == kMaxTensors) launch();
  }
  launch();
}

at::Tensor box_ascent_step_cuda(at::TensorList x, at::TensorList y, at::TensorList grad, at::TensorList params,
                                std::optional<at::TensorList> prev_step, double step, double epsilon, int64_t box,
                                int64_t direction, double momentum) {
  const BoxAscentOptions options =
      check_box_ascent_args(x, y, grad, params, prev_step, step, epsilon, box, direction, momentum);
  TORCH_CHECK(x[0].is_cuda(), "hessgap: box_ascent_step's CUDA kernel got tensors on ", x[0].device());
  const c10::cuda::CUDAGuard device_guard(x[0].device());
  DenseOperands operands(x, y, grad, params, prev_step, options.use_momentum);

  int64_t total_blocks = 0;
  for (const at::Tensor& xi : operands.x) total_blocks += (xi.numel() + kChunk - 1) / kChunk;
  const at::TensorOptions double_options = x[0].options().dtype(at::kDouble);
  if (total_blocks == 0) {
    operands.finish();
    return at::zeros({kBoxAscentReductions}, double_options);
  }
  at::Tensor partials = at::empty({total_blocks, kBoxAscentReductions}, double_options);
  AT_DISPATCH_FLOATING_TYPES(x[0].scalar_type(), "hessgap::box_ascent_step (CUDA)", [&] {
    const auto c = options.constants<scalar_t>();
    if (options.use_momentum) {
      launch_all<scalar_t, true>(operands, c, partials.data_ptr<double>());
    } else {
      launch_all<scalar_t, false>(operands, c, partials.data_ptr<double>());
    }
  });
  operands.finish();
  return partials.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(hessgap, CUDA, m) { m.impl("box_ascent_step", &box_ascent_step_cuda); }

}  // namespace hessgap
