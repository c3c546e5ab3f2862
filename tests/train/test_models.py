"""The paper's networks: parameter counts against hand-computed formulas, shapes, scaling, bad input."""

import pytest
import torch
from torch import nn

from hessgap.errors import HessgapError
from hessgap.train import models
from hessgap.train.models import MODEL_NAMES, build_model, check_fits_memory, count_parameters, parameter_count

pytestmark = pytest.mark.usefixtures("one_thread")

ALLOWED = (nn.Flatten, nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout)
SHAPES = {"digits": ((1, 8, 8), 10), "mnist1d": ((40,), 10), "mnist": ((1, 28, 28), 10), "cifar100": ((3, 32, 32), 100)}


def linear(i, o):
    return i * o + o


def bn(c):
    return 2 * c


def conv(i, o, k):
    return i * o * k + o


def test_f1_on_mnist_has_the_papers_size():
    expected = linear(784, 512) + bn(512) + 4 * (linear(512, 512) + bn(512)) + linear(512, 10)
    model = build_model("F1", (1, 28, 28), 10)
    assert count_parameters(model) == expected == 1_462_794  # ≈ 1.5M, as the paper's F1
    assert sum(isinstance(m, nn.Linear) for m in model) == 6


def test_f2_on_timit_shape():
    expected = linear(360, 512) + bn(512) + 6 * (linear(512, 512) + bn(512)) + linear(512, 1973)
    assert count_parameters(build_model("F2", (360,), 1973)) == expected


@pytest.mark.parametrize("name,classes", [("C1", 10), ("C3", 100)])
def test_alexnet_like_on_cifar(name, classes):
    # 32 → 16 → 8 after two 3×3 stride-2 "same" pools
    expected = (conv(3, 64, 25) + bn(64) + conv(64, 64, 25) + bn(64)
                + linear(64 * 8 * 8, 384) + bn(384) + linear(384, 192) + bn(192) + linear(192, classes))
    model = build_model(name, (3, 32, 32), classes)
    assert count_parameters(model) == expected
    assert sum(isinstance(m, nn.Dropout) for m in model) == 2
    assert all(m.p == 0.5 for m in model if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("name,classes", [("C2", 10), ("C4", 100)])
def test_vgg_like_on_cifar(name, classes):
    expected, channels = 0, 3
    for out, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(convs):
            expected += conv(channels, out, 9) + bn(out)
            channels = out
    expected += linear(512 * 1 * 1, 512) + bn(512) + linear(512, classes)
    model = build_model(name, (3, 32, 32), classes)
    assert count_parameters(model) == expected
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 5


@pytest.mark.parametrize("dataset", sorted(SHAPES))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape_and_standard_layers(name, dataset):
    shape, classes = SHAPES[dataset]
    model = build_model(name, shape, classes, width=0.125).eval()
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()
    layers = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
    extra = (nn.Unflatten,) if len(shape) == 1 and name.startswith("C") else ()
    assert all(isinstance(m, ALLOWED + extra) for m in layers), [type(m).__name__ for m in layers]


def test_small_images_leave_out_pools_that_would_shrink_below_one_pixel():
    vgg = build_model("C2", (1, 8, 8), 10, width=0.125)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg) == 3  # 8 → 4 → 2 → 1, then no more
    flat_in = next(m for m in vgg if isinstance(m, nn.Linear)).in_features
    assert flat_in == 64  # 512 · 0.125 channels × 1 × 1
    alex = build_model("C1", (1, 8, 8), 10, width=0.25)
    assert next(m for m in alex if isinstance(m, nn.Linear)).in_features == 16 * 2 * 2  # 8 → 4 → 2


def test_flat_signals_use_one_by_k_kernels():
    model = build_model("C1", (40,), 10, width=0.25)
    assert isinstance(model[0], nn.Unflatten)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (1, 5) and c.padding == (0, 2) for c in convs)
    pools = [m for m in model if isinstance(m, nn.MaxPool2d)]
    assert all(p.kernel_size == (1, 3) for p in pools)
    assert next(m for m in model if isinstance(m, nn.Linear)).in_features == 16 * 1 * 10  # 40 → 20 → 10
    vgg = build_model("C2", (40,), 10, width=0.125)
    assert next(m for m in vgg if isinstance(m, nn.Linear)).in_features == 64 * 1 * 1  # 40→20→10→5→2→1


