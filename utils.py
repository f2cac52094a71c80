"""Shared code of the dataset-condensation scripts: datasets, the DC/DSA and DM learning loops, the gradient
distance, network training and evaluation, and results I/O. main.py, main_DM.py and CL_DM.py only parse flags and
call into here."""
import dataclasses
import gzip
import json
import math
import os
import pickle
import random
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from augment import DiffAugment, ParamDiffAug, augment_dc, parse_strategy
from networks import MODEL_NAMES, get_network, has_batchnorm

# -----------------------------------------------------------------------------
# Errors, file helpers
# -----------------------------------------------------------------------------


class UserError(Exception):
    """An error caused by the user's input or environment (missing data, unreadable file).

    The CLI scripts catch it and print only its message, so the message is forced onto a single
    line: it must say what is wrong and how to fix it.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


def _short(exc, limit=200):
    """One-line description of an exception, for embedding in a UserError message."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _atomic_write(path, write_fn, mode):
    """Write through write_fn(file) into a temp file next to `path`, then rename it over `path`.

    The rename is atomic on POSIX, so an interrupted run never leaves a truncated file behind
    that a later run would mistake for a finished one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_torch_file_atomic(obj, path):
    """torch.save(obj) to `path` atomically (temp file in the same directory + os.replace)."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def write_text_atomic(path, text):
    """Write the string `text` to `path` atomically, creating parent directories."""
    _atomic_write(path, lambda f: f.write(text), "w")


def load_torch_file(path, what, weights_only=True):
    """torch.load a file onto the CPU, turning a missing or corrupt file into a UserError.

    `what` names the content for the message (e.g. 'synthetic set'). weights_only defaults to True:
    every file this project reads holds only tensors, lists, dicts, strings and numbers.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"Cannot load the {what}: file {path} does not exist; check the path (or create the file first).")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise UserError(
            f"Cannot load the {what} from {path}: the file is unreadable or corrupt ({_short(e)}); "
            f"delete it and re-create or re-download it."
        ) from e


# -----------------------------------------------------------------------------
# Datasets
# -----------------------------------------------------------------------------

DATASETS = {
    "MNIST": dict(channel=1, im_size=(28, 28), num_classes=10, mean=[0.1307], std=[0.3081]),
    "FashionMNIST": dict(channel=1, im_size=(28, 28), num_classes=10, mean=[0.2861], std=[0.3530]),
    "SVHN": dict(channel=3, im_size=(32, 32), num_classes=10, mean=[0.4377, 0.4438, 0.4728], std=[0.1980, 0.2010, 0.1970]),
    "CIFAR10": dict(channel=3, im_size=(32, 32), num_classes=10, mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.2010]),
    "CIFAR100": dict(channel=3, im_size=(32, 32), num_classes=100, mean=[0.5071, 0.4866, 0.4409], std=[0.2673, 0.2564, 0.2762]),
    "TinyImageNet": dict(channel=3, im_size=(64, 64), num_classes=200, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
}

# Where the Debian package dataset-fashion-mnist installs the four original IDX .gz files; used
# when data_path has no FashionMNIST files, so the real data works without network.
FASHION_MNIST_SYSTEM_DIRS = ["/usr/share/datasets/fashion-mnist"]

MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
                 "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]  # torchvision's names
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # torchvision's names
SVHN_CLASSES = [str(d) for d in range(10)]

IDX_FILES = {  # split -> (images file, labels file), names without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_LAYOUT = {  # name -> (folder, archive, train files, test files, meta file, meta key, label key)
    "CIFAR10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)],
                ["test_batch"], "batches.meta", "label_names", "labels"),
    "CIFAR100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"], "meta",
                 "fine_label_names", "fine_labels"),
}
TINY_IMAGENET_FILE = "tinyimagenet.pt"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"


@dataclasses.dataclass
class DatasetTensors:
    """A whole dataset held as tensors, ready for condensation and evaluation.

    images_*: float32 (N, C, H, W), scaled to [0, 1] then normalised per channel with mean/std,
    contiguous. labels_*: int64 (N,). indices_class[c]: int64 indices into the train set of the
    images of class c, ascending. Tensors live on the CPU until .to(device) is called.
    """
    name: str
    channel: int
    im_size: tuple
    num_classes: int
    class_names: list
    mean: list
    std: list
    images_train: torch.Tensor
    labels_train: torch.Tensor
    images_test: torch.Tensor
    labels_test: torch.Tensor
    indices_class: list

    def to(self, device):
        """A copy whose tensors (and indices_class) live on `device`."""
        return dataclasses.replace(
            self,
            images_train=self.images_train.to(device),
            labels_train=self.labels_train.to(device),
            images_test=self.images_test.to(device),
            labels_test=self.labels_test.to(device),
            indices_class=[idx.to(device) for idx in self.indices_class],
        )


def normalize_uint8(images, mean, std):
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std per channel.

    Same float32 operations in the same order as torchvision's ToTensor() + Normalize(mean, std), so
    the result is bit-identical to applying them image by image. In-place steps keep peak memory at
    one float copy of the set.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous().to(torch.float32)
    x.div_(255)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return x


def class_indices(labels, num_classes):
    """List over classes of the (ascending) int64 indices of the samples with that label."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes)
    return [chunk.clone() for chunk in torch.split(order, counts.tolist())]


