// The fused LM head + cross-entropy and its R-gradients (math: hessgap/ops/linear_ce_rop.py): the schemas of
// torch.ops.hessgap.linear_ce_forward / linear_ce_rgrad and their kernels, registered for the CPU here and for
// CUDA in csrc/cuda/linear_ce_rop.cu.
//
// Tokens go through in chunks of `token_chunk`, the vocabulary in chunks of `vocab_chunk`. With one vocabulary
// chunk the logits of a token chunk are computed once per pass; with several, the log-sum-exp is accumulated
// online over the chunks first (primal pass; the R-pass reads the primal pass's lse) and a second sweep
// recomputes each chunk's logits (and in the R-pass its tangents, after a first sweep for pᵀż): twice the
// logit matmuls for memory c × vocab_chunk instead of c × V. Accumulation in float32 (float64 for float64).
#include "hessgap/linear_ce_rop.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace hessgap {
namespace {

at::ScalarType accumulation_type(const at::Tensor& h) {
  return h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_linear_ce(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& labels, const at::Tensor& token_weights) {
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "hessgap: h must be floating point, got ", h.scalar_type());
  TORCH_CHECK(h.dim() == 2, "hessgap: h must be (tokens, d), got shape ", h.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == h.size(1), "hessgap: weight must be (vocabulary, d) with d = ",
              h.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == h.scalar_type() && weight.device() == h.device(),
              "hessgap: weight must have h's dtype ", h.scalar_type(), " and device ", h.device(), ", got ",
              weight.scalar_type(), " on ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "hessgap: bias must be (vocabulary,) = (",
                weight.size(0), ",), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == h.scalar_type() && bias->device() == h.device(),
                "hessgap: bias must have h's dtype and device");
  }
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == h.size(0), "hessgap: labels must be (tokens,) = (", h.size(0),
              ",), got shape ", labels.sizes());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
              "hessgap: labels must hold integer class indices, got ", labels.scalar_type());
  TORCH_CHECK(token_weights.dim() == 1 && token_weights.size(0) == h.size(0),
              "hessgap: token_weights must be (tokens,) = (", h.size(0), ",), got shape ", token_weights.sizes());
  TORCH_CHECK(at::isFloatingType(token_weights.scalar_type()), "hessgap: token_weights must be floating point");
  TORCH_CHECK(labels.device() == h.device() && token_weights.device() == h.device(),
              "hessgap: labels and token_weights must be on h's device ", h.device());
  if (h.size(0) > 0) {
    const int64_t vocab = weight.size(0);
    const bool bad = ((labels < 0).logical_or(labels >= vocab)).logical_and(token_weights != 0).any().item<bool>();
    TORCH_CHECK(!bad, "hessgap: a counted token's label is outside [0, ", vocab,
                "); give ignored tokens a zero token weight");
  }
}

int64_t chunk_or_all(int64_t chunk, int64_t total) { return chunk <= 0 ? std::max<int64_t>(total, 1) : chunk; }

// Logits of tokens `hc` (c, d; accumulation dtype) for the vocabulary rows [v0, v0 + m).
at::Tensor chunk_logits(const at::Tensor& hc, const at::Tensor& wm, const c10::optional<at::Tensor>& bias, int64_t v0,
                        int64_t m, at::ScalarType acc) {
  at::Tensor z = hc.mm(wm.t());
  if (bias.has_value()) z.add_(bias->narrow(0, v0, m).to(acc).unsqueeze(0));
  return z;
}

