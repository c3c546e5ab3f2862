// ElementOps for at::vec::Vectorized (CPU only): lets box_ascent_element run on whole SIMD vectors
// with exactly the operations its scalar form uses.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "hessgap/box_ascent_math.h"

namespace hessgap {
inline namespace HESSGAP_KERNEL_NS {

template <typename S>
struct ElementOps<at::vec::Vectorized<S>> {
  using Vec = at::vec::Vectorized<S>;
  static inline Vec splat(S v) { return Vec(v); }
  static inline Vec add(const Vec& a, const Vec& b) { return a + b; }
  static inline Vec sub(const Vec& a, const Vec& b) { return a - b; }
  static inline Vec mul(const Vec& a, const Vec& b) { return a * b; }
  static inline Vec neg(const Vec& v) { return v.neg(); }
  static inline Vec abs(const Vec& v) { return v.abs(); }
  static inline Vec minimum(const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }
  static inline Vec maximum(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
  static inline Vec sign(const Vec& g) {
    const Vec zero(S(0));
    const Vec negative_to_minus_one = Vec::blendv(g, Vec(S(-1)), g < zero);
    return Vec::blendv(negative_to_minus_one, Vec(S(1)), g > zero);
  }
  static inline Vec on_face(const Vec& y, const Vec& r) { return y.abs().ge(r); }
};

}  // namespace HESSGAP_KERNEL_NS
}  // namespace hessgap
