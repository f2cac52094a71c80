"""Tiny datasets written in the real on-disk formats, for tests.

Plain writer functions (importable with `from conftest import write_mnist`) take a data_path and the
sizes and return the data_path; the fixtures below call them with the default tiny sizes into
tmp_path. Every writer is deterministic in its arguments: make_split() with the same arguments
returns the exact arrays that were written (in file order), so tests can compare against them.
"""
import gzip
import os
import pickle
import shutil
import struct
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

# make the flat top-level modules (utils.py, networks.py, ...) importable however pytest is started
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def workers_output(stderr):
    """What the processes of a torchrun job printed themselves (a faulthandler stack included), without the launcher's
    own report of the failure, which alone would fill a truncated assertion message."""
    own = [line for line in stderr.splitlines() if 'torch/distributed/' not in line and 'elastic' not in line]
    return '\n'.join(own)[-6000:]


def make_class_images(num_classes, per_class, channel, size, seed=0, noise=0.08):
    """Learnable synthetic images: uint8 (num_classes * per_class, channel, H, W) and int64 labels.

    Class k is a smooth sinusoidal grating with its own orientation, frequency and per-channel phase;
    each image adds a random phase shift, contrast change and pixel noise (std `noise`). A small ConvNet
    trained on a few images per class separates the classes far above chance at the default noise; more
    noise makes single images poor class representatives. Images are in class-major order.
    """
    H, W = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    k = np.arange(num_classes).reshape(-1, 1, 1, 1, 1)
    c = np.arange(channel).reshape(1, 1, -1, 1, 1)
    yy, xx = np.meshgrid(np.arange(H) / H, np.arange(W) / W, indexing="ij")
    angle = np.pi * (k % 6) / 6
    freq = 1.5 + (k // 6) % 5
    u = np.cos(angle) * xx + np.sin(angle) * yy  # (K, 1, 1, H, W) coordinate across the stripes
    phase = 2 * np.pi * ((0.37 * k + 0.29 * c + 0.11 * (k // 30)) % 1.0)
    jitter = rng.uniform(-0.4, 0.4, size=(num_classes, per_class, 1, 1, 1))
    contrast = rng.uniform(0.8, 1.2, size=(num_classes, per_class, 1, 1, 1))
    x = 0.5 + 0.35 * contrast * np.sin(2 * np.pi * freq * u + phase + jitter)
    x = x + rng.normal(0.0, noise, size=(num_classes, per_class, channel, H, W))
    images = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).reshape(-1, channel, H, W)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return images, labels


def make_split(num_classes, train_per_class, test_per_class, channel, size, seed=0, noise=0.08):
    """((x_train, y_train), (x_test, y_test)) uint8 N,C,H,W, shuffled like real files (not class-sorted)."""
    rng = np.random.default_rng(seed + 1000)
    out = []
    for per_class, split_seed in ((train_per_class, seed), (test_per_class, seed + 1)):
        images, labels = make_class_images(num_classes, per_class, channel, size, split_seed, noise)
        order = rng.permutation(len(labels))
        out.append((images[order], labels[order]))
    return tuple(out)


# ---------------------------------------------------------------- MNIST / FashionMNIST (IDX)

def write_idx(path, array):
    """Write a uint8 array as an IDX file (magic 0x08 type + ndim, big-endian dims); .gz by name."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">i", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_idx_folder(directory, train, test, gz=False):
    """The four IDX files (train/t10k images and labels) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images[:, 0])
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)


def write_mnist(data_path, train_per_class=20, test_per_class=10, num_classes=10, gz=False, seed=0, name="MNIST",
                noise=0.08):
    """data_path/<name>/raw/ with the four IDX files (name MNIST or FashionMNIST)."""
    train, test = make_split(num_classes, train_per_class, test_per_class, 1, 28, seed, noise)
    write_idx_folder(os.path.join(data_path, name, "raw"), train, test, gz)
    return str(data_path)


def write_fashion_mnist(data_path, train_per_class=20, test_per_class=10, num_classes=10, gz=True, seed=0, noise=0.08):
    return write_mnist(data_path, train_per_class, test_per_class, num_classes, gz, seed, name="FashionMNIST",
                       noise=noise)


# ---------------------------------------------------------------- CIFAR10 / CIFAR100 (pickles)

def _dump_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _archive_folder(data_path, folder_name, archive_name):
    """Replace data_path/folder_name by the .tar.gz archive the official download ships."""
    with tarfile.open(os.path.join(data_path, archive_name), "w:gz") as tar:
        tar.add(os.path.join(data_path, folder_name), arcname=folder_name)
    shutil.rmtree(os.path.join(data_path, folder_name))


def write_cifar10(data_path, train_per_class=20, test_per_class=10, seed=0, archive=False):
    """data_path/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta), or only the .tar.gz."""
    (x_tr, y_tr), (x_te, y_te) = make_split(10, train_per_class, test_per_class, 3, 32, seed)
    folder = os.path.join(data_path, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(y_tr)), 5)):
        _dump_pickle(os.path.join(folder, f"data_batch_{i + 1}"),
                     {"batch_label": f"training batch {i + 1} of 5", "data": x_tr[idx].reshape(len(idx), -1),
                      "labels": y_tr[idx].tolist(), "filenames": [f"img_{j}.png" for j in idx]})
    _dump_pickle(os.path.join(folder, "test_batch"),
                 {"batch_label": "testing batch 1 of 1", "data": x_te.reshape(len(y_te), -1),
                  "labels": y_te.tolist(), "filenames": [f"test_{j}.png" for j in range(len(y_te))]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump_pickle(os.path.join(folder, "batches.meta"),
                 {"label_names": names, "num_cases_per_batch": len(y_tr) // 5, "num_vis": 3072})
    if archive:
        _archive_folder(data_path, "cifar-10-batches-py", "cifar-10-python.tar.gz")
    return str(data_path)


def write_cifar100(data_path, train_per_class=2, test_per_class=1, seed=0, archive=False):
    """data_path/cifar-100-python/ (train, test, meta with fine and coarse labels), or only the .tar.gz."""
    (x_tr, y_tr), (x_te, y_te) = make_split(100, train_per_class, test_per_class, 3, 32, seed)
    folder = os.path.join(data_path, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        _dump_pickle(os.path.join(folder, split),
                     {"filenames": [f"{split}_{j}.png" for j in range(len(y))], "batch_label": f"{split} batch",
                      "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(), "data": x.reshape(len(y), -1)})
    _dump_pickle(os.path.join(folder, "meta"),
                 {"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
                  "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]})
    if archive:
        _archive_folder(data_path, "cifar-100-python", "cifar-100-python.tar.gz")
    return str(data_path)


# ---------------------------------------------------------------- SVHN (.mat)

def write_svhn(data_path, train_per_class=20, test_per_class=10, seed=0):
    """data_path/{train,test}_32x32.mat: X is H, W, C, N uint8; y is N x 1 with digit 0 stored as 10."""
    import scipy.io
    os.makedirs(data_path, exist_ok=True)
    for split, (x, y) in zip(("train", "test"), make_split(10, train_per_class, test_per_class, 3, 32, seed)):
        y_mat = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(os.path.join(data_path, f"{split}_32x32.mat"), {"X": np.transpose(x, (2, 3, 1, 0)), "y": y_mat})
    return str(data_path)


# ---------------------------------------------------------------- TinyImageNet (folder of JPEGs)

def tiny_wnids(num_classes):
    return [f"n{1000000 + 17 * i:08d}" for i in range(num_classes)]


def write_tiny_imagenet_folder(data_path, num_classes=3, train_per_class=4, val_per_class=2, seed=0, words=True):
    """data_path/tiny-imagenet-200/ laid out like the official zip, with 64x64 JPEGs.

    Val images are shuffled across classes so their labels must come from val_annotations.txt.
    words.txt (when written) also lists wnids that are not in wnids.txt, like the real one.
    """
    from PIL import Image
    root = os.path.join(data_path, "tiny-imagenet-200")
    wnids = tiny_wnids(num_classes)
    (x_tr, y_tr), (x_va, y_va) = make_split(num_classes, train_per_class, val_per_class, 3, 64, seed)
    os.makedirs(os.path.join(root, "val", "images"), exist_ok=True)
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in wnids))
    if words:
        with open(os.path.join(root, "words.txt"), "w") as f:
            f.write("n00000001\tentity\n")
            f.write("".join(f"{w}\tthing {i}, object {i}\n" for i, w in enumerate(wnids)))
    for i, w in enumerate(wnids):
        image_dir = os.path.join(root, "train", w, "images")
        os.makedirs(image_dir, exist_ok=True)
        members = np.flatnonzero(y_tr == i)
        with open(os.path.join(root, "train", w, f"{w}_boxes.txt"), "w") as f:
            f.write("".join(f"{w}_{j}.JPEG\t0\t0\t63\t63\n" for j in range(len(members))))
        for j, idx in enumerate(members):
            Image.fromarray(x_tr[idx].transpose(1, 2, 0)).save(os.path.join(image_dir, f"{w}_{j}.JPEG"), quality=95)
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        for j in range(len(y_va)):
            Image.fromarray(x_va[j].transpose(1, 2, 0)).save(os.path.join(root, "val", "images", f"val_{j}.JPEG"), quality=95)
            f.write(f"val_{j}.JPEG\t{wnids[y_va[j]]}\t0\t0\t63\t63\n")
    return str(data_path)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module of tests on tiny tensors: on a shared 2-core machine extra threads only add
    synchronisation. Use with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mnist_path(tmp_path):
    return write_mnist(tmp_path)


@pytest.fixture
def fashion_gz_path(tmp_path):
    return write_fashion_mnist(tmp_path)


@pytest.fixture
def cifar10_path(tmp_path):
    return write_cifar10(tmp_path)


@pytest.fixture
def cifar100_path(tmp_path):
    return write_cifar100(tmp_path)


@pytest.fixture
def svhn_path(tmp_path):
    return write_svhn(tmp_path)


@pytest.fixture
def tiny_imagenet_folder_path(tmp_path):
    return write_tiny_imagenet_folder(tmp_path)


@pytest.fixture
def dataset_writers():
    """The writer functions as one namespace, for tests that need other sizes."""
    return types.SimpleNamespace(
        make_class_images=make_class_images, make_split=make_split, write_mnist=write_mnist,
        write_fashion_mnist=write_fashion_mnist, write_cifar10=write_cifar10, write_cifar100=write_cifar100,
        write_svhn=write_svhn, write_tiny_imagenet_folder=write_tiny_imagenet_folder,
    )
