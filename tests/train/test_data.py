"""Data sets and loaders: the real on-disk formats (IDX, CIFAR pickles) written by the tests, MNIST-1D, digits."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from hessgap.errors import HessgapError
from hessgap.train.data import DATASET_NAMES, large_batch_size, load_dataset, make_loader
from hessgap.train.datasets.idx import read_idx
from hessgap.train.datasets.mnist1d import MNIST1DConfig, draw_transforms, generate, templates, transform

pytestmark = pytest.mark.usefixtures("one_thread")


# --- writers of the real formats ------------------------------------------------------------------

def write_idx(path, array, compress=False):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist(folder, n_train=12, n_test=6, side=28, compress=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if compress else "")), array, compress)
    return {k: v.astype(np.uint8) for k, v in arrays.items()}


def write_cifar(folder, name="cifar10", per_file=4, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        files, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        files, key, classes = ["train", "test"], b"fine_labels", 100
    written = {}
    for f in files:
        entry = {b"data": rng.integers(0, 256, (per_file, 3072)).astype(np.uint8),
                 key: rng.integers(0, classes, per_file).tolist(), b"batch_label": f.encode()}
        if name == "cifar100":
            entry[b"coarse_labels"] = rng.integers(0, 20, per_file).tolist()
        with open(folder / f, "wb") as fh:
            pickle.dump(entry, fh, protocol=protocol)
        written[f] = entry
    return written


def standardize(train, test):
    """Per-channel standardization with the training split's statistics (the independent reference)."""
    train = train.astype(np.float64)
    test = test.astype(np.float64)
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    return (train - mean) / std, (test - mean) / std


# --- MNIST (IDX) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("compress,subdir", [(False, "."), (True, "MNIST/raw")])
def test_mnist_reads_idx_files(tmp_path, compress, subdir):
    arrays = write_mnist(tmp_path / subdir, compress=compress)
    data = load_dataset("mnist", root=tmp_path)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10 and data.image and not data.flip_ok
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    ref_train, ref_test = standardize(arrays["train-images-idx3-ubyte"][:, None] / 255.0,
                                      arrays["t10k-images-idx3-ubyte"][:, None] / 255.0)
    np.testing.assert_allclose(x_train.numpy(), ref_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_test.numpy(), ref_test, rtol=1e-5, atol=1e-5)
    assert y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_idx_reader_checks_the_header(tmp_path):
    good = tmp_path / "good"
    write_idx(good, np.arange(24).reshape(2, 3, 4))
    np.testing.assert_array_equal(read_idx(good), np.arange(24).reshape(2, 3, 4))
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(HessgapError, match="not an IDX file"):
        read_idx(bad_magic)
    wrong_type = tmp_path / "wrong_type"
    wrong_type.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"abcd")
    with pytest.raises(HessgapError, match="unsigned byte"):
        read_idx(wrong_type)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(HessgapError, match="truncated"):
        read_idx(truncated)


