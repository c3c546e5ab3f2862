"""The remedies: augmentation against scipy's affine resampling, FGSM and the proximal step against
hand-derived updates, the dynamic batch schedule, and each remedy inside the training loop."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import affine_transform
from torch import nn

from hessgap.errors import HessgapError
from hessgap.train import train
from hessgap.train.data import load_dataset
from hessgap.train.remedies import (
    BatchSchedule,
    affine_images,
    augment_batch,
    fgsm,
    make_training_step,
    proximal_step,
)

from tiny_runs import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def scipy_affine(image, angle, shift_x, shift_y, mirror):
    """The same transform in pixel coordinates (row, col) about the image centre, by scipy."""
    height, width = image.shape
    cy, cx = (height - 1) / 2, (width - 1) / 2
    cos, sin, sign = math.cos(angle), math.sin(angle), -1.0 if mirror else 1.0
    matrix = np.array([[cos, sin * sign], [-sin, cos * sign]])
    # output pixel o samples input M (o − c − t) + c: rotate about the centre c, then shift by t
    offset = np.array([cy, cx]) - matrix @ (np.array([cy, cx]) + np.array([shift_y * height, shift_x * width]))
    return affine_transform(image, matrix, offset=offset, order=1, mode="nearest")


@pytest.mark.parametrize("angle,shift_x,shift_y,mirror", [
    (0.0, 0.0, 0.0, False), (0.0, 0.0, 0.0, True), (math.radians(10), 0.0, 0.0, False),
    (math.radians(-7), 0.13, -0.2, True), (math.radians(3), -0.05, 0.17, False),
])
def test_affine_images_match_scipy(angle, shift_x, shift_y, mirror):
    images = torch.rand(2, 3, 7, 10, dtype=torch.float64)  # non-square: rotation must be in pixel space
    out = affine_images(images, torch.tensor([angle] * 2), torch.tensor([shift_x] * 2),
                        torch.tensor([shift_y] * 2), torch.tensor([mirror] * 2))
    for n in range(2):
        for c in range(3):
            ref = scipy_affine(images[n, c].numpy(), angle, shift_x, shift_y, mirror)
            np.testing.assert_allclose(out[n, c].numpy(), ref, atol=1e-6)


def test_positive_shift_moves_content_right_and_down():
    image = torch.zeros(1, 1, 10, 10)
    image[0, 0, 4, 3] = 1.0
    out = affine_images(image, 0.0, 0.2, 0.1, False)
    assert out[0, 0].argmax().item() == 5 * 10 + 5  # row 4 + 1, column 3 + 2


def test_augment_batch_draws_within_the_papers_ranges():
    images = torch.rand(64, 1, 9, 9, dtype=torch.float64)
    same = augment_batch(images, torch.Generator().manual_seed(0), flip=False, max_degrees=0, max_translate=0)
    torch.testing.assert_close(same, images, atol=1e-12, rtol=0)
    flipped = augment_batch(images, torch.Generator().manual_seed(0), flip=True, max_degrees=0, max_translate=0)
    is_flip = [torch.allclose(f, torch.flip(x, dims=[-1]), atol=1e-12) for f, x in zip(flipped, images)]
    is_same = [torch.allclose(f, x, atol=1e-12) for f, x in zip(flipped, images)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and 15 < sum(is_flip) < 49
    # a single bright pixel at the centre moves by at most 0.2 of the image (plus rotation about the centre)
    dot = torch.zeros(256, 1, 21, 21, dtype=torch.float64)
    dot[:, 0, 10, 10] = 1.0
    moved = augment_batch(dot, torch.Generator().manual_seed(1))
    rows, cols = torch.meshgrid(torch.arange(21.0, dtype=torch.float64), torch.arange(21.0, dtype=torch.float64), indexing="ij")
    mass = moved[:, 0].sum((1, 2))
    dx = (moved[:, 0] * cols).sum((1, 2)) / mass - 10
    dy = (moved[:, 0] * rows).sum((1, 2)) / mass - 10
    assert dx.abs().max() <= 0.2 * 21 + 1e-9 and dy.abs().max() <= 0.2 * 21 + 1e-9
    assert dx.abs().max() > 0.15 * 21 and dy.abs().max() > 0.15 * 21  # the range is used
    again = augment_batch(dot, torch.Generator().manual_seed(1))
    assert torch.equal(again, moved)  # reproducible under the generator
    with pytest.raises(HessgapError, match="flat feature vectors"):
        augment_batch(torch.rand(4, 40))


def test_fgsm_is_the_sign_of_the_input_gradient():
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    p = torch.softmax(model(x), 1)
    grad = (p - F.one_hot(y, 4).double()) @ model.weight.detach() / 5  # ∇_x of the mean cross-entropy
    torch.testing.assert_close(fgsm(model, x, y, 0.3), x + 0.3 * grad.detach().sign())
    with pytest.raises(HessgapError, match="fgsm_epsilon"):
        fgsm(model, x, y, 0.0)


def test_fgsm_leaves_batchnorm_statistics_and_mode_alone():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    before = model[1].running_mean.clone()
    fgsm(model, torch.randn(10, 6), torch.randint(0, 3, (10,)), 0.1)
    assert torch.equal(model[1].running_mean, before) and model.training


def test_proximal_step_matches_the_hand_derived_update():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    lr, lam = 0.1, 0.7
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()

    def grads(w, b):
        w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(x @ w.T + b, y), (w, b))

    g = grads(w0, b0)
    w1, b1 = w0 - lr * g[0], b0 - lr * g[1]  # the proximal term's gradient is 0 at x_k
    g = grads(w1, b1)
    w2, b2 = w1 - lr * (g[0] + lam * (w1 - w0)), b1 - lr * (g[1] + lam * (b1 - b0))
    loss = proximal_step(model, torch.optim.SGD(model.parameters(), lr=lr), x, y, F.cross_entropy, lam, 2)
    torch.testing.assert_close(model.weight.detach(), w2)
    torch.testing.assert_close(model.bias.detach(), b2)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w0.T + b0, y))


def test_adversarial_step_trains_on_half_clean_half_perturbed():
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    perturbed = fgsm(model, x, y, 0.2)
    with torch.no_grad():
        expected = 0.5 * F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(model(perturbed), y)
    step = make_training_step("adversarial", fgsm_epsilon=0.2)
    torch.testing.assert_close(step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y), expected)


def test_batch_schedule_grows_geometrically_to_its_final_size():
    schedule = BatchSchedule(4, 20, 1.5)
    assert [schedule.batch_size(e) for e in range(1, 7)] == [4, 6, 9, 14, 20, 20]
    assert BatchSchedule.from_value([8, 8, 1.0]).batch_size(10) == 8
    with pytest.raises(HessgapError, match="start ≤ final"):
        BatchSchedule(10, 5, 1.5)
    with pytest.raises(HessgapError, match="growth"):
        BatchSchedule(1, 5, 0.5)
    with pytest.raises(HessgapError, match="start size, final size, growth"):
        BatchSchedule.from_value(12)


@pytest.mark.parametrize("value,message", [
    ((16.5, 100, 2), "got start=16.5"),  # was: silently 16
    ((float("nan"), 100, 2), "got start=nan"),  # was: ValueError: cannot convert float NaN to integer
    ((True, 100, 2), "got start=True"),
    ((16, 100, "fast"), "growth must be a finite factor ≥ 1 per epoch, got fast"),  # was: ValueError from float()
    ((16, 100, float("nan")), "growth must be a finite factor"),
])
def test_batch_schedule_refuses_sizes_that_are_not_whole_numbers(value, message):
    with pytest.raises(HessgapError, match=message):
        BatchSchedule.from_value(value)
    assert BatchSchedule.from_value((16.0, 100.0, 2)) == BatchSchedule(16, 100, 2.0)  # whole numbers from JSON


def test_make_training_step_bad_input():
    with pytest.raises(HessgapError, match="augment, conservative, adversarial, dynamic"):
        make_training_step("mixup")
    with pytest.raises(HessgapError, match="image data"):
        make_training_step("augment", image=False)


# --- the remedies inside train() --------------------------------------------------------------------

@pytest.mark.parametrize("remedy", ["augment", "conservative", "adversarial"])
def test_each_remedy_trains_and_differs_from_plain(digits, remedy):
    plain = train(tiny(), dataset=digits, progress=False)
    result = train(tiny(remedy=remedy), dataset=digits, progress=False)
    assert len(result.history) == 2 and math.isfinite(result.final["train_loss"])
    assert result.final["train_acc"] > 0.3
    diff = torch.nn.utils.parameters_to_vector(result.model.parameters()) - torch.nn.utils.parameters_to_vector(plain.model.parameters())
    assert diff.abs().max() > 1e-4


def test_conservative_with_no_proximal_term_and_one_step_is_plain_training(digits):
    plain = train(tiny(), dataset=digits, progress=False)
    same = train(tiny(remedy="conservative", prox_lambda=0.0, prox_steps=1), dataset=digits, progress=False)
    for p, q in zip(plain.model.state_dict().values(), same.model.state_dict().values()):
        assert torch.equal(p, q)


def test_dynamic_sampling_follows_the_schedule(digits):
    result = train(tiny(remedy="dynamic", batch_schedule=(32, 200, 2.0), epochs=4), dataset=digits, progress=False)
    assert [h["batch_size"] for h in result.history] == [32, 64, 128, 200]
    default = train(tiny(remedy="dynamic", epochs=1), dataset=digits, progress=False)
    assert default.history[0]["batch_size"] == 128  # starts at batch_size, grows ×1.2 to 10% of the data
    with pytest.raises(HessgapError, match="larger than the training set"):
        train(tiny(remedy="dynamic", batch_schedule=(32, 5000, 2.0)), dataset=digits, progress=False)


def test_augment_refuses_flat_signals():
    flat = load_dataset("mnist1d")
    with pytest.raises(HessgapError, match="image data"):
        train(tiny(dataset="mnist1d", remedy="augment"), dataset=flat, progress=False)
