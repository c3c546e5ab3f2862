// Softmax attention and its R-operator for k directions: the schemas of torch.ops.hessgap.attention_* and
// their CPU kernels (math and shapes: hessgap/ops/attention_rop.py).
//
// Flash-style: per (batch, head) the queries are cut into blocks of kBQ rows and the keys into blocks of kBK;
// every op recomputes its tile of P = exp(S − lse) from Q, K and the rows' log-sum-exp, so besides inputs and
// outputs a task holds a few kBQ×kBK and D×kBK tiles, whatever T is: never the T×T matrix, per direction or
// at all. The tiles of P, dP and dS are computed once per tile and shared by the k directions. Inner loops
// are axpy's over contiguous rows (the key block is transposed once per tile), which the compiler vectorizes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "hessgap/attention_rop.h"

namespace hessgap {
namespace {

constexpr int64_t kBQ = 32;
constexpr int64_t kBK = 64;

template <typename T>
void transpose_block(const T* src, int64_t ld, int64_t rows, int64_t cols, T* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * ld + c];
}

// out[i][j] (+)= alpha · Σ_d a[i][d] · bT[d][j]; a is (bq × depth) with row stride lda, bT is (depth × bk).
template <typename T>
void row_times_t(const T* a, int64_t lda, int64_t bq, int64_t depth, const T* bT, int64_t bk, T alpha, T* out,
                 bool accumulate) {
  for (int64_t i = 0; i < bq; ++i) {
    T* o = out + i * bk;
    if (!accumulate) std::fill(o, o + bk, T(0));
    const T* ai = a + i * lda;
    for (int64_t d = 0; d < depth; ++d) {
      const T ad = alpha * ai[d];
      const T* b = bT + d * bk;
      for (int64_t j = 0; j < bk; ++j) o[j] += ad * b[j];
    }
  }
}

// out[i][:] += Σ_j w[i][j] · rows[j][:]   (w is bq × bk, rows is bk × width with row stride ld)
template <typename T>
void weighted_rows(const T* w, int64_t bq, int64_t bk, const T* rows, int64_t ld, int64_t width, T alpha, T* out,
                   int64_t ldo) {
  for (int64_t i = 0; i < bq; ++i) {
    T* o = out + i * ldo;
    for (int64_t j = 0; j < bk; ++j) {
      const T c = alpha * w[i * bk + j];
      if (c == T(0)) continue;
      const T* r = rows + j * ld;
      for (int64_t e = 0; e < width; ++e) o[e] += c * r[e];
    }
  }
}

// out[j][:] += Σ_i w[i][j] · rows[i][:]   (the transposed product, w is bq × bk)
template <typename T>
void weighted_rows_t(const T* w, int64_t bq, int64_t bk, const T* rows, int64_t ld, int64_t width, T alpha, T* out,
                     int64_t ldo) {
  for (int64_t i = 0; i < bq; ++i) {
    const T* r = rows + i * ld;
    for (int64_t j = 0; j < bk; ++j) {
      const T c = alpha * w[i * bk + j];
      if (c == T(0)) continue;
      T* o = out + j * ldo;
      for (int64_t e = 0; e < width; ++e) o[e] += c * r[e];
    }
  }
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t e = 0; e < n; ++e) s += a[e] * b[e];
  return s;
}

// Shapes and pointers of one call, and the tile of scores / probabilities of one (head, query block, key block).
template <typename T>
struct Attention {
  int64_t B, H, Tq, Tk, D, Dv;
  T scale;
  bool causal;
  BiasView bias;

  int64_t head_q(int64_t n) const { return n * Tq * D; }
  int64_t head_k(int64_t n) const { return n * Tk * D; }
  int64_t head_v(int64_t n) const { return n * Tk * Dv; }
  int64_t head_o(int64_t n) const { return n * Tq * Dv; }
  int64_t stride_q() const { return B * H * Tq * D; }  // one direction of a stacked tangent
  int64_t stride_k() const { return B * H * Tk * D; }
  int64_t stride_v() const { return B * H * Tk * Dv; }
  int64_t stride_o() const { return B * H * Tq * Dv; }

  bool skip(int64_t i0, int64_t bq, int64_t j0) const { return causal && j0 > i0 + bq - 1; }