// g = p − e_y for the vocabulary rows [v0, v0 + m), scaled per token by `wc` (in place on p); returns z_y·[y in chunk].
at::Tensor subtract_labels(at::Tensor& g, const at::Tensor& z, const at::Tensor& yc, int64_t v0, int64_t m) {
  const at::Tensor inside = yc.ge(v0).logical_and(yc.lt(v0 + m)).to(g.scalar_type()).unsqueeze(1);
  const at::Tensor index = (yc - v0).clamp(0, m - 1).unsqueeze(1);
  g.scatter_add_(1, index, inside.neg());
  return (z.gather(1, index) * inside).squeeze(1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& token_weights, int64_t token_chunk, int64_t vocab_chunk) {
  check_linear_ce(h, weight, bias, labels, token_weights);
  const auto acc = accumulation_type(h);
  const int64_t n = h.size(0), d = h.size(1), vocab = weight.size(0);
  const int64_t tc = chunk_or_all(token_chunk, n), vc = chunk_or_all(vocab_chunk, vocab);
  const auto opts = h.options().dtype(acc);
  at::Tensor loss = at::zeros({}, opts), lse = at::empty({n}, opts);
  at::Tensor gh = at::zeros({n, d}, opts), gw = at::zeros({vocab, d}, opts), gb = at::zeros({vocab}, opts);
  const at::Tensor w = token_weights.to(acc), y = labels.to(at::kLong);
  const bool one_sweep = vc >= vocab;
  for (int64_t t0 = 0; t0 < n; t0 += tc) {
    const int64_t c = std::min(tc, n - t0);
    const at::Tensor hc = h.narrow(0, t0, c).to(acc), wc = w.narrow(0, t0, c), yc = y.narrow(0, t0, c);
    at::Tensor z, lse_c;
    if (one_sweep) {
      z = chunk_logits(hc, weight.to(acc), bias, 0, vocab, acc);
      lse_c = at::logsumexp(z, {1});
    } else {  // online log-sum-exp over the vocabulary chunks
      at::Tensor top = at::full({c}, -std::numeric_limits<double>::infinity(), opts), sum = at::zeros({c}, opts);
      for (int64_t v0 = 0; v0 < vocab; v0 += vc) {
        const int64_t m = std::min(vc, vocab - v0);
        const at::Tensor zm = chunk_logits(hc, weight.narrow(0, v0, m).to(acc), bias, v0, m, acc);
        const at::Tensor next = at::maximum(top, std::get<0>(zm.max(1)));
        sum = sum * (top - next).exp() + (zm - next.unsqueeze(1)).exp().sum(1);
        top = next;
      }
      lse_c = top + sum.log();
    }
    lse.narrow(0, t0, c).copy_(lse_c);
    loss.add_((wc * lse_c).sum());
    for (int64_t v0 = 0; v0 < vocab; v0 += vc) {
      const int64_t m = std::min(vc, vocab - v0);
      const at::Tensor wm = weight.narrow(0, v0, m).to(acc);
      const at::Tensor zm = one_sweep ? z : chunk_logits(hc, wm, bias, v0, m, acc);
      at::Tensor g = (zm - lse_c.unsqueeze(1)).exp_();
      loss.sub_((wc * subtract_labels(g, zm, yc, v0, m)).sum());
      g.mul_(wc.unsqueeze(1));
      gh.narrow(0, t0, c).addmm_(g, wm);
      gw.narrow(0, v0, m).addmm_(g.t(), hc);
      gb.narrow(0, v0, m).add_(g.sum(0));
    }
  }
  return {loss, lse, gh.to(h.scalar_type()), gw.to(h.scalar_type()), gb.to(h.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_rgrad(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
    const at::Tensor& token_weights, const at::Tensor& lse, const c10::optional<at::Tensor>& dh,
    const c10::optional<at::Tensor>& dweight, const c10::optional<at::Tensor>& dbias, int64_t token_chunk,
    int64_t vocab_chunk) {
  check_linear_ce(h, weight, bias, labels, token_weights);
  const int64_t n = h.size(0), d = h.size(1), vocab = weight.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "hessgap: lse must be (tokens,) = (", n, ",), got ", lse.sizes());
  TORCH_CHECK(dh.has_value() || dweight.has_value() || dbias.has_value(),
              "hessgap: linear_ce_rgrad needs at least one of dh, dweight, dbias");
  const int64_t k = dh.has_value() ? dh->size(0) : dweight.has_value() ? dweight->size(0) : dbias->size(0);
  if (dh.has_value())
    TORCH_CHECK(dh->dim() == 3 && dh->size(0) == k && dh->size(1) == n && dh->size(2) == d,
                "hessgap: dh must be (k, tokens, d) = (", k, ", ", n, ", ", d, "), got shape ", dh->sizes());
  if (dweight.has_value())
    TORCH_CHECK(dweight->dim() == 3 && dweight->size(0) == k && dweight->size(1) == vocab && dweight->size(2) == d,
                "hessgap: dweight must be (k, vocabulary, d) = (", k, ", ", vocab, ", ", d, "), got shape ",
                dweight->sizes());
  if (dbias.has_value())
    TORCH_CHECK(dbias->dim() == 2 && dbias->size(0) == k && dbias->size(1) == vocab,
                "hessgap: dbias must be (k, vocabulary) = (", k, ", ", vocab, "), got shape ", dbias->sizes());
  for (const auto* t : {&dh, &dweight, &dbias})
    if (t->has_value())
      TORCH_CHECK((*t)->scalar_type() == h.scalar_type() && (*t)->device() == h.device(),
                  "hessgap: the tangents must have h's dtype ", h.scalar_type(), " and device ", h.device());

  const auto acc = accumulation_type(h);
  const int64_t tc = chunk_or_all(token_chunk, n), vc = chunk_or_all(vocab_chunk, vocab);
  const auto opts = h.options().dtype(acc);
  at::Tensor rloss = at::zeros({k}, opts), rgh = at::zeros({k, n, d}, opts);
  at::Tensor rgw = at::zeros({k, vocab, d}, opts), rgb = at::zeros({k, vocab}, opts);
  const at::Tensor w = token_weights.to(acc), y = labels.to(at::kLong), lse_all = lse.to(acc);
  const bool one_sweep = vc >= vocab;

  for (int64_t t0 = 0; t0 < n; t0 += tc) {
    const int64_t c = std::min(tc, n - t0);
    const at::Tensor hc = h.narrow(0, t0, c).to(acc), wc = w.narrow(0, t0, c), yc = y.narrow(0, t0, c);
    const at::Tensor lse_c = lse_all.narrow(0, t0, c).unsqueeze(1);
    const at::Tensor dhc = dh.has_value() ? dh->narrow(1, t0, c).to(acc) : at::Tensor();
    // p and ż = Ẇh + Wḣ + ḃ (k, c, m) of the vocabulary rows [v0, v0 + m)
    auto sweep = [&](int64_t v0, int64_t m, const at::Tensor& wm, at::Tensor& p, at::Tensor& zdot) {
      p = (chunk_logits(hc, wm, bias, v0, m, acc) - lse_c).exp_();
      zdot = dhc.defined() ? at::matmul(dhc, wm.t()) : at::zeros({k, c, m}, opts);
      if (dweight.has_value()) zdot.baddbmm_(hc.unsqueeze(0).expand({k, c, d}),
                                             dweight->narrow(1, v0, m).to(acc).transpose(1, 2));
      if (dbias.has_value()) zdot.add_(dbias->narrow(1, v0, m).to(acc).unsqueeze(1));
    };
    at::Tensor centre;  // pᵀż per direction and token (k, c)
    at::Tensor p, zdot;
    if (one_sweep) {
      sweep(0, vocab, weight.to(acc), p, zdot);
      centre = (zdot * p.unsqueeze(0)).sum(2);
    } else {
      centre = at::zeros({k, c}, opts);
      for (int64_t v0 = 0; v0 < vocab; v0 += vc) {
        const int64_t m = std::min(vc, vocab - v0);
        sweep(v0, m, weight.narrow(0, v0, m).to(acc), p, zdot);
        centre.add_((zdot * p.unsqueeze(0)).sum(2));
      }
    }
    for (int64_t v0 = 0; v0 < vocab; v0 += vc) {
      const int64_t m = std::min(vc, vocab - v0);
      const at::Tensor wm = weight.narrow(0, v0, m).to(acc);
      if (!one_sweep) sweep(v0, m, wm, p, zdot);
      at::Tensor g = p.clone();
      subtract_labels(g, p, yc, v0, m);
      g.mul_(wc.unsqueeze(1));                                      // ∂L/∂z of the chunk
      rloss.add_((zdot * g.unsqueeze(0)).sum({1, 2}));
      at::Tensor& r = zdot.sub_(centre.unsqueeze(2)).mul_(p.mul_(wc.unsqueeze(1)).unsqueeze(0));  // R{∂L/∂z}
      at::Tensor rgh_c = rgh.narrow(1, t0, c), rgw_m = rgw.narrow(1, v0, m);
      rgh_c.baddbmm_(r, wm.unsqueeze(0).expand({k, m, d}));
      rgw_m.baddbmm_(r.transpose(1, 2), hc.unsqueeze(0).expand({k, c, d}));
      rgb.narrow(1, v0, m).add_(r.sum(1));
      if (dweight.has_value()) rgh_c.baddbmm_(g.unsqueeze(0).expand({k, c, m}), dweight->narrow(1, v0, m).to(acc));
      if (dhc.defined()) rgw_m.baddbmm_(g.t().unsqueeze(0).expand({k, m, c}), dhc);
    }
  }
  const auto out = h.scalar_type();
  return {rloss, rgh.to(out), rgw.to(out), rgb.to(out)};
}

TORCH_LIBRARY_FRAGMENT(hessgap, m) {
  m.def(
      "linear_ce_forward(Tensor h, Tensor weight, Tensor? bias, Tensor labels, Tensor token_weights, "
      "int token_chunk, int vocab_chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_ce_rgrad(Tensor h, Tensor weight, Tensor? bias, Tensor labels, Tensor token_weights, Tensor lse, "
      "Tensor? dh, Tensor? dweight, Tensor? dbias, int token_chunk, int vocab_chunk) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hessgap, CPU, m) {
  m.impl("linear_ce_forward", &linear_ce_forward);
  m.impl("linear_ce_rgrad", &linear_ce_rgrad);
}

}  // namespace hessgap
