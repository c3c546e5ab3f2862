"""The names users type: networks, data sets, remedies, optimizers, presets and sharpness solvers.

This is their one source: the training code, the experiments and the command line all read them here
(and normalize user spellings through :func:`model_name` and :func:`dataset_name`). The experiments'
names live with the experiments, in :mod:`hessgap.experiments.registry`.
"""

from __future__ import annotations

from .errors import HessgapError

#: The paper's networks (Table 1): fully connected F1, F2; convolutional C1-C4.
MODEL_NAMES = ("F1", "F2", "C1", "C2", "C3", "C4")
#: digits ships with scikit-learn, mnist1d is generated locally; the others are read from a folder.
DATASET_NAMES = ("digits", "mnist1d", "mnist", "cifar10", "cifar100")
#: Data sets that need files on disk (``data_root``).
DATASETS_ON_DISK = ("mnist", "cifar10", "cifar100")
#: The remedies of the paper's Appendix E.
REMEDY_NAMES = ("augment", "conservative", "adversarial", "dynamic")
OPTIMIZER_NAMES = ("adam", "sgd")
PRESET_NAMES = ("quick", "paper")
#: Maximizers of Metric 2.1: "auto" runs the paper's L-BFGS-B path and the sign ascent and keeps the better;
#: "lbfgsb" is hessgap's torch L-BFGS-B (scipy's iterates), "lbfgsb-scipy" scipy's own, for reference.
SHARPNESS_SOLVERS = ("auto", "box-ascent", "lbfgsb", "lbfgsb-scipy")
#: Input preprocessing: "standardize" (hessgap's default: per channel, with the training split's statistics)
#: or "none" (pixel intensities scaled to [0, 1], as the authors' code did; MNIST-1D as generated).
PREPROCESS_NAMES = ("standardize", "none")
#: Initial weights: PyTorch's default (hessgap's default) or Glorot-uniform with zero biases (Keras's, the paper's).
INIT_NAMES = ("pytorch", "glorot")
#: BatchNorm while sharpness is measured: "eval" (running statistics, hessgap's default) or "train" (the
#: statistics of each batch, as the authors' Keras BatchNormalization(mode=2) always normalized).
BATCHNORM_MODES = ("eval", "train")
#: When training stops: after a fixed number of epochs, or once the training loss stopped improving.
STOP_RULES = ("epochs", "plateau")
#: The measures of ``hessgap.measures`` (each an entry of :mod:`hessgap.measures.registry`, in this order).
MEASURE_NAMES = (
    "keskar", "keskar_subspace", "adaptive_linf", "adaptive_l2", "m_sharpness", "gaussian", "gaussian_adaptive",
    "pacbayes_flatness", "pacbayes_mag_flatness", "hessian_lmax", "hessian_trace", "scaled_lmax", "scaled_trace",
    "scaled_lmax_over_trace", "relative_flatness", "fisher_rao", "llc", "geodesic",
)
#: What :class:`hessgap.Tracker` measures along training (``hessgap train --track``): the top Hessian eigenvalue
#: (warm-started Lanczos), the Hutchinson trace, Metric 2.1, critical sharpness along the optimizer's update (and
#: along it on other data), and SGD's edge-of-stability ratio λmax·η over its stability limit.
TRACK_MEASURES = ("lambda_max", "trace", "sharpness", "critical_sharpness", "relative_critical_sharpness", "eos_ratio")
#: What a training run may track (``TrainConfig.track``, ``hessgap train --track``): all but the relative critical
#: sharpness, which needs a second data set.
TRAIN_TRACK_MEASURES = tuple(name for name in TRACK_MEASURES if name != "relative_critical_sharpness")


#: The measures taken when none are named: every one but those run on request only (``llc``: SGLD chains,
#: tens of times a Hessian measure's cost; ``geodesic``: the symmetry-aware sharpness, for transformers).
DEFAULT_MEASURE_NAMES = MEASURE_NAMES[:-2]
#: The curvature matrices the spectrum functions, the landscape's eigen-directions and the Hessian measures
#: take (``curvature=``): the Hessian, the generalized Gauss-Newton matrix, the empirical and the true Fisher.
CURVATURES = ("hessian", "ggn", "empirical-fisher", "true-fisher")
#: The trace estimators of ``hessgap.trace``.
TRACE_METHODS = ("hutchinson", "hutch++", "adaptive-hutch++")
#: The zoos of ``hessgap correlate``.
ZOO_PRESETS = ("quick", "full")


def model_name(name) -> str:
    """The canonical spelling of a network name (``"f1"`` -> ``"F1"``); unknown names raise."""
    key = str(name).upper()
    if key not in MODEL_NAMES:
        raise HessgapError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return key


def dataset_name(name) -> str:
    """The canonical spelling of a data set name (``"MNIST-1D"`` -> ``"mnist1d"``); unknown names raise."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in DATASET_NAMES:
        raise HessgapError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key

#: ``hessgap.landscape``: directions computed from the model (other choices: saved models, given tensors)
LANDSCAPE_DIRECTIONS = ("random", "hessian", "hessian-min")
#: Scaling of random landscape directions: per filter (Li et al.), per layer, or none.
LANDSCAPE_NORMALIZATIONS = ("filter", "layer", "none")
#: Engines of the landscape's pass: chosen per model, the layer-stack engine, or functional_call for any model.
LANDSCAPE_ENGINES = ("auto", "stack", "functional")
#: Paths between two models: the line, or the paper's curve sin(απ/2)·x_B + cos(απ/2)·x_A.
INTERPOLATION_PATHS = ("linear", "curved")