  // s = scale · q_i k_jᵀ + bias, −∞ where masked; kT is the transposed key block (D × bk)
  void scores(int64_t n, const T* q, const T* kT, int64_t i0, int64_t bq, int64_t j0, int64_t bk, T* s) const {
    row_times_t(q + i0 * D, D, bq, D, kT, bk, scale, s, false);
    const T inf = std::numeric_limits<T>::infinity();
    const T* bp = static_cast<const T*>(bias.data);
    const int64_t b = n / H, h = n % H;
    for (int64_t i = 0; i < bq; ++i) {
      for (int64_t j = 0; j < bk; ++j) {
        T& v = s[i * bk + j];
        if (bp) v += bp[b * bias.sb + h * bias.sh + (i0 + i) * bias.si + (j0 + j) * bias.sj];
        if (causal && j0 + j > i0 + i) v = -inf;
      }
    }
  }

  // p = exp(s − lse) in place (0 for rows whose every key is masked)
  void probabilities(T* s, const T* lse, int64_t i0, int64_t bq, int64_t bk) const {
    for (int64_t i = 0; i < bq; ++i) {
      const T l = lse[i0 + i];
      T* row = s + i * bk;
      if (!std::isfinite(l)) {
        std::fill(row, row + bk, T(0));
        continue;
      }
      for (int64_t j = 0; j < bk; ++j) row[j] = std::exp(row[j] - l);
    }
  }
};

template <typename T>
Attention<T> describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const c10::optional<at::Tensor>& bias, bool causal, double scale) {
  return Attention<T>{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3), static_cast<T>(scale),
                      causal, bias_view(bias)};
}

// ---- forward: O and the rows' log-sum-exp, online softmax over key blocks ---------------------------------

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                         const at::Tensor& v_, const c10::optional<at::Tensor>& bias,
                                                         bool causal, double scale) {
  check_attention(q_, k_, v_, bias);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_forward_cpu", [&] {
    using T = scalar_t;
    const auto a = describe<T>(q, k, v, bias, causal, scale);
    const T* qp = q.const_data_ptr<T>();
    const T* kp = k.const_data_ptr<T>();
    const T* vp = v.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    T* lp = lse.mutable_data_ptr<T>();
    const T inf = std::numeric_limits<T>::infinity();
    at::parallel_for(0, a.B * a.H, 1, [&](int64_t n0, int64_t n1) {
      std::vector<T> kT(a.D * kBK), s(kBQ * kBK), acc(kBQ * a.Dv), m(kBQ), l(kBQ);
      for (int64_t n = n0; n < n1; ++n) {
        const T* qh = qp + a.head_q(n);
        const T* kh = kp + a.head_k(n);
        const T* vh = vp + a.head_v(n);
        for (int64_t i0 = 0; i0 < a.Tq; i0 += kBQ) {
          const int64_t bq = std::min(kBQ, a.Tq - i0);
          std::fill(m.begin(), m.end(), -inf);
          std::fill(l.begin(), l.end(), T(0));
          std::fill(acc.begin(), acc.end(), T(0));
          for (int64_t j0 = 0; j0 < a.Tk && !a.skip(i0, bq, j0); j0 += kBK) {
            const int64_t bk = std::min(kBK, a.Tk - j0);
            transpose_block(kh + j0 * a.D, a.D, bk, a.D, kT.data());
            a.scores(n, qh, kT.data(), i0, bq, j0, bk, s.data());
            for (int64_t i = 0; i < bq; ++i) {
              T* row = s.data() + i * bk;
              T mx = m[i];
              for (int64_t j = 0; j < bk; ++j) mx = std::max(mx, row[j]);
              if (mx == -inf) {
                std::fill(row, row + bk, T(0));
                continue;
              }
              const T shrink = m[i] == -inf ? T(0) : std::exp(m[i] - mx);
              T sum = 0;
              for (int64_t j = 0; j < bk; ++j) {
                row[j] = std::exp(row[j] - mx);
                sum += row[j];
              }
              l[i] = l[i] * shrink + sum;
              T* ai = acc.data() + i * a.Dv;
              for (int64_t e = 0; e < a.Dv; ++e) ai[e] *= shrink;
              m[i] = mx;
            }
            weighted_rows(s.data(), bq, bk, vh + j0 * a.Dv, a.Dv, a.Dv, T(1), acc.data(), a.Dv);
          }
          for (int64_t i = 0; i < bq; ++i) {
            T* o = op + a.head_o(n) + (i0 + i) * a.Dv;
            const T* ai = acc.data() + i * a.Dv;
            const bool any = l[i] > T(0);
            for (int64_t e = 0; e < a.Dv; ++e) o[e] = any ? ai[e] / l[i] : T(0);
            lp[n * a.Tq + i0 + i] = any ? m[i] + std::log(l[i]) : -inf;
          }
        }
      }
    });
  });
  return {out, lse};
}

