"""The numbers Keskar et al. (ICLR 2017) report, so that every report can put a run beside them.

Values are the paper's own: mean ± std over 5 random starts, accuracies in percent, sharpness in the
units of Metric 2.1 (percent rise of the loss over 1 + f(x)). Each pair is ``(mean, std)``.
"""

from __future__ import annotations

CITATION = (
    "Keskar, Mudigere, Nocedal, Smelyanskiy, Tang. On Large-Batch Training for Deep Learning: "
    "Generalization Gap and Sharp Minima. ICLR 2017 (arXiv:1609.04836)"
)

# the data set each network was trained on in the paper
PAPER_DATASET = {
    "F1": "MNIST",
    "F2": "TIMIT",
    "C1": "CIFAR-10",
    "C2": "CIFAR-10",
    "C3": "CIFAR-100",
    "C4": "CIFAR-100",
}

# Table 2: accuracy in percent
TABLE2 = {
    "F1": {"train_sb": (99.66, 0.05), "train_lb": (99.92, 0.01), "test_sb": (98.03, 0.07), "test_lb": (97.81, 0.07)},
    "F2": {"train_sb": (99.99, 0.03), "train_lb": (98.35, 2.08), "test_sb": (64.02, 0.2), "test_lb": (59.45, 1.05)},
    "C1": {"train_sb": (99.89, 0.02), "train_lb": (99.66, 0.2), "test_sb": (80.04, 0.12), "test_lb": (77.26, 0.42)},
    "C2": {"train_sb": (99.99, 0.04), "train_lb": (99.99, 0.01), "test_sb": (89.24, 0.12), "test_lb": (87.26, 0.07)},
    "C3": {"train_sb": (99.56, 0.44), "train_lb": (99.88, 0.30), "test_sb": (49.58, 0.39), "test_lb": (46.45, 0.43)},
    "C4": {"train_sb": (99.10, 1.23), "train_lb": (99.57, 1.84), "test_sb": (63.08, 0.5), "test_lb": (57.81, 0.17)},
}

# Table 3 (full space) and Table 4 (random 100-dimensional subspace): sharpness keyed by
# (regime, epsilon)
TABLE3 = {
    "F1": {("sb", 1e-3): (1.23, 0.83), ("lb", 1e-3): (205.14, 69.52), ("sb", 5e-4): (0.61, 0.27), ("lb", 5e-4): (42.90, 17.14)},
    "F2": {("sb", 1e-3): (1.39, 0.02), ("lb", 1e-3): (310.64, 38.46), ("sb", 5e-4): (0.90, 0.05), ("lb", 5e-4): (93.15, 6.81)},
    "C1": {("sb", 1e-3): (28.58, 3.13), ("lb", 1e-3): (707.23, 43.04), ("sb", 5e-4): (7.08, 0.88), ("lb", 5e-4): (227.31, 23.23)},
    "C2": {("sb", 1e-3): (8.68, 1.32), ("lb", 1e-3): (925.32, 38.29), ("sb", 5e-4): (2.07, 0.86), ("lb", 5e-4): (175.31, 18.28)},
    "C3": {("sb", 1e-3): (29.85, 5.98), ("lb", 1e-3): (258.75, 8.96), ("sb", 5e-4): (8.56, 0.99), ("lb", 5e-4): (105.11, 13.22)},
    "C4": {("sb", 1e-3): (12.83, 3.84), ("lb", 1e-3): (421.84, 36.97), ("sb", 5e-4): (4.07, 0.87), ("lb", 5e-4): (109.35, 16.57)},
}
TABLE4 = {
    "F1": {("sb", 1e-3): (0.11, 0.00), ("lb", 1e-3): (9.22, 0.56), ("sb", 5e-4): (0.05, 0.00), ("lb", 5e-4): (9.17, 0.14)},
    "F2": {("sb", 1e-3): (0.29, 0.02), ("lb", 1e-3): (23.63, 0.54), ("sb", 5e-4): (0.05, 0.00), ("lb", 5e-4): (6.28, 0.19)},
    "C1": {("sb", 1e-3): (2.18, 0.23), ("lb", 1e-3): (137.25, 21.60), ("sb", 5e-4): (0.71, 0.15), ("lb", 5e-4): (29.50, 7.48)},
    "C2": {("sb", 1e-3): (0.95, 0.34), ("lb", 1e-3): (25.09, 2.61), ("sb", 5e-4): (0.31, 0.08), ("lb", 5e-4): (5.82, 0.52)},
    "C3": {("sb", 1e-3): (17.02, 2.20), ("lb", 1e-3): (236.03, 31.26), ("sb", 5e-4): (4.03, 1.45), ("lb", 5e-4): (86.96, 27.39)},
    "C4": {("sb", 1e-3): (6.05, 1.13), ("lb", 1e-3): (72.99, 10.96), ("sb", 5e-4): (1.89, 0.33), ("lb", 5e-4): (19.85, 4.12)},
}

# Appendix E: LB networks trained with a remedy (single numbers, no std given)
REMEDIES = {
    "augment": {
        "test_lb": {"C1": 82.50, "C2": 90.26, "C3": 53.03, "C4": 65.88},
        "sharpness_lb_1e-3": {"C1": 231.77, "C2": 468.65, "C3": 103.68, "C4": 271.06},
    },
    "conservative": {
        "test_lb": {"F1": 98.12, "F2": 61.94, "C1": 78.41, "C2": 88.50, "C3": 45.98, "C4": 62.51},
        "sharpness_lb_1e-3": {"F1": 232.25, "C1": 520.34},
    },
    "adversarial": {"note": "tried; no improvement reported (no table)"},
    "dynamic": {"note": "proposed, not tested in the paper"},
}

# the paper's statements for the figures, quoted beside the measured curves
FIGURE_NOTES = {
    "parametric": (
        "Fig. 3 / Fig. 7: along the line (and the curve) from x_SB (alpha = 0) to x_LB (alpha = 1) the "
        "loss rises steeply around x_LB and the LB minimizer sits in a sharper basin."
    ),
    "sweep": (
        "Fig. 4: test accuracy falls and sharpness rises as the batch size grows "
        "(C1: drop past about 500; F2: drop past about 15000)."
    ),
    "warmstart": (
        "Fig. 5: LB training warm-started from early SB iterates stays sharp; from later SB iterates it "
        "reaches flat minimizers that generalize as well as SB."
    ),
    "along_training": (
        "Fig. 6: LB sharpness rises as the training loss falls; SB sharpness stays low, then drops. "
        "LB iterates stay close to the start: ||x_SB - x0|| / ||x_LB - x0|| was 3 to 10."
    ),
    "spectrum": (
        "Sharp minimizers have many large positive Hessian eigenvalues; flat ones have small eigenvalues."
    ),
}

DISTANCE_RATIO_RANGE = (3.0, 10.0)


def format_pair(pair) -> str:
    """``(mean, std)`` as ``"mean ± std"``; a single number as itself; None as a dash."""
    if pair is None:
        return "–"
    if isinstance(pair, (tuple, list)):
        return f"{pair[0]:.2f} ± {pair[1]:.2f}"
    return f"{pair:.2f}"
