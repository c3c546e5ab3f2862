// hessgap::box_ascent_step called through the dispatcher, against a plain scalar loop written here
// (independent of the kernels' shared header). Run by ctest; exits non-zero on any mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

using BoxAscentFn = at::Tensor(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                               std::optional<at::TensorList>, double, double, int64_t, int64_t, double);

c10::TypedOperatorHandle<BoxAscentFn> box_ascent_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("hessgap::box_ascent_step", "").typed<BoxAscentFn>();
}

struct Expected {
  std::vector<at::Tensor> y, params, prev;
  double step_sq = 0, faces = 0, predicted = 0;
};

template <typename S>
S clamp_box(S v, S r) {
  if (v > r) return r;
  if (v < -r) return -r;
  return v;
}

// The step, one coordinate at a time, on CPU copies of the inputs.
template <typename S>
Expected scalar_loop(const std::vector<at::Tensor>& x, const std::vector<at::Tensor>& y,
                     const std::vector<at::Tensor>& g, const std::vector<at::Tensor>& m, double step, double epsilon,
                     int box, int direction, double momentum) {
  Expected e;
  const S eps = static_cast<S>(epsilon), eta = static_cast<S>(step), mu = static_cast<S>(momentum);
  const S one_minus_mu = static_cast<S>(1.0 - momentum);
  for (size_t t = 0; t < x.size(); ++t) {
    at::Tensor xc = x[t].cpu().contiguous(), gc = g[t].cpu().contiguous();
    at::Tensor yc = y[t].cpu().contiguous().clone(), mc = m[t].cpu().contiguous().clone();
    at::Tensor pc = at::empty_like(xc);
    const S *xp = xc.data_ptr<S>(), *gp = gc.data_ptr<S>();
    S *yp = yc.data_ptr<S>(), *mp = mc.data_ptr<S>(), *pp = pc.data_ptr<S>();
    for (int64_t i = 0; i < xc.numel(); ++i) {
      const S r = box == 0 ? eps * (std::fabs(xp[i]) + S(1)) : box == 1 ? eps * std::fabs(xp[i]) : eps;
      const S s = direction == 0 ? (gp[i] > 0 ? S(1) : gp[i] < 0 ? S(-1) : S(0)) : gp[i];
      const S z = clamp_box<S>(yp[i] + eta * s, r);
      S y_new = z;
      if (momentum > 0) {
        const S a = one_minus_mu * (z - yp[i]);
        const S b = yp[i] + a;
        const S c = mu * mp[i];
        y_new = clamp_box<S>(b + c, r);
      }
      const S delta = y_new - yp[i];
      e.step_sq += static_cast<double>(delta) * static_cast<double>(delta);
      e.faces += std::fabs(y_new) >= r ? 1.0 : 0.0;
      e.predicted += static_cast<double>(gp[i]) * static_cast<double>(delta);
      if (momentum > 0) mp[i] = delta;
      yp[i] = y_new;
      pp[i] = xp[i] + y_new;
    }
    e.y.push_back(yc);
    e.params.push_back(pc);
    e.prev.push_back(mc);
  }
  return e;
}

bool close(double a, double b, double rtol) { return std::fabs(a - b) <= rtol * std::fabs(b) + 1e-300; }

template <typename S>
void check_case(at::Device device, at::ScalarType dtype, int box, int direction, double momentum) {
  const std::vector<std::vector<int64_t>> shapes = {{1}, {7}, {1023}, {40000}, {3, 5, 7}, {0}};
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  const double epsilon = 1e-2, step = 3e-3;
  std::vector<at::Tensor> x, y, g, p, m;
  for (const auto& s : shapes) {
    x.push_back(at::randn(s, opts));
    y.push_back(at::randn(s, opts) * (2 * epsilon));
    at::Tensor gi = at::randn(s, opts);
    gi.view({-1}).slice(0, 0, gi.numel(), 3).zero_();  // exact zeros: sign(0) = 0
    g.push_back(gi);
    p.push_back(at::full(s, 1e30, opts));  // sentinel: every element must be overwritten
    m.push_back(at::randn(s, opts) * epsilon);
  }
  const Expected e = scalar_loop<S>(x, y, g, m, step, epsilon, box, direction, momentum);
  const at::Tensor out = box_ascent_op().call(x, y, g, p, momentum > 0 ? std::optional<at::TensorList>(m) : std::nullopt,
                                              step, epsilon, box, direction, momentum);
  const std::string name = std::string(c10::toString(dtype)) + " on " + device.str() + " box=" + std::to_string(box) +
                           " direction=" + std::to_string(direction) + " momentum=" + std::to_string(momentum);
  for (size_t t = 0; t < shapes.size(); ++t) {
    expect(at::equal(y[t].cpu(), e.y[t]), name + ": y[" + std::to_string(t) + "]");
    expect(at::equal(p[t].cpu(), e.params[t]), name + ": params[" + std::to_string(t) + "]");
    if (momentum > 0) expect(at::equal(m[t].cpu(), e.prev[t]), name + ": prev_step[" + std::to_string(t) + "]");
  }
  const at::Tensor r = out.cpu();
  expect(r.scalar_type() == at::kDouble && r.numel() == 3, name + ": result is 3 float64 values");
  const double* rp = r.data_ptr<double>();
  expect(close(rp[0], e.step_sq, 1e-12), name + ": sum of squared steps");
  expect(rp[1] == e.faces, name + ": coordinates on the faces");
  expect(close(rp[2], e.predicted, 1e-12), name + ": predicted increase");
}

void check_device(at::Device device) {
  for (int box = 0; box < 3; ++box)
    for (int direction = 0; direction < 2; ++direction)
      for (double momentum : {0.0, 0.75}) {
        check_case<float>(device, at::kFloat, box, direction, momentum);
        check_case<double>(device, at::kDouble, box, direction, momentum);
      }
}

void check_bad_epsilon_is_refused() {
  std::vector<at::Tensor> x = {at::randn({4})}, y = {at::zeros({4})}, g = {at::randn({4})}, p = {at::zeros({4})};
  bool refused = false;
  try {
    box_ascent_op().call(x, y, g, p, std::nullopt, 1e-3, 0.0, 0, 0, 0.0);
  } catch (const c10::Error& err) {
    refused = std::string(err.what()).find("epsilon") != std::string::npos;
  }
  expect(refused, "epsilon = 0 is refused with a message naming epsilon");
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_device(at::kCPU);
  check_bad_epsilon_is_refused();
  if (at::hasCUDA()) {
    check_device(at::Device(at::kCUDA, 0));
  } else {
    std::printf("no CUDA device: CUDA kernel not exercised\n");
  }
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("hessgap::box_ascent_step matches the scalar loop\n");
  return 0;
}
