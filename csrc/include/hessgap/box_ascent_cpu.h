// The CPU kernel of hessgap::box_ascent_step over one contiguous range, written once with
// at::vec::Vectorized and compiled once per instruction set: csrc/box_ascent.cpp compiles it for the
// baseline target, csrc/box_ascent_avx2.cpp for AVX2 (chosen at run time when the CPU has it).
#pragma once

#include <array>
#include <cstdint>

#include "hessgap/box_ascent_math.h"

namespace hessgap {

// [Σ delta², #{|y_new| ≥ r}, Σ g·delta], accumulated in double.
using BoxAscentSums = std::array<double, 3>;

// One step over n contiguous elements (m is null without momentum); returns the range's sums.
template <typename S>
using StepRangeFn = BoxAscentSums (*)(const S* x, S* y, const S* g, S* p, S* m, int64_t n,
                                      const BoxAscentConstants<S>& c);

// The compiled variants of one instruction set, indexed by [use_momentum].
struct StepRangeKernels {
  StepRangeFn<float> f32[2] = {nullptr, nullptr};
  StepRangeFn<double> f64[2] = {nullptr, nullptr};
};

// AVX2 variants (csrc/box_ascent_avx2.cpp); all null when the compiler cannot target AVX2.
StepRangeKernels box_ascent_avx2_kernels();

}  // namespace hessgap

// The kernel body itself: only for the translation units that compile it (they include the matching
// at::vec headers first).
#ifdef HESSGAP_COMPILE_STEP_RANGE
#include "hessgap/box_ascent_vec.h"

namespace hessgap {
inline namespace HESSGAP_KERNEL_NS {

template <typename S, bool kMomentum>
BoxAscentSums step_range(const S* x, S* y, const S* g, S* p, S* m, int64_t n, const BoxAscentConstants<S>& c) {
  using Vec = at::vec::Vectorized<S>;
  using VecOps = ElementOps<Vec>;
  using Ops = ElementOps<S>;
  constexpr int64_t W = Vec::size();
  // Per-lane double accumulators: the lane loop below vectorises, and the sums stay in double.
  double sq[W] = {}, face[W] = {}, pred[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec xv = Vec::loadu(x + i);
    const Vec yv = Vec::loadu(y + i);
    const Vec gv = Vec::loadu(g + i);
    const Vec mv = kMomentum ? Vec::loadu(m + i) : Vec(S(0));
    const BoxAscentElement<Vec> e = box_ascent_element<kMomentum>(xv, yv, gv, mv, c);
    e.y_new.store(y + i);
    VecOps::add(xv, e.y_new).store(p + i);
    if (kMomentum) e.delta.store(m + i);
    S d[W], gs[W], f[W];
    e.delta.store(d);
    gv.store(gs);
    VecOps::on_face(e.y_new, e.radius).store(f);
    for (int64_t k = 0; k < W; ++k) {
      const double dk = static_cast<double>(d[k]);
      sq[k] += dk * dk;
      pred[k] += static_cast<double>(gs[k]) * dk;
      face[k] += static_cast<double>(f[k]);
    }
  }
  BoxAscentSums out{0.0, 0.0, 0.0};
  for (int64_t k = 0; k < W; ++k) {
    out[0] += sq[k];
    out[1] += face[k];
    out[2] += pred[k];
  }
  for (; i < n; ++i) {
    const S mi = kMomentum ? m[i] : S(0);
    const BoxAscentElement<S> e = box_ascent_element<kMomentum>(x[i], y[i], g[i], mi, c);
    y[i] = e.y_new;
    p[i] = Ops::add(x[i], e.y_new);
    if (kMomentum) m[i] = e.delta;
    const double dk = static_cast<double>(e.delta);
    out[0] += dk * dk;
    out[1] += static_cast<double>(on_face(e.y_new, e.radius));
    out[2] += static_cast<double>(g[i]) * dk;
  }
  return out;
}

// This translation unit's variants.
inline StepRangeKernels step_range_kernels() {
  StepRangeKernels k;
  k.f32[0] = &step_range<float, false>;
  k.f32[1] = &step_range<float, true>;
  k.f64[0] = &step_range<double, false>;
  k.f64[1] = &step_range<double, true>;
  return k;
}

}  // namespace HESSGAP_KERNEL_NS
}  // namespace hessgap
#endif  // HESSGAP_COMPILE_STEP_RANGE