def _find_file(directory, name):
    """Path of `name` or `name.gz` inside directory, or None."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_maybe_gz(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path, expected_magic):
    """Parse an IDX file of unsigned bytes (images magic 2051, labels magic 2049) into a uint8 array."""
    try:
        raw = _read_maybe_gz(path)
    except (OSError, EOFError) as e:
        raise UserError(f"Cannot read IDX file {path} ({_short(e)}); delete it and provide the file again.") from e
    if len(raw) < 8:
        raise UserError(f"IDX file {path} is truncated; delete it and provide the file again.")
    magic = int(np.frombuffer(raw, dtype=">i4", count=1)[0])
    if magic != expected_magic:
        raise UserError(f"IDX file {path} has magic number {magic}, expected {expected_magic}; "
                        f"it is not the right MNIST-format file, replace it.")
    ndim = magic & 0xFF  # low byte = number of dimensions, next byte 0x08 = unsigned byte data
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise UserError(f"IDX file {path} is truncated or corrupt (header says {shape}); "
                        f"delete it and provide the file again.")
    # copy: frombuffer views the immutable bytes, and torch warns on non-writable arrays
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()


def _idx_dir_files(directory):
    """{(split, kind): path} when all four IDX files are in directory, else None."""
    found = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        for kind, name in (("images", images_name), ("labels", labels_name)):
            path = _find_file(directory, name)
            if path is None:
                return None
            found[(split, kind)] = path
    return found


def _load_idx_dir(files, im_size):
    out = {}
    for split in IDX_FILES:
        images = read_idx(files[(split, "images")], 2051)
        labels = read_idx(files[(split, "labels")], 2049)
        if images.shape[1:] != tuple(im_size) or labels.shape[0] != images.shape[0]:
            raise UserError(f"IDX files {files[(split, 'images')]} and {files[(split, 'labels')]} do not match "
                            f"(images {images.shape}, labels {labels.shape}, expected {tuple(im_size)} images); "
                            f"replace them with the original files.")
        out[split] = (images[:, None], labels)  # add the channel axis
    return out


def _download_with_torchvision(name, data_path):
    """Download `name` with torchvision into data_path, in the layout the loaders below read.

    torchvision is imported here, not at module level, so everything else works even when it is
    missing or broken.
    """
    from torchvision import datasets
    if name in ("MNIST", "FashionMNIST"):
        getattr(datasets, name)(root=data_path, train=True, download=True)
        getattr(datasets, name)(root=data_path, train=False, download=True)
    elif name in ("CIFAR10", "CIFAR100"):
        getattr(datasets, name)(root=data_path, train=True, download=True)
    elif name == "SVHN":
        datasets.SVHN(root=data_path, split="train", download=True)
        datasets.SVHN(root=data_path, split="test", download=True)
    else:
        raise ValueError(f"torchvision has no download for {name}")


def _try_download(name, data_path, download):
    """Try the torchvision download; returns a short note of what happened, for the error message."""
    if not download:
        return "download disabled"
    try:
        _download_with_torchvision(name, data_path)
    except Exception as e:  # no network, DNS failure, broken torchvision, bad checksum, ...
        return f"download failed ({_short(e)})"
    return "download did not produce the files"


def _load_mnist_like(name, data_path, download):
    info = DATASETS[name]
    local_dir = os.path.join(data_path, name, "raw")
    search_dirs = [local_dir] + (list(FASHION_MNIST_SYSTEM_DIRS) if name == "FashionMNIST" else [])
    for directory in search_dirs:
        files = _idx_dir_files(directory)
        if files is not None:
            return _load_idx_dir(files, info["im_size"])
    note = _try_download(name, data_path, download)
    files = _idx_dir_files(local_dir)
    if files is not None:
        return _load_idx_dir(files, info["im_size"])
    fix = f"place the four IDX files (plain or .gz) in {local_dir}"
    if name == "FashionMNIST":
        fix += " or install the Debian package dataset-fashion-mnist"
    raise UserError(f"{name} data not found: looked for train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                    f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (plain or .gz) in {', '.join(search_dirs)}; "
                    f"{note}. To fix: {fix}, or run once with network access and downloads enabled.")


def _read_pickle(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise UserError(f"Cannot read {path} ({_short(e)}); delete the folder and provide the dataset again.") from e


def _extract_archive(archive, data_path):
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):  # refuses absolute paths / links out of data_path
                tar.extractall(data_path, filter="data")
            else:
                tar.extractall(data_path)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"Cannot extract {archive} ({_short(e)}); delete it and download it again.") from e


def _load_cifar(name, data_path, download):
    folder_name, archive_name, train_files, test_files, meta_file, meta_key, label_key = CIFAR_LAYOUT[name]
    folder = os.path.join(data_path, folder_name)
    archive = os.path.join(data_path, archive_name)
    needed = train_files + test_files + [meta_file]

    def complete():
        return all(os.path.isfile(os.path.join(folder, f)) for f in needed)

    note = ""
    if not complete() and not os.path.isfile(archive):
        note = _try_download(name, data_path, download)
    if not complete() and os.path.isfile(archive):  # also what torchvision leaves when its extraction broke
        _extract_archive(archive, data_path)
        note = f"extracting {archive_name} did not produce them"
    if not complete():
        raise UserError(f"{name} data not found: looked for {', '.join(needed)} in {folder} and for {archive}; "
                        f"{note}. To fix: put {archive_name} (from https://www.cs.toronto.edu/~kriz/cifar.html) "
                        f"in {data_path}, or run once with network access and downloads enabled.")

    def read_split(files):
        images, labels = [], []
        for f in files:
            entry = _read_pickle(os.path.join(folder, f))
            images.append(np.asarray(entry["data"], dtype=np.uint8))
            labels.append(np.asarray(entry[label_key], dtype=np.int64))
        images = np.concatenate(images)
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
            raise UserError(f"{name} files in {folder} hold images of shape {images.shape[1:]}, expected 3072 "
                            f"bytes each; replace them with the original files.")
        return images.reshape(-1, 3, 32, 32), np.concatenate(labels)  # rows are stored R, G, B planes

    class_names = list(_read_pickle(os.path.join(folder, meta_file))[meta_key])
    return {"train": read_split(train_files), "test": read_split(test_files)}, class_names


def _load_svhn(data_path, download):
    import scipy.io  # lazy: only SVHN needs scipy
    paths = {split: os.path.join(data_path, f"{split}_32x32.mat") for split in ("train", "test")}
    note = None
    if not all(os.path.isfile(p) for p in paths.values()):
        note = _try_download("SVHN", data_path, download)
    if not all(os.path.isfile(p) for p in paths.values()):
        raise UserError(f"SVHN data not found: looked for {paths['train']} and {paths['test']}; {note}. "
                        f"To fix: put train_32x32.mat and test_32x32.mat (from http://ufldl.stanford.edu/housenumbers/) "
                        f"in {data_path}, or run once with network access and downloads enabled.")
    out = {}
    for split, path in paths.items():
        try:
            mat = scipy.io.loadmat(path)
            X, y = mat["X"], mat["y"]
        except Exception as e:
            raise UserError(f"Cannot read SVHN file {path} ({_short(e)}); delete it and download it again.") from e
        images = np.ascontiguousarray(np.transpose(X, (3, 2, 0, 1)))  # H, W, C, N -> N, C, H, W
        labels = np.asarray(y, dtype=np.int64).reshape(-1)
        labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
        out[split] = (images, labels)
    return out


def build_tiny_imagenet_file(folder, out_path):
    """Convert an extracted tiny-imagenet-200/ folder into tinyimagenet.pt (done once, atomically).

    Class order is the order of wnids.txt; class names come from words.txt when present (the full
    entry, e.g. 'goldfish, Carassius auratus'), else the wnids. The val split, labelled by
    val/val_annotations.txt, becomes the test set.
    """
    from PIL import Image  # lazy: only this one-off conversion needs PIL

    def read_lines(path):
        with open(path) as f:
            return [line.rstrip("\n") for line in f if line.strip()]

    wnids_path = os.path.join(folder, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise UserError(f"TinyImageNet folder {folder} has no wnids.txt; re-extract tiny-imagenet-200.zip there.")
    wnids = [line.strip() for line in read_lines(wnids_path)]
    label_of = {w: i for i, w in enumerate(wnids)}
    words = {}
    words_path = os.path.join(folder, "words.txt")
    if os.path.isfile(words_path):
        for line in read_lines(words_path):
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    classes = [words.get(w) or w for w in wnids]

    train_files, train_labels = [], []
    for w in wnids:
        image_dir = os.path.join(folder, "train", w, "images")
        if not os.path.isdir(image_dir):
            raise UserError(f"TinyImageNet folder is incomplete: {image_dir} is missing; re-extract tiny-imagenet-200.zip.")
        names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith((".jpeg", ".jpg")))
        train_files += [os.path.join(image_dir, n) for n in names]
        train_labels += [label_of[w]] * len(names)

    annotations = os.path.join(folder, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise UserError(f"TinyImageNet folder is incomplete: {annotations} is missing; re-extract tiny-imagenet-200.zip.")
    val_files, val_labels = [], []
    for line in read_lines(annotations):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise UserError(f"Bad line in {annotations}: {line!r}; re-extract tiny-imagenet-200.zip.")
        val_files.append(os.path.join(folder, "val", "images", fields[0]))
        val_labels.append(label_of[fields[1]])

    def read_images(files):
        # Decoding JPEGs one by one is unavoidable; this runs once and the result is cached on disk.
        out = np.empty((len(files), 3, 64, 64), dtype=np.uint8)
        for i, path in enumerate(files):
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
            except Exception as e:
                raise UserError(f"Cannot read TinyImageNet image {path} ({_short(e)}); re-extract the folder.") from e
            if arr.shape != (64, 64, 3):
                raise UserError(f"TinyImageNet image {path} is {arr.shape[1]}x{arr.shape[0]}, expected 64x64; "
                                f"re-extract the original tiny-imagenet-200.zip.")
            out[i] = arr.transpose(2, 0, 1)
        return torch.from_numpy(out)

    data = {
        "classes": classes,
        "images_train": read_images(train_files),
        "labels_train": torch.tensor(train_labels, dtype=torch.int64),
        "images_val": read_images(val_files),
        "labels_val": torch.tensor(val_labels, dtype=torch.int64),
    }
    save_torch_file_atomic(data, out_path)


def _load_tiny_imagenet(data_path):
    path = os.path.join(data_path, TINY_IMAGENET_FILE)
    folder = os.path.join(data_path, TINY_IMAGENET_FOLDER)
    if not os.path.isfile(path):
        if not os.path.isdir(folder):
            raise UserError(f"TinyImageNet data not found: looked for {path} and the folder {folder}; there is no "
                            f"automatic download. To fix: put tinyimagenet.pt in {data_path}, or extract "
                            f"tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) into {data_path}.")
        build_tiny_imagenet_file(folder, path)
    data = load_torch_file(path, "TinyImageNet data")
    keys = ("classes", "images_train", "labels_train", "images_val", "labels_val")
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise UserError(f"{path} is not a TinyImageNet file: it must be a dict with keys {', '.join(keys)}; "
                        f"delete it so it is rebuilt from {folder}, or replace it.")
    for k in ("images_train", "images_val"):
        images = data[k]
        if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)):
            raise UserError(f"{path}: '{k}' must be a uint8 tensor of shape N x 3 x 64 x 64; "
                            f"delete it so it is rebuilt from {folder}, or replace it.")
    splits = {"train": (data["images_train"], data["labels_train"]), "test": (data["images_val"], data["labels_val"])}
    return splits, [str(c) for c in data["classes"]]


def get_dataset(name, data_path, download=True):
    """Load a whole dataset into a DatasetTensors (CPU), normalised like ToTensor() + Normalize().

    Files already under data_path are always used first (and, for FashionMNIST, the Debian package's
    files); otherwise torchvision downloads them when download=True. Missing data raises UserError.
    """
    canonical = {n.lower(): n for n in DATASETS}
    if not isinstance(name, str) or name.lower() not in canonical:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    name = canonical[name.lower()]
    data_path = os.fspath(data_path)
    info = DATASETS[name]

    if name in ("MNIST", "FashionMNIST"):
        splits = _load_mnist_like(name, data_path, download)
        class_names = list(MNIST_CLASSES if name == "MNIST" else FASHION_MNIST_CLASSES)
    elif name in ("CIFAR10", "CIFAR100"):
        splits, class_names = _load_cifar(name, data_path, download)
    elif name == "SVHN":
        splits = _load_svhn(data_path, download)
        class_names = list(SVHN_CLASSES)
    else:
        splits, class_names = _load_tiny_imagenet(data_path)
    num_classes = len(class_names)  # TinyImageNet files may hold a subset of the 200 classes

    tensors = {}
    for split, (images, labels) in splits.items():
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if labels.numel() != len(images):
            raise UserError(f"{name} {split} split has {len(images)} images but {labels.numel()} labels; "
                            f"the files under {data_path} are corrupt, replace them.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(f"{name} {split} labels must lie in 0..{num_classes - 1} but range over "
                            f"{int(labels.min())}..{int(labels.max())}; the files under {data_path} are corrupt, replace them.")
        tensors[split] = (normalize_uint8(torch.as_tensor(images), info["mean"], info["std"]), labels)

    return DatasetTensors(
        name=name, channel=info["channel"], im_size=tuple(info["im_size"]), num_classes=num_classes,
        class_names=class_names, mean=list(info["mean"]), std=list(info["std"]),
        images_train=tensors["train"][0], labels_train=tensors["train"][1],
        images_test=tensors["test"][0], labels_test=tensors["test"][1],
        indices_class=class_indices(tensors["train"][1], num_classes),
    )


# ---------------------------------------------------------------------------------------------
# Seeding and devices
# ---------------------------------------------------------------------------------------------

def set_seed(seed):
    """Seed python, numpy and torch (CPU and every CUDA device). The only place the project seeds."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(name=None):
    """'cuda' when available, else 'cpu'; an explicit name is checked so a typo fails early."""
    if name in (None, '', 'auto'):
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use cpu, cuda or cuda:N")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available on this machine; use --device cpu")
    return str(device)


def get_rng_state():
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def draw_seed():
    """A seed for one Siamese augmentation draw, taken from the global (seeded) torch RNG."""
    return int(torch.randint(0, 2**31 - 1, (1,)))


# ---------------------------------------------------------------------------------------------
# Gradient distance (SPEC §4)
# ---------------------------------------------------------------------------------------------

METRICS = ('ours', 'mse', 'cos')