def test_width_scales_units_and_depth_scales_blocks():
    f1 = build_model("F1", (1, 8, 8), 10, width=0.5, depth=0.4)
    hidden = [m for m in f1 if isinstance(m, nn.Linear)][:-1]
    assert [m.out_features for m in hidden] == [256, 256]  # round(5 · 0.4) = 2 blocks of 256
    c1 = build_model("C1", (3, 32, 32), 10, width=0.5, depth=1.5)
    assert [m.out_channels for m in c1 if isinstance(m, nn.Conv2d)] == [32, 32, 32]
    assert [m.out_features for m in c1 if isinstance(m, nn.Linear)] == [192, 96, 10]
    c2 = build_model("C2", (3, 32, 32), 10, width=0.25, depth=1 / 3)
    assert [m.out_channels for m in c2 if isinstance(m, nn.Conv2d)] == [16, 32, 64, 128, 128]
    tiny = build_model("F1", (40,), 10, width=1e-6, depth=1e-6)
    assert [m.out_features for m in tiny if isinstance(m, nn.Linear)] == [1, 10]  # never below 1


def test_dropout_zero_leaves_dropout_out():
    model = build_model("C1", (1, 8, 8), 10, width=0.25, dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in model)


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = build_model("C1", (1, 8, 8), 10, width=0.25)
    torch.manual_seed(3)
    b = build_model("C1", (1, 8, 8), 10, width=0.25)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bad_input():
    with pytest.raises(HessgapError, match="F1, F2, C1, C2, C3, C4"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(HessgapError, match="width"):
        build_model("F1", (1, 8, 8), 10, width=0)
    with pytest.raises(HessgapError, match="depth"):
        build_model("F1", (1, 8, 8), 10, depth=float("nan"))
    with pytest.raises(HessgapError, match="input_shape"):
        build_model("C1", (8, 8), 10)
    with pytest.raises(HessgapError, match="num_classes"):
        build_model("F1", (40,), 1)
    with pytest.raises(HessgapError, match="dropout"):
        build_model("C1", (1, 8, 8), 10, dropout=1.0)
    assert isinstance(build_model("c1", (1, 8, 8), 10, width=0.1), nn.Sequential)  # names are case-blind


@pytest.mark.parametrize("dataset", ["digits", "cifar100", "mnist1d"])
def test_models_take_the_fused_hvp_path(dataset):
    """Every network is a plain layer stack that the fused R-operator engine handles."""
    import hessgap

    shape, classes = SHAPES[dataset]
    for name in MODEL_NAMES:
        model = build_model(name, shape, classes, width=0.0625, depth=0.5).eval()
        n = count_parameters(model)
        batch = (torch.randn(4, *shape), torch.randint(0, classes, (4,)))
        info = hessgap.hvp(model, batch, torch.randn(1, n), return_info=True)
        assert info.path == "fused", (name, info.fallback_reason)


# --- the authors' variants: Glorot initialization and C2/C4's convolution dropout ------------------------

def test_glorot_init_has_keras_statistics():
    torch.manual_seed(0)
    model = build_model("F1", (1, 28, 28), 10, init="glorot")
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        fan_out, fan_in = layer.weight.shape
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w = layer.weight.detach()
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound  # U(−bound, bound)
        assert abs(float(w.std()) - bound / 3 ** 0.5) < 0.02 * bound / 3 ** 0.5  # its std, bound / √3
        assert abs(float(w.mean())) < 0.01 * bound
        assert torch.count_nonzero(layer.bias) == 0
    conv = next(m for m in build_model("C1", (3, 32, 32), 10, init="glorot") if isinstance(m, nn.Conv2d))
    bound = (6.0 / (3 * 25 + 64 * 25)) ** 0.5  # fans count the 5×5 receptive field, as Keras's
    assert bound * 0.99 < float(conv.weight.detach().abs().max()) <= bound and torch.count_nonzero(conv.bias) == 0
    torch.manual_seed(0)
    default = build_model("F1", (1, 28, 28), 10)
    torch.manual_seed(0)
    assert all(torch.equal(p, q) for p, q in zip(default.parameters(),
                                                 build_model("F1", (1, 28, 28), 10, init="pytorch").parameters()))
    first = next(m for m in default if isinstance(m, nn.Linear))
    assert float(first.weight.detach().abs().max()) <= 784 ** -0.5 and torch.count_nonzero(first.bias) > 0  # PyTorch's own
    with pytest.raises(HessgapError, match="unknown initialization 'he'; choose one of pytorch, glorot"):
        build_model("F1", (40,), 10, init="he")


def _dropout_rates(model):
    return [m.p for m in model if isinstance(m, nn.Dropout)]


@pytest.mark.parametrize("name", ["C2", "C4"])
def test_conv_dropout_follows_the_authors_vgg(name):
    classes = 10 if name == "C2" else 100
    plain = build_model(name, (3, 32, 32), classes)
    assert _dropout_rates(plain) == [0.5]  # the dense layer's only
    keras = build_model(name, (3, 32, 32), classes, conv_dropout=True)
    # stacks of 2, 2, 3, 3, 3 convolutions: 0.3 after the first, 0.4 after every other but a stack's last,
    # then 0.5 after flattening and after the dense layer
    assert _dropout_rates(keras) == [0.3, 0.4] + [0.4] * 2 * 3 + [0.5, 0.5]
    layers = list(keras)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert isinstance(layers[convs[0] + 3], nn.Dropout) and layers[convs[0] + 3].p == 0.3  # conv, BN, ReLU, dropout
    assert isinstance(layers[convs[1] + 3], nn.MaxPool2d)  # a stack's last convolution: no dropout
    assert count_parameters(keras) == count_parameters(plain)
    assert _dropout_rates(build_model(name, (3, 32, 32), classes, dropout=0.0, conv_dropout=True)) == [0.3] + [0.4] * 7


@pytest.mark.parametrize("name", ["F1", "F2", "C1", "C3"])
def test_conv_dropout_leaves_the_other_networks_as_the_authors_had_them(name):
    a = build_model(name, (3, 32, 32), 10)
    b = build_model(name, (3, 32, 32), 10, conv_dropout=True)
    assert [type(m) for m in a] == [type(m) for m in b]
    with pytest.raises(HessgapError, match="conv_dropout must be True or False, got 1"):
        build_model(name, (3, 32, 32), 10, conv_dropout=1)


# ------------------------------------------------------------------------------------------ sizes refused before
# anything is built (was: a RuntimeError from torch's allocator, or a build that never ended)

@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape,classes", [((1, 8, 8), 10), ((40,), 10), ((3, 32, 32), 100)])
@pytest.mark.parametrize("width,depth", [(1.0, 1.0), (0.125, 2.3), (1.7, 0.4), (1e-9, 1e-9)])
def test_parameter_count_is_the_built_networks_without_building_it(name, shape, classes, width, depth):
    model = build_model(name, shape, classes, width, depth, conv_dropout=True)
    assert parameter_count(name, shape, classes, width, depth) == count_parameters(model)


def test_parameter_count_of_any_width_is_an_exact_integer():
    units = 512 * 10**9
    expected = linear(64, units) + bn(units) + 4 * (linear(units, units) + bn(units)) + linear(units, 10)
    assert parameter_count("F1", (1, 8, 8), 10, width=1e9) == expected  # 1.05e24: no float rounding


def test_a_network_larger_than_memory_is_refused_with_its_size(monkeypatch):
    monkeypatch.setattr(models, "device_memory", lambda device: 10**9)  # a machine with 1 GB
    with pytest.raises(HessgapError, match=r"F1 \(width 1e\+09, depth 1\) has 1\.05e\+24 parameters, 4\.19e\+15 GB "
                                           r"as torch.float32: more than the 1 GB of this machine's memory"):
        build_model("F1", (1, 8, 8), 10, width=1e9)
    n = parameter_count("F1", (1, 8, 8), 10, width=16)  # 269,164,554 parameters: 1.08 GB
    with pytest.raises(HessgapError, match=f"has {n:,} parameters, 1.08 GB"):
        build_model("F1", (1, 8, 8), 10, width=16)
    # training holds several copies: 62e6 parameters are 0.248 GB, four of them 0.992 GB, two 0.496 GB
    with pytest.raises(HessgapError, match=r"training with adam holds 4 copies of them, 0.992 GB: more than the 0.5 GB"):
        monkeypatch.setattr(models, "device_memory", lambda device: 5 * 10**8)
        check_fits_memory("F1", 62_000_000, "cpu", 4, "training with adam")
    check_fits_memory("F1", 62_000_000, "cpu", 2, "training with sgd")


@pytest.mark.parametrize("scale", [1e300, 1e308, float("inf")])
def test_absurd_widths_are_refused_without_a_traceback(scale):
    with pytest.raises(HessgapError, match="width|float range"):
        build_model("C2", (3, 32, 32), 100, width=scale)


def test_a_depth_beyond_the_block_limit_is_refused_before_building():
    with pytest.raises(HessgapError, match="depth=1e\\+09 gives F1 5,000,000,000 repeated blocks .* at most 10,000"):
        parameter_count("F1", (1, 8, 8), 10, depth=1e9)
    with pytest.raises(HessgapError, match="gives C2 13,000,000,000 repeated blocks"):
        build_model("C2", (3, 32, 32), 10, depth=1e9)
    assert parameter_count("F1", (40,), 10, width=0.01, depth=2000) > 0  # 10,000 blocks: still allowed
