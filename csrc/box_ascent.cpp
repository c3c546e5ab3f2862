// hessgap::box_ascent_step: schema, argument checks and the CPU kernel.
// The CUDA kernel is in csrc/cuda/box_ascent.cu; the per-element math both share is in
// include/hessgap/box_ascent_math.h; the op's exact semantics and its plain-PyTorch twin are in
// hessgap/ops/box_ascent.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <ATen/Version.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "hessgap/box_ascent.h"
#define HESSGAP_COMPILE_STEP_RANGE  // the baseline variant of the CPU kernel
#include "hessgap/box_ascent_cpu.h"
#include "hessgap/checks.h"

namespace hessgap {

namespace {

void check_no_shared_memory(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b,
                            size_t i) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  // TooHard: a strided layout the overlap test cannot decide; refuse only views of one storage.
  const bool shared = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial ||
                      (status == at::MemOverlapStatus::TooHard && a.storage().is_alias_of(b.storage()));
  TORCH_CHECK(!shared, "hessgap: ", name_a, "[", i, "] and ",
              name_b, "[", i, "] share memory; the step writes ", name_a, " and reads or writes ", name_b,
              ", so give each its own tensor (for example x = [p.detach().clone() for p in params])");
}

void check_writable(const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "hessgap: ", name, "[", i,
              "] has elements that share memory (an expanded or broadcast view) and cannot be written "
              "element by element; pass a tensor with its own storage, e.g. ",
              name, "[", i, "].clone()");
}

}  // namespace

BoxAscentOptions check_box_ascent_args(at::TensorList x, at::TensorList y, at::TensorList grad, at::TensorList params,
                                       const std::optional<at::TensorList>& prev_step, double step, double epsilon,
                                       int64_t box, int64_t direction, double momentum) {
  TORCH_CHECK(!x.empty(), "hessgap: box_ascent_step got no tensors; pass one tensor per parameter in x, y, grad "
              "and params");
  check_matching_lists(x, "x", y, "y");
  check_matching_lists(x, "x", grad, "grad");
  check_matching_lists(x, "x", params, "params");
  const at::Tensor& ref = x[0];
  check_floating(ref, "x[0]");
  check_same_device_dtype(x, ref, "x");
  check_same_device_dtype(y, ref, "y");
  check_same_device_dtype(grad, ref, "grad");
  check_same_device_dtype(params, ref, "params");

  TORCH_CHECK(std::isfinite(step), "hessgap: step must be a finite number, got ", step);
  TORCH_CHECK(std::isfinite(epsilon) && epsilon > 0, "hessgap: epsilon (the box's size) must be finite and > 0, got ",
              epsilon);
  TORCH_CHECK(momentum >= 0 && momentum < 1, "hessgap: momentum must be in [0, 1), got ", momentum,
              "; use 0 for plain projected ascent");
  TORCH_CHECK(box >= 0 && box <= 2, "hessgap: box must be 0 (keskar), 1 (adaptive) or 2 (absolute), got ", box);
  TORCH_CHECK(direction == 0 || direction == 1, "hessgap: direction must be 0 (sign) or 1 (gradient), got ",
              direction);

  const bool use_momentum = momentum > 0;
  TORCH_CHECK(!use_momentum || prev_step.has_value(), "hessgap: momentum ", momentum,
              " > 0 needs prev_step: one buffer per parameter holding the previous step (zeros at the start)");
  if (prev_step.has_value()) {
    check_matching_lists(x, "x", *prev_step, "prev_step");
    check_same_device_dtype(*prev_step, ref, "prev_step");
  }

  for (size_t i = 0; i < x.size(); ++i) {
    check_writable(y[i], "y", i);
    check_writable(params[i], "params", i);
    check_no_shared_memory(params[i], "params", y[i], "y", i);
    check_no_shared_memory(params[i], "params", x[i], "x", i);
    check_no_shared_memory(params[i], "params", grad[i], "grad", i);
    check_no_shared_memory(y[i], "y", x[i], "x", i);
    check_no_shared_memory(y[i], "y", grad[i], "grad", i);
    if (use_momentum) {
      const at::Tensor& m = (*prev_step)[i];
      check_writable(m, "prev_step", i);
      check_no_shared_memory(m, "prev_step", y[i], "y", i);
      check_no_shared_memory(m, "prev_step", params[i], "params", i);
      check_no_shared_memory(m, "prev_step", x[i], "x", i);
      check_no_shared_memory(m, "prev_step", grad[i], "grad", i);
    }
  }
  return {step, epsilon, momentum, static_cast<BoxKind>(box), static_cast<Direction>(direction), use_momentum};
}

DenseOperands::DenseOperands(at::TensorList x_in, at::TensorList y_in, at::TensorList grad_in,
                             at::TensorList params_in, const std::optional<at::TensorList>& prev_in,
                             bool use_momentum) {
  const size_t n = x_in.size();
  x.reserve(n);
  y.reserve(n);
  grad.reserve(n);
  params.reserve(n);
  if (use_momentum) prev_step.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = x_in[i];
    auto same_dense_layout = [&](const at::Tensor& t) {
      return t.is_non_overlapping_and_dense() && t.strides() == ref.strides();
    };
    bool dense = same_dense_layout(ref) && same_dense_layout(y_in[i]) && same_dense_layout(grad_in[i]) &&
                 same_dense_layout(params_in[i]);
    if (use_momentum) dense = dense && same_dense_layout((*prev_in)[i]);
    if (dense) {
      x.push_back(ref);
      y.push_back(y_in[i]);
      grad.push_back(grad_in[i]);
      params.push_back(params_in[i]);
      if (use_momentum) prev_step.push_back((*prev_in)[i]);
      continue;
    }
    // Slow path: contiguous copies of what is read, contiguous temporaries for what is written.
    x.push_back(ref.contiguous());
    grad.push_back(grad_in[i].contiguous());
    auto writable = [&](const at::Tensor& t, bool read_too) {
      if (t.is_contiguous()) return t;
      at::Tensor tmp = read_too ? t.contiguous() : at::empty(t.sizes(), t.options());
      copy_back.emplace_back(t, tmp);
      return tmp;
    };
    y.push_back(writable(y_in[i], true));
    params.push_back(writable(params_in[i], false));
    if (use_momentum) prev_step.push_back(writable((*prev_in)[i], true));
  }
}

