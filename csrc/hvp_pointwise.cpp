// Element-wise second-order pieces of hessgap's fused R-operator (forward-over-reverse) engine, for k
// directions at once: the schemas of torch.ops.hessgap.hvp_* and their CPU kernels.
//
//   hvp_act_jvp(z, t)                  out[j] = σ'(z) ⊙ t[j]                       (R{a} = σ'(z) R{z})
//   hvp_act_rbackward(z, g, rz, rg)    out[j] = σ'(z) ⊙ rg[j] + σ''(z) ⊙ g ⊙ rz[j]  (R{∂L/∂z})
//   hvp_softmax_ce_rgrad(p, rz, s)     out[j] = s · p ⊙ (rz[j] − ⟨p, rz[j]⟩_row)   (softmax-CE Hessian · R{z})
//
// z, g, p hold one batch; t, rz, rg, out have one more leading dimension k (the directions). σ' and σ''
// are computed once per element and reused for all k directions, which is the point of fusing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "hessgap/checks.h"
#include "hessgap/hvp_activation.h"
#include "hessgap/hvp_checks.h"

namespace hessgap {
namespace {

// Elements per block: σ', σ'' of a block live on the stack while the k directions stream through it.
constexpr int64_t kBlock = 512;

at::Tensor act_jvp_cpu(const at::Tensor& z, const at::Tensor& t, c10::string_view kind, double slope) {
  check_directions(z, "z", t, "t");
  const HvpActivation act = hvp_activation_from_name(std::string(kind));
  const at::Tensor zc = z.contiguous(), tc = t.contiguous();
  at::Tensor out = at::empty_like(tc, at::MemoryFormat::Contiguous);
  const int64_t n = zc.numel(), k = tc.size(0);
  if (n == 0 || k == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "hvp_act_jvp_cpu", [&] {
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* tp = tc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(slope);
    at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
      scalar_t d1[kBlock];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t i0 = blk * kBlock, len = std::min(kBlock, n - i0);
        for (int64_t i = 0; i < len; ++i) {
          scalar_t unused;
          hvp_activation_derivatives<scalar_t>(act, s, zp[i0 + i], d1[i], unused);
        }
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* tj = tp + j * n + i0;
          scalar_t* oj = op + j * n + i0;
          for (int64_t i = 0; i < len; ++i) oj[i] = d1[i] * tj[i];
        }
      }
    });
  });
  return out;
}

at::Tensor act_rbackward_cpu(const at::Tensor& z, const at::Tensor& g, const at::Tensor& rz, const at::Tensor& rg,
                             c10::string_view kind, double slope) {
  check_act_rbackward_args(z, g, rz, rg);
  const HvpActivation act = hvp_activation_from_name(std::string(kind));
  const at::Tensor zc = z.contiguous(), gc = g.contiguous(), rzc = rz.contiguous(), rgc = rg.contiguous();
  at::Tensor out = at::empty_like(rgc, at::MemoryFormat::Contiguous);
  const int64_t n = zc.numel(), k = rzc.size(0);
  if (n == 0 || k == 0) return out;
  const bool piecewise_linear = act == HvpActivation::ReLU || act == HvpActivation::LeakyReLU;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "hvp_act_rbackward_cpu", [&] {
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* rzp = rzc.const_data_ptr<scalar_t>();
    const scalar_t* rgp = rgc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(slope);
    at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
      scalar_t d1[kBlock], d2g[kBlock];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t i0 = blk * kBlock, len = std::min(kBlock, n - i0);
        for (int64_t i = 0; i < len; ++i) {
          scalar_t d2;
          hvp_activation_derivatives<scalar_t>(act, s, zp[i0 + i], d1[i], d2);
          d2g[i] = d2 * gp[i0 + i];
        }
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* rgj = rgp + j * n + i0;
          const scalar_t* rzj = rzp + j * n + i0;
          scalar_t* oj = op + j * n + i0;
          if (piecewise_linear) {  // σ'' = 0: skip reading rz
            for (int64_t i = 0; i < len; ++i) oj[i] = d1[i] * rgj[i];
          } else {
            for (int64_t i = 0; i < len; ++i) oj[i] = d1[i] * rgj[i] + d2g[i] * rzj[i];
          }
        }
      }
    });
  });
  return out;
}

at::Tensor softmax_ce_rgrad_cpu(const at::Tensor& p, const at::Tensor& rz, double scale) {
  check_softmax_ce_args(p, rz);
  const at::Tensor pc = p.contiguous(), rzc = rz.contiguous();
  at::Tensor out = at::empty_like(rzc, at::MemoryFormat::Contiguous);
  const int64_t batch = pc.size(0), classes = pc.size(1), k = rzc.size(0);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "hvp_softmax_ce_rgrad_cpu", [&] {
    const scalar_t* pp = pc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rzc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    // one task per (direction, row); a row is short (the classes), so grain over many rows
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(classes, 1));
    at::parallel_for(0, k * batch, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* prow = pp + (r % batch) * classes;
        const scalar_t* rrow = rp + r * classes;
        scalar_t* orow = op + r * classes;
        // accumulate the row's dot product in double for float32 too: rows can have thousands of classes
        double dot = 0;
        for (int64_t c = 0; c < classes; ++c) dot += static_cast<double>(prow[c]) * static_cast<double>(rrow[c]);
        const scalar_t d = static_cast<scalar_t>(dot);
        for (int64_t c = 0; c < classes; ++c) orow[c] = sc * prow[c] * (rrow[c] - d);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hessgap, m) {
  m.def("hvp_act_jvp(Tensor z, Tensor t, str kind, float slope=0.01) -> Tensor");
  m.def("hvp_act_rbackward(Tensor z, Tensor g, Tensor rz, Tensor rg, str kind, float slope=0.01) -> Tensor");
  m.def("hvp_softmax_ce_rgrad(Tensor p, Tensor rz, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hessgap, CPU, m) {
  m.impl("hvp_act_jvp", &act_jvp_cpu);
  m.impl("hvp_act_rbackward", &act_rbackward_cpu);
  m.impl("hvp_softmax_ce_rgrad", &softmax_ce_rgrad_cpu);
}

}  // namespace hessgap
