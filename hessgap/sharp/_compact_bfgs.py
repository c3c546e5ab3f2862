"""The limited-memory BFGS matrix of L-BFGS-B in compact form (Byrd, Nocedal & Schnabel 1994; Byrd, Lu,
Nocedal & Zhu 1995, Section 3):

    B = θI − W M Wᵀ,   W = [Y  θS] (n × 2c),   M = [[−D, Lᵀ], [L, θSᵀS]]⁻¹

where S and Y hold the last c ≤ m corrections s = x₊ − x and y = g₊ − g (oldest first), D is the diagonal
of SᵀY, L its strictly lower triangle and θ = yᵀy / sᵀy of the newest pair.

The n-vectors live in two (m, n) tensors, Y and S, on the caller's device and in its dtype; a new pair
fills the next free slot or overwrites the oldest, so the c pairs in use are always the first c rows and
every product with W is a matrix–vector product over them (the age order is applied to the 2c results).
The small matrices (SᵀS, SᵀY, M, the factor of the subspace system K) are float64 on the CPU, as scipy
keeps them, and are computed with the same factorizations: T = θSᵀS + LD⁻¹Lᵀ = JJᵀ for M (``formt`` and
``bmv``) and K = UᵀEU for the subspace step (``formk``), so that a factorization that fails resets the
memory where scipy's does.
"""

from __future__ import annotations

import torch

_F64 = torch.float64
_CPU = torch.device("cpu")