void DenseOperands::finish() {
  for (auto& [target, result] : copy_back) target.copy_(result);
  copy_back.clear();
}

namespace {

// Elements per CPU work item: big enough to amortise scheduling, small enough to balance threads.
constexpr int64_t kCpuChunk = 1 << 15;

bool cpu_has_avx2() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

struct ChosenCpuKernels {
  StepRangeKernels kernels;
  const char* name;
};

// The AVX2 variant when the CPU has AVX2 and torch's ATEN_CPU_CAPABILITY does not ask for the baseline,
// else the baseline variant compiled in this file. Chosen once.
const ChosenCpuKernels& chosen_cpu_kernels() {
  static const ChosenCpuKernels chosen = []() -> ChosenCpuKernels {
    if (cpu_has_avx2() && at::get_cpu_capability() != "DEFAULT") {
      const StepRangeKernels avx2 = box_ascent_avx2_kernels();  // only called where AVX2 runs
      if (avx2.f32[0] != nullptr) return {avx2, "avx2"};
    }
    return {step_range_kernels(), "baseline"};
  }();
  return chosen;
}

const StepRangeKernels& cpu_kernels() { return chosen_cpu_kernels().kernels; }

// Which CPU variant box_ascent_step runs ("avx2" or "baseline"), for tests and benchmark reports.
std::string box_ascent_cpu_kernel() { return chosen_cpu_kernels().name; }

template <typename S>
StepRangeFn<S> pick_kernel(bool use_momentum) {
  if constexpr (std::is_same_v<S, float>) {
    return cpu_kernels().f32[use_momentum ? 1 : 0];
  } else {
    return cpu_kernels().f64[use_momentum ? 1 : 0];
  }
}

template <typename S>
BoxAscentSums step_all_cpu(const DenseOperands& t, const BoxAscentConstants<S>& c, bool use_momentum) {
  const StepRangeFn<S> step_range = pick_kernel<S>(use_momentum);
  // Work items span all tensors: (tensor, first element, element count).
  struct Chunk {
    size_t tensor;
    int64_t begin;
    int64_t size;
  };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < t.size(); ++i) {
    const int64_t n = t.x[i].numel();
    for (int64_t b = 0; b < n; b += kCpuChunk) chunks.push_back({i, b, std::min(kCpuChunk, n - b)});
  }
  std::vector<BoxAscentSums> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Chunk& ch = chunks[k];
      const size_t i = ch.tensor;
      S* m = use_momentum ? t.prev_step[i].data_ptr<S>() + ch.begin : nullptr;
      partial[k] = step_range(t.x[i].data_ptr<S>() + ch.begin, t.y[i].data_ptr<S>() + ch.begin,
                              t.grad[i].data_ptr<S>() + ch.begin, t.params[i].data_ptr<S>() + ch.begin, m, ch.size,
                              c);
    }
  });
  // Summed in chunk order: the result does not depend on the number of threads.
  BoxAscentSums total{0.0, 0.0, 0.0};
  for (const BoxAscentSums& r : partial)
    for (int64_t j = 0; j < kBoxAscentReductions; ++j) total[j] += r[j];
  return total;
}

at::Tensor box_ascent_step_cpu(at::TensorList x, at::TensorList y, at::TensorList grad, at::TensorList params,
                               std::optional<at::TensorList> prev_step, double step, double epsilon, int64_t box,
                               int64_t direction, double momentum) {
  const BoxAscentOptions options =
      check_box_ascent_args(x, y, grad, params, prev_step, step, epsilon, box, direction, momentum);
  TORCH_CHECK(x[0].device().is_cpu(), "hessgap: box_ascent_step's CPU kernel got tensors on ", x[0].device());
  DenseOperands operands(x, y, grad, params, prev_step, options.use_momentum);
  BoxAscentSums total{};
  AT_DISPATCH_FLOATING_TYPES(x[0].scalar_type(), "hessgap::box_ascent_step (CPU)", [&] {
    const auto c = options.constants<scalar_t>();
    total = step_all_cpu<scalar_t>(operands, c, options.use_momentum);
  });
  operands.finish();
  at::Tensor result = at::empty({kBoxAscentReductions}, x[0].options().dtype(at::kDouble));
  double* out = result.data_ptr<double>();
  for (int64_t j = 0; j < kBoxAscentReductions; ++j) out[j] = total[j];
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hessgap, m) {
  m.def(
      "box_ascent_step(Tensor[] x, Tensor(a!)[] y, Tensor[] grad, Tensor(b!)[] params, Tensor(c!)[]? prev_step, "
      "float step, float epsilon, int box, int direction, float momentum) -> Tensor");
  m.def("box_ascent_cpu_kernel() -> str", &box_ascent_cpu_kernel);
}

TORCH_LIBRARY_IMPL(hessgap, CPU, m) { m.impl("box_ascent_step", &box_ascent_step_cpu); }

}  // namespace hessgap
