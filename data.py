"""Datasets (SPEC §2): the on-disk formats of MNIST/FashionMNIST (IDX), CIFAR10/100 (pickles), SVHN (.mat) and
TinyImageNet (tinyimagenet.pt or the public folder), read offline from files, with torchvision downloading what is
missing when the network allows. load_dataset() returns the whole set as normalised tensors (DatasetTensors)."""
import dataclasses
import gzip
import os
import pickle
import tarfile

import numpy as np
import torch

import folders
from base import UserError, check_choice, load_torch_file, save_torch_file_atomic, short_error

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
        raise UserError(f"Cannot read IDX file {path} ({short_error(e)}); delete it and provide the file again.") from e
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
        return f"download failed ({short_error(e)})"
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
        raise UserError(f"Cannot read {path} ({short_error(e)}); delete the folder and provide the dataset again.") from e


def _extract_archive(archive, data_path):
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):  # refuses absolute paths / links out of data_path
                tar.extractall(data_path, filter="data")
            else:
                tar.extractall(data_path)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"Cannot extract {archive} ({short_error(e)}); delete it and download it again.") from e


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
            raise UserError(f"Cannot read SVHN file {path} ({short_error(e)}); delete it and download it again.") from e
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
                raise UserError(f"Cannot read TinyImageNet image {path} ({short_error(e)}); re-extract the folder.") from e
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


def _load_tiny_imagenet(data_path, unsafe_load=False):
    path = os.path.join(data_path, TINY_IMAGENET_FILE)
    folder = os.path.join(data_path, TINY_IMAGENET_FOLDER)
    if not os.path.isfile(path):
        if not os.path.isdir(folder):
            raise UserError(f"TinyImageNet data not found: looked for {path} and the folder {folder}; there is no "
                            f"automatic download. To fix: put tinyimagenet.pt in {data_path}, or extract "
                            f"tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) into {data_path}.")
        build_tiny_imagenet_file(folder, path)
    data = load_torch_file(path, "TinyImageNet data", unsafe=unsafe_load)
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


DATASET_NAMES = list(DATASETS) + list(folders.FOLDER_DATASETS)  # every --dataset value


def check_dataset_args(args):
    """--dataset (and, for a folder dataset, --data_path, --im_size, --channels) before any data is loaded."""
    if folders.canonical_name(args.dataset) is None:
        check_choice(args.dataset, DATASET_NAMES, 'dataset')
    return folders.check_folder_args(args)


def dataset_info_for(args):
    """channel, im_size, num_classes of --dataset without loading it (a folder dataset's from its folders)."""
    if folders.canonical_name(args.dataset) is None:
        return DATASETS[args.dataset]
    options = folders.loader_options(args)
    return folders.folder_info(args.dataset, args.data_path, options['im_size'], options['channels'])


def load_dataset_for(args):
    """load_dataset with the script's flags; a folder dataset's normalisation and size go into args, so that the
    run's config states them."""
    data = load_dataset(args.dataset, args.data_path, unsafe_load=getattr(args, 'unsafe_load', False),
                        **folders.loader_options(args))
    if folders.canonical_name(args.dataset) is not None:
        args.data_mean, args.data_std, args.data_im_size = list(data.mean), list(data.std), list(data.im_size)
    return data


def load_dataset(name, data_path, download=True, unsafe_load=False, im_size=None, channels=None, quiet=False):
    """Load a whole dataset into a DatasetTensors (CPU), normalised like ToTensor() + Normalize().

    Files already under data_path are always used first (and, for FashionMNIST, the Debian package's
    files); otherwise torchvision downloads them when download=True. Missing data raises UserError. unsafe_load: see
    base.load_torch_file (tinyimagenet.pt is a user-supplied torch file). im_size, channels, quiet: for the folder
    datasets (folders.py), whose mean and std are those of their training images.
    """
    if folders.canonical_name(name) is not None:
        return _load_folder_dataset(folders.canonical_name(name), data_path, im_size, channels, quiet)
    if im_size is not None or channels is not None:
        raise ValueError(f"im_size and channels apply to {', '.join(folders.FOLDER_DATASETS)} only, not {name}")
    canonical = {n.lower(): n for n in DATASETS}
    if not isinstance(name, str) or name.lower() not in canonical:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
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
        splits, class_names = _load_tiny_imagenet(data_path, unsafe_load)
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
    return _dataset_tensors(name, info, class_names, tensors)


def _dataset_tensors(name, info, class_names, tensors):
    num_classes = len(class_names)
    return DatasetTensors(
        name=name, channel=info["channel"], im_size=tuple(info["im_size"]), num_classes=num_classes,
        class_names=class_names, mean=list(info["mean"]), std=list(info["std"]),
        images_train=tensors["train"][0], labels_train=tensors["train"][1],
        images_test=tensors["test"][0], labels_test=tensors["test"][1],
        indices_class=class_indices(tensors["train"][1], num_classes),
    )


def _load_folder_dataset(name, data_path, im_size, channels, quiet):
    splits, class_names = folders.load_folder_splits(name, data_path, im_size, channels, quiet)
    images_train = splits["train"][0]
    mean, std = folders.channel_stats(images_train)
    info = dict(channel=images_train.shape[1], im_size=tuple(images_train.shape[-2:]), mean=mean, std=std)
    tensors = {split: (normalize_uint8(images, mean, std), labels) for split, (images, labels) in splits.items()}
    return _dataset_tensors(name, info, class_names, tensors)


def check_ipc_fits(data, ipc):
    smallest = min(int(idx.numel()) for idx in data.indices_class)
    if ipc > smallest:
        raise UserError(f'--ipc {ipc} is larger than the smallest class of {data.name} ({smallest} training images)')