class CompactLbfgs:
    """The last ``memory`` correction pairs of an n-variable problem and the compact matrices built from them."""

    def __init__(self, n: int, memory: int, dtype: torch.dtype, device: torch.device):
        self.memory = memory
        self.y = torch.empty(memory, n, dtype=dtype, device=device)
        self.s = torch.empty(memory, n, dtype=dtype, device=device)
        self.slots: list[int] = []  # the rows in use, oldest pair first
        self.theta = 1.0
        self._ss = torch.zeros(memory, memory, dtype=_F64)  # sᵢᵀsⱼ by slot
        self._sy = torch.zeros(memory, memory, dtype=_F64)  # sᵢᵀyⱼ by slot (the newest row, and D = sᵢᵀyᵢ)
        self.middle = torch.zeros(0, 0, dtype=_F64)  # M, in W's column order
        self._middle_on_device: torch.Tensor | None = None
        # Grams of [y-slots, s-slots] over the free (Z) and active (A) variables of `_tracked_free`, kept up
        # to date as pairs arrive and variables enter or leave the free set (as scipy's formk does), so
        # that K costs O(changes · c²) rather than O(n c²) per iteration
        self._gram_free = torch.zeros(2 * memory, 2 * memory, dtype=_F64)
        self._gram_active = torch.zeros(2 * memory, 2 * memory, dtype=_F64)
        self._tracked_free = torch.ones(n, dtype=torch.bool, device=device)
        self._k_factor: torch.Tensor | None = None  # U with K = UᵀEU, for the free set in `_k_free`
        self._k_free: torch.Tensor | None = None
        self._masked: torch.Tensor | None = None  # (5, n) scratch for push: s, and y, s on Z and on A

    @property
    def size(self) -> int:
        """c: how many pairs are held (0 means B = θI with θ = 1)."""
        return len(self.slots)

    def reset(self) -> None:
        """Forget every pair (after a failed factorization or line search, as scipy does)."""
        self.slots = []
        self.theta = 1.0
        self.middle = torch.zeros(0, 0, dtype=_F64)
        self._middle_on_device = None
        self._k_factor = None

    # ------------------------------------------------------------------------------------ products with W

    def transpose_times(self, v: torch.Tensor) -> torch.Tensor:
        """Wᵀv = [Yᵀv; θSᵀv] as a float64 CPU vector of length 2c."""
        c = self.size
        products = torch.cat([self.y[:c] @ v, self.s[:c] @ v]).to(_CPU, _F64)
        return torch.cat([products[self.slots], self.theta * products[[c + slot for slot in self.slots]]])

    def times(self, coefficients: torch.Tensor) -> torch.Tensor:
        """W·coefficients (an n-vector in the variables' dtype and device) for a 2c-vector of coefficients."""
        c = self.size
        by_slot = torch.zeros(2 * c, dtype=_F64)
        by_slot[self.slots] = coefficients[:c]
        by_slot[[c + slot for slot in self.slots]] = self.theta * coefficients[c:]
        by_slot = by_slot.to(self.y.device, self.y.dtype)
        return torch.addmv(self.y[:c].T @ by_slot[:c], self.s[:c].T, by_slot[c:])

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows of W at the variables ``index``: a (len(index), 2c) float64 tensor on the device."""
        c = self.size
        picked = torch.cat([self.y[:c][:, index], self.s[:c][:, index]]).to(_F64)
        age = self.slots + [c + slot for slot in self.slots]
        w = picked[age]
        w[c:] *= self.theta
        return w.T

    def middle_on_device(self) -> torch.Tensor:
        """M as float64 on the variables' device (the Cauchy search applies it to many rows at once)."""
        if self._middle_on_device is None:
            self._middle_on_device = self.middle.to(self.y.device)
        return self._middle_on_device

    # ------------------------------------------------------------------------------------------- update

    def push(self, s: torch.Tensor, y: torch.Tensor, *, ys: float, yy: float, ss: float) -> bool:
        """Add the pair (s, y) with sᵀy = ``ys``, yᵀy = ``yy``, sᵀs = ``ss`` (scipy's ``matupd`` and
        ``formt``). Returns False when T = θSᵀS + LD⁻¹Lᵀ is not positive definite; the caller then resets.

        sᵀy and sᵀs come from the line search (as (φ'(stp) − φ'(0))·stp and stp²‖d‖²) rather than from
        new dot products, as in scipy.
        """
        slot = len(self.slots) if len(self.slots) < self.memory else self.slots.pop(0)
        self.slots.append(slot)
        self.y[slot].copy_(y)
        self.s[slot].copy_(s)
        self.theta = yy / ys
        c = self.size

        # s·(every y and s), and the new rows of the free and active Grams over the tracked free set
        if self._masked is None:
            self._masked = torch.empty(5, y.numel(), dtype=y.dtype, device=y.device)
        masked, free = self._masked, self._tracked_free.to(y.dtype)
        masked[0].copy_(s)
        torch.mul(y, free, out=masked[1])
        torch.mul(s, free, out=masked[2])
        torch.sub(y, masked[1], out=masked[3])
        torch.sub(s, masked[2], out=masked[4])
        products = torch.cat([masked @ self.y[:c].T, masked @ self.s[:c].T], dim=1).to(_CPU, _F64)
        self._sy[slot, :c] = products[0, :c]  # s_newᵀyⱼ: the newest row of SᵀY
        self._ss[slot, :c] = products[0, c:]
        self._ss[:c, slot] = products[0, c:]
        self._sy[slot, slot] = ys
        self._ss[slot, slot] = ss
        columns = list(range(c)) + [self.memory + j for j in range(c)]
        for gram, new_rows in ((self._gram_free, products[1:3]), (self._gram_active, products[3:5])):
            for row, values in zip((slot, self.memory + slot), new_rows):
                gram[row, columns] = values
                gram[columns, row] = values

        self._k_factor = None
        self._middle_on_device = None
        return self._form_middle()

    def _age_ordered(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix[self.slots][:, self.slots]

    def _form_middle(self) -> bool:
        """M by scipy's route: T = θSᵀS + LD⁻¹Lᵀ = JJᵀ, then M·v by two block-triangular solves (``bmv``),
        applied to the identity. False when T is not positive definite."""
        sy = self._age_ordered(self._sy)
        ss = self._age_ordered(self._ss)
        diagonal = sy.diagonal()
        lower = sy.tril(-1)
        t = self.theta * ss + (lower / diagonal) @ lower.T
        j, info = torch.linalg.cholesky_ex(t)
        if info.item() != 0:
            return False
        c = self.size
        identity = torch.eye(2 * c, dtype=_F64)
        v1, v2 = identity[:c], identity[c:]
        root = diagonal.sqrt().unsqueeze(1)
        # [D^½ 0; −LD^-½ J] [p1; p2] = [v1; v2]
        p1 = v1 / root
        p2 = torch.linalg.solve_triangular(j, v2 + (lower / diagonal) @ v1, upper=False)
        # [−D^½ D^-½Lᵀ; 0 Jᵀ] [q1; q2] = [p1; p2]
        q2 = torch.linalg.solve_triangular(j.T, p2, upper=True)
        q1 = -p1 / root + (lower.T @ q2) / diagonal.unsqueeze(1)
        self.middle = torch.cat([q1, q2])
        return True

    # ------------------------------------------------------------------------- the subspace system K

    def _track_free_set(self, free: torch.Tensor) -> None:
        """Move the Grams from the tracked free set to ``free``: add the entering variables' outer
        products to the free Gram and take them from the active one; the reverse for the leaving ones."""
        c = self.size
        in_use = torch.tensor(list(range(c)) + [self.memory + j for j in range(c)])
        block = (in_use.unsqueeze(1), in_use)
        entering = torch.nonzero(free & ~self._tracked_free).squeeze(1)
        leaving = torch.nonzero(self._tracked_free & ~free).squeeze(1)
        for index, sign in ((entering, 1.0), (leaving, -1.0)):
            if c and index.numel():
                picked = torch.cat([self.y[:c][:, index], self.s[:c][:, index]])
                change = sign * (picked @ picked.T).to(_CPU, _F64)
                self._gram_free[block] += change
                self._gram_active[block] -= change
        self._tracked_free = free

    def factor_subspace(self, free: torch.Tensor) -> bool:
        """Factor K = [[−D − YᵀZZᵀY/θ, L_aᵀ − R_zᵀ], [L_a − R_z, θSᵀAAᵀS]] as UᵀEU, E = diag(−I, I), for the
        free set ``free`` (scipy's ``formk``). L_a is the strictly lower triangle of SᵀAAᵀY and R_z the upper
        triangle of SᵀZZᵀY. Reuses the last factor when neither the pairs nor the free set changed.
        False when a Cholesky factorization fails; the caller then resets."""
        if self._k_factor is not None and torch.equal(free, self._k_free):
            return True
        if not torch.equal(free, self._tracked_free):
            self._track_free_set(free)
        c, theta = self.size, self.theta
        y_rows, s_rows = self.slots, [self.memory + slot for slot in self.slots]
        yy_free = self._gram_free[y_rows][:, y_rows]
        sy_free = self._gram_free[s_rows][:, y_rows]
        ss_active = self._gram_active[s_rows][:, s_rows]
        sy_active = self._gram_active[s_rows][:, y_rows]
        diagonal = self._age_ordered(self._sy).diagonal()

        top_left = torch.diag(diagonal) + yy_free / theta
        top_right = (sy_free.triu() - sy_active.tril(-1)).T
        l11, info = torch.linalg.cholesky_ex(top_left)
        if info.item() != 0:
            return False
        u12 = torch.linalg.solve_triangular(l11, top_right, upper=False)
        l22, info = torch.linalg.cholesky_ex(theta * ss_active + u12.T @ u12)
        if info.item() != 0:
            return False
        factor = torch.zeros(2 * c, 2 * c, dtype=_F64)
        factor[:c, :c] = l11.T
        factor[:c, c:] = u12
        factor[c:, c:] = l22.T
        self._k_factor = factor
        self._k_free = free
        return True

    def solve_subspace(self, v: torch.Tensor) -> torch.Tensor:
        """K⁻¹v = U⁻¹EU⁻ᵀv with the factor of the last :meth:`factor_subspace`."""
        u = self._k_factor
        w = torch.linalg.solve_triangular(u.T, v.unsqueeze(1), upper=False)
        w[: self.size] *= -1.0
        return torch.linalg.solve_triangular(u, w, upper=True).squeeze(1)
