"""The Moré–Thuente line search (Moré & Thuente 1994, MINPACK-2's ``dcsrch``/``dcstep``) on plain floats.

L-BFGS-B searches along its direction with this method and ftol = 1e-3, gtol = 0.9, xtol = 0.1, a
minimum step of 0 and a maximum step that keeps the trial points in the box. The search keeps an
interval [stx, sty] that contains a step satisfying the strong Wolfe conditions

    φ(stp) ≤ φ(0) + ftol·stp·φ'(0)     and     |φ'(stp)| ≤ gtol·|φ'(0)|,

and picks each trial step from cubic and quadratic models of φ on that interval, safeguarded. The
arithmetic follows MINPACK-2's step by step, so that the same φ values give the same steps as scipy.
"""

from __future__ import annotations

import numpy as np

EVALUATE = "evaluate"  # evaluate φ and φ' at `step` and call `update` again
CONVERGED = "converged"  # `step` satisfies both Wolfe conditions
WARNING = "warning"  # no further progress is possible; `step` is the last trial (scipy accepts it too)

# how far an unbracketed search may extrapolate, relative to the last step (MINPACK-2's xtrapl, xtrapu)
_EXTRAPOLATE_LOW = 1.1
_EXTRAPOLATE_HIGH = 4.0


class MoreThuente:
    """One line search on φ(stp) = f(x + stp·d), started from φ(0) = ``value`` and φ'(0) = ``slope`` < 0.

    Evaluate φ at :attr:`step`, pass the value and slope to :meth:`update`, and repeat while it returns
    :data:`EVALUATE`; :attr:`warning` names the reason when it returns :data:`WARNING`.
    """

    def __init__(
        self,
        value: float,
        slope: float,
        step: float,
        step_max: float,
        *,
        ftol: float = 1e-3,
        gtol: float = 0.9,
        xtol: float = 0.1,
        step_min: float = 0.0,
    ):
        if not slope < 0:
            raise ValueError(f"the search direction must descend, got φ'(0) = {slope}")
        if not step_min <= step <= step_max:
            raise ValueError(f"the first step {step} must lie in [{step_min}, {step_max}]")
        self.step = step
        self.warning = ""
        self._ftol, self._gtol, self._xtol = ftol, gtol, xtol
        self._step_min, self._step_max = step_min, step_max
        self._bracketed = False
        self._stage = 1  # 2 once a step with ψ(stp) ≤ 0 and φ'(stp) ≥ 0 was seen
        self._value0 = value
        self._slope0 = slope
        self._slope_test = ftol * slope  # the sufficient-decrease line's slope
        self._width = step_max - step_min
        self._width_before = 2.0 * self._width
        # (stx, fx, gx): the best step so far; (sty, fy, gy): the other end of the interval
        self._stx, self._fx, self._gx = 0.0, value, slope
        self._sty, self._fy, self._gy = 0.0, value, slope
        self._lo, self._hi = 0.0, step + _EXTRAPOLATE_HIGH * step

    def update(self, value: float, slope: float) -> str:
        """Take φ(step) and φ'(step); return :data:`EVALUATE` (with a new :attr:`step`), :data:`CONVERGED`
        or :data:`WARNING`."""
        step = self.step
        sufficient = self._value0 + step * self._slope_test
        if self._stage == 1 and value <= sufficient and slope >= 0.0:
            self._stage = 2

        # the tests in MINPACK-2's order: a later one overrides an earlier one's reason
        status = ""
        if self._bracketed and (step <= self._lo or step >= self._hi):
            status, self.warning = WARNING, "rounding errors prevent progress"
        if self._bracketed and self._hi - self._lo <= self._xtol * self._hi:
            status, self.warning = WARNING, "xtol test satisfied"
        if step == self._step_max and value <= sufficient and slope <= self._slope_test:
            status, self.warning = WARNING, "stp = stpmax"
        if step == self._step_min and (value > sufficient or slope >= self._slope_test):
            status, self.warning = WARNING, "stp = stpmin"
        if value <= sufficient and abs(slope) <= self._gtol * (-self._slope0):
            status = CONVERGED
        if status:
            return status

        if self._stage == 1 and value <= self._fx and value > sufficient:
            # a lower value without sufficient decrease: step on the modified function
            # ψ(stp) = φ(stp) − φ(0) − ftol·stp·φ'(0), whose minimizer is easier to bracket
            gt = self._slope_test
            stx, fx, gx, sty, fy, gy, new_step, self._bracketed = _safeguarded_step(
                self._stx, self._fx - self._stx * gt, self._gx - gt,
                self._sty, self._fy - self._sty * gt, self._gy - gt,
                step, value - step * gt, slope - gt,
                self._bracketed, self._lo, self._hi,
            )  # fmt: skip
            self._stx, self._fx, self._gx = stx, fx + stx * gt, gx + gt
            self._sty, self._fy, self._gy = sty, fy + sty * gt, gy + gt
        else:
            (self._stx, self._fx, self._gx, self._sty, self._fy, self._gy, new_step, self._bracketed) = (
                _safeguarded_step(
                    self._stx, self._fx, self._gx, self._sty, self._fy, self._gy,
                    step, value, slope, self._bracketed, self._lo, self._hi,
                )
            )  # fmt: skip

        if self._bracketed:
            # bisect when the interval did not shrink enough over the last two steps
            if abs(self._sty - self._stx) >= 0.66 * self._width_before:
                new_step = self._stx + 0.5 * (self._sty - self._stx)
            self._width_before = self._width
            self._width = abs(self._sty - self._stx)
            self._lo, self._hi = min(self._stx, self._sty), max(self._stx, self._sty)
        else:
            self._lo = new_step + _EXTRAPOLATE_LOW * (new_step - self._stx)
            self._hi = new_step + _EXTRAPOLATE_HIGH * (new_step - self._stx)

        new_step = _clip(new_step, self._step_min, self._step_max)
        if self._bracketed and (
            new_step <= self._lo or new_step >= self._hi or self._hi - self._lo <= self._xtol * self._hi
        ):
            new_step = self._stx  # no further progress is possible: go back to the best step
        self.step = new_step
        return EVALUATE


