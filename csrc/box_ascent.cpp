// hessgap::box_ascent_step: schema, argument checks and the CPU kernel.
// The CUDA kernel is in csrc/cuda/box_ascent.cu; the per-element math both share is in
// include/hessgap/box_ascent_math.h; the op's exact semantics and its plain-PyTorch twin are in
// hessgap/ops/box_ascent.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

#include "hessgap/box_ascent.h"
#include "hessgap/box_ascent_vec.h"
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

using Reductions = std::array<double, kBoxAscentReductions>;

// One step over n contiguous elements; returns the chunk's reductions, accumulated in double.
template <typename S, bool kMomentum>
Reductions step_range(const S* x, S* y, const S* g, S* p, S* m, int64_t n, const BoxAscentConstants<S>& c) {
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
  Reductions out{0.0, 0.0, 0.0};
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

template <typename S, bool kMomentum>
Reductions step_all_cpu(const DenseOperands& t, const BoxAscentConstants<S>& c) {
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
  std::vector<Reductions> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Chunk& ch = chunks[k];
      const size_t i = ch.tensor;
      S* m = kMomentum ? t.prev_step[i].data_ptr<S>() + ch.begin : nullptr;
      partial[k] = step_range<S, kMomentum>(t.x[i].data_ptr<S>() + ch.begin, t.y[i].data_ptr<S>() + ch.begin,
                                            t.grad[i].data_ptr<S>() + ch.begin, t.params[i].data_ptr<S>() + ch.begin,
                                            m, ch.size, c);
    }
  });
  // Summed in chunk order: the result does not depend on the number of threads.
  Reductions total{0.0, 0.0, 0.0};
  for (const Reductions& r : partial)
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
  Reductions total{};
  AT_DISPATCH_FLOATING_TYPES(x[0].scalar_type(), "hessgap::box_ascent_step (CPU)", [&] {
    const auto c = options.constants<scalar_t>();
    total = options.use_momentum ? step_all_cpu<scalar_t, true>(operands, c) : step_all_cpu<scalar_t, false>(operands, c);
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
}

TORCH_LIBRARY_IMPL(hessgap, CPU, m) { m.impl("box_ascent_step", &box_ascent_step_cpu); }

}  // namespace hessgap
