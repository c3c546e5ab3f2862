"""MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated locally and deterministically.

Ten hand-made digit templates of length 12 are padded, dilated, scaled, translated, covered with
correlated noise where the signal is zero, given i.i.d. Gaussian noise and a random shear, then
resampled to 40 features. Follows the reference generator's defaults (``get_dataset_args``); uses a
private ``numpy.random.Generator`` so the global NumPy state is untouched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d


@dataclass(frozen=True)
class MNIST1DConfig:
    num_samples: int = 5000
    train_split: float = 0.8
    template_len: int = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    final_seq_length: int = 40


def templates() -> np.ndarray:
    """The ten digit templates (10 × 12), whitened, starting at 0, scaled by 1/6 as in the reference."""
    digits = np.asarray(
        [
            [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
            [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
            [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
            [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
            [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
            [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
            [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
            [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
            [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
            [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
        ],
        dtype=np.float64,
    )
    digits -= digits.mean(1, keepdims=True)
    digits /= digits.std(1, keepdims=True)
    digits -= digits[:, :1]
    return digits / 6.0


def _resample(x: np.ndarray, length: int) -> np.ndarray:
    return np.interp(np.linspace(0, 1, length), np.linspace(0, 1, len(x)), x)


def _transform(x: np.ndarray, cfg: MNIST1DConfig, rng: np.random.Generator, eps: float = 1e-8) -> np.ndarray:
    low, high = cfg.padding
    pad = low + int(rng.random() * (high - low + 1))
    x = np.concatenate([x + eps, np.zeros(pad)])
    x = _resample(x, cfg.template_len + high)  # dilate to a common length
    x = x * (1 + cfg.scale_coeff * (rng.random() - 0.5))  # scale
    shift = int(rng.integers(cfg.max_translation))  # translate (circularly)
    x = np.concatenate([x[-shift:], x[:-shift]]) if shift else x
    mask = x != 0
    corr = gaussian_filter1d(cfg.corr_noise_scale * rng.standard_normal(x.shape), 2)
    x = mask * x + (~mask) * corr  # correlated noise where there is no signal
    x = x + cfg.iid_noise_scale * rng.standard_normal(x.shape)
    x = x - cfg.shear_scale * (rng.random() - 0.5) * np.linspace(-0.5, 0.5, len(x))  # shear
    return _resample(x, cfg.final_seq_length)


def generate(seed: int = 0, cfg: MNIST1DConfig = MNIST1DConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 inputs (N × 40), standardized over all samples; int64 labels."""
    return tuple(a.copy() for a in _generate(int(seed), cfg))  # copies: callers may modify them


@functools.lru_cache(maxsize=4)  # the sample loop is pure Python; repeated loads in one process reuse it
def _generate(seed: int, cfg: MNIST1DConfig):
    rng = np.random.default_rng(seed)
    base = templates()
    per_class = cfg.num_samples // len(base)
    xs, ys = [], []
    for label, template in enumerate(base):
        for _ in range(per_class):
            xs.append(_transform(template, cfg, rng))
            ys.append(label)
    order = rng.permutation(len(ys))
    x = np.stack(xs)[order]
    y = np.asarray(ys, dtype=np.int64)[order]
    x = (x - x.mean()) / x.std()
    split = int(len(y) * cfg.train_split)
    return x[:split].astype(np.float32), y[:split], x[split:].astype(np.float32), y[split:]