// ---- first-order backward ------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const c10::optional<at::Tensor>& bias,
    const at::Tensor& o_, const at::Tensor& lse_, const at::Tensor& g_, bool causal, double scale) {
  check_attention(q_, k_, v_, bias);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), o = o_.contiguous(),
                   lse = lse_.contiguous(), g = g_.contiguous();
  TORCH_CHECK(g.sizes() == o.sizes(), "hessgap: g must have the output's shape ", o.sizes());
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward_cpu", [&] {
    using T = scalar_t;
    const auto a = describe<T>(q, k, v, bias, causal, scale);
    const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const T *op = o.const_data_ptr<T>(), *lp = lse.const_data_ptr<T>(), *gp = g.const_data_ptr<T>();
    T *dqp = dq.mutable_data_ptr<T>(), *dkp = dk.mutable_data_ptr<T>(), *dvp = dv.mutable_data_ptr<T>();
    at::parallel_for(0, a.B * a.H, 1, [&](int64_t n0, int64_t n1) {
      std::vector<T> kT(a.D * kBK), vT(a.Dv * kBK), p(kBQ * kBK), dp(kBQ * kBK), delta(a.Tq);
      for (int64_t n = n0; n < n1; ++n) {
        const T *qh = qp + a.head_q(n), *kh = kp + a.head_k(n), *vh = vp + a.head_v(n);
        const T *gh = gp + a.head_o(n), *oh = op + a.head_o(n), *lh = lp + n * a.Tq;
        for (int64_t i = 0; i < a.Tq; ++i) delta[i] = dot(gh + i * a.Dv, oh + i * a.Dv, a.Dv);
        for (int64_t i0 = 0; i0 < a.Tq; i0 += kBQ) {
          const int64_t bq = std::min(kBQ, a.Tq - i0);
          for (int64_t j0 = 0; j0 < a.Tk && !a.skip(i0, bq, j0); j0 += kBK) {
            const int64_t bk = std::min(kBK, a.Tk - j0);
            transpose_block(kh + j0 * a.D, a.D, bk, a.D, kT.data());
            transpose_block(vh + j0 * a.Dv, a.Dv, bk, a.Dv, vT.data());
            a.scores(n, qh, kT.data(), i0, bq, j0, bk, p.data());
            a.probabilities(p.data(), lh, i0, bq, bk);
            row_times_t(gh + i0 * a.Dv, a.Dv, bq, a.Dv, vT.data(), bk, T(1), dp.data(), false);
            for (int64_t i = 0; i < bq; ++i)
              for (int64_t j = 0; j < bk; ++j) dp[i * bk + j] = p[i * bk + j] * (dp[i * bk + j] - delta[i0 + i]);
            weighted_rows_t(p.data(), bq, bk, gh + i0 * a.Dv, a.Dv, a.Dv, T(1), dvp + a.head_v(n) + j0 * a.Dv, a.Dv);
            weighted_rows(dp.data(), bq, bk, kh + j0 * a.D, a.D, a.D, a.scale, dqp + a.head_q(n) + i0 * a.D, a.D);
            weighted_rows_t(dp.data(), bq, bk, qh + i0 * a.D, a.D, a.D, a.scale, dkp + a.head_k(n) + j0 * a.D, a.D);
          }
        }
      }
    });
  });
  return {dq, dk, dv};
}