def check_choice(value, choices, what):
    if value not in choices:
        raise ValueError(f"unknown {what} '{value}'; valid choices: {', '.join(map(str, choices))}")
    return value


def match_loss(gw_syn, gw_real, metric='ours'):
    """Distance between two lists of per-parameter gradients (SPEC §4): match_loss_classes of a single class."""
    return match_loss_classes([g.unsqueeze(0) for g in gw_syn], [g.unsqueeze(0) for g in gw_real], metric)[0]


def match_loss_classes(gw_syn, gw_real, metric='ours'):
    """match_loss of K classes at once: gradients stacked along a leading class dimension; returns (K,) distances.

    'ours': per layer, gradients as (out, rest) rows, summed 1 - cos between rows; 1-D parameters (biases, norm
    weights) contribute nothing, as in the reference. 'mse' and 'cos' compare the concatenated gradient vectors."""
    check_choice(metric, METRICS, 'distance metric')
    if metric == 'ours':
        dis = torch.zeros(gw_real[0].shape[0], device=gw_real[0].device, dtype=gw_real[0].dtype)
        for g_syn, g_real in zip(gw_syn, gw_real):
            if g_real.dim() == 2:  # a 1-D parameter per class
                continue
            g_syn = g_syn.flatten(2)
            g_real = g_real.flatten(2)
            cos = (g_syn * g_real).sum(-1) / (g_syn.norm(dim=-1) * g_real.norm(dim=-1) + 1e-6)
            dis = dis + (1 - cos).sum(-1)
        return dis
    vec_syn = torch.cat([g.flatten(1) for g in gw_syn], dim=1)
    vec_real = torch.cat([g.flatten(1) for g in gw_real], dim=1)
    if metric == 'mse':
        return ((vec_syn - vec_real) ** 2).sum(-1)
    return 1 - (vec_syn * vec_real).sum(-1) / (vec_syn.norm(dim=-1) * vec_real.norm(dim=-1) + 1e-6)


# ---------------------------------------------------------------------------------------------
# Experiment settings from the papers
# ---------------------------------------------------------------------------------------------

# ipc -> (outer_loop, inner_loop) of gradient matching (SPEC §4)
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}

EVAL_POOLS = {
    'M': ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18'],
    'B': ['ConvNetBN', 'ConvNetASwishBN', 'AlexNetBN', 'VGG11BN', 'ResNet18BN'],
    'W': ['ConvNetW32', 'ConvNetW64', 'ConvNetW128', 'ConvNetW256'],
    'D': ['ConvNetD1', 'ConvNetD2', 'ConvNetD3', 'ConvNetD4'],
    'A': ['ConvNetAS', 'ConvNetAR', 'ConvNetAL', 'ConvNetASwish'],
    'P': ['ConvNetNP', 'ConvNetMP', 'ConvNetAP'],
    'N': ['ConvNetNN', 'ConvNetBN', 'ConvNetLN', 'ConvNetIN', 'ConvNetGN'],
}
EVAL_MODES = ('S', 'SS') + tuple(EVAL_POOLS)


def get_loops(ipc, outer_loop=None, inner_loop=None):
    """(outer_loop, inner_loop) for gradient matching; explicit values override the paper's table."""
    if outer_loop is not None and inner_loop is not None:
        return outer_loop, inner_loop
    if ipc not in LOOPS:
        raise UserError(f"no loop settings for ipc {ipc} (known: {', '.join(map(str, LOOPS))}); pass --outer_loop and "
                        f"--inner_loop (the authors advise 50 10 or 20 25 with --init real)")
    table_outer, table_inner = LOOPS[ipc]
    return (table_outer if outer_loop is None else outer_loop), (table_inner if inner_loop is None else inner_loop)


def get_eval_pool(eval_mode, model):
    """Models a synthetic set is evaluated on. 'S' swaps BatchNorm for instance norm (ConvNetBN -> ConvNet)."""
    check_choice(eval_mode, EVAL_MODES, 'eval_mode')
    if eval_mode == 'S':
        return [model[:model.index('BN')] if 'BN' in model else model]
    if eval_mode == 'SS':
        return [model]
    return list(EVAL_POOLS[eval_mode])


def dc_aug_strategy(dataset, model_eval):
    """DC augmentation during evaluation training (reference get_daparam): MNIST digits get crop/scale/rotate,
    ConvNetBN gets crop/noise, everything else none."""
    strategy = 'none'
    if dataset == 'MNIST':
        strategy = 'crop_scale_rotate'
    if model_eval == 'ConvNetBN':
        strategy = 'crop_noise'
    return strategy


def eval_settings(method, dataset, model_eval, dsa_strategy, epoch_eval_train=None, default_epochs=300):
    """Augmentation and epoch count for training one evaluation model (SPEC §1, §7).

    Returns (dsa_strategy or None, dc_strategy or None, epochs). DSA-style methods augment with DSA; DC uses the DC
    augmentation rule, and so do the coreset baselines (BASELINE_METHODS) unless a DSA strategy is given, as the DC
    paper evaluates them like DC sets. Epochs: 1000 when any augmentation is on, else default_epochs, unless the user
    set them."""
    dsa = dsa_strategy if method_uses_dsa(method, dsa_strategy) else None
    dc = None
    if dsa is None and (method == 'DC' or method in BASELINE_METHODS):
        strategy = dc_aug_strategy(dataset, model_eval)
        dc = None if strategy == 'none' else strategy
    if epoch_eval_train is not None:
        epochs = epoch_eval_train
    else:
        epochs = 1000 if (dsa or dc) else default_epochs
    return dsa, dc, epochs


def method_uses_dsa(method, dsa_strategy):
    if dsa_strategy in (None, '', 'none', 'None'):
        return False
    return method != 'DC'


def default_dsa_strategy(dataset):
    """Digits must not be mirrored (SPEC §5)."""
    if dataset in ('MNIST', 'SVHN'):
        return 'color_crop_cutout_scale_rotate'
    return 'color_crop_cutout_flip_scale_rotate'


# ---------------------------------------------------------------------------------------------
# Training and evaluation of networks (SPEC §7)
# ---------------------------------------------------------------------------------------------

def augment_batch(images, dsa_strategy=None, dc_strategy=None, dsa_param=None):
    """Independent (per-image) augmentation for network training, from the global RNG."""
    if dsa_strategy:
        return DiffAugment(images, dsa_strategy, param=dsa_param)
    if dc_strategy:
        return augment_dc(images, dc_strategy)
    return images


class NetRandom:
    """The private random streams of one evaluation network: its batch orders and its augmentation draws.

    Evaluation draws every random number of network k from its own NetRandom, so training the networks one by one
    or all together (train_and_test_batched) draws the same numbers and gives the same accuracies. Batch orders and
    augmentation parameters come from a generator on the device; the DSA op group is picked from a CPU generator,
    so picking it never waits for the GPU (a device generator would need a .item() per batch)."""

    def __init__(self, seed, choice_seed, device):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(int(seed))
        self.choice_generator = torch.Generator('cpu').manual_seed(int(choice_seed))

    def perm(self, n):
        return torch.randperm(n, generator=self.generator, device=self.device)

    def augment(self, images, dsa_strategy=None, dc_strategy=None, dsa_param=None):
        """Like augment_batch: DSA with per-image parameters (one op group per call in aug_mode 'S'), else DC."""
        if dsa_strategy:
            param = dsa_param or ParamDiffAug()
            groups = parse_strategy(dsa_strategy)
            if param.aug_mode == 'S' and len(groups) > 1:
                # DiffAugment would pick the group itself; picking it here keeps the draw on the CPU. Given a single
                # group, DiffAugment draws no choice.
                dsa_strategy = groups[int(torch.randint(len(groups), (1,), generator=self.choice_generator))]
            return DiffAugment(images, dsa_strategy, param=param, generator=self.generator)
        if dc_strategy:
            return augment_dc(images, dc_strategy, generator=self.generator)
        return images


def net_randoms(num, device):
    """num NetRandoms seeded from the global (per-experiment seeded) torch RNG, network after network."""
    seeds = torch.randint(0, 2**62, (num, 2)).tolist()
    return [NetRandom(seed, choice_seed, device) for seed, choice_seed in seeds]


