"""Rules of ``nn.LSTM`` and ``nn.GRU``: ``aten.lstm.input`` and ``aten.gru.input`` stay one node in the captured
graph (every layer, direction and time step), and their rule runs the recurrence itself, per time step.

A layer (one direction) is ``gi = X W_iᵀ + b_i`` for all steps at once, then per step ``gh = h W_hᵀ + b_h`` and a
point-wise cell (:class:`LSTMCell`, :class:`GRUCell`) from (gi, gh, state) to the next state. Each pass keeps
that split: the products that do not recur (X W_iᵀ, the weights' gradients, the terms with R{W}) are one matrix
product over all steps and the k directions, and only R{h} W_hᵀ and the cell's element-wise algebra run step by
step. The cells give their R-backward in closed form (σ′ = s(1 − s), σ″ terms (1 − 2s)·R{s}; tanh′ = 1 − t²,
tanh″ terms −2t·R{t}).

The first-order backward through time (its per-step gradients are what the R-backward differentiates) is
computed once per batch and kept with the batch's primal state.
"""

from __future__ import annotations

import torch

from .base import GraphUnsupported, OpRule

aten = torch.ops.aten


def _or_zeros(t, like, k=None):
    if t is not None:
        return t
    return like.new_zeros(like.shape if k is None else (k,) + tuple(like.shape))


class LSTMCell:
    """i, f, g, o = σ, σ, tanh, σ of a = gi + gh; c′ = f c + i g; h′ = o tanh(c′). State (h, c)."""

    gates = 4

    @staticmethod
    def forward(gi, gh, state):
        h, c = state
        i, f, g, o = (gi + gh).chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c2 = f * c + i * g
        tau = torch.tanh(c2)
        return (o * tau, c2), (i, f, g, o, c, tau)

    @staticmethod
    def vjp(cache, g_new):
        i, f, g, o, c, tau = cache
        gh2, gc2 = g_new
        gct = gc2 + gh2 * o * (1 - tau * tau)
        ga = torch.cat([gct * g * i * (1 - i), gct * c * f * (1 - f), gct * i * (1 - g * g),
                        gh2 * tau * o * (1 - o)], -1)
        return ga, ga, (None, gct * f)

    @staticmethod
    def jvp(cache, r_gi, r_gh, r_state):
        i, f, g, o, c, tau = cache
        ai, af, ag, ao = (r_gi + r_gh).chunk(4, -1)
        ri, rf, rg, ro = i * (1 - i) * ai, f * (1 - f) * af, (1 - g * g) * ag, o * (1 - o) * ao
        rc = r_state[1]
        rc2 = rf * c + f * rc + ri * g + i * rg
        rtau = (1 - tau * tau) * rc2
        return (ro * tau + o * rtau, rc2), (ri, rf, rg, ro, rc, rtau)

    @staticmethod
    def rvjp(cache, rcache, g_new, rg_new):
        i, f, g, o, c, tau = cache
        ri, rf, rg, ro, rc, rtau = rcache
        gh2, gc2 = g_new
        rgh2, rgc2 = rg_new
        dtau = 1 - tau * tau
        gtau, go = gh2 * o, gh2 * tau
        r_gtau, r_go = rgh2 * o + gh2 * ro, rgh2 * tau + gh2 * rtau
        gct = gc2 + gtau * dtau
        r_gct = rgc2 + r_gtau * dtau - 2 * gtau * tau * rtau
        gi_, gf, gg = gct * g, gct * c, gct * i
        r_gi_, r_gf, r_gg = r_gct * g + gct * rg, r_gct * c + gct * rc, r_gct * i + gct * ri
        ra = torch.cat([r_gi_ * i * (1 - i) + gi_ * (1 - 2 * i) * ri,
                        r_gf * f * (1 - f) + gf * (1 - 2 * f) * rf,
                        r_gg * (1 - g * g) - 2 * gg * g * rg,
                        r_go * o * (1 - o) + go * (1 - 2 * o) * ro], -1)
        return ra, ra, (None, r_gct * f + gct * rf)