// ---- R-forward: R{O} and ρ for k directions ------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> attention_rforward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const c10::optional<at::Tensor>& bias,
    const at::Tensor& o_, const at::Tensor& lse_, const at::Tensor& rq_, const at::Tensor& rk_, const at::Tensor& rv_,
    bool causal, double scale) {
  check_attention(q_, k_, v_, bias);
  const int64_t K = rq_.size(0);
  check_stack(q_, rq_, "rq", K);
  check_stack(k_, rk_, "rk", K);
  check_stack(v_, rv_, "rv", K);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), o = o_.contiguous(),
                   lse = lse_.contiguous(), rq = rq_.contiguous(), rk = rk_.contiguous(), rv = rv_.contiguous();
  at::Tensor ro = at::empty({K, q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor rho = at::empty({K, q.size(0), q.size(1), q.size(2)}, q.options());
  if (K == 0) return {ro, rho};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_rforward_cpu", [&] {
    using T = scalar_t;
    const auto a = describe<T>(q, k, v, bias, causal, scale);
    const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const T *op = o.const_data_ptr<T>(), *lp = lse.const_data_ptr<T>();
    const T *rqp = rq.const_data_ptr<T>(), *rkp = rk.const_data_ptr<T>(), *rvp = rv.const_data_ptr<T>();
    T *rop = ro.mutable_data_ptr<T>(), *rhop = rho.mutable_data_ptr<T>();
    at::parallel_for(0, a.B * a.H, 1, [&](int64_t n0, int64_t n1) {
      // per direction: the running ρ and R{O} accumulators of one query block (kBQ rows each)
      std::vector<T> kT(a.D * kBK), rkT(a.D * kBK), p(kBQ * kBK), rs(kBQ * kBK), acc(K * kBQ * a.Dv), r(K * kBQ);
      for (int64_t n = n0; n < n1; ++n) {
        const T *qh = qp + a.head_q(n), *kh = kp + a.head_k(n), *vh = vp + a.head_v(n), *lh = lp + n * a.Tq;
        for (int64_t i0 = 0; i0 < a.Tq; i0 += kBQ) {
          const int64_t bq = std::min(kBQ, a.Tq - i0);
          std::fill(acc.begin(), acc.end(), T(0));
          std::fill(r.begin(), r.end(), T(0));
          for (int64_t j0 = 0; j0 < a.Tk && !a.skip(i0, bq, j0); j0 += kBK) {
            const int64_t bk = std::min(kBK, a.Tk - j0);
            transpose_block(kh + j0 * a.D, a.D, bk, a.D, kT.data());
            a.scores(n, qh, kT.data(), i0, bq, j0, bk, p.data());
            a.probabilities(p.data(), lh, i0, bq, bk);
            for (int64_t d = 0; d < K; ++d) {
              const T* rqh = rqp + d * a.stride_q() + a.head_q(n);
              const T* rkh = rkp + d * a.stride_k() + a.head_k(n);
              const T* rvh = rvp + d * a.stride_v() + a.head_v(n);
              transpose_block(rkh + j0 * a.D, a.D, bk, a.D, rkT.data());
              row_times_t(rqh + i0 * a.D, a.D, bq, a.D, kT.data(), bk, a.scale, rs.data(), false);
              row_times_t(qh + i0 * a.D, a.D, bq, a.D, rkT.data(), bk, a.scale, rs.data(), true);
              T* rd = r.data() + d * kBQ;
              for (int64_t i = 0; i < bq; ++i) {
                T sum = 0;
                for (int64_t j = 0; j < bk; ++j) {
                  T& x = rs[i * bk + j];
                  x = p[i * bk + j] * x;  // P ⊙ R{S}
                  sum += x;
                }
                rd[i] += sum;
              }
              T* ad = acc.data() + d * kBQ * a.Dv;
              weighted_rows(rs.data(), bq, bk, vh + j0 * a.Dv, a.Dv, a.Dv, T(1), ad, a.Dv);
              weighted_rows(p.data(), bq, bk, rvh + j0 * a.Dv, a.Dv, a.Dv, T(1), ad, a.Dv);
            }
          }
          // R{O} = Σ_j P (R{S} − ρ) V + P R{V} = acc − ρ·O
          for (int64_t d = 0; d < K; ++d) {
            for (int64_t i = 0; i < bq; ++i) {
              const T rho_i = r[d * kBQ + i];
              const T* oi = op + a.head_o(n) + (i0 + i) * a.Dv;
              const T* ai = acc.data() + (d * kBQ + i) * a.Dv;
              T* out = rop + d * a.stride_o() + a.head_o(n) + (i0 + i) * a.Dv;
              for (int64_t e = 0; e < a.Dv; ++e) out[e] = ai[e] - rho_i * oi[e];
              rhop[d * a.B * a.H * a.Tq + n * a.Tq + i0 + i] = rho_i;
            }
          }
        }
      }
    });
  });
  return {ro, rho};
}