def autocast(device, enabled):
    """bfloat16 autocast on the device's type when enabled (--bf16), else a no-op context."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bool(enabled))


def train_epoch(net, optimizer, images, labels, batch_size, dsa_strategy=None, dc_strategy=None, dsa_param=None,
                rand=None, bf16=False, channels_last=False):
    """One pass over an in-memory set in random order. Nothing leaves the device.

    rand: a NetRandom for the batch order and augmentation (default: the global RNG). bf16: forward under bfloat16
    autocast. channels_last: feed the batches in channels_last memory format (the network should be in it too)."""
    net.train()
    n = images.shape[0]
    order = rand.perm(n) if rand is not None else torch.randperm(n, device=images.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if rand is not None:
            img = rand.augment(images[idx], dsa_strategy, dc_strategy, dsa_param)
        else:
            img = augment_batch(images[idx], dsa_strategy, dc_strategy, dsa_param)
        if channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        backward_mean_loss(net, img, labels[idx], bf16)
        optimizer.step()


# On the CPU a convolutional network runs fastest on batches whose largest activation (the first layer's output)
# stays in the caches: for ConvNet on 28x28 images, chunks of 16-20 images make forward+backward 1.7x and the
# forward 2.4x faster than batches of 256 or 1024 (docs/PERFORMANCE.md). The bound is in floats of that activation.
CPU_CHUNK_FLOATS = 2 * 1024 * 1024


def cpu_chunk_size(net, images):
    """How many images net should take per forward on the CPU, or None for the whole batch at once: on a GPU, for
    networks without convolutions, and while a BatchNorm layer uses batch statistics (chunks would change them)."""
    if images.device.type != 'cpu' or images.dim() != 4:
        return None
    modules = list(net.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    if not convs or any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in modules):
        return None
    return max(1, CPU_CHUNK_FLOATS // (convs[0].out_channels * images.shape[-2] * images.shape[-1]))


def batch_chunks(net, images):
    """Slices that cut a batch into the chunks net should take (cpu_chunk_size), or one slice for all of it."""
    n = images.shape[0]
    chunk = cpu_chunk_size(net, images) or max(1, n)
    return [slice(s, s + chunk) for s in range(0, n, chunk)]


def embed_chunked(net, images):
    """net.embed(images), computed chunk by chunk (batch_chunks) and concatenated; gradients flow into each chunk."""
    parts = [net.embed(images[part]) for part in batch_chunks(net, images)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def chunk_losses(net, images, labels, bf16=False):
    """(loss, logits) per chunk of the batch (batch_chunks), where loss is the chunk's share of the batch's mean
    cross-entropy: the chunk losses sum to that mean, so their gradients sum to its gradient up to float rounding."""
    n = images.shape[0]
    for part in batch_chunks(net, images):
        with autocast(images.device, bf16):
            out = net(images[part])
        if bf16:
            out = out.float()  # the loss in full precision
        yield F.cross_entropy(out, labels[part], reduction='sum') / n, out


def backward_mean_loss(net, images, labels, bf16=False):
    """backward() of the mean cross-entropy of a batch, chunk by chunk into .grad (chunk_losses). Returns the logits,
    detached."""
    outs = []
    for loss, out in chunk_losses(net, images, labels, bf16):
        loss.backward()
        outs.append(out.detach())
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def mean_loss_grads(net, params, images, labels, create_graph=False):
    """torch.autograd.grad of the mean cross-entropy of a batch w.r.t. params, summed over its chunks (chunk_losses).
    create_graph=True keeps the result differentiable w.r.t. the images."""
    total = None
    for loss, _ in chunk_losses(net, images, labels):
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return list(total)


@torch.inference_mode()
def test_accuracy(net, images, labels, batch_size=1024, bf16=False, channels_last=False):
    """Accuracy over a whole tensor set, in batches of batch_size (on the CPU, cache-sized chunks: cpu_chunk_size);
    the count stays on the device until the end. channels_last: feed the batches in channels_last memory format
    (the network should be in it too); bf16: forward under bfloat16 autocast."""
    net.eval()
    batch_size = min(batch_size, cpu_chunk_size(net, images) or batch_size)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        img = images[start:start + batch_size]
        if channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        with autocast(img.device, bf16):
            out = net(img)
        correct += (out.argmax(1) == labels[start:start + batch_size]).sum()
    return correct.item() / max(1, images.shape[0])


COMPILE_ERROR = None  # why torch.compile failed in this process, once it has: later networks skip it silently


class SoftCompiled:
    """torch.compile(net) that fails soft: if compiling is unavailable or fails (no C++ compiler, unsupported op), it
    says so in one line on stderr (once per process) and runs net eagerly. Exposes what training needs of a module."""

    def __init__(self, net):
        self.net = net
        self.compiled = None
        if COMPILE_ERROR is None:
            try:
                self.compiled = torch.compile(net)
            except Exception as e:  # e.g. a Python version or platform torch.compile does not support
                self._give_up(e)

    def _give_up(self, e):
        global COMPILE_ERROR
        COMPILE_ERROR = _short(e, 120)
        print(f'warning: torch.compile is unavailable here ({COMPILE_ERROR}); running eagerly', file=sys.stderr)
        self.compiled = None

    def __call__(self, x):
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as e:  # compilation happens on the first calls: a failure shows up here
                self._give_up(e)
        return self.net(x)

    def train(self, mode=True):
        self.net.train(mode)
        return self

    def modules(self):
        return self.net.modules()

    def eval(self):
        return self.train(False)


def train_and_test(net, images_train, labels_train, images_test, labels_test, epochs, lr, batch_size,
                   dsa_strategy=None, dc_strategy=None, dsa_param=None, rand=None, bf16=False, channels_last=False,
                   compile=False):
    """The evaluation protocol: epochs+1 epochs of SGD (momentum 0.9, wd 5e-4), lr x0.1 with a fresh optimizer
    after epoch epochs//2, then test accuracy.

    rand: the network's NetRandom (default: the global RNG). bf16 / channels_last / compile: the opt-in speed flags
    (bfloat16 autocast of training and test forwards, channels_last network and batches, torch.compile)."""
    images_train = images_train.detach()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = SoftCompiled(net) if compile else net
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    decay_epoch = epochs // 2 + 1
    for ep in range(epochs + 1):
        train_epoch(model, optimizer, images_train, labels_train, batch_size, dsa_strategy, dc_strategy, dsa_param,
                    rand, bf16, channels_last)
        if ep == decay_epoch:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return test_accuracy(model, images_test, labels_test, bf16=bf16, channels_last=channels_last)


# Networks x images a batched test forward takes at once (the one-by-one test pass takes 1024 images).
BATCHED_TEST_IMAGES = 1024
# Bound on networks x batch x pixels that batched evaluation training holds at once (activations scale with it).
BATCHED_EVAL_PIXELS = 4_000_000


def sgd_step_(params, grads, momentum_buffers, lr, momentum=0.9, weight_decay=5e-4):
    """In place, what torch.optim.SGD(lr, momentum, weight_decay) does on its step (no dampening, no nesterov):
    d = g + wd * p; buf = d on the first step, else momentum * buf + d; p -= lr * buf. Works on stacked tensors of
    many networks at once. momentum_buffers is a list, empty for a fresh optimizer, filled on the first step."""
    with torch.no_grad():
        d = torch._foreach_add(grads, params, alpha=weight_decay)
        if not momentum_buffers:
            momentum_buffers.extend(torch.clone(x).detach() for x in d)
        else:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_add_(momentum_buffers, d)
        torch._foreach_add_(params, momentum_buffers, alpha=-lr)


def train_and_test_batched(nets, rands, images_train, labels_train, images_test, labels_test, epochs, lr, batch_size,
                           dsa_strategy=None, dc_strategy=None, dsa_param=None, bf16=False):
    """train_and_test of several networks of one architecture (without BatchNorm) at once: their parameters are
    stacked (torch.func.stack_module_state) and one vmapped forward/backward serves them all. Network k keeps its own
    initialisation, batch orders and augmentation draws (rands[k]), so the accuracies equal those of train_and_test
    with rand=rands[k] up to float rounding. Returns the list of test accuracies."""
    images_train = images_train.detach()
    skeleton = nets[0]  # functional_call only borrows its structure; the stacked tensors are the parameters
    for net in nets:
        net.train()
    params, buffers = stack_module_state(nets)
    names, values = list(params), list(params.values())

    def forward(p, b, x):
        if bf16:  # autocast does not reach inside vmap: the forward runs on bfloat16 copies (fp32 master weights)
            p = {name: v.to(torch.bfloat16) for name, v in p.items()}
            x = x.to(torch.bfloat16)
        return functional_call(skeleton, (p, b), (x,))

    forward_each = vmap(forward)  # network k on its own batch x[k]
    forward_shared = vmap(forward, in_dims=(0, 0, None))  # every network on the same batch
    n, k = images_train.shape[0], len(nets)
    momentum_buffers = []
    decay_epoch = epochs // 2 + 1
    for ep in range(epochs + 1):
        orders = [r.perm(n) for r in rands]
        for start in range(0, n, batch_size):
            idx = [o[start:start + batch_size] for o in orders]
            img = torch.stack([r.augment(images_train[i], dsa_strategy, dc_strategy, dsa_param)
                               for r, i in zip(rands, idx)])
            lab = torch.stack([labels_train[i] for i in idx])
            out = forward_each(params, buffers, img)
            # the sum of the networks' mean losses: each network's gradient is that of its own mean loss
            loss = F.cross_entropy(out.float().flatten(0, 1), lab.flatten(), reduction='sum') / lab.shape[1]
            grads = torch.autograd.grad(loss, values)
            sgd_step_(values, list(grads), momentum_buffers, lr)
        if ep == decay_epoch:
            lr *= 0.1
            momentum_buffers = []  # a fresh optimizer: the momentum restarts
    params = {name: v.detach() for name, v in zip(names, values)}
    with torch.no_grad():  # leave each network trained, as train_and_test does
        for i, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.copy_(params[name][i])
    skeleton.eval()
    correct = torch.zeros(k, dtype=torch.long, device=images_test.device)
    step = max(1, BATCHED_TEST_IMAGES // k)
    with torch.inference_mode():
        for start in range(0, images_test.shape[0], step):
            out = forward_shared(params, buffers, images_test[start:start + step])
            correct += (out.argmax(-1) == labels_test[start:start + step]).sum(1)
    return (correct.double() / max(1, images_test.shape[0])).tolist()


def flag_on(value, device):
    """An on/off/auto speed flag: 'auto' (or None) means on exactly when the device is a GPU."""
    if value in (None, 'auto'):
        return torch.device(device).type == 'cuda'
    return str(value).lower() not in ('0', 'false', 'off', 'no')


def eval_group_size(num_eval, n_train, batch_size, im_size):
    """How many evaluation networks train together: bounded by BATCHED_EVAL_PIXELS (networks x batch x pixels)."""
    per_net = min(batch_size, max(1, n_train)) * im_size[0] * im_size[1]
    return max(1, min(num_eval, BATCHED_EVAL_PIXELS // per_net))


def evaluate_models(images, labels, data, args, model_eval, num_eval, desc=''):
    """Train num_eval fresh networks of one architecture on a (synthetic) set; return their test accuracies.

    Networks are created one after another from the global RNG, and each gets a NetRandom for its batch orders and
    augmentation. Models without BatchNorm are trained together in groups (train_and_test_batched) when
    --eval_batched is on (auto: on a GPU); otherwise, and with --channels_last or --compile (which act on modules),
    one by one. Both paths draw the same random numbers, so the accuracies agree to float rounding."""
    dsa, dc, epochs = eval_settings(args.method, data.name, model_eval, args.dsa_strategy,
                                    args.epoch_eval_train, args.default_epoch_eval)
    bf16, channels_last, compile = (getattr(args, f, False) for f in ('bf16', 'channels_last', 'compile'))
    rands = net_randoms(num_eval, args.device)
    make_net = lambda: get_network(model_eval, data.channel, data.num_classes, data.im_size, device=args.device)
    first = make_net()
    batched = (flag_on(getattr(args, 'eval_batched', 'auto'), args.device) and not has_batchnorm(first)
               and not channels_last and not compile and num_eval > 1)
    group = eval_group_size(num_eval, images.shape[0], args.batch_train, data.im_size) if batched else 1
    accs = []
    with tqdm(total=num_eval, desc=desc or f'eval {model_eval}', leave=False, disable=args.quiet) as bar:
        while len(accs) < num_eval:
            # training draws nothing from the global RNG, so creating the networks lazily keeps their weights
            size = min(group, num_eval - len(accs))
            nets = [first if not accs and i == 0 else make_net() for i in range(size)]
            group_rands = rands[len(accs):len(accs) + size]
            if size > 1:
                accs += train_and_test_batched(nets, group_rands, images, labels, data.images_test, data.labels_test,
                                               epochs, args.lr_net, args.batch_train, dsa, dc, args.dsa_param, bf16)
            else:
                accs.append(train_and_test(nets[0], images, labels, data.images_test, data.labels_test, epochs,
                                           args.lr_net, args.batch_train, dsa, dc, args.dsa_param, group_rands[0],
                                           bf16, channels_last, compile))
            bar.update(size)
    return accs


# ---------------------------------------------------------------------------------------------
# Synthetic sets
# ---------------------------------------------------------------------------------------------

def sample_class_indices(data, c, n):
    """Training-set indices of n random images of class c, drawn on the device without replacement."""
    idx = data.indices_class[c]
    return idx[torch.randperm(idx.shape[0], device=idx.device)[:n]]


def sample_class_images(data, c, n):
    return data.images_train[sample_class_indices(data, c, n)]


def synthetic_labels(num_classes, ipc, device):
    return torch.arange(num_classes, device=device).repeat_interleave(ipc)


def init_synthetic_set(data, ipc, init, device):
    """ipc images per class in class order: Gaussian noise, or random real images of the class."""
    check_choice(init, ('noise', 'real'), '--init')
    image_syn = torch.randn(data.num_classes * ipc, data.channel, *data.im_size, device=device)
    if init == 'real':
        for c in range(data.num_classes):
            if data.indices_class[c].numel() < ipc:
                raise UserError(f"class {c} has {data.indices_class[c].numel()} training images, fewer than ipc {ipc}")
            image_syn[c * ipc:(c + 1) * ipc] = sample_class_images(data, c, ipc)
    return image_syn.requires_grad_(True), synthetic_labels(data.num_classes, ipc, device)


# ---------------------------------------------------------------------------------------------
# Gradient matching: one DC/DSA iteration (SPEC §4)
# ---------------------------------------------------------------------------------------------

def freeze_bn_from_real(net, data, classes, n_per_class=16):
    """BatchNorm statistics from n real images per class, then frozen (eval mode) while matching."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    img = torch.cat([sample_class_images(data, c, n_per_class) for c in classes])
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch the statistics are exactly that batch's
    net.train()
    with torch.no_grad():
        net(img)
    for m in bns:
        m.eval()


