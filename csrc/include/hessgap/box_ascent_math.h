// The per-element math of the projected box-ascent step, shared by the CPU kernel (scalar tail and
// at::vec::Vectorized body) and the CUDA kernel, so that all of them compute the same numbers.
//
// For one coordinate, with r the box's half-width and s the step direction:
//   z      = clamp(y + step·s, −r, r)
//   y_new  = clamp(y + (1 − μ)(z − y) + μ·m, −r, r)     (μ = 0: y_new = z)
//   delta  = y_new − y
// The operations are written one at a time in the reference's order, and on the GPU with
// round-to-nearest intrinsics, so that no multiply-add is contracted into an FMA: CPU, GPU and the
// plain-PyTorch reference then round every intermediate identically.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HESSGAP_HOST_DEVICE __host__ __device__
#else
#define HESSGAP_HOST_DEVICE
#endif

// The kernels' code is compiled once per instruction set (baseline, AVX2, CUDA). Each translation unit
// names its own inline namespace, so that the copies of these inline functions never share a symbol
// and the linker cannot hand an AVX2 copy to baseline code.
#ifndef HESSGAP_KERNEL_NS
#define HESSGAP_KERNEL_NS baseline
#endif

namespace hessgap {

// Values of the op's `box` argument (hessgap/ops/box_ascent.py maps the names to them).
enum class BoxKind : int64_t { Keskar = 0, Adaptive = 1, Absolute = 2 };
// Values of the op's `direction` argument.
enum class Direction : int64_t { Sign = 0, Gradient = 1 };

// The step's constants, already cast to the tensors' scalar type S (as PyTorch casts Python scalars).
template <typename S>
struct BoxAscentConstants {
  S step;
  S epsilon;
  S momentum;
  S one_minus_momentum;  // (1 − μ) computed in double, then cast, as the reference does
  BoxKind box;
  Direction direction;
};

inline namespace HESSGAP_KERNEL_NS {

// Element-wise primitives; specialised for float and double here (host and device) and for
// at::vec::Vectorized in box_ascent_vec.h (CPU only). A traits struct rather than overloads so that
// specialisations declared after box_ascent_element are still found when it is instantiated.
template <typename T>
struct ElementOps;

template <typename S>
struct ScalarOps {
  static HESSGAP_HOST_DEVICE inline S splat(S v) { return v; }
  static HESSGAP_HOST_DEVICE inline S neg(S v) { return -v; }
  // IEEE minimum/maximum: NaN in either argument propagates, like torch.minimum/torch.maximum.
  static HESSGAP_HOST_DEVICE inline S minimum(S a, S b) { return a != a ? a : (b != b ? b : (b < a ? b : a)); }
  static HESSGAP_HOST_DEVICE inline S maximum(S a, S b) { return a != a ? a : (b != b ? b : (b > a ? b : a)); }
  // torch.sign: ±1, zero stays zero, NaN stays NaN.
  static HESSGAP_HOST_DEVICE inline S sign(S g) { return g > S(0) ? S(1) : (g < S(0) ? S(-1) : g); }
};

template <>
struct ElementOps<float> : ScalarOps<float> {
  static HESSGAP_HOST_DEVICE inline float abs(float v) { return ::fabsf(v); }
  static HESSGAP_HOST_DEVICE inline float add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
  }
  static HESSGAP_HOST_DEVICE inline float sub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
  }
  static HESSGAP_HOST_DEVICE inline float mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
};

template <>
struct ElementOps<double> : ScalarOps<double> {
  static HESSGAP_HOST_DEVICE inline double abs(double v) { return ::fabs(v); }
  static HESSGAP_HOST_DEVICE inline double add(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
  }
  static HESSGAP_HOST_DEVICE inline double sub(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
  }
  static HESSGAP_HOST_DEVICE inline double mul(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
  }
};

// 1 where y lies on a face of the box (|y| ≥ r), else 0.
template <typename S>
HESSGAP_HOST_DEVICE inline S on_face(S y, S r) {
  return ElementOps<S>::abs(y) >= r ? S(1) : S(0);
}

// What one step produces for one coordinate (or one vector of coordinates).
template <typename T>
struct BoxAscentElement {
  T y_new;   // the new perturbation, inside the box
  T delta;   // y_new − y: the step actually taken (also the new momentum buffer)
  T radius;  // the box's half-width r at this coordinate
};

// The box's half-width at x: Keskar ε(|x| + 1), adaptive ε|x|, absolute ε.
template <typename T, typename S>
HESSGAP_HOST_DEVICE inline T box_radius(const T& x, const BoxAscentConstants<S>& c) {
  using Op = ElementOps<T>;
  const T eps = Op::splat(c.epsilon);
  switch (c.box) {
    case BoxKind::Keskar:
      return Op::mul(eps, Op::add(Op::abs(x), Op::splat(S(1))));
    case BoxKind::Adaptive:
      return Op::mul(eps, Op::abs(x));
    default:
      return eps;
  }
}

// One projected ascent step at one coordinate. T is S itself or a vector of S; kMomentum selects the
// Auto-PGD momentum form (m is ignored when it is false).
template <bool kMomentum, typename T, typename S>
HESSGAP_HOST_DEVICE inline BoxAscentElement<T> box_ascent_element(const T& x, const T& y, const T& g, const T& m,
                                                                    const BoxAscentConstants<S>& c) {
  using Op = ElementOps<T>;
  const T r = box_radius(x, c);
  const T neg_r = Op::neg(r);
  const T s = c.direction == Direction::Sign ? Op::sign(g) : g;
  const T z = Op::maximum(Op::minimum(Op::add(y, Op::mul(Op::splat(c.step), s)), r), neg_r);
  T y_new = z;
  if (kMomentum) {
    const T pulled = Op::add(Op::add(y, Op::mul(Op::splat(c.one_minus_momentum), Op::sub(z, y))),
                             Op::mul(Op::splat(c.momentum), m));
    y_new = Op::maximum(Op::minimum(pulled, r), neg_r);
  }
  return {y_new, Op::sub(y_new, y), r};
}

}  // namespace HESSGAP_KERNEL_NS
}  // namespace hessgap