class GRUCell:
    """r, z = σ(gi_r + gh_r), σ(gi_z + gh_z); n = tanh(gi_n + r·gh_n); h′ = n + z (h − n). State (h,)."""

    gates = 3

    @staticmethod
    def forward(gi, gh, state):
        (h,) = state
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (n + z * (h - n),), (r, z, n, h_n, h)

    @staticmethod
    def _first(cache, gh2):
        r, z, n, h_n, h = cache
        gn, gz = gh2 * (1 - z), gh2 * (h - n)
        ga_n = gn * (1 - n * n)
        g_r = ga_n * h_n
        return gn, gz, ga_n, g_r

    @classmethod
    def vjp(cls, cache, g_new):
        r, z, n, h_n, h = cache
        (gh2,) = g_new
        gn, gz, ga_n, g_r = cls._first(cache, gh2)
        ga_r, ga_z = g_r * r * (1 - r), gz * z * (1 - z)
        return torch.cat([ga_r, ga_z, ga_n], -1), torch.cat([ga_r, ga_z, ga_n * r], -1), (gh2 * z,)

    @staticmethod
    def jvp(cache, r_gi, r_gh, r_state):
        r, z, n, h_n, h = cache
        (rh,) = r_state
        ai_r, ai_z, ai_n = r_gi.chunk(3, -1)
        ah_r, ah_z, ah_n = r_gh.chunk(3, -1)
        rr, rz = r * (1 - r) * (ai_r + ah_r), z * (1 - z) * (ai_z + ah_z)
        rn = (1 - n * n) * (ai_n + rr * h_n + r * ah_n)
        return (rn + rz * (h - n) + z * (rh - rn),), (rr, rz, rn, ah_n, rh)

    @classmethod
    def rvjp(cls, cache, rcache, g_new, rg_new):
        r, z, n, h_n, h = cache
        rr, rz, rn, r_hn, rh = rcache
        (gh2,), (rgh2,) = g_new, rg_new
        gn, gz, ga_n, g_r = cls._first(cache, gh2)
        r_gn, r_gz = rgh2 * (1 - z) - gh2 * rz, rgh2 * (h - n) + gh2 * (rh - rn)
        r_ga_n = r_gn * (1 - n * n) - 2 * gn * n * rn
        r_ga_z = r_gz * z * (1 - z) + gz * (1 - 2 * z) * rz
        r_g_r = r_ga_n * h_n + ga_n * r_hn
        r_ga_r = r_g_r * r * (1 - r) + g_r * (1 - 2 * r) * rr
        return (torch.cat([r_ga_r, r_ga_z, r_ga_n], -1), torch.cat([r_ga_r, r_ga_z, r_ga_n * r + ga_n * rr], -1),
                (rgh2 * z + gh2 * rz,))


def _rows(t):
    """(…, T, B, F) -> (…, T·B, F)."""
    return t.reshape(t.shape[:-3] + (-1, t.shape[-1]))


def _times_directions(t, w):
    """t (T, B, F) times each direction's matrix w (k, F, G): (k, T, B, G) in one batched GEMM whose shared operand
    is a stride-0 expand (a broadcasting matmul would copy w once per time step)."""
    rows = t.reshape(-1, t.shape[-1])
    return torch.bmm(rows.expand(w.shape[0], -1, -1), w).view((w.shape[0],) + tuple(t.shape[:-1]) + (w.shape[-1],))


def _linear(x, w, b):
    """x Wᵀ + b over the last dimension (x may carry a leading k)."""
    y = torch.matmul(x, w.t())
    return y if b is None else y + b


