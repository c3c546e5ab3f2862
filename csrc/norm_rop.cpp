// Row-wise R-operator pieces of LayerNorm, RMSNorm and GroupNorm for k directions: the schemas of
// torch.ops.hessgap.norm_rforward / norm_rbackward and their CPU kernels (math: hessgap/ops/norm_rop.py).
//
//   norm_rforward(xhat, rstd, rx, center)                  -> (rxhat, m1)
//   norm_rbackward(xhat, rstd, a, ra, rxhat, m1, center)   -> rgx
//
// One task per (direction, row): the row of x̂ and a stays in cache while each direction's row is read
// twice and written once, where a composition of tensor ops makes about a dozen passes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "hessgap/norm_rop.h"

namespace hessgap {
namespace {

std::tuple<at::Tensor, at::Tensor> norm_rforward_cpu(const at::Tensor& xhat, const at::Tensor& rstd,
                                                     const at::Tensor& rx, bool center) {
  check_norm_rows(xhat, rstd, rx, "rx");
  const at::Tensor xc = xhat.contiguous(), rc = rstd.contiguous(), rxc = rx.contiguous();
  at::Tensor rxhat = at::empty_like(rxc, at::MemoryFormat::Contiguous);
  at::Tensor m1 = at::empty({rxc.size(0), rxc.size(1)}, rxc.options());
  const int64_t k = rxc.size(0), rows = xc.size(0), d = xc.size(1);
  if (rxhat.numel() == 0) return {rxhat, m1.zero_()};
  AT_DISPATCH_FLOATING_TYPES(xhat.scalar_type(), "norm_rforward_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const scalar_t* tp = rxc.const_data_ptr<scalar_t>();
    scalar_t* op = rxhat.mutable_data_ptr<scalar_t>();
    scalar_t* mp = m1.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
    at::parallel_for(0, k * rows, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = t % rows;
        const scalar_t* x = xp + row * d;
        const scalar_t* r = tp + t * d;
        double sum = 0, dot = 0;
        for (int64_t i = 0; i < d; ++i) {
          sum += r[i];
          dot += static_cast<double>(x[i]) * r[i];
        }
        const scalar_t mean = center ? static_cast<scalar_t>(sum / d) : scalar_t(0);
        const scalar_t m = static_cast<scalar_t>(dot / d);
        const scalar_t s = rp[row];
        scalar_t* o = op + t * d;
        for (int64_t i = 0; i < d; ++i) o[i] = s * (r[i] - mean - x[i] * m);
        mp[t] = m;
      }
    });
  });
  return {rxhat, m1};
}

at::Tensor norm_rbackward_cpu(const at::Tensor& xhat, const at::Tensor& rstd, const at::Tensor& a,
                              const at::Tensor& ra, const at::Tensor& rxhat, const at::Tensor& m1, bool center) {
  check_norm_rows(xhat, rstd, ra, "ra");
  check_norm_rows(xhat, rstd, rxhat, "rxhat");
  TORCH_CHECK(a.sizes() == xhat.sizes() && a.scalar_type() == xhat.scalar_type(),
              "hessgap: a must be like xhat (rows, D), got ", a.sizes());
  TORCH_CHECK(ra.size(0) == rxhat.size(0) && m1.dim() == 2 && m1.size(0) == ra.size(0) && m1.size(1) == xhat.size(0),
              "hessgap: ra, rxhat and m1 must hold the same k directions: (k, rows, D), (k, rows, D), (k, rows)");
  const at::Tensor xc = xhat.contiguous(), rc = rstd.contiguous(), ac = a.contiguous(), rac = ra.contiguous(),
                   rxc = rxhat.contiguous(), mc = m1.contiguous();
  at::Tensor out = at::empty_like(rac, at::MemoryFormat::Contiguous);
  const int64_t k = rac.size(0), rows = xc.size(0), d = xc.size(1);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(xhat.scalar_type(), "norm_rbackward_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* rap = rac.const_data_ptr<scalar_t>();
    const scalar_t* rxp = rxc.const_data_ptr<scalar_t>();
    const scalar_t* mp = mc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
    at::parallel_for(0, k * rows, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = t % rows;
        const scalar_t* x = xp + row * d;
        const scalar_t* av = ap + row * d;
        const scalar_t* rav = rap + t * d;
        const scalar_t* rxv = rxp + t * d;
        double sa = 0, sax = 0, sra = 0, srax = 0, sarx = 0;
        for (int64_t i = 0; i < d; ++i) {
          sa += av[i];
          sax += static_cast<double>(av[i]) * x[i];
          sra += rav[i];
          srax += static_cast<double>(rav[i]) * x[i];
          sarx += static_cast<double>(av[i]) * rxv[i];
        }
        const scalar_t ma = center ? static_cast<scalar_t>(sa / d) : scalar_t(0);
        const scalar_t mra = center ? static_cast<scalar_t>(sra / d) : scalar_t(0);
        const scalar_t max_ = static_cast<scalar_t>(sax / d);
        const scalar_t mrx = static_cast<scalar_t>((srax + sarx) / d);
        const scalar_t r = rp[row];
        const scalar_t r2m = r * r * mp[t];
        scalar_t* o = op + t * d;
        for (int64_t i = 0; i < d; ++i) {
          const scalar_t c = av[i] - ma - x[i] * max_;
          const scalar_t rcv = rav[i] - mra - rxv[i] * max_ - x[i] * mrx;
          o[i] = r * rcv - r2m * c;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hessgap, m) {
  m.def("norm_rforward(Tensor xhat, Tensor rstd, Tensor rx, bool center) -> (Tensor, Tensor)");
  m.def("norm_rbackward(Tensor xhat, Tensor rstd, Tensor a, Tensor ra, Tensor rxhat, Tensor m1, bool center) -> Tensor");
}

TORCH_LIBRARY_IMPL(hessgap, CPU, m) {
  m.impl("norm_rforward", &norm_rforward_cpu);
  m.impl("norm_rbackward", &norm_rbackward_cpu);
}

}  // namespace hessgap