def class_batches(data, image_syn, i, c, ipc, batch_real, dsa_strategy=None, dsa_param=None):
    """The real batch and the synthetic images of class c (the i-th class), with one Siamese DSA transform drawn for
    both. Random draws, in order: the real batch, then the transform seed."""
    img_real = sample_class_images(data, c, batch_real)
    img_syn = image_syn[i * ipc:(i + 1) * ipc]
    if dsa_strategy:
        seed = draw_seed()  # Siamese: the same transform for the real and the synthetic batch
        img_real = DiffAugment(img_real, dsa_strategy, param=dsa_param, seed=seed)
        img_syn = DiffAugment(img_syn, dsa_strategy, param=dsa_param, seed=seed)
    return img_real, img_syn


def class_pair_loss(net, params, img_real, img_syn, c, metric):
    """Distance between the gradients of the real and of the synthetic batch of class c (the latter differentiable)."""
    lab_real = torch.full((img_real.shape[0],), c, device=img_real.device, dtype=torch.long)
    lab_syn = torch.full((img_syn.shape[0],), c, device=img_syn.device, dtype=torch.long)
    gw_real = [g.detach() for g in mean_loss_grads(net, params, img_real, lab_real)]
    gw_syn = mean_loss_grads(net, params, img_syn, lab_syn, create_graph=True)
    return match_loss(gw_syn, gw_real, metric)


def class_gradient_loss(net, image_syn, data, classes, ipc, batch_real, metric, dsa_strategy=None, dsa_param=None):
    """Sum over classes of the distance between the gradients of the real and of the synthetic batch of that class."""
    params = [p for p in net.parameters() if p.requires_grad]
    loss = 0
    for i, c in enumerate(classes):
        img_real, img_syn = class_batches(data, image_syn, i, c, ipc, batch_real, dsa_strategy, dsa_param)
        loss = loss + class_pair_loss(net, params, img_real, img_syn, c, metric)
    return loss


def class_gradients(net, images, labels, create_graph=False):
    """Gradients of the cross-entropy of each class's batch w.r.t. the network's parameters, all classes in one
    computation: images (K, n, C, H, W), labels (K,) -> list over parameters of (K, *shape) tensors.

    Each class gets its own copy of the parameters (expanded views: no memory); one vmapped forward runs class k's
    batch through copy k, and autograd.grad of the sum of the per-class mean losses gives, w.r.t. copy k, the gradient
    of class k. create_graph=True keeps the result differentiable w.r.t. the images (the synthetic set) by ordinary
    autograd. (vmap over torch.func.grad gives the same numbers but needs about twice the memory and time.)"""
    k, n = images.shape[:2]
    names = [name for name, _ in net.named_parameters()]
    copies = [p.detach().unsqueeze(0).expand(k, *p.shape).requires_grad_(True) for p in net.parameters()]
    buffers = dict(net.named_buffers())

    def forward(params, x):
        return functional_call(net, (dict(zip(names, params)), buffers), (x,))

    out = vmap(forward)(copies, images)
    loss = F.cross_entropy(out.flatten(0, 1), labels.repeat_interleave(n), reduction='sum') / n
    return list(torch.autograd.grad(loss, copies, create_graph=create_graph))


# Bound on classes x (batch_real + ipc) x pixels that one batched gradient computation takes: activation memory
# scales with it (ConvNet, batch_real 256, 10 classes of 28x28 images: about 6 GB).
BATCHED_CLASS_PIXELS = 3_000_000