class Layer:
    """One layer and direction of the recurrence, time-major: X (T, B, I) -> Y (T, B, H)."""

    def __init__(self, cell, reverse: bool):
        self.cell, self.reverse = cell, reverse

    def steps(self, length):
        return range(length - 1, -1, -1) if self.reverse else range(length)

    def forward(self, x, state, p):
        wi, wh, bi, bh = p
        gi = _linear(x, wi, bi)
        caches, hprev, ys = [None] * x.shape[0], [None] * x.shape[0], [None] * x.shape[0]
        for t in self.steps(x.shape[0]):
            hprev[t] = state[0]
            state, caches[t] = self.cell.forward(gi[t], _linear(state[0], wh, bh), state)
            ys[t] = state[0]
        return torch.stack(ys), state, {"x": x, "p": p, "caches": caches, "hprev": torch.stack(hprev)}

    def backward(self, saved, gy, g_final):
        """First-order gradients: of X, the parameters and the initial state; keeps the per-step ones."""
        wi, wh, bi, bh = saved["p"]
        caches, x, hprev = saved["caches"], saved["x"], saved["hprev"]
        g_state = tuple(_or_zeros(g, hprev[0]) for g in g_final)
        g_news, ggi, ggh = [None] * len(caches), [None] * len(caches), [None] * len(caches)
        for t in reversed(list(self.steps(len(caches)))):
            g_new = (g_state[0] + gy[t] if gy is not None else g_state[0],) + g_state[1:]
            g_news[t] = g_new
            ggi[t], ggh[t], direct = self.cell.vjp(caches[t], g_new)
            g_state = (_or_zeros(direct[0], hprev[0]) + ggh[t] @ wh,) + direct[1:]
        ggi, ggh = torch.stack(ggi), torch.stack(ggh)
        saved["first"] = (g_news, ggi, ggh)
        grads = {"x": ggi @ wi, "wi": _rows(ggi).t() @ _rows(x), "wh": _rows(ggh).t() @ _rows(hprev),
                 "bi": ggi.sum((0, 1)), "bh": ggh.sum((0, 1))}
        return grads, g_state

    def jvp(self, saved, rx, r_state0, rp, k):
        wi, wh, bi, bh = saved["p"]
        rwi, rwh, rbi, rbh = rp
        x, hprev, caches = saved["x"], saved["hprev"], saved["caches"]
        rgi = rx @ wi.t() if rx is not None else x.new_zeros((k,) + tuple(x.shape[:2]) + (wi.shape[0],))
        if rwi is not None:
            rgi = rgi + _times_directions(x, rwi.transpose(1, 2))
        if rbi is not None:
            rgi = rgi + rbi[:, None, None]
        # the R{W_h} part of R{gh}, every step at once (h_{t−1} is known)
        rgh_w = _times_directions(hprev, rwh.transpose(1, 2)) if rwh is not None else None
        r_state = tuple(_or_zeros(r, hprev[0], k) for r in r_state0)
        rcaches, rhprev, rys = [None] * len(caches), [None] * len(caches), [None] * len(caches)
        for t in self.steps(len(caches)):
            rhprev[t] = r_state[0]
            rgh = r_state[0] @ wh.t()
            if rgh_w is not None:
                rgh = rgh + rgh_w[:, t]
            if rbh is not None:
                rgh = rgh + rbh[:, None]
            r_state, rcaches[t] = self.cell.jvp(caches[t], rgi[:, t], rgh, r_state)
            rys[t] = r_state[0]
        rsaved = {"rx": rx, "rp": rp, "rcaches": rcaches, "rhprev": torch.stack(rhprev, 1)}
        return torch.stack(rys, 1), r_state, rsaved

    def rvjp(self, saved, rsaved, rgy, rg_final, k):
        wi, wh, bi, bh = saved["p"]
        rwi, rwh, rbi, rbh = rsaved["rp"]
        caches, x, hprev = saved["caches"], saved["x"], saved["hprev"]
        g_news, ggi, ggh = saved["first"]
        ggh_rwh = _times_directions(ggh, rwh) if rwh is not None else None  # g_gh R{W_h}, every step
        rg_state = tuple(_or_zeros(r, hprev[0], k) for r in rg_final)
        rggi, rggh = [None] * len(caches), [None] * len(caches)
        for t in reversed(list(self.steps(len(caches)))):
            rg_new = (rg_state[0] + rgy[:, t] if rgy is not None else rg_state[0],) + rg_state[1:]
            rggi[t], rggh[t], direct = self.cell.rvjp(caches[t], rsaved["rcaches"][t], g_news[t], rg_new)
            rh = _or_zeros(direct[0], hprev[0], k) + rggh[t] @ wh
            if ggh_rwh is not None:
                rh = rh + ggh_rwh[:, t]
            rg_state = (rh,) + direct[1:]
        rggi, rggh = torch.stack(rggi, 1), torch.stack(rggh, 1)
        rx = rsaved["rx"]
        r_x = rggi @ wi
        if rwi is not None:
            r_x = r_x + _times_directions(ggi, rwi)
        r_wi = torch.matmul(_rows(rggi).transpose(1, 2), _rows(x))
        if rx is not None:
            r_wi = r_wi + torch.matmul(_rows(ggi).t(), _rows(rx))
        r_wh = torch.matmul(_rows(rggh).transpose(1, 2), _rows(hprev)) + torch.matmul(_rows(ggh).t(), _rows(rsaved["rhprev"]))
        grads = {"x": r_x, "wi": r_wi, "wh": r_wh, "bi": rggi.sum((1, 2)), "bh": rggh.sum((1, 2))}
        return grads, rg_state


