"""CIFAR ResNets: parameter counts against hand-computed formulas and the published sizes, shapes, bad input."""

import pytest
import torch
from torch import nn

from hessgap.errors import HessgapError
from hessgap.train.resnet import BasicBlock, PadShortcut, ResNet, cifar_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


def conv3(i, o):
    return 9 * i * o  # 3×3, no bias (BatchNorm follows)


def bn(c):
    return 2 * c


def he_cifar_count(n, classes=10, width=16):
    """6n + 2 layers, option A shortcuts (no parameters): stem, three stages of n blocks, Linear."""
    w = [width, 2 * width, 4 * width]
    total = conv3(3, w[0]) + bn(w[0])
    previous = w[0]
    for c in w:
        for _ in range(n):
            total += conv3(previous, c) + bn(c) + conv3(c, c) + bn(c)
            previous = c
    return total + 4 * width * classes + classes


def resnet18_count(classes=10):
    """[2, 2, 2, 2] with 64..512 channels, 1×1 projection shortcuts (+BN) where the shape changes."""
    w = [64, 128, 256, 512]
    total = conv3(3, 64) + bn(64)
    previous = 64
    for c in w:
        for _ in range(2):
            total += conv3(previous, c) + bn(c) + conv3(c, c) + bn(c)
            if previous != c:
                total += previous * c + bn(c)
            previous = c
    return total + 512 * classes + classes


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth, published", [(20, 0.27e6), (56, 0.85e6)])
def test_he_cifar_resnets_have_the_papers_sizes(depth, published):
    model = cifar_resnet(depth)
    assert count(model) == he_cifar_count((depth - 2) // 6)
    assert abs(count(model) - published) / published < 0.01  # He et al. 2016, Table 6
    # option A: the shortcuts that change shape are parameter-free
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2


def test_resnet18_for_cifar_has_the_usual_size():
    model = cifar_resnet(18)
    assert count(model) == resnet18_count() == 11_173_962  # ≈ 11.2M, the usual CIFAR ResNet-18
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert len(model.stages) == 4 and [len(s) for s in model.stages] == [2, 2, 2, 2]


def test_shapes_through_the_stages():
    model = cifar_resnet(20, width=4).eval()
    x = torch.randn(3, 3, 32, 32)
    h = model.stem(x)
    assert h.shape == (3, 4, 32, 32)
    sizes = []
    for stage in model.stages:
        h = stage(h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(4, 32, 32), (8, 16, 16), (16, 8, 8)]
    assert model(x).shape == (3, 10)
    # other sizes and channels: the pool is adaptive
    assert cifar_resnet(18, width=2, num_classes=7, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_width_scales_every_stage():
    assert count(cifar_resnet(20, width=8)) == he_cifar_count(3, width=8)
    assert [s[0].conv1.out_channels for s in cifar_resnet(18, width=8).stages] == [8, 16, 32, 64]


def test_pad_shortcut_keeps_the_input_in_the_middle_channels():
    x = torch.randn(2, 4, 6, 6)
    out = PadShortcut(4, 8, 2)(x)
    assert out.shape == (2, 8, 3, 3)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 6:].any()


def test_a_block_adds_its_shortcut():
    block = BasicBlock(4, 4).eval()
    x = torch.randn(2, 4, 5, 5)
    residual = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    assert torch.allclose(block(x), torch.relu(residual + x))


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, 51, "20", 20.0, True])
def test_depths_without_a_network_are_refused(depth):
    with pytest.raises(HessgapError, match="depth"):
        cifar_resnet(depth)


@pytest.mark.parametrize("width", [0, -4, 2.5, True])
def test_bad_widths_are_refused(width):
    with pytest.raises(HessgapError, match="width"):
        cifar_resnet(20, width)


def test_resnet_checks_its_stages():
    with pytest.raises(HessgapError, match="one width per stage"):
        ResNet((2, 2), (16,))
    with pytest.raises(HessgapError, match="shortcut"):
        ResNet((1,), (4,), shortcut="conv")