def class_gradient_loss_batched(net, image_syn, data, classes, ipc, batch_real, metric, dsa_strategy=None,
                                dsa_param=None):
    """class_gradient_loss with the per-class gradients of many classes computed together (class_gradients), for
    networks without BatchNorm. Same random draws in the same order (real batch, then Siamese seed, class by class),
    so the loss and its gradient on image_syn equal the loop's to float rounding. Classes go in chunks bounded by
    BATCHED_CLASS_PIXELS; when real batches differ in size (a class smaller than batch_real) it falls back to the
    per-class loop on the same batches."""
    pairs = [class_batches(data, image_syn, i, c, ipc, batch_real, dsa_strategy, dsa_param)
             for i, c in enumerate(classes)]
    if len({real.shape[0] for real, _ in pairs}) > 1:
        params = [p for p in net.parameters() if p.requires_grad]
        return sum(class_pair_loss(net, params, real, syn, c, metric) for (real, syn), c in zip(pairs, classes))
    h, w = image_syn.shape[2:]
    most = max(1, BATCHED_CLASS_PIXELS // ((pairs[0][0].shape[0] + ipc) * h * w))
    chunk = math.ceil(len(classes) / math.ceil(len(classes) / most))  # even chunks of at most `most` classes
    loss = 0
    for start in range(0, len(classes), chunk):
        members = range(start, min(start + chunk, len(classes)))
        labels = torch.as_tensor([classes[i] for i in members], device=image_syn.device)
        gw_real = [g.detach() for g in class_gradients(net, torch.stack([pairs[i][0] for i in members]), labels)]
        gw_syn = class_gradients(net, torch.stack([pairs[i][1] for i in members]), labels, create_graph=True)
        loss = loss + match_loss_classes(gw_syn, gw_real, metric).sum()
    return loss


def matching_step(net, image_syn, optimizer_img, data, args, classes, dsa):
    """One update of the synthetic set: BatchNorm frozen from real images, the gradient-matching loss over classes
    (all classes in one vmapped computation with --batched_classes, auto: on a GPU; BatchNorm models class by class),
    one optimizer step. Returns the loss, detached."""
    ipc = image_syn.shape[0] // len(classes)
    batched = flag_on(getattr(args, 'batched_classes', 'auto'), image_syn.device) and not has_batchnorm(net)
    gradient_loss = class_gradient_loss_batched if batched else class_gradient_loss
    freeze_bn_from_real(net, data, classes)
    loss = gradient_loss(net, image_syn, data, classes, ipc, args.batch_real, args.dis_metric, dsa, args.dsa_param)
    optimizer_img.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_img.step()
    return loss.detach()


def train_on_synthetic(net, optimizer_net, image_syn, label_syn, args, dsa, epochs):
    """The network follows the synthetic set: epochs of training on a frozen copy of it (no DC augmentation while
    learning, DSA if the method uses it)."""
    syn_train = image_syn.detach().clone()
    for _ in range(epochs):
        train_epoch(net, optimizer_net, syn_train, label_syn, args.batch_train, dsa, None, args.dsa_param)


def dc_iteration(image_syn, label_syn, optimizer_img, data, args, classes, outer_loop, inner_loop):
    """One outer iteration of gradient matching on a freshly initialised network; returns the mean loss (tensor)."""
    dsa = args.dsa_strategy if method_uses_dsa(args.method, args.dsa_strategy) else None
    net = get_network(args.model, data.channel, data.num_classes, data.im_size, device=image_syn.device)
    net.train()
    optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
    loss_sum = torch.zeros((), device=image_syn.device)
    for ol in range(outer_loop):
        loss_sum += matching_step(net, image_syn, optimizer_img, data, args, classes, dsa)
        if ol == outer_loop - 1:
            break
        train_on_synthetic(net, optimizer_net, image_syn, label_syn, args, dsa, inner_loop)
    return loss_sum / (len(classes) * outer_loop)


# ---------------------------------------------------------------------------------------------
# Distribution matching: one DM iteration (SPEC §6)
# ---------------------------------------------------------------------------------------------

def auto_class_chunk(num_classes, ipc, batch_real, im_size, bn):
    """How many classes to embed at once. BN models see all classes together (as in the paper); otherwise bound
    the images*pixels per chunk so a large set (TinyImageNet ipc 50) fits in host memory."""
    if bn:
        return num_classes
    per_class = (ipc + batch_real) * im_size[0] * im_size[1]
    return max(1, min(num_classes, 4_000_000 // per_class))


def class_means(emb, counts):
    """Mean embedding of consecutive groups of rows of sizes counts."""
    seg = torch.repeat_interleave(torch.arange(len(counts), device=emb.device),
                                  torch.as_tensor(counts, device=emb.device))
    sums = torch.zeros(len(counts), emb.shape[1], device=emb.device, dtype=emb.dtype).index_add_(0, seg, emb)
    return sums / torch.as_tensor(counts, device=emb.device, dtype=emb.dtype).unsqueeze(1)


def dm_iteration(image_syn, label_syn, optimizer_img, data, args, classes, class_chunk=None):
    """One distribution-matching step: mean embeddings of real and synthetic images of each class are pulled together
    under a fresh random network. Classes are processed in chunks; gradients accumulate, one optimizer step."""
    ipc = image_syn.shape[0] // len(classes)
    dsa = args.dsa_strategy if method_uses_dsa(args.method, args.dsa_strategy) else None
    net = get_network(args.model, data.channel, data.num_classes, data.im_size, device=image_syn.device)
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    chunk = class_chunk or auto_class_chunk(len(classes), ipc, args.batch_real, data.im_size, has_batchnorm(net))
    # every random choice is drawn up front, in class order, so chunking does not change them
    real_idx, seeds = [], []
    for c in classes:
        real_idx.append(sample_class_indices(data, c, args.batch_real))
        seeds.append(draw_seed() if dsa else None)
    optimizer_img.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=image_syn.device)
    for start in range(0, len(classes), chunk):
        members = range(start, min(start + chunk, len(classes)))
        reals, syns = [], []
        for i in members:
            img_real = data.images_train[real_idx[i]]
            img_syn = image_syn[i * ipc:(i + 1) * ipc]
            if dsa:
                img_real = DiffAugment(img_real, dsa, param=args.dsa_param, seed=seeds[i])
                img_syn = DiffAugment(img_syn, dsa, param=args.dsa_param, seed=seeds[i])
            reals.append(img_real)
            syns.append(img_syn)
        with torch.no_grad():
            mean_real = class_means(embed_chunked(net, torch.cat(reals)), [r.shape[0] for r in reals])
        mean_syn = class_means(embed_chunked(net, torch.cat(syns)), [s.shape[0] for s in syns])
        loss = ((mean_real - mean_syn) ** 2).sum()
        loss.backward()
        loss_sum += loss.detach()
    optimizer_img.step()
    return loss_sum / len(classes)


# ---------------------------------------------------------------------------------------------
# Results I/O (SPEC §8): res_*.pt in the published structure, vis png grids, JSON summaries
# ---------------------------------------------------------------------------------------------

def result_stem(method, dataset, model, ipc):
    return f'{method}_{dataset}_{model}_{ipc}ipc'


def log(args, msg):
    if not getattr(args, 'quiet', False):
        tqdm.write(msg)


def save_vis(path, images, mean, std, nrow):
    """De-normalised, clipped grid, one row per class; written atomically."""
    from PIL import Image
    images = images.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (images * std_t + mean_t).clamp(0, 1)
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    rows = (n + nrow - 1) // nrow
    pad = 2
    grid = torch.zeros(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):  # one copy per image into the grid: a few hundred at most, not a hot path
        r, col = divmod(k, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[k]
    array = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    Image.fromarray(array).save(tmp, format='PNG')
    os.replace(tmp, path)


def summarize(accs_all_exps):
    """{model: {'accs': [...], 'mean': %, 'std': %, 'n': K}} in percent."""
    out = {}
    for key, accs in accs_all_exps.items():
        a = np.asarray(accs, dtype=np.float64)
        out[key] = {'n': int(a.size), 'mean': float(a.mean() * 100) if a.size else float('nan'),
                    'std': float(a.std() * 100) if a.size else float('nan'), 'accs': [float(x) for x in a]}
    return out


def summary_lines(num_exp, model, summary):
    return [f'Run {num_exp} experiments, train on {model}, evaluate {s["n"]} random {key}, '
            f'mean = {s["mean"]:.2f}% std = {s["std"]:.2f}%' for key, s in summary.items()]


def config_dict(args):
    """The run's flags as plain JSON-able values (stored in res_*.pt under 'config' and in the JSON summary)."""
    keep = (str, int, float, bool, type(None))
    return {k: v for k, v in sorted(vars(args).items()) if isinstance(v, keep)}


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + '\n')


def save_results(path, data_save, accs_all_exps, args, timings):
    save_torch_file_atomic({'data': data_save, 'accs_all_exps': accs_all_exps, 'config': config_dict(args),
                            'timings': timings}, path)


def load_synthetic_sets(path, channel=None, im_size=None, num_classes=None):
    """The list of [images, labels] of a res_*.pt (ours or a published one), checked for the published structure."""
    obj = load_torch_file(path, 'synthetic set')
    where = f"'{path}' is not a synthetic-set file in the published structure"
    if not isinstance(obj, dict) or not isinstance(obj.get('data'), (list, tuple)) or len(obj['data']) == 0:
        raise UserError(f"{where} (expected a dict whose 'data' is a non-empty list of [images, labels])")
    sets = []
    for k, entry in enumerate(obj['data']):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not all(torch.is_tensor(t) for t in entry[:2]):
            raise UserError(f"{where} (entry {k} of 'data' is not [images, labels])")
        images, labels = entry[0], entry[1]
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"{where} (entry {k}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                            f"do not form N x C x H x W and N)")
        if channel is not None and (images.shape[1] != channel or tuple(images.shape[2:]) != tuple(im_size)):
            raise UserError(f"'{path}' holds {tuple(images.shape[1:])} images but the dataset has "
                            f"{(channel, *im_size)}; check --dataset")
        if num_classes is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(f"'{path}' has labels outside 0..{num_classes - 1}; check --dataset")
        sets.append((images.float(), labels.long()))
    return sets


# ---------------------------------------------------------------------------------------------
# The shared experiment loop of main.py and main_DM.py
# ---------------------------------------------------------------------------------------------

RESUME_KEYS = ('method', 'dataset', 'model', 'ipc', 'Iteration', 'seed', 'init', 'lr_img', 'batch_real', 'dsa_strategy',
               'dis_metric', 'num_exp', 'feat_epochs', 'forget_epochs')


def evaluate_pool(images, labels, data, args, eval_pool, tag):
    """Accuracies of every model of the pool trained on one set; prints mean and std per model."""
    accs = {}
    for model_eval in eval_pool:
        accs[model_eval] = evaluate_models(images, labels, data, args, model_eval, args.num_eval,
                                           desc=f'{tag} eval {model_eval}')
        a = np.asarray(accs[model_eval])
        log(args, f'{tag}: evaluate {len(a)} random {model_eval}, mean = {a.mean():.4f} std = {a.std():.4f}')
    return accs


def eval_iterations(args):
    its = set()
    if args.eval_mode in ('S', 'SS') and args.eval_every > 0:
        its = set(range(0, args.Iteration + 1, args.eval_every))
    its.add(args.Iteration)  # always evaluate the final set (the reference skips it when Iteration % 500 != 0)
    return its


def save_checkpoint(path, args, state):
    save_torch_file_atomic({'config': config_dict(args), **state}, path)


def load_checkpoint(path, args):
    if not os.path.exists(path):
        return None
    ckpt = torch.load(path, map_location='cpu', weights_only=False)  # our own file: it holds RNG states (numpy)
    old = ckpt.get('config', {})
    for key in RESUME_KEYS:
        if key in old and old[key] != getattr(args, key, None):
            raise UserError(f"checkpoint '{path}' was written with --{key} {old[key]}, not {getattr(args, key, None)}; "
                            f"rerun with the same flags or without --resume")
    return ckpt


def run_experiments(args, data, init_fn, step_fn=None):
    """num_exp experiments: init_fn(exp) -> (image_syn, label_syn); step_fn(it, image_syn, label_syn, optimizer) -> loss.
    Evaluates on the eval pool at the evaluation iterations, checkpoints every args.checkpoint_every iterations,
    and writes res_*.pt, the vis png and the JSON summary atomically. Returns the summary dict."""
    stem = result_stem(args.method, args.dataset, args.model, args.ipc)
    os.makedirs(args.save_path, exist_ok=True)
    res_path = os.path.join(args.save_path, f'res_{stem}.pt')
    ckpt_path = os.path.join(args.save_path, f'ckpt_{stem}.pt')
    eval_pool = get_eval_pool(args.eval_mode, args.model)
    eval_its = eval_iterations(args) if step_fn is not None else {0}
    iterations = args.Iteration if step_fn is not None else 0

    state = {'exp': 0, 'it': 0, 'data_save': [], 'accs_all_exps': {m: [] for m in eval_pool}, 'history': [],
             'seconds': 0.0}
    ckpt = load_checkpoint(ckpt_path, args) if args.resume else None
    if ckpt is not None:
        state.update({k: ckpt[k] for k in state})
        log(args, f'resuming from {ckpt_path}: experiment {state["exp"]}, iteration {state["it"]}')
    t_start = time.time() - state['seconds']

    for exp in range(state['exp'], args.num_exp):
        if ckpt is not None and ckpt.get('image_syn') is not None and ckpt['exp'] == exp:
            image_syn = ckpt['image_syn'].to(args.device).requires_grad_(True)
            label_syn = ckpt['label_syn'].to(args.device)
            start_it = ckpt['it']
        else:
            set_seed(args.seed + exp)
            image_syn, label_syn = init_fn(exp)
            start_it = 0
        optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5) if step_fn is not None else None
        if ckpt is not None and ckpt.get('optimizer') is not None and ckpt['exp'] == exp:
            optimizer_img.load_state_dict(ckpt['optimizer'])
            set_rng_state(ckpt['rng'])
        ckpt = None
        log(args, f'================== Exp {exp} ==================')
        bar = tqdm(range(start_it, iterations + 1), desc=f'exp {exp}', disable=args.quiet or iterations == 0)
        for it in bar:
            if it in eval_its:
                accs = evaluate_pool(image_syn.detach(), label_syn, data, args, eval_pool, f'exp {exp} iter {it}')
                for m, a in accs.items():
                    state['history'].append({'exp': exp, 'iteration': it, 'model': m, 'accs': a})
                    if it == iterations:
                        state['accs_all_exps'][m] += a
                if args.save_vis:
                    save_vis(os.path.join(args.save_path, f'vis_{stem}_exp{exp}_iter{it}.png'), image_syn,
                             data.mean, data.std, nrow=args.ipc)
            if it == iterations:
                break
            loss = float(step_fn(it, image_syn, label_syn, optimizer_img))
            if not math.isfinite(loss):
                raise UserError(f'the matching loss became {loss} at experiment {exp} iteration {it}; lower --lr_img '
                                f'(results of finished experiments are in {args.save_path})')
            bar.set_postfix(loss=f'{loss:.4f}')
            if args.checkpoint_every > 0 and (it + 1) % args.checkpoint_every == 0 and it + 1 < iterations:
                save_checkpoint(ckpt_path, args, {
                    **state, 'exp': exp, 'it': it + 1, 'seconds': time.time() - t_start,
                    'image_syn': image_syn.detach().cpu(), 'label_syn': label_syn.cpu(),
                    'optimizer': optimizer_img.state_dict(), 'rng': get_rng_state()})
        state['data_save'].append([image_syn.detach().cpu().clone(), label_syn.cpu().clone()])
        state['seconds'] = time.time() - t_start
        save_results(res_path, state['data_save'], state['accs_all_exps'], args, {'seconds': state['seconds']})
        if args.checkpoint_every > 0 and exp + 1 < args.num_exp:
            save_checkpoint(ckpt_path, args, {**state, 'exp': exp + 1, 'it': 0})

    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    return report_results(args, state['accs_all_exps'], args.num_exp, os.path.join(args.save_path, f'res_{stem}.json'),
                          t_start, history=state['history'], res_file=res_path)