class Recurrent(OpRule):
    """aten.lstm.input / aten.gru.input: layers × directions of :class:`Layer`, in eval mode."""

    needs_grad = True

    def __init__(self, node):
        super().__init__(node)
        self.lstm = node.target is aten.lstm.input
        self.cell = LSTMCell if self.lstm else GRUCell
        _, hx, params, self.biases, self.layers, dropout, train, bidirectional, self.batch_first = node.args[:9]
        self.directions = 2 if bidirectional else 1
        if train and dropout:
            raise GraphUnsupported(f"{self.describe()} with dropout between layers in train mode (random masks)")
        self.hx = list(hx) if self.lstm else [hx]
        self.params = list(params)
        self.per_layer = 4 if self.biases else 2
        if len(self.params) != self.per_layer * self.layers * self.directions:
            raise GraphUnsupported(f"{self.describe()} with projections (proj_size > 0)")

    def inputs(self):
        return [self.node.args[0], *self.hx, *self.params]

    def _unpack(self, values):
        """(input, initial states per (layer, direction), parameters per (layer, direction)) from the rule inputs."""
        x, states, params = values[0], values[1:1 + len(self.hx)], values[1 + len(self.hx):]
        per = []
        for j in range(self.layers * self.directions):
            p = params[j * self.per_layer:(j + 1) * self.per_layer]
            per.append((p[0], p[1], p[2], p[3]) if self.biases else (p[0], p[1], None, None))
        return x, states, per

    def _time_major(self, t, lead):
        return t.transpose(lead, lead + 1) if (self.batch_first and t is not None) else t

    def _blocks(self) -> list:
        """Per layer, its directions as (index into the states and parameters, :class:`Layer`)."""
        return [[(layer * self.directions + d, Layer(self.cell, reverse=d == 1)) for d in range(self.directions)]
                for layer in range(self.layers)]

    def forward(self, args, kwargs):
        x, hx, params = args[0], args[1], args[2]
        hx = list(hx) if self.lstm else [hx]
        x, states, per = self._unpack([x, *hx, *params])
        h = self._time_major(x, 0)
        saved = {"layers": {}}
        finals = [None] * (self.layers * self.directions)
        for block in self._blocks():
            outs = []
            for j, layer in block:
                y, finals[j], saved["layers"][j] = layer.forward(h, tuple(s[j] for s in states), per[j])
                outs.append(y)
            h = torch.cat(outs, -1)
        out = self._time_major(h, 0)
        result = (out, *(torch.stack([f[i] for f in finals]) for i in range(len(states))))
        return result, saved

    def _split(self, g, j):
        """The slice of a (…, D·H) output gradient that direction j % D of its layer produced."""
        size = g.shape[-1] // self.directions
        d = j % self.directions
        return g[..., d * size:(d + 1) * size]

    def _first_order(self, saved, g):
        """The first-order backward through every layer (once per batch: the R-backward reads its per-step
        gradients)."""
        if "grads" in saved:
            return saved["grads"]
        g = g if g is not None else [None] * (1 + len(self.hx))
        g_out = self._time_major(g[0], 0)
        g_states = g[1:]
        grads = {}
        for block in reversed(self._blocks()):
            g_x = None
            for j, rule in block:
                gy = self._split(g_out, j) if g_out is not None else None
                g_final = tuple(s[j] if s is not None else None for s in g_states)
                grads[j] = rule.backward(saved["layers"][j], gy, g_final)
                g_x = grads[j][0]["x"] if g_x is None else g_x + grads[j][0]["x"]
            g_out = g_x
        saved["grads"] = (grads, g_out)
        return saved["grads"]

    def _assemble(self, grads, g_x, need, lead):
        """Per-rule-input gradients from the per-(layer, direction) results."""
        g_x = self._time_major(g_x, lead)
        states = [torch.stack([grads[j][1][i] for j in range(len(grads))], lead) for i in range(len(self.hx))]
        params = []
        for j in range(len(grads)):
            g = grads[j][0]
            params += [g["wi"], g["wh"]] + ([g["bi"], g["bh"]] if self.biases else [])
        return [t if wanted else None for t, wanted in zip([g_x, *states, *params], need)]

    def vjp(self, saved, g, need):
        grads, g_x = self._first_order(saved, g)
        return self._assemble(grads, g_x, need, 0)

    def jvp(self, saved, tangents):
        rx, r_states, r_per = self._unpack(tangents)
        k = next(t.shape[0] for t in tangents if t is not None)
        rh = self._time_major(rx, 1)
        rsaved, finals = {}, [None] * (self.layers * self.directions)
        for block in self._blocks():
            outs = []
            for j, layer in block:
                r_state0 = tuple(s[:, j] if s is not None else None for s in r_states)
                ry, finals[j], rsaved[j] = layer.jvp(saved["layers"][j], rh, r_state0, r_per[j], k)
                outs.append(ry)
            rh = torch.cat(outs, -1)
        out = [self._time_major(rh, 1)] + [torch.stack([f[i] for f in finals], 1) for i in range(len(self.hx))]
        return out, (rsaved, k)

    def rvjp(self, saved, rsaved, g, rg, need):
        rsaved, k = rsaved
        self._first_order(saved, g)
        rg = rg if rg is not None else [None] * (1 + len(self.hx))
        rg_out = self._time_major(rg[0], 1)
        grads = {}
        for block in reversed(self._blocks()):
            rg_x = None
            for j, rule in block:
                rgy = self._split(rg_out, j) if rg_out is not None else None
                rg_final = tuple(s[:, j] if s is not None else None for s in rg[1:])
                grads[j] = rule.rvjp(saved["layers"][j], rsaved[j], rgy, rg_final, k)
                rg_x = grads[j][0]["x"] if rg_x is None else rg_x + grads[j][0]["x"]
            rg_out = rg_x
        return self._assemble(grads, rg_out, need, 1)


RULES = {aten.lstm.input: Recurrent, aten.gru.input: Recurrent}
