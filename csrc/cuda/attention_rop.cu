// CUDA kernels of torch.ops.hessgap.attention_* (schemas and CPU twins in csrc/attention_rop.cpp; math in
// hessgap/ops/attention_rop.py).
//
// Flash-style: a block holds kWarps query rows (one warp each) of one (batch, head) and, for the R-ops, one
// direction (grid z); it walks the keys in tiles of kBK rows staged in shared memory, recomputing each tile's
// probabilities from Q, K and the rows' log-sum-exp. Lane j of a warp owns key j of the tile (its score, its
// probability) and output columns j, j + 32, ... of the row. Nothing of size T×T is ever stored: besides
// inputs and outputs the memory is O(T) per direction (ρ). Key-side gradients (∂K, ∂V and their R-parts)
// collect the rows' contributions with atomicAdd.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "hessgap/attention_rop.h"

namespace hessgap {
namespace {

constexpr int kWarps = 4;
constexpr int kBK = 32;
constexpr int kMaxPerLane = 8;  // head dimensions up to 256

template <typename T>
struct Args {
  const T *q = nullptr, *k = nullptr, *v = nullptr, *bias = nullptr, *o = nullptr, *lse = nullptr, *g = nullptr;
  const T *rq = nullptr, *rk = nullptr, *rv = nullptr, *ro = nullptr, *rho = nullptr, *rg = nullptr;
  T *out0 = nullptr, *out1 = nullptr, *out2 = nullptr;
  int64_t B = 0, H = 0, Tq = 0, Tk = 0, D = 0, Dv = 0;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  T scale = 1;
  bool causal = false;
};

__device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ inline T larger(T a, T b) { return a > b ? a : b; }

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v = larger(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// rows [j0, j0 + bk) of a (T, width) matrix into shared memory with row stride width + 1 (no bank conflicts)
template <typename T>
__device__ void load_tile(T* dst, const T* src, int64_t j0, int bk, int64_t width) {
  for (int64_t x = threadIdx.x; x < bk * width; x += blockDim.x) {
    const int64_t r = x / width, c = x % width;
    dst[r * (width + 1) + c] = src[(j0 + r) * width + c];
  }
}

template <typename T>
__device__ void load_row(T* dst, const T* src, int64_t width, int lane) {
  for (int64_t c = lane; c < width; c += 32) dst[c] = src[c];
}

// scale · ⟨a, tile row⟩ for this lane's key, a in shared memory
template <typename T>
__device__ T tile_dot(const T* a, const T* tile, int lane, int64_t width) {
  const T* row = tile + lane * (width + 1);
  T s = 0;
  for (int64_t c = 0; c < width; ++c) s += a[c] * row[c];
  return s;
}

// the score of (row i, key j) with bias and causal mask; −∞ when masked or outside the tile
template <typename T>
__device__ T masked(const Args<T>& a, T s, int64_t n, int64_t i, int64_t j, bool inside) {
  if (!inside) return -INFINITY;
  if (a.bias) s += a.bias[(n / a.H) * a.sb + (n % a.H) * a.sh + i * a.si + j * a.sj];
  if (a.causal && j > i) return -INFINITY;
  return s;
}

struct Shared {
  // offsets (in elements) of the tiles and the per-warp rows in dynamic shared memory
  int64_t kt, vt, rkt, rvt, rows, row_width;
};

template <typename T>
__device__ T* smem() {
  extern __shared__ __align__(16) unsigned char raw[];
  return reinterpret_cast<T*>(raw);
}

inline Shared layout(int64_t D, int64_t Dv) {
  Shared s;
  s.kt = 0;
  s.vt = s.kt + kBK * (D + 1);
  s.rkt = s.vt + kBK * (Dv + 1);
  s.rvt = s.rkt + kBK * (D + 1);
  s.rows = s.rvt + kBK * (Dv + 1);
  s.row_width = 2 * D + 2 * Dv;  // q, rq, g, rg
  return s;
}

inline int64_t shared_bytes(const Shared& s, size_t item) { return (s.rows + kWarps * s.row_width) * item; }

// ---- forward ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void forward_kernel(Args<T> a, Shared lay) {
  T* sm = smem<T>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = blockIdx.y, i = int64_t(blockIdx.x) * kWarps + warp;
  const bool row_ok = i < a.Tq;
  T* qs = sm + lay.rows + warp * lay.row_width;
  if (row_ok) load_row(qs, a.q + (n * a.Tq + i) * a.D, a.D, lane);
  T acc[kMaxPerLane];
  for (int r = 0; r < kMaxPerLane; ++r) acc[r] = 0;
  T m = -INFINITY, l = 0;
  const int64_t last_row = min64(a.Tq, int64_t(blockIdx.x + 1) * kWarps) - 1;
  for (int64_t j0 = 0; j0 < a.Tk; j0 += kBK) {
    if (a.causal && j0 > last_row) break;
    const int bk = static_cast<int>(min64(kBK, a.Tk - j0));
    __syncthreads();
    load_tile(sm + lay.kt, a.k + n * a.Tk * a.D, j0, bk, a.D);
    load_tile(sm + lay.vt, a.v + n * a.Tk * a.Dv, j0, bk, a.Dv);
    __syncthreads();
    if (!row_ok) continue;
    const int64_t j = j0 + lane;
    T s = lane < bk ? a.scale * tile_dot(qs, sm + lay.kt, lane, a.D) : T(0);
    s = masked(a, s, n, i, j, lane < bk);
    const T m_new = larger(m, warp_max(s));
    if (m_new == -INFINITY) continue;
    const T shrink = m == -INFINITY ? T(0) : exp(m - m_new);
    const T p = s == -INFINITY ? T(0) : exp(s - m_new);
    l = l * shrink + warp_sum(p);
    for (int r = 0; r < kMaxPerLane; ++r) acc[r] *= shrink;
    for (int jj = 0; jj < bk; ++jj) {
      const T pj = __shfl_sync(0xffffffffu, p, jj);
      const T* vrow = sm + lay.vt + jj * (a.Dv + 1);
      for (int r = 0; r < kMaxPerLane && lane + 32 * r < a.Dv; ++r) acc[r] += pj * vrow[lane + 32 * r];
    }
    m = m_new;
  }
  if (!row_ok) return;
  for (int r = 0; r < kMaxPerLane && lane + 32 * r < a.Dv; ++r)
    a.out0[(n * a.Tq + i) * a.Dv + lane + 32 * r] = l > 0 ? acc[r] / l : T(0);
  if (lane == 0) a.out1[n * a.Tq + i] = l > 0 ? m + log(l) : T(-INFINITY);
}

// ---- first-order backward and both R-ops share one walk over the key tiles ----------------------------------

// MODE 0: first-order backward (out0 = ∂Q, out1 = ∂K, out2 = ∂V)
// MODE 1: R-forward (out0 = R{O}, out1 = ρ)
// MODE 2: R-backward (out0 = R{∂Q}, out1 = R{∂K}, out2 = R{∂V})
template <typename T, int MODE>
__global__ void walk_kernel(Args<T> a, Shared lay) {
  T* sm = smem<T>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = blockIdx.y, i = int64_t(blockIdx.x) * kWarps + warp, dir = blockIdx.z;
  const bool row_ok = i < a.Tq;
  const bool tangents = MODE != 0;
  const int64_t sq = a.B * a.H * a.Tq * a.D, sk = a.B * a.H * a.Tk * a.D, sv = a.B * a.H * a.Tk * a.Dv,
                so = a.B * a.H * a.Tq * a.Dv;
  T* qs = sm + lay.rows + warp * lay.row_width;
  T* rqs = qs + a.D;
  T* gs = rqs + a.D;
  T* rgs = gs + a.Dv;
  const int64_t row = n * a.Tq + i;
  T delta = 0, rdelta = 0, rho = 0, lse = -INFINITY;
  if (row_ok) {
    load_row(qs, a.q + row * a.D, a.D, lane);
    if (tangents) load_row(rqs, a.rq + dir * sq + row * a.D, a.D, lane);
    if (MODE != 1) load_row(gs, a.g + row * a.Dv, a.Dv, lane);
    const bool has_rg = MODE == 2 && a.rg != nullptr;
    if (has_rg) load_row(rgs, a.rg + dir * so + row * a.Dv, a.Dv, lane);
    lse = a.lse[row];
    if (MODE != 1) {
      T x = 0, rx = 0;
      for (int64_t c = lane; c < a.Dv; c += 32) {
        const T oc = a.o[row * a.Dv + c];
        x += a.g[row * a.Dv + c] * oc;
        if (MODE == 2) {
          rx += a.g[row * a.Dv + c] * a.ro[dir * so + row * a.Dv + c];
          if (has_rg) rx += a.rg[dir * so + row * a.Dv + c] * oc;
        }
      }
      delta = warp_sum(x);
      rdelta = warp_sum(rx);
    }
    if (MODE == 2) rho = a.rho[dir * a.B * a.H * a.Tq + row];
  }
  __syncwarp();
  const bool finite = lse != -INFINITY;
  T acc[kMaxPerLane];   // MODE 0: ∂Q row; MODE 1: R{O} row (before − ρ·O); MODE 2: R{∂Q} row
  for (int r = 0; r < kMaxPerLane; ++r) acc[r] = 0;
  T rho_sum = 0;
  const int64_t last_row = min64(a.Tq, int64_t(blockIdx.x + 1) * kWarps) - 1;
  const int64_t width_q = MODE == 1 ? a.Dv : a.D;  // the acc row's width
  for (int64_t j0 = 0; j0 < a.Tk; j0 += kBK) {
    if (a.causal && j0 > last_row) break;
    const int bk = static_cast<int>(min64(kBK, a.Tk - j0));
    __syncthreads();
    load_tile(sm + lay.kt, a.k + n * a.Tk * a.D, j0, bk, a.D);
    load_tile(sm + lay.vt, a.v + n * a.Tk * a.Dv, j0, bk, a.Dv);
    if (tangents) {
      load_tile(sm + lay.rkt, a.rk + dir * sk + n * a.Tk * a.D, j0, bk, a.D);
      load_tile(sm + lay.rvt, a.rv + dir * sv + n * a.Tk * a.Dv, j0, bk, a.Dv);
    }
    __syncthreads();
    if (!row_ok || !finite) continue;
    const bool inside = lane < bk;
    const int64_t j = j0 + lane;
    T s = inside ? a.scale * tile_dot(qs, sm + lay.kt, lane, a.D) : T(0);
    s = masked(a, s, n, i, j, inside);
    const T p = s == -INFINITY ? T(0) : exp(s - lse);
    T rs = 0, dp = 0, ds = 0, rp = 0, rds = 0;
    if (tangents && inside)
      rs = p > 0 ? a.scale * (tile_dot(rqs, sm + lay.kt, lane, a.D) + tile_dot(qs, sm + lay.rkt, lane, a.D)) : T(0);
    if (MODE != 1 && inside) {
      dp = tile_dot(gs, sm + lay.vt, lane, a.Dv) - delta;  // dP − δ
      ds = p * dp;
    }
    if (MODE == 2 && inside) {
      T rdp = tile_dot(gs, sm + lay.rvt, lane, a.Dv);
      if (a.rg) rdp += tile_dot(rgs, sm + lay.vt, lane, a.Dv);
      rp = p * (rs - rho);
      rds = rp * dp + p * (rdp - rdelta);
    }
    if (MODE == 1) rho_sum += p * rs;
    // the row's own accumulator: a sum over this tile's keys, each lane its columns
    for (int jj = 0; jj < bk; ++jj) {
      if (MODE == 1) {
        const T w1 = __shfl_sync(0xffffffffu, p * rs, jj), w2 = __shfl_sync(0xffffffffu, p, jj);
        const T* vrow = sm + lay.vt + jj * (a.Dv + 1);
        const T* rvrow = sm + lay.rvt + jj * (a.Dv + 1);
        for (int r = 0; r < kMaxPerLane && lane + 32 * r < width_q; ++r)
          acc[r] += w1 * vrow[lane + 32 * r] + w2 * rvrow[lane + 32 * r];
      } else {
        const T w1 = __shfl_sync(0xffffffffu, MODE == 0 ? ds : rds, jj);
        const T w2 = MODE == 2 ? __shfl_sync(0xffffffffu, ds, jj) : T(0);
        const T* krow = sm + lay.kt + jj * (a.D + 1);
        const T* rkrow = sm + lay.rkt + jj * (a.D + 1);
        for (int r = 0; r < kMaxPerLane && lane + 32 * r < width_q; ++r) {
          T x = w1 * krow[lane + 32 * r];
          if (MODE == 2) x += w2 * rkrow[lane + 32 * r];
          acc[r] += a.scale * x;
        }
      }
    }
    // the keys' accumulators, shared by every row: atomics
    if (MODE != 1 && inside && (p != 0 || rp != 0 || rds != 0)) {
      T* dk = a.out1 + (MODE == 2 ? dir * sk : 0) + (n * a.Tk + j) * a.D;
      T* dv = a.out2 + (MODE == 2 ? dir * sv : 0) + (n * a.Tk + j) * a.Dv;
      for (int64_t c = 0; c < a.D; ++c) {
        T x = MODE == 0 ? ds * qs[c] : rds * qs[c] + ds * rqs[c];
        atomicAdd(dk + c, a.scale * x);
      }
      for (int64_t c = 0; c < a.Dv; ++c) {
        T x = MODE == 0 ? p * gs[c] : rp * gs[c];
        if (MODE == 2 && a.rg) x += p * rgs[c];
        atomicAdd(dv + c, x);
      }
    }
  }
  if (!row_ok) return;
  if (MODE == 1) {
    rho_sum = warp_sum(rho_sum);
    for (int r = 0; r < kMaxPerLane && lane + 32 * r < a.Dv; ++r) {
      const int64_t c = lane + 32 * r;
      a.out0[dir * so + row * a.Dv + c] = acc[r] - rho_sum * a.o[row * a.Dv + c];
    }
    if (lane == 0) a.out1[dir * a.B * a.H * a.Tq + row] = rho_sum;
  } else {
    T* dq = a.out0 + (MODE == 2 ? dir * sq : 0) + row * a.D;
    for (int r = 0; r < kMaxPerLane && lane + 32 * r < a.D; ++r) dq[lane + 32 * r] = acc[r];
  }
}

// ---- launching ---------------------------------------------------------------------------------------------

template <typename T>
Args<T> base_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& bias,
                  bool causal, double scale) {
  Args<T> a;
  a.q = q.const_data_ptr<T>();
  a.k = k.const_data_ptr<T>();
  a.v = v.const_data_ptr<T>();
  a.B = q.size(0), a.H = q.size(1), a.Tq = q.size(2), a.Tk = k.size(2), a.D = q.size(3), a.Dv = v.size(3);
  const BiasView view = bias_view(bias);
  a.bias = static_cast<const T*>(view.data);
  a.sb = view.sb, a.sh = view.sh, a.si = view.si, a.sj = view.sj;
  a.scale = static_cast<T>(scale);
  a.causal = causal;
  return a;
}

void check_head_dims(const at::Tensor& q, const at::Tensor& v) {
  TORCH_CHECK(q.size(3) <= 32 * kMaxPerLane && v.size(3) <= 32 * kMaxPerLane,
              "hessgap: the CUDA attention kernels take head dimensions up to ", 32 * kMaxPerLane, ", got ", q.size(3),
              " and ", v.size(3));
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int64_t bytes, const at::Tensor& like) {
  int device_limit = 0;
  AT_CUDA_CHECK(cudaDeviceGetAttribute(&device_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, like.get_device()));
  TORCH_CHECK(bytes <= device_limit, "hessgap: attention tiles need ", bytes, " bytes of shared memory, the device has ",
              device_limit, "; use smaller head dimensions or float32");
  AT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  (void)grid;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                          const at::Tensor& v_, const c10::optional<at::Tensor>& bias,
                                                          bool causal, double scale) {
  check_attention(q_, k_, v_, bias);
  check_head_dims(q_, v_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (out.numel() == 0) return {out, lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_forward_cuda", [&] {
    Args<scalar_t> a = base_args<scalar_t>(q, k, v, bias, causal, scale);
    a.out0 = out.mutable_data_ptr<scalar_t>();
    a.out1 = lse.mutable_data_ptr<scalar_t>();
    const Shared lay = layout(a.D, a.Dv);
    const int64_t bytes = shared_bytes(lay, sizeof(scalar_t));
    const dim3 grid((a.Tq + kWarps - 1) / kWarps, a.B * a.H, 1);
    launch(forward_kernel<scalar_t>, grid, bytes, q);
    forward_kernel<scalar_t><<<grid, kWarps * 32, bytes, stream>>>(a, lay);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const c10::optional<at::Tensor>& bias,
    const at::Tensor& o_, const at::Tensor& lse_, const at::Tensor& g_, bool causal, double scale) {
  check_attention(q_, k_, v_, bias);
  check_head_dims(q_, v_);
  TORCH_CHECK(g_.sizes() == o_.sizes(), "hessgap: g must have the output's shape ", o_.sizes());
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), o = o_.contiguous(),
                   lse = lse_.contiguous(), g = g_.contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  if (q.numel() == 0 || k.numel() == 0) return {dq, dk, dv};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward_cuda", [&] {
    Args<scalar_t> a = base_args<scalar_t>(q, k, v, bias, causal, scale);
    a.o = o.const_data_ptr<scalar_t>();
    a.lse = lse.const_data_ptr<scalar_t>();
    a.g = g.const_data_ptr<scalar_t>();
    a.out0 = dq.mutable_data_ptr<scalar_t>();
    a.out1 = dk.mutable_data_ptr<scalar_t>();
    a.out2 = dv.mutable_data_ptr<scalar_t>();
    const Shared lay = layout(a.D, a.Dv);
    const int64_t bytes = shared_bytes(lay, sizeof(scalar_t));
    const dim3 grid((a.Tq + kWarps - 1) / kWarps, a.B * a.H, 1);
    launch(walk_kernel<scalar_t, 0>, grid, bytes, q);
    walk_kernel<scalar_t, 0><<<grid, kWarps * 32, bytes, stream>>>(a, lay);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_rforward_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const c10::optional<at::Tensor>& bias,
    const at::Tensor& o_, const at::Tensor& lse_, const at::Tensor& rq_, const at::Tensor& rk_, const at::Tensor& rv_,
    bool causal, double scale) {
  check_attention(q_, k_, v_, bias);
  check_head_dims(q_, v_);
  const int64_t K = rq_.size(0);
  check_stack(q_, rq_, "rq", K);
  check_stack(k_, rk_, "rk", K);
  check_stack(v_, rv_, "rv", K);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), o = o_.contiguous(),
                   lse = lse_.contiguous(), rq = rq_.contiguous(), rk = rk_.contiguous(), rv = rv_.contiguous();
  at::Tensor ro = at::zeros({K, q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor rho = at::zeros({K, q.size(0), q.size(1), q.size(2)}, q.options());
  if (ro.numel() == 0) return {ro, rho};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_rforward_cuda", [&] {
    Args<scalar_t> a = base_args<scalar_t>(q, k, v, bias, causal, scale);
    a.o = o.const_data_ptr<scalar_t>();
    a.lse = lse.const_data_ptr<scalar_t>();
    a.rq = rq.const_data_ptr<scalar_t>();
    a.rk = rk.const_data_ptr<scalar_t>();
    a.rv = rv.const_data_ptr<scalar_t>();
    a.out0 = ro.mutable_data_ptr<scalar_t>();
    a.out1 = rho.mutable_data_ptr<scalar_t>();
    const Shared lay = layout(a.D, a.Dv);
    const int64_t bytes = shared_bytes(lay, sizeof(scalar_t));
    const dim3 grid((a.Tq + kWarps - 1) / kWarps, a.B * a.H, K);
    launch(walk_kernel<scalar_t, 1>, grid, bytes, q);
    walk_kernel<scalar_t, 1><<<grid, kWarps * 32, bytes, stream>>>(a, lay);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ro, rho};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_rbackward_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const c10::optional<at::Tensor>& bias,
    const at::Tensor& o_, const at::Tensor& lse_, const at::Tensor& g_, const at::Tensor& rq_, const at::Tensor& rk_,
    const at::Tensor& rv_, const at::Tensor& ro_, const at::Tensor& rho_, const c10::optional<at::Tensor>& rg_,
    bool causal, double scale) {
  check_attention(q_, k_, v_, bias);
  check_head_dims(q_, v_);
  const int64_t K = rq_.size(0);
  check_stack(q_, rq_, "rq", K);
  check_stack(k_, rk_, "rk", K);
  check_stack(v_, rv_, "rv", K);
  check_stack(o_, ro_, "ro", K);
  const bool has_rg = rg_.has_value() && rg_->defined();
  if (has_rg) check_stack(o_, *rg_, "rg", K);
  TORCH_CHECK(g_.sizes() == o_.sizes(), "hessgap: g must have the output's shape ", o_.sizes());
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), o = o_.contiguous(),
                   lse = lse_.contiguous(), g = g_.contiguous(), rq = rq_.contiguous(), rk = rk_.contiguous(),
                   rv = rv_.contiguous(), ro = ro_.contiguous(), rho = rho_.contiguous();
  const at::Tensor rg = has_rg ? rg_->contiguous() : at::Tensor();
  at::Tensor rdq = at::zeros_like(rq), rdk = at::zeros_like(rk), rdv = at::zeros_like(rv);
  if (rdq.numel() == 0 || k.numel() == 0) return {rdq, rdk, rdv};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_rbackward_cuda", [&] {
    Args<scalar_t> a = base_args<scalar_t>(q, k, v, bias, causal, scale);
    a.o = o.const_data_ptr<scalar_t>();
    a.lse = lse.const_data_ptr<scalar_t>();
    a.g = g.const_data_ptr<scalar_t>();
    a.rq = rq.const_data_ptr<scalar_t>();
    a.rk = rk.const_data_ptr<scalar_t>();
    a.rv = rv.const_data_ptr<scalar_t>();
    a.ro = ro.const_data_ptr<scalar_t>();
    a.rho = rho.const_data_ptr<scalar_t>();
    a.rg = has_rg ? rg.const_data_ptr<scalar_t>() : nullptr;
    a.out0 = rdq.mutable_data_ptr<scalar_t>();
    a.out1 = rdk.mutable_data_ptr<scalar_t>();
    a.out2 = rdv.mutable_data_ptr<scalar_t>();
    const Shared lay = layout(a.D, a.Dv);
    const int64_t bytes = shared_bytes(lay, sizeof(scalar_t));
    const dim3 grid((a.Tq + kWarps - 1) / kWarps, a.B * a.H, K);
    launch(walk_kernel<scalar_t, 2>, grid, bytes, q);
    walk_kernel<scalar_t, 2><<<grid, kWarps * 32, bytes, stream>>>(a, lay);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rdq, rdk, rdv};
}

}  // namespace

TORCH_LIBRARY_IMPL(hessgap, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("attention_rforward", &attention_rforward_cuda);
  m.impl("attention_rbackward", &attention_rbackward_cuda);
}

}  // namespace hessgap