def report_results(args, accs_all_exps, num_exp, json_path, t_start, **extra):
    """The end of every run: the final lines (SPEC §8 wording), peak memory, and the JSON summary. Returns the
    summary dict."""
    summary = summarize(accs_all_exps)
    print('\n==================== Final Results ====================\n')
    for line in summary_lines(num_exp, args.model, summary):
        print(line)
    memory = peak_memory_mb(args.device)
    log(args, f'peak memory: host {memory["host_mb"]:.0f} MB' +
        (f', {args.device} {memory["device_mb"]:.0f} MB' if 'device_mb' in memory else ''))
    write_json_atomic(json_path, {'config': config_dict(args), 'results': summary, **extra,
                                  'wall_seconds': round(time.time() - t_start, 3), 'peak_memory': memory})
    return summary


def peak_memory_mb(device='cpu'):
    """Peak resident host memory of this process (and peak allocated CUDA memory), in MB."""
    import resource
    out = {'host_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if str(device).startswith('cuda') and torch.cuda.is_available():
        out['device_mb'] = torch.cuda.max_memory_allocated() / 2**20
    return out


def condense(args, data, iteration):
    """Learn num_exp synthetic sets of all classes, initialised by --init, with
    iteration(image_syn, label_syn, optimizer_img, classes) -> loss (one DC/DSA or DM step)."""
    check_ipc_fits(data, args.ipc)
    classes = list(range(data.num_classes))

    def init(exp):
        return init_synthetic_set(data, args.ipc, args.init, args.device)

    def step(it, image_syn, label_syn, optimizer_img):
        return iteration(image_syn, label_syn, optimizer_img, classes)

    return run_experiments(args, data, init, step)


def evaluate_saved(args, data):
    """--load_syn: evaluate every set stored in a res_*.pt on the eval pool, without learning."""
    sets = load_synthetic_sets(args.load_syn, data.channel, data.im_size, data.num_classes)
    eval_pool = get_eval_pool(args.eval_mode, args.model)
    accs_all = {m: [] for m in eval_pool}
    t_start = time.time()
    for exp, (images, labels) in enumerate(sets):
        set_seed(args.seed + exp)
        accs = evaluate_pool(images.to(args.device), labels.to(args.device), data, args, eval_pool,
                             f'set {exp}')
        for m, a in accs.items():
            accs_all[m] += a
    name = os.path.splitext(os.path.basename(args.load_syn))[0]
    out = os.path.join(args.save_path, f'eval_{name}_{args.eval_mode}.json')
    summary = report_results(args, accs_all, len(sets), out, t_start, file=os.path.abspath(args.load_syn))
    log(args, f'summary written to {out}')
    return summary


# ---------------------------------------------------------------------------------------------
# Command-line plumbing shared by main.py, main_DM.py and CL_DM.py
# ---------------------------------------------------------------------------------------------

def add_common_args(parser, **defaults):
    """Flags every condensation script has; defaults differ per script (SPEC §1)."""
    d = dict(dataset='CIFAR10', model='ConvNet', ipc=1, eval_mode='S', num_exp=5, num_eval=20, epoch_eval_train=None,
             Iteration=1000, lr_img=0.1, lr_net=0.01, batch_real=256, batch_train=256, init='noise', dsa_strategy='None',
             data_path='data', save_path='result', eval_every=500)
    d.update(defaults)
    a = parser.add_argument
    a('--dataset', type=str, default=d['dataset'], help='MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100, TinyImageNet')
    a('--model', type=str, default=d['model'], help='network to condense with (see networks.MODEL_NAMES)')
    a('--ipc', type=int, default=d['ipc'], help='images per class')
    a('--eval_mode', type=str, default=d['eval_mode'], help='S SS M B W D A P N (see SPEC)')
    a('--num_exp', type=int, default=d['num_exp'], help='number of experiments')
    a('--num_eval', type=int, default=d['num_eval'], help='networks trained per evaluation')
    a('--epoch_eval_train', type=int, default=d['epoch_eval_train'],
      help='epochs of evaluation training (default: 1000 with augmentation, else 300)')
    a('--Iteration', type=int, default=d['Iteration'], help='learning iterations')
    a('--lr_img', type=float, default=d['lr_img'], help='learning rate of the synthetic images')
    a('--lr_net', type=float, default=d['lr_net'], help='learning rate of network training')
    a('--batch_real', type=int, default=d['batch_real'], help='real images per class per step')
    a('--batch_train', type=int, default=d['batch_train'], help='batch size of network training')
    a('--init', type=str, default=d['init'], help='noise or real: initialisation of the synthetic set')
    a('--dsa_strategy', type=str, default=d['dsa_strategy'], help="DSA ops joined by '_', or None")
    a('--data_path', type=str, default=d['data_path'], help='dataset folder')
    a('--save_path', type=str, default=d['save_path'], help='results folder')
    a('--eval_every', type=int, default=d['eval_every'], help='evaluation interval for eval_mode S/SS')
    a('--seed', type=int, default=0, help='experiment k uses seed + k; drives every random choice')
    a('--device', type=str, default=None, help='cpu, cuda, cuda:N (default: cuda when available)')
    a('--resume', action='store_true', help='continue from the checkpoint in save_path')
    a('--checkpoint_every', type=int, default=100, help='iterations between checkpoints (0: none)')
    a('--load_syn', type=str, default=None, help='evaluate the sets of a res_*.pt without learning')
    a('--no_vis', dest='save_vis', action='store_false', help='do not write vis png grids')
    a('--quiet', action='store_true', help='no progress bars or per-evaluation logs')
    # speed (docs/PERFORMANCE.md): none of these changes results beyond float rounding, except --bf16
    a('--eval_batched', type=str, default='auto', choices=SPEED_FLAG_CHOICES,
      help='train the num_eval networks together with torch.func (models without BatchNorm); auto: on a GPU')
    a('--batched_classes', type=str, default='auto', choices=SPEED_FLAG_CHOICES,
      help='DC/DSA: per-class gradients of all classes in one vmapped computation (models without BatchNorm); '
           'auto: on a GPU')
    a('--channels_last', action='store_true', help='evaluation networks and batches in channels_last memory format '
                                                   '(implies one-by-one evaluation)')
    a('--bf16', action='store_true', help='bfloat16 autocast in evaluation training and test forwards')
    a('--compile', action='store_true', help='torch.compile the evaluation networks (implies one-by-one evaluation; '
                                             'falls back to eager with a warning when unavailable)')
    return parser


SPEED_FLAG_CHOICES = ('auto', '1', '0')


def check_common_args(args):
    """Validate flags before any data is loaded: every bad value fails in one line."""
    check_choice(args.dataset, list(DATASETS), 'dataset')
    check_choice(args.model, MODEL_NAMES, 'model')
    check_choice(args.eval_mode, EVAL_MODES, 'eval_mode')
    for name in get_eval_pool(args.eval_mode, args.model):
        check_choice(name, MODEL_NAMES, 'model')
    check_choice(args.init, ('noise', 'real'), 'init')
    parse_strategy(args.dsa_strategy)
    for flag in ('ipc', 'num_exp', 'num_eval', 'batch_real', 'batch_train'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    if args.Iteration < 0:
        raise UserError(f'--Iteration must be >= 0, got {args.Iteration}')
    if args.epoch_eval_train is not None and args.epoch_eval_train < 0:
        raise UserError(f'--epoch_eval_train must be >= 0, got {args.epoch_eval_train}')
    if args.load_syn is not None and not os.path.isfile(args.load_syn):
        raise UserError(f"--load_syn file '{args.load_syn}' does not exist")
    args.device = get_device(args.device)
    args.dsa_param = ParamDiffAug()
    return args


def check_ipc_fits(data, ipc):
    smallest = min(int(idx.numel()) for idx in data.indices_class)
    if ipc > smallest:
        raise UserError(f'--ipc {ipc} is larger than the smallest class of {data.name} ({smallest} training images)')


def cli(main_fn):
    """Run a script's main; bad input ends in one line on stderr and exit status 2, never a traceback."""
    try:
        main_fn()
    except (UserError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted: rerun with --resume to continue from the last checkpoint', file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Coreset baselines (random, herding, k-center, forgetting) and the whole-dataset bound
# ---------------------------------------------------------------------------------------------

SELECTION_METHODS = ('random', 'herding', 'kcenter', 'forgetting')  # real-image coresets, ipc per class
BASELINE_METHODS = SELECTION_METHODS + ('whole',)  # evaluated like DC sets (see eval_settings)
BASELINE_BATCH = 256  # batch of the feature / forgetting networks trained on the full set
WHOLE_EPOCHS = 30  # --epoch_eval_train default of --method whole (a full pass is ~N/ipc times longer)


def _check_pick_count(n, ipc):
    if not 1 <= ipc <= n:
        raise ValueError(f'cannot select {ipc} distinct examples out of {n}')


def random_selection(n, ipc, device):
    """ipc distinct positions out of n, uniformly at random (the DC paper's 'Random')."""
    _check_pick_count(n, ipc)
    return torch.randperm(n, device=device)[:ipc]


def herding_selection(features, ipc):
    """Greedy herding: each step adds the row that brings the mean of the selected rows closest to the mean of all
    rows. features: (n, d). Returns ipc distinct positions in pick order."""
    n = features.shape[0]
    _check_pick_count(n, ipc)
    target = features.mean(0)
    total = torch.zeros_like(target)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    picks = []
    for t in range(1, ipc + 1):
        # squared distance to the target of the mean after adding each candidate, all candidates at once
        dist = ((total + features) / t - target).pow(2).sum(1).masked_fill(taken, float('inf'))
        i = torch.argmin(dist)
        picks.append(i)
        taken[i] = True
        total = total + features[i]
    return torch.stack(picks)


def _distances_to(features, point):
    # the direct formula, not the matmul expansion: exact, so hand-made ties and zeros stay exact
    return torch.cdist(features, point.unsqueeze(0), compute_mode='donot_use_mm_for_euclid_dist').squeeze(1)


def kcenter_selection(features, ipc):
    """Greedy k-center (farthest-point) selection: start from the row closest to the mean, then repeatedly add
    the row farthest from everything selected so far. features: (n, d). Returns ipc distinct positions in pick order."""
    _check_pick_count(features.shape[0], ipc)
    first = torch.argmin(_distances_to(features, features.mean(0)))
    min_dist = _distances_to(features, features[first])
    taken = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    taken[first] = True
    picks = [first]
    for _ in range(ipc - 1):
        i = torch.argmax(min_dist.masked_fill(taken, -1.0))  # -1: duplicates at distance 0 are still pickable
        picks.append(i)
        taken[i] = True
        min_dist = torch.minimum(min_dist, _distances_to(features, features[i]))
    return torch.stack(picks)


def forgetting_counts(correct_history):
    """Forgetting events per example: how often it goes from correctly classified at one epoch to incorrectly
    classified at the next. correct_history: (epochs, N) bool. Returns (N,) int64."""
    h = torch.as_tensor(correct_history, dtype=torch.bool)
    return (h[:-1] & ~h[1:]).sum(0, dtype=torch.long)


def forgetting_selection(counts, ipc):
    """The ipc most-forgotten positions; ties broken at random (a random order, then a stable sort by count)."""
    _check_pick_count(counts.numel(), ipc)
    perm = torch.randperm(counts.numel(), device=counts.device)
    order = torch.argsort(counts[perm], descending=True, stable=True)
    return perm[order[:ipc]]


def train_full_set(net, data, epochs, lr, batch_size=BASELINE_BATCH, desc='train', quiet=False):
    """Plain SGD (momentum 0.9, wd 5e-4, no augmentation) on the whole training set.

    Returns the (epochs, N) bool record of whether each example was classified correctly in its own training
    forward pass of each epoch; it stays on the device."""
    images, labels = data.images_train, data.labels_train
    n = labels.shape[0]
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    correct = torch.zeros(epochs, n, dtype=torch.bool, device=labels.device)
    net.train()
    for ep in tqdm(range(epochs), desc=desc, leave=False, disable=quiet):
        order = torch.randperm(n, device=labels.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            out = backward_mean_loss(net, images[idx], labels[idx])
            optimizer.step()
            correct[ep, idx] = out.argmax(1) == labels[idx]
    return correct


def _forked_rng(device):
    """Context in which the global torch RNG may be reseeded: the CPU and CUDA states are restored on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.device(device).type == 'cuda' else []
    return torch.random.fork_rng(devices=devices)


def featnet_path(args, dataset, seed):
    return os.path.join(args.save_path, f'featnet_{dataset}_{args.model}_{args.feat_epochs}ep_seed{seed}.pt')


def feature_net(data, args, seed):
    """A --model network trained on the full training set for --feat_epochs epochs, in eval mode.

    Cached as a state dict in save_path (featnet_{dataset}_{model}_{epochs}ep_seed{seed}.pt) and reused by the
    herding and k-center runs. It is built and trained from torch seed `seed` inside a forked RNG, so the
    network depends only on its file name and the caller's random stream is the same whether or not the cache
    existed (delete the file after changing --lr_net or the data)."""
    path = featnet_path(args, data.name, seed)
    with _forked_rng(args.device):
        torch.manual_seed(seed)
        net = get_network(args.model, data.channel, data.num_classes, data.im_size, device=args.device)
        if os.path.isfile(path):
            try:
                net.load_state_dict(load_torch_file(path, 'cached feature network'))
            except (RuntimeError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"cached feature network {path} does not fit --model {args.model} on {data.name} "
                                f"({_short(e)}); delete it so it is retrained") from e
            log(args, f'feature network loaded from {path}')
        else:
            log(args, f'training the feature network ({args.model}, {args.feat_epochs} epochs, seed {seed})')
            train_full_set(net, data, args.feat_epochs, args.lr_net, desc='feature net', quiet=args.quiet)
            save_torch_file_atomic({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
    return net.eval()


@torch.inference_mode()
def embed_images(net, images, indices, batch_size=1024):
    """net.embed of images[indices], in batches, on the images' device."""
    return torch.cat([embed_chunked(net, images[indices[start:start + batch_size]])
                      for start in range(0, indices.shape[0], batch_size)])


def select_coreset(method, data, args, seed):
    """Training-set indices of a coreset: args.ipc per class, classes in order. `seed` names the cached feature
    network of herding/k-center; every other random choice comes from the global RNG (seeded by the caller)."""
    check_choice(method, SELECTION_METHODS, 'coreset method')
    check_ipc_fits(data, args.ipc)
    net, counts = None, None
    if method in ('herding', 'kcenter'):
        net = feature_net(data, args, seed)
    if method == 'forgetting':
        net = get_network(args.model, data.channel, data.num_classes, data.im_size, device=args.device)
        history = train_full_set(net, data, args.forget_epochs, args.lr_net, desc='forgetting', quiet=args.quiet)
        counts = forgetting_counts(history)
    picks = []
    for c, idx in enumerate(data.indices_class):
        if method == 'random':
            pos = random_selection(idx.numel(), args.ipc, idx.device)
        elif method == 'forgetting':
            pos = forgetting_selection(counts[idx], args.ipc)
        else:
            features = embed_images(net, data.images_train, idx).float()
            pos = (herding_selection if method == 'herding' else kcenter_selection)(features, args.ipc)
        picks.append(idx[pos])
    return torch.cat(picks)


def coreset(method, data, args, seed):
    """(images, labels) of a coreset: the dataset's own normalised tensors, ipc per class in class order."""
    indices = select_coreset(method, data, args, seed)
    return data.images_train[indices], data.labels_train[indices]


def run_whole(args, data):
    """The 'whole dataset' bound: each model of the eval pool trained num_eval times per experiment on the full
    training set with the evaluation protocol (evaluate_pool), reported like run_experiments. res_whole_*.pt keeps
    'accs_all_exps' and an empty 'data' (the set is the training set itself). Returns the summary dict."""
    stem = result_stem(args.method, args.dataset, args.model, args.ipc)
    res_path = os.path.join(args.save_path, f'res_{stem}.pt')
    eval_pool = get_eval_pool(args.eval_mode, args.model)
    accs_all_exps, history = {m: [] for m in eval_pool}, []
    t_start = time.time()
    for exp in range(args.num_exp):
        set_seed(args.seed + exp)
        log(args, f'================== Exp {exp} ==================')
        accs = evaluate_pool(data.images_train, data.labels_train, data, args, eval_pool, f'exp {exp} whole')
        for m, a in accs.items():
            accs_all_exps[m] += a
            history.append({'exp': exp, 'iteration': 0, 'model': m, 'accs': a})
        save_results(res_path, [], accs_all_exps, args, {'seconds': time.time() - t_start})
    return report_results(args, accs_all_exps, args.num_exp, os.path.join(args.save_path, f'res_{stem}.json'),
                          t_start, history=history, res_file=res_path)