def _clip(step: float, low: float, high: float) -> float:
    """min(max(step, low), high) as C's fmax/fmin take it: a NaN step becomes ``low``."""
    return min(step if step >= low else low, high)


def _cubic_minimizer_gamma(theta, d1, d2, clip_at_zero=False):
    """γ of the cubic interpolating two points' values and slopes d1, d2 (scaled to avoid overflow)."""
    s = max(abs(theta), abs(d1), abs(d2))
    radicand = (theta / s) ** 2 - (d1 / s) * (d2 / s)
    if clip_at_zero:
        radicand = max(0.0, radicand)
    return s * np.sqrt(radicand)


def _safeguarded_step(stx, fx, dx, sty, fy, dy, stp, fp, dp, bracketed, step_min, step_max):
    """MINPACK-2's ``dcstep``: the next trial step and the updated interval, by the four cases of
    Moré & Thuente (1994, Section 4). Returns (stx, fx, dx, sty, fy, dy, next step, bracketed).

    The arithmetic is IEEE's, as in C (a zero divisor gives ±inf or NaN rather than an exception), so
    that degenerate slopes take the same branches as scipy's."""
    with np.errstate(all="ignore"):
        stx, fx, dx, sty, fy, dy, stp, fp, dp = map(np.float64, (stx, fx, dx, sty, fy, dy, stp, fp, dp))
        out = _dcstep(stx, fx, dx, sty, fy, dy, stp, fp, dp, bracketed, step_min, step_max)
    return (*map(float, out[:7]), out[7])


def _dcstep(stx, fx, dx, sty, fy, dy, stp, fp, dp, bracketed, step_min, step_max):
    sign = dp * (dx / abs(dx))
    if fp > fx:
        # case 1: a higher value; the minimum is bracketed. Cubic step if closer to stx, else the
        # average of the cubic and quadratic steps.
        theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
        gamma = _cubic_minimizer_gamma(theta, dx, dp)
        if stp < stx:
            gamma = -gamma
        p = (gamma - dx) + theta
        q = ((gamma - dx) + gamma) + dp
        cubic = stx + p / q * (stp - stx)
        quadratic = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
        if abs(cubic - stx) < abs(quadratic - stx):
            new_step = cubic
        else:
            new_step = cubic + (quadratic - cubic) / 2.0
        bracketed = True
    elif sign < 0.0:
        # case 2: a lower value and slopes of opposite sign; bracketed. The step farther from stp.
        theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
        gamma = _cubic_minimizer_gamma(theta, dx, dp)
        if stp > stx:
            gamma = -gamma
        p = (gamma - dp) + theta
        q = ((gamma - dp) + gamma) + dx
        cubic = stp + p / q * (stx - stp)
        secant = stp + (dp / (dp - dx)) * (stx - stp)
        new_step = cubic if abs(cubic - stp) > abs(secant - stp) else secant
        bracketed = True
    elif abs(dp) < abs(dx):
        # case 3: a lower value, same-sign slopes whose magnitude decreases. The cubic step only when
        # the cubic tends to infinity in the step's direction or its minimum lies beyond stp.
        theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
        gamma = _cubic_minimizer_gamma(theta, dx, dp, clip_at_zero=True)
        if stp > stx:
            gamma = -gamma
        p = (gamma - dp) + theta
        q = (gamma + (dx - dp)) + gamma
        r = p / q
        if r < 0.0 and gamma != 0.0:
            cubic = stp + r * (stx - stp)
        elif stp > stx:
            cubic = step_max
        else:
            cubic = step_min
        secant = stp + (dp / (dp - dx)) * (stx - stp)
        if bracketed:
            new_step = cubic if abs(cubic - stp) < abs(secant - stp) else secant
            if stp > stx:
                new_step = min(stp + 0.66 * (sty - stp), new_step)
            else:
                new_step = max(stp + 0.66 * (sty - stp), new_step)
        else:
            new_step = cubic if abs(cubic - stp) > abs(secant - stp) else secant
            new_step = max(step_min, min(step_max, new_step))
    else:
        # case 4: a lower value, same-sign slopes that do not decrease: the cubic step on [stp, sty]
        # when bracketed, else the far end of the allowed range.
        if bracketed:
            theta = 3.0 * (fp - fy) / (sty - stp) + dy + dp
            gamma = _cubic_minimizer_gamma(theta, dy, dp)
            if stp > sty:
                gamma = -gamma
            p = (gamma - dp) + theta
            q = ((gamma - dp) + gamma) + dy
            new_step = stp + p / q * (sty - stp)
        elif stp > stx:
            new_step = step_max
        else:
            new_step = step_min

    # the interval's new ends
    if fp > fx:
        sty, fy, dy = stp, fp, dp
    else:
        if sign < 0.0:
            sty, fy, dy = stx, fx, dx
        stx, fx, dx = stp, fp, dp
    return stx, fx, dx, sty, fy, dy, new_step, bracketed
