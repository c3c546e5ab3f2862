"""Curvature along training, inside the user's own loop: :class:`Tracker` (λmax, trace, Metric 2.1, critical
sharpness and SGD's edge-of-stability ratio every N steps, warm-started, changing nothing about the run) and
:func:`critical_sharpness` (Kalra et al. 2026: λc = 2/ηc from a line search along the optimizer's update).

tracker.py (the records), measures.py (one function per measure), critical.py (the line search), update.py
(the optimizer's next update without taking it), folder.py (the JSONL run folder that resumes), plot.py.
"""

from .critical import CriticalResult, critical_sharpness
from .tracker import Tracker

__all__ = ["CriticalResult", "Tracker", "critical_sharpness"]
