// Host-side pieces of hessgap::box_ascent_step shared by its CPU (csrc/box_ascent.cpp) and CUDA
// (csrc/cuda/box_ascent.cu) kernels: argument checks and the dense operands the kernels walk.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "hessgap/box_ascent_math.h"

namespace hessgap {

// The three reductions the op returns, in this order.
constexpr int64_t kBoxAscentReductions = 3;  // [Σ delta², #{|y_new| ≥ r}, Σ g·delta]

struct BoxAscentOptions {
  double step;
  double epsilon;
  double momentum;
  BoxKind box;
  Direction direction;
  bool use_momentum;  // momentum > 0: read and write prev_step

  template <typename S>
  BoxAscentConstants<S> constants() const {
    return {static_cast<S>(step),     static_cast<S>(epsilon), static_cast<S>(momentum),
            static_cast<S>(1.0 - momentum), box, direction};
  }
};

// Checks every argument of the op (list lengths, shapes, devices, dtypes, memory overlap, scalar ranges);
// each failure says what was wrong and how to fix it.
BoxAscentOptions check_box_ascent_args(at::TensorList x, at::TensorList y, at::TensorList grad, at::TensorList params,
                                       const std::optional<at::TensorList>& prev_step, double step, double epsilon,
                                       int64_t box, int64_t direction, double momentum);

// For each parameter i, tensors x, y, grad, params (and prev_step) that share one dense memory layout,
// so that a kernel may treat each of them as a flat array of numel() elements.
// Fast path: the caller's tensors are used as they are when they already share a non-overlapping dense
// layout (contiguous, channels-last, ...). Slow path, for any other strides: contiguous temporaries,
// whose results finish() copies back into the caller's tensors (two extra passes over that parameter).
struct DenseOperands {
  std::vector<at::Tensor> x, y, grad, params, prev_step;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (caller's tensor, temporary holding its result)

  DenseOperands(at::TensorList x, at::TensorList y, at::TensorList grad, at::TensorList params,
                const std::optional<at::TensorList>& prev_step, bool use_momentum);
  size_t size() const { return x.size(); }
  // Writes the results held in temporaries back into the caller's tensors.
  void finish();
};

}  // namespace hessgap
