// First and second derivatives of hessgap's supported activations, shared by the CPU and CUDA kernels
// of the fused R-operator pieces (csrc/hvp_pointwise.cpp, csrc/cuda/hvp_pointwise.cu).
#pragma once

#include <cmath>
#include <string>

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

namespace hessgap {

enum class HvpActivation : int { ReLU = 0, LeakyReLU = 1, Tanh = 2, Sigmoid = 3, GELU = 4, GELUTanh = 5, SiLU = 6 };

// The kind names of the op schemas ("relu", "leaky_relu", ...) -> enum; a clear error for anything else.
inline HvpActivation hvp_activation_from_name(const std::string& name) {
  if (name == "relu") return HvpActivation::ReLU;
  if (name == "leaky_relu") return HvpActivation::LeakyReLU;
  if (name == "tanh") return HvpActivation::Tanh;
  if (name == "sigmoid") return HvpActivation::Sigmoid;
  if (name == "gelu") return HvpActivation::GELU;
  if (name == "gelu_tanh") return HvpActivation::GELUTanh;
  if (name == "silu") return HvpActivation::SiLU;
  TORCH_CHECK(false, "hessgap: unknown activation kind '", name,
              "'; expected one of relu, leaky_relu, tanh, sigmoid, gelu, gelu_tanh, silu");
  return HvpActivation::ReLU;
}

// σ'(z) and σ''(z) at one point. ReLU and LeakyReLU follow PyTorch's convention at 0 (the
// derivative there is the left one) and have σ'' = 0, as autograd's double backward does.
template <typename T>
C10_HOST_DEVICE inline void hvp_activation_derivatives(HvpActivation kind, T slope, T z, T& d1, T& d2) {
  using std::erf;
  using std::exp;
  using std::tanh;
  switch (kind) {
    case HvpActivation::ReLU:
      d1 = z > T(0) ? T(1) : T(0);
      d2 = T(0);
      return;
    case HvpActivation::LeakyReLU:
      d1 = z > T(0) ? T(1) : slope;
      d2 = T(0);
      return;
    case HvpActivation::Tanh: {
      const T t = tanh(z);
      d1 = T(1) - t * t;
      d2 = T(-2) * t * d1;
      return;
    }
    case HvpActivation::Sigmoid: {
      const T s = T(1) / (T(1) + exp(-z));
      d1 = s * (T(1) - s);
      d2 = d1 * (T(1) - T(2) * s);
      return;
    }
    case HvpActivation::GELU: {
      // σ = z Φ(z): σ' = Φ + z φ, σ'' = φ (2 − z²)
      const T kInvSqrt2 = T(0.70710678118654752440);
      const T kInvSqrt2Pi = T(0.39894228040143267794);
      const T cdf = T(0.5) * (T(1) + erf(z * kInvSqrt2));
      const T pdf = kInvSqrt2Pi * exp(T(-0.5) * z * z);
      d1 = cdf + z * pdf;
      d2 = pdf * (T(2) - z * z);
      return;
    }
    case HvpActivation::GELUTanh: {
      // σ = ½ z (1 + tanh u), u = c (z + a z³)
      const T c = T(0.79788456080286535588);  // sqrt(2/π)
      const T a = T(0.044715);
      const T u = c * (z + a * z * z * z);
      const T du = c * (T(1) + T(3) * a * z * z);
      const T ddu = c * T(6) * a * z;
      const T t = tanh(u);
      const T sech2 = T(1) - t * t;
      const T dt = sech2 * du;
      const T ddt = T(-2) * t * dt * du + sech2 * ddu;
      d1 = T(0.5) * (T(1) + t) + T(0.5) * z * dt;
      d2 = dt + T(0.5) * z * ddt;
      return;
    }
    case HvpActivation::SiLU: {
      // σ = z s(z), s the logistic function: σ' = s (1 + z (1 − s)), σ'' = s (1 − s) (2 + z (1 − 2 s))
      const T s = T(1) / (T(1) + exp(-z));
      d1 = s * (T(1) + z * (T(1) - s));
      d2 = s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s));
      return;
    }
  }
  d1 = T(0);
  d2 = T(0);
}

}  // namespace hessgap