@pytest.mark.parametrize("name, shape", [
    ("train-images-idx3-ubyte", (0, 28, 28)),  # no images at all
    ("t10k-images-idx3-ubyte", (6, 0, 28)),  # images of no pixels
])
def test_mnist_file_without_data_is_named_at_load_time(tmp_path, name, shape):
    write_mnist(tmp_path)
    write_idx(tmp_path / name, np.zeros(shape))
    if shape[0] == 0:
        write_idx(tmp_path / name.replace("images-idx3", "labels-idx1"), np.zeros(0))
    with pytest.raises(HessgapError, match=f"{name} holds no images .*{shape}"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_truncated_or_oversized_file_is_named(tmp_path, compress):
    write_mnist(tmp_path, compress=compress)
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    full = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(full[: len(full) // 2])
    with pytest.raises(HessgapError, match=f"{name}"):
        load_dataset("mnist", root=tmp_path)
    write_mnist(tmp_path)  # header sizes that disagree with the data: 12 images promised, 13 present
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes() + b"\x03")
    with pytest.raises(HessgapError, match="train-labels-idx1-ubyte: the header promises \\(12,\\) = 12 bytes of data "
                                           "but the file holds 13.*1 byte more"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_missing_files_are_listed(tmp_path):
    with pytest.raises(HessgapError, match="does not exist.*train-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path / "nowhere")
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(HessgapError, match="missing: t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(HessgapError, match="data_root"):
        load_dataset("mnist")


def test_mnist_labels_out_of_range(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 11))
    with pytest.raises(HessgapError, match="outside 0..9"):
        load_dataset("mnist", root=tmp_path)


# --- CIFAR (pickles) ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,subdir", [("cifar10", "cifar-10-batches-py"), ("cifar10", "."),
                                         ("cifar100", "cifar-100-python")])
def test_cifar_reads_pickles(tmp_path, name, subdir):
    written = write_cifar(tmp_path / subdir, name)
    data = load_dataset(name, root=tmp_path)
    if name == "cifar10":
        train_files, test_files, key, classes = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10
    else:
        train_files, test_files, key, classes = ["train"], ["test"], b"fine_labels", 100
    assert data.num_classes == classes and data.input_shape == (3, 32, 32) and data.flip_ok
    raw_train = np.concatenate([written[f][b"data"] for f in train_files]).reshape(-1, 3, 32, 32) / 255.0
    raw_test = np.concatenate([written[f][b"data"] for f in test_files]).reshape(-1, 3, 32, 32) / 255.0
    ref_train, ref_test = standardize(raw_train, raw_test)
    np.testing.assert_allclose(data.train.tensors[0].numpy(), ref_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.test.tensors[0].numpy(), ref_test, rtol=1e-5, atol=1e-5)
    assert data.train.tensors[1].tolist() == sum((written[f][key] for f in train_files), [])
    assert data.test.tensors[1].tolist() == sum((written[f][key] for f in test_files), [])


def test_cifar_files_without_images_are_named(tmp_path):
    write_cifar(tmp_path, "cifar100", per_file=0)
    with pytest.raises(HessgapError, match="CIFAR100 train files in .* \\(train\\) hold no images"):
        load_dataset("cifar100", root=tmp_path)


def test_cifar_missing_and_damaged_files(tmp_path):
    with pytest.raises(HessgapError, match="data_batch_1.*cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(HessgapError, match="missing: data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(HessgapError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)  # no labels
    with pytest.raises(HessgapError, match="not a CIFAR batch"):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickles_of_every_protocol_are_read(tmp_path, protocol):
    written = write_cifar(tmp_path, "cifar100", per_file=3, protocol=protocol)
    data = load_dataset("cifar100", root=tmp_path, preprocess="none")
    np.testing.assert_array_equal(np.rint(data.train.tensors[0].numpy() * 255), written["train"][b"data"].reshape(-1, 3, 32, 32))
    assert data.test.tensors[1].tolist() == written["test"][b"fine_labels"]


def _as_written_by_python2_and_numpy1(entry) -> bytes:
    """``entry`` pickled as the official archives were: protocol 2, bytes as Python 2 strings, numpy 1's
    ``numpy.core.multiarray`` module."""

    class Python2Pickler(pickle._Pickler):
        def save_bytes(self, obj):  # Python 2's str opcode instead of a call of _codecs.encode
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
            self.memoize(obj)

        dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}

    buffer = __import__("io").BytesIO()
    Python2Pickler(buffer, protocol=2).dump(entry)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def test_cifar_pickles_as_the_official_archives_hold_them_are_read(tmp_path):
    written = write_cifar(tmp_path, "cifar100", per_file=3)
    for f, entry in written.items():
        official = _as_written_by_python2_and_numpy1(entry)
        assert b"numpy.core.multiarray\n_reconstruct" in official and b"_codecs" not in official
        (tmp_path / f).write_bytes(official)
    data = load_dataset("cifar100", root=tmp_path, preprocess="none")
    np.testing.assert_array_equal(np.rint(data.train.tensors[0].numpy() * 255), written["train"][b"data"].reshape(-1, 3, 32, 32))
    assert data.train.tensors[1].tolist() == written["train"][b"fine_labels"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize("where", ["entry", "labels"])
def test_a_crafted_cifar_pickle_is_refused_without_running_its_code(tmp_path, protocol, where):
    write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "code-ran"
    entry = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    if where == "entry":
        entry[b"notes"] = _RunsCode(marker)
    else:
        entry[b"labels"] = np.array([0, _RunsCode(marker)], dtype=object)  # inside an object array
    with open(tmp_path / "data_batch_2", "wb") as fh:
        pickle.dump(entry, fh, protocol=protocol)
    with pytest.raises(HessgapError, match=r"CIFAR file .*data_batch_2 names (__builtin__|builtins)\.exec, which a CIFAR batch does "
                                           r"not hold.*will not unpickle it.*official 'python version' archive"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


def test_a_cifar_pickle_may_not_call_other_codecs(tmp_path):
    write_cifar(tmp_path, "cifar10")
    # _codecs.encode is admitted for Python 3's protocol-2 bytes only, i.e. with "latin1"
    crafted = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    (tmp_path / "test_batch").write_bytes(crafted)
    with pytest.raises(HessgapError, match=r"cannot read CIFAR file .*test_batch: UnpicklingError: _codecs\.encode"):
        load_dataset("cifar10", root=tmp_path)


# --- digits and MNIST-1D --------------------------------------------------------------------------

def test_digits_split_is_fixed_stratified_and_standardized():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert (data.num_train, data.num_test) == (1437, 360)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10 and data.image and not data.flip_ok
    x = data.train.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3
    counts = torch.bincount(data.test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 20% of each class
    again = load_dataset("digits")
    assert torch.equal(again.train.tensors[0], x) and torch.equal(again.test.tensors[1], data.test.tensors[1])
    assert not torch.equal(load_dataset("digits", seed=1).test.tensors[1], data.test.tensors[1])
    # the images are sklearn's, up to one affine standardization (raw pixels span exactly 0..16)
    raw = load_digits().images.reshape(1797, -1) / 16.0
    ours = torch.cat([data.train.tensors[0], data.test.tensors[0]]).reshape(1797, -1).double().numpy()
    ours = (ours - ours.min()) / (ours.max() - ours.min())
    rows = lambda a: a[np.lexsort(np.round(a, 6).T[::-1])]  # noqa: E731
    np.testing.assert_allclose(rows(ours), rows(raw), atol=1e-5)
    labels = torch.cat([data.train.tensors[1], data.test.tensors[1]])
    assert torch.bincount(labels).tolist() == np.bincount(load_digits().target).tolist()


def test_mnist1d_matches_the_reference_generator_statistics():
    data = load_dataset("mnist1d")
    assert (data.num_train, data.num_test) == (4000, 1000) and data.input_shape == (40,)
    assert not data.image and data.num_classes == 10
    assert not torch.equal(load_dataset("mnist1d", seed=1).train.tensors[0], data.train.tensors[0])
    base = templates()
    assert base.shape == (10, 12) and np.allclose(base[:, 0], 0)
    # Greydanus (2020) reports ≈32% test accuracy for logistic regression on MNIST-1D: hard for linear
    # models, yet far above chance (10%). A least-squares linear classifier lands just below that.
    x_train, y_train, x_test, y_test = generate(0)
    np.testing.assert_array_equal(x_train, data.train.tensors[0].numpy())
    with_bias = lambda x: np.hstack([x, np.ones((len(x), 1))])  # noqa: E731
    weights = np.linalg.lstsq(with_bias(x_train), np.eye(10)[y_train], rcond=None)[0]
    accuracy = float(np.mean((with_bias(x_test) @ weights).argmax(1) == y_test))
    assert 0.18 < accuracy < 0.4, accuracy
    # a nonlinear classifier does much better: the classes are there, in the shapes
    from sklearn.neighbors import KNeighborsClassifier

    assert KNeighborsClassifier().fit(x_train, y_train).score(x_test, y_test) > 0.45
    assert np.bincount(y_train, minlength=10).min() > 300


def reference_transform(x, draws, i, cfg, eps=1e-8):
    """Greydanus' per-sample transform, step by step with np.interp / np.roll, fed sample i's draws."""
    resample = lambda v, n: np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(v)), v)  # noqa: E731
    length = cfg.template_len + cfg.padding[1]
    v = resample(np.concatenate([x + eps, np.zeros(draws["pad"][i])]), length)
    v = np.roll(v * draws["scale"][i], draws["shift"][i])
    mask = v != 0
    v = mask * v + (1 - mask) * draws["corr_noise"][i] + draws["iid_noise"][i]
    v = v - draws["shear"][i] * np.linspace(-0.5, 0.5, length)
    return resample(v, cfg.final_seq_length)


def test_mnist1d_vectorized_transform_matches_the_per_sample_reference():
    cfg = MNIST1DConfig()
    base = templates()
    labels = np.arange(300) % 10
    draws = draw_transforms(len(labels), cfg, np.random.default_rng(7))
    assert draws["pad"].min() >= cfg.padding[0] and draws["pad"].max() <= cfg.padding[1]
    assert draws["shift"].max() < cfg.max_translation
    out = transform(base[labels], draws, cfg)
    expected = np.stack([reference_transform(base[label], draws, i, cfg) for i, label in enumerate(labels)])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_unknown_dataset_lists_choices():
    with pytest.raises(HessgapError, match=", ".join(DATASET_NAMES)):
        load_dataset("imagenet")


# --- loaders --------------------------------------------------------------------------------------

def tiny(n=10):
    return torch.utils.data.TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))


def order(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_loader_order_depends_only_on_seed_and_epoch():
    data = tiny()
    first = order(make_loader(data, 3, shuffle=True, seed=5, epoch=1))
    assert sorted(first) == list(range(10))
    assert order(make_loader(data, 3, shuffle=True, seed=5, epoch=1)) == first
    assert order(make_loader(data, 3, shuffle=True, seed=5, epoch=2)) != first
    assert order(make_loader(data, 3, shuffle=True, seed=6, epoch=1)) != first
    assert order(make_loader(data, 4, shuffle=False)) == list(range(10))
    sizes = [len(y) for _, y in make_loader(data, 4, shuffle=True)]
    assert sizes == [4, 4, 2]
    assert [len(y) for _, y in make_loader(data, 4, shuffle=True, drop_last=True)] == [4, 4]
    batch_x, batch_y = next(iter(make_loader(data, 3, shuffle=False)))
    assert batch_x.shape == (3, 1) and batch_y.tolist() == [0, 1, 2]


def test_loader_bad_batch_sizes():
    with pytest.raises(HessgapError, match="larger than the data set"):
        make_loader(tiny(), 11, shuffle=True)
    with pytest.raises(HessgapError, match="positive integer"):
        make_loader(tiny(), 0, shuffle=True)
    with pytest.raises(HessgapError, match="TensorDataset"):
        make_loader([(1, 2)], 1, shuffle=True)


def test_large_batch_is_ten_percent():
    assert large_batch_size(60000) == 6000 and large_batch_size(50000) == 5000
    assert large_batch_size(load_dataset("digits")) == 144


def test_no_preprocessing_keeps_pixels_in_their_unit_range():
    from sklearn.datasets import load_digits

    raw = load_dataset("digits", preprocess="none")
    x = torch.cat([raw.train.tensors[0], raw.test.tensors[0]])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # 0..16 divided by 16, not centred or scaled
    assert sorted(set((x * 16).round().flatten().tolist())) == sorted(set(load_digits().images.flatten().tolist()))
    standardized = load_dataset("digits")
    assert torch.equal(raw.train.tensors[1], standardized.train.tensors[1])  # the same split
    scale = float(standardized.train.tensors[0].flatten()[1:].std() / raw.train.tensors[0].flatten()[1:].std())
    np.testing.assert_allclose((raw.train.tensors[0] - raw.train.tensors[0].mean()) * scale,
                               standardized.train.tensors[0], atol=1e-4)
    assert "not standardized" in raw.source and "not standardized" not in standardized.source
    m1d = load_dataset("mnist1d", preprocess="none")  # MNIST-1D's own scaling belongs to the data set
    assert torch.equal(m1d.train.tensors[0], load_dataset("mnist1d").train.tensors[0])
    with pytest.raises(HessgapError, match="unknown preprocessing 'whiten'; choose one of standardize, none"):
        load_dataset("digits", preprocess="whiten")


def test_no_preprocessing_reads_mnist_and_cifar_in_zero_one(tmp_path):
    written = write_mnist(tmp_path / "mnist")
    data = load_dataset("mnist", tmp_path / "mnist", preprocess="none")
    np.testing.assert_allclose(data.train.tensors[0].numpy()[:, 0], written["train-images-idx3-ubyte"] / 255.0,
                               rtol=1e-6)
    batches = write_cifar(tmp_path / "cifar", "cifar10")
    cifar = load_dataset("cifar10", tmp_path / "cifar", preprocess="none")
    np.testing.assert_allclose(cifar.test.tensors[0].numpy().reshape(-1, 3072), batches["test_batch"][b"data"] / 255.0,
                               rtol=1e-6)
