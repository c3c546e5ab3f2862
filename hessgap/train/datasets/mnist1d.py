"""MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated locally and deterministically.

Ten hand-made digit templates of length 12 are padded, dilated, scaled, translated, covered with
correlated noise where the signal is zero, given i.i.d. Gaussian noise and a random shear, then
resampled to 40 features. Follows the reference generator's steps and defaults (``get_dataset_args``),
vectorized over samples (the random draws are made in one batch, so the samples differ from the reference's
file, not their distribution); uses a private ``numpy.random.Generator``, leaving NumPy's global state alone.
"""

from __future__ import annotations

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


def _linear_resample(x: np.ndarray, lengths: np.ndarray, size: int) -> np.ndarray:
    """Row i's first ``lengths[i]`` values, linearly resampled to ``size`` points (``np.interp`` per row)."""
    rows = np.arange(x.shape[0])[:, None]
    position = np.linspace(0.0, 1.0, size)[None, :] * (lengths[:, None] - 1)
    low = np.minimum(np.floor(position).astype(np.int64), lengths[:, None] - 1)
    high = np.minimum(low + 1, lengths[:, None] - 1)
    frac = position - low
    return x[rows, low] * (1 - frac) + x[rows, high] * frac


def draw_transforms(count: int, cfg: MNIST1DConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The random parts of ``count`` samples' transforms, drawn in one go."""
    low, high = cfg.padding
    length = cfg.template_len + high
    return {
        "pad": low + (rng.random(count) * (high - low + 1)).astype(np.int64),
        "scale": 1 + cfg.scale_coeff * (rng.random(count) - 0.5),
        "shift": rng.integers(cfg.max_translation, size=count),
        "corr_noise": gaussian_filter1d(cfg.corr_noise_scale * rng.standard_normal((count, length)), 2, axis=1),
        "iid_noise": cfg.iid_noise_scale * rng.standard_normal((count, length)),
        "shear": cfg.shear_scale * (rng.random(count) - 0.5),
    }


def transform(signals: np.ndarray, draws: dict[str, np.ndarray], cfg: MNIST1DConfig, eps: float = 1e-8) -> np.ndarray:
    """Pad, dilate, scale, translate, add noise, shear and subsample templates (N × 12) to N × 40, as the
    reference generator does sample by sample."""
    count = signals.shape[0]
    length = cfg.template_len + cfg.padding[1]
    padded = np.zeros((count, length))
    padded[:, : cfg.template_len] = signals + eps
    x = _linear_resample(padded, cfg.template_len + draws["pad"], length)  # dilate to a common length
    x = x * draws["scale"][:, None]
    # translate circularly: x[j] <- x[j - shift]
    x = x[np.arange(count)[:, None], (np.arange(length)[None, :] - draws["shift"][:, None]) % length]
    x = np.where(x != 0, x, draws["corr_noise"])  # correlated noise where there is no signal
    x = x + draws["iid_noise"]
    x = x - draws["shear"][:, None] * np.linspace(-0.5, 0.5, length)[None, :]
    return _linear_resample(x, np.full(count, length), cfg.final_seq_length)


def generate(seed: int = 0, cfg: MNIST1DConfig = MNIST1DConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 inputs (N × 40), standardized over all samples; int64 labels."""
    rng = np.random.default_rng(seed)
    base = templates()
    per_class = cfg.num_samples // len(base)
    labels = np.repeat(np.arange(len(base), dtype=np.int64), per_class)
    x = transform(base[labels], draw_transforms(len(labels), cfg, rng), cfg)
    order = rng.permutation(len(labels))
    x, y = x[order], labels[order]
    x = (x - x.mean()) / x.std()
    split = int(len(y) * cfg.train_split)
    return x[:split].astype(np.float32), y[:split], x[split:].astype(np.float32), y[split:]