// ---- R-backward: R{∂/∂Q}, R{∂/∂K}, R{∂/∂V} for k directions ----------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_rbackward_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const c10::optional<at::Tensor>& bias,
    const at::Tensor& o_, const at::Tensor& lse_, const at::Tensor& g_, const at::Tensor& rq_, const at::Tensor& rk_,
    const at::Tensor& rv_, const at::Tensor& ro_, const at::Tensor& rho_, const c10::optional<at::Tensor>& rg_,
    bool causal, double scale) {
  check_attention(q_, k_, v_, bias);
  const int64_t K = rq_.size(0);
  check_stack(q_, rq_, "rq", K);
  check_stack(k_, rk_, "rk", K);
  check_stack(v_, rv_, "rv", K);
  check_stack(o_, ro_, "ro", K);
  const bool has_rg = rg_.has_value() && rg_->defined();
  if (has_rg) check_stack(o_, *rg_, "rg", K);
  TORCH_CHECK(g_.sizes() == o_.sizes(), "hessgap: g must have the output's shape ", o_.sizes());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), o = o_.contiguous(),
                   lse = lse_.contiguous(), g = g_.contiguous(), rq = rq_.contiguous(), rk = rk_.contiguous(),
                   rv = rv_.contiguous(), ro = ro_.contiguous(), rho = rho_.contiguous();
  const at::Tensor rg = has_rg ? rg_->contiguous() : at::Tensor();
  at::Tensor rdq = at::zeros_like(rq), rdk = at::zeros_like(rk), rdv = at::zeros_like(rv);
  if (K == 0) return {rdq, rdk, rdv};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_rbackward_cpu", [&] {
    using T = scalar_t;
    const auto a = describe<T>(q, k, v, bias, causal, scale);
    const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const T *op = o.const_data_ptr<T>(), *lp = lse.const_data_ptr<T>(), *gp = g.const_data_ptr<T>();
    const T *rqp = rq.const_data_ptr<T>(), *rkp = rk.const_data_ptr<T>(), *rvp = rv.const_data_ptr<T>();
    const T *rop = ro.const_data_ptr<T>(), *rhop = rho.const_data_ptr<T>();
    const T* rgp = has_rg ? rg.const_data_ptr<T>() : nullptr;
    T *rdqp = rdq.mutable_data_ptr<T>(), *rdkp = rdk.mutable_data_ptr<T>(), *rdvp = rdv.mutable_data_ptr<T>();
    const int64_t rows = a.B * a.H * a.Tq;
    at::parallel_for(0, a.B * a.H, 1, [&](int64_t n0, int64_t n1) {
      std::vector<T> kT(a.D * kBK), vT(a.Dv * kBK), rkT(a.D * kBK), rvT(a.Dv * kBK);
      std::vector<T> p(kBQ * kBK), dp(kBQ * kBK), ds(kBQ * kBK), rp(kBQ * kBK), rdp(kBQ * kBK);
      std::vector<T> delta(a.Tq), rdelta(K * a.Tq);
      for (int64_t n = n0; n < n1; ++n) {
        const T *qh = qp + a.head_q(n), *kh = kp + a.head_k(n), *vh = vp + a.head_v(n);
        const T *oh = op + a.head_o(n), *gh = gp + a.head_o(n), *lh = lp + n * a.Tq;
        for (int64_t i = 0; i < a.Tq; ++i) delta[i] = dot(gh + i * a.Dv, oh + i * a.Dv, a.Dv);
        for (int64_t d = 0; d < K; ++d) {
          const T* roh = rop + d * a.stride_o() + a.head_o(n);
          for (int64_t i = 0; i < a.Tq; ++i) {
            T x = dot(gh + i * a.Dv, roh + i * a.Dv, a.Dv);
            if (rgp) x += dot(rgp + d * a.stride_o() + a.head_o(n) + i * a.Dv, oh + i * a.Dv, a.Dv);
            rdelta[d * a.Tq + i] = x;
          }
        }
        for (int64_t i0 = 0; i0 < a.Tq; i0 += kBQ) {
          const int64_t bq = std::min(kBQ, a.Tq - i0);
          for (int64_t j0 = 0; j0 < a.Tk && !a.skip(i0, bq, j0); j0 += kBK) {
            const int64_t bk = std::min(kBK, a.Tk - j0);
            transpose_block(kh + j0 * a.D, a.D, bk, a.D, kT.data());
            transpose_block(vh + j0 * a.Dv, a.Dv, bk, a.Dv, vT.data());
            a.scores(n, qh, kT.data(), i0, bq, j0, bk, p.data());
            a.probabilities(p.data(), lh, i0, bq, bk);
            row_times_t(gh + i0 * a.Dv, a.Dv, bq, a.Dv, vT.data(), bk, T(1), dp.data(), false);
            for (int64_t i = 0; i < bq; ++i)
              for (int64_t j = 0; j < bk; ++j) {
                dp[i * bk + j] -= delta[i0 + i];  // dP − δ
                ds[i * bk + j] = p[i * bk + j] * dp[i * bk + j];
              }
            for (int64_t d = 0; d < K; ++d) {
              const T* rqh = rqp + d * a.stride_q() + a.head_q(n);
              const T* rkh = rkp + d * a.stride_k() + a.head_k(n);
              const T* rvh = rvp + d * a.stride_v() + a.head_v(n);
              const T* rgh = rgp ? rgp + d * a.stride_o() + a.head_o(n) : nullptr;
              const T* rhoh = rhop + d * rows + n * a.Tq;
              transpose_block(rkh + j0 * a.D, a.D, bk, a.D, rkT.data());
              transpose_block(rvh + j0 * a.Dv, a.Dv, bk, a.Dv, rvT.data());
              // R{P} = P ⊙ (R{S} − ρ)
              row_times_t(rqh + i0 * a.D, a.D, bq, a.D, kT.data(), bk, a.scale, rp.data(), false);
              row_times_t(qh + i0 * a.D, a.D, bq, a.D, rkT.data(), bk, a.scale, rp.data(), true);
              // R{dP} = R{g} Vᵀ + g R{V}ᵀ
              row_times_t(gh + i0 * a.Dv, a.Dv, bq, a.Dv, rvT.data(), bk, T(1), rdp.data(), false);
              if (rgh) row_times_t(rgh + i0 * a.Dv, a.Dv, bq, a.Dv, vT.data(), bk, T(1), rdp.data(), true);
              for (int64_t i = 0; i < bq; ++i) {
                const T rho_i = rhoh[i0 + i], rdelta_i = rdelta[d * a.Tq + i0 + i];
                for (int64_t j = 0; j < bk; ++j) {
                  const int64_t x = i * bk + j;
                  const T pv = p[x];
                  rp[x] = pv * (rp[x] - rho_i);
                  rdp[x] = rp[x] * dp[x] + pv * (rdp[x] - rdelta_i);  // now R{dS}
                }
              }
              T* rdvh = rdvp + d * a.stride_v() + a.head_v(n) + j0 * a.Dv;
              weighted_rows_t(rp.data(), bq, bk, gh + i0 * a.Dv, a.Dv, a.Dv, T(1), rdvh, a.Dv);
              if (rgh) weighted_rows_t(p.data(), bq, bk, rgh + i0 * a.Dv, a.Dv, a.Dv, T(1), rdvh, a.Dv);
              T* rdqh = rdqp + d * a.stride_q() + a.head_q(n) + i0 * a.D;
              weighted_rows(rdp.data(), bq, bk, kh + j0 * a.D, a.D, a.D, a.scale, rdqh, a.D);
              weighted_rows(ds.data(), bq, bk, rkh + j0 * a.D, a.D, a.D, a.scale, rdqh, a.D);
              T* rdkh = rdkp + d * a.stride_k() + a.head_k(n) + j0 * a.D;
              weighted_rows_t(rdp.data(), bq, bk, qh + i0 * a.D, a.D, a.D, a.scale, rdkh, a.D);
              weighted_rows_t(ds.data(), bq, bk, rqh + i0 * a.D, a.D, a.D, a.scale, rdkh, a.D);
            }
          }
        }
      }
    });
  });
  return {rdq, rdk, rdv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hessgap, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? bias, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor o, Tensor lse, Tensor g, bool causal, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("attention_rforward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor o, Tensor lse, Tensor rq, Tensor rk, "
        "Tensor rv, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("attention_rbackward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor o, Tensor lse, Tensor g, Tensor rq, "
        "Tensor rk, Tensor rv, Tensor ro, Tensor rho, Tensor? rg, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hessgap, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_rforward", &attention_rforward_cpu);
  m.impl("attention_rbackward", &attention_rbackward_cpu);
}

}  // namespace hessgap
