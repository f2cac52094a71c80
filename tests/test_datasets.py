import os
import urllib.error

import numpy as np
import pytest
import torch

import base
from conftest import (make_class_images, make_split, tiny_wnids, write_cifar10, write_cifar100, write_fashion_mnist,
                      write_idx_folder, write_mnist, write_tiny_imagenet_folder)
from base import UserError
import data as data_module
from data import DATASETS, load_dataset

REAL_FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def expected_normalised(images_uint8, name):
    """Reference normalisation in float64, for tolerance checks independent of the implementation."""
    mean = np.array(DATASETS[name]["mean"]).reshape(1, -1, 1, 1)
    std = np.array(DATASETS[name]["std"]).reshape(1, -1, 1, 1)
    return torch.from_numpy((images_uint8.astype(np.float64) / 255 - mean) / std).float()


def torchvision_tensors(dataset):
    """Stack a torchvision dataset item by item: (images, labels)."""
    images, labels = zip(*[dataset[i] for i in range(len(dataset))])
    return torch.stack(images), torch.tensor(labels)


def tv_transform(name):
    transforms = pytest.importorskip("torchvision.transforms")
    info = DATASETS[name]
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(info["mean"], info["std"])])


def check_layout(ds, name, n_train, n_test):
    info = DATASETS[name]
    C, (H, W) = info["channel"], info["im_size"]
    assert ds.name == name and ds.channel == C and ds.im_size == (H, W)
    assert ds.mean == info["mean"] and ds.std == info["std"]
    assert len(ds.class_names) == ds.num_classes
    assert ds.images_train.shape == (n_train, C, H, W) and ds.images_test.shape == (n_test, C, H, W)
    for t in (ds.images_train, ds.images_test):
        assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    assert ds.labels_train.dtype == torch.int64 and ds.labels_train.shape == (n_train,)
    assert ds.labels_test.dtype == torch.int64 and ds.labels_test.shape == (n_test,)
    check_indices_class(ds)


def check_indices_class(ds):
    assert len(ds.indices_class) == ds.num_classes
    for c, idx in enumerate(ds.indices_class):
        assert idx.dtype == torch.int64
        assert torch.all(ds.labels_train[idx] == c)
        assert torch.all(idx[1:] > idx[:-1])  # ascending, no duplicates
    assert sum(len(idx) for idx in ds.indices_class) == len(ds.labels_train)


def assert_one_line_user_error(excinfo, *must_contain):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for part in must_contain:
        assert str(part) in msg, (part, msg)


def test_registry_matches_spec():
    assert list(DATASETS) == ["MNIST", "FashionMNIST", "SVHN", "CIFAR10", "CIFAR100", "TinyImageNet"]
    assert DATASETS["MNIST"] == dict(channel=1, im_size=(28, 28), num_classes=10, mean=[0.1307], std=[0.3081])
    assert DATASETS["FashionMNIST"]["mean"] == [0.2861] and DATASETS["FashionMNIST"]["std"] == [0.3530]
    assert DATASETS["SVHN"]["std"] == [0.1980, 0.2010, 0.1970]
    assert DATASETS["CIFAR10"]["mean"] == [0.4914, 0.4822, 0.4465]
    assert DATASETS["CIFAR100"]["num_classes"] == 100 and DATASETS["CIFAR100"]["std"] == [0.2673, 0.2564, 0.2762]
    assert DATASETS["TinyImageNet"] == dict(channel=3, im_size=(64, 64), num_classes=200,
                                            mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    for info in DATASETS.values():
        assert len(info["mean"]) == len(info["std"]) == info["channel"]


def test_mnist_equals_torchvision_item_by_item(mnist_path):
    datasets = pytest.importorskip("torchvision.datasets")
    ds = load_dataset("MNIST", mnist_path, download=False)
    check_layout(ds, "MNIST", 200, 100)
    assert ds.num_classes == 10 and ds.class_names == datasets.MNIST.classes
    for train, images, labels in ((True, ds.images_train, ds.labels_train), (False, ds.images_test, ds.labels_test)):
        ref = datasets.MNIST(mnist_path, train=train, download=False, transform=tv_transform("MNIST"))
        ref_images, ref_labels = torchvision_tensors(ref)
        assert torch.equal(images, ref_images)
        assert torch.equal(labels, ref_labels)
    (x_tr, y_tr), _ = make_split(10, 20, 10, 1, 28)  # what the fixture wrote
    assert torch.equal(ds.labels_train, torch.from_numpy(y_tr))
    torch.testing.assert_close(ds.images_train, expected_normalised(x_tr, "MNIST"), rtol=0, atol=1e-5)


def test_plain_and_gz_idx_give_the_same_tensors(tmp_path):
    plain = load_dataset("MNIST", write_mnist(tmp_path / "plain", 3, 2, gz=False), download=False)
    gz = load_dataset("MNIST", write_mnist(tmp_path / "gz", 3, 2, gz=True), download=False)
    assert torch.equal(plain.images_train, gz.images_train) and torch.equal(plain.labels_test, gz.labels_test)


def test_fashion_mnist_gz(fashion_gz_path):
    ds = load_dataset("FashionMNIST", fashion_gz_path, download=False)
    check_layout(ds, "FashionMNIST", 200, 100)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    _, (x_te, y_te) = make_split(10, 20, 10, 1, 28)
    assert torch.equal(ds.labels_test, torch.from_numpy(y_te))
    torch.testing.assert_close(ds.images_test, expected_normalised(x_te, "FashionMNIST"), rtol=0, atol=1e-5)


def test_fashion_mnist_system_fallback_and_local_priority(tmp_path, monkeypatch):
    system_dir = tmp_path / "system"
    train, test = make_split(10, 2, 1, 1, 28, seed=5)
    write_idx_folder(system_dir, train, test, gz=True)
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIRS", [str(system_dir)])
    ds = load_dataset("FashionMNIST", tmp_path / "empty", download=False)
    assert torch.equal(ds.labels_train, torch.from_numpy(train[1]))
    # files under data_path win over the system copy
    local = write_fashion_mnist(tmp_path / "local", 3, 1, seed=9)
    ds = load_dataset("FashionMNIST", local, download=False)
    assert len(ds.labels_train) == 30


def test_cifar10_equals_torchvision_item_by_item(cifar10_path, monkeypatch):
    pytest.importorskip("torchvision")
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # fixture files have other md5s
    ds = load_dataset("CIFAR10", cifar10_path, download=False)
    check_layout(ds, "CIFAR10", 200, 100)
    assert ds.class_names[:2] == ["airplane", "automobile"]
    for train, images, labels in ((True, ds.images_train, ds.labels_train), (False, ds.images_test, ds.labels_test)):
        ref = tv_cifar.CIFAR10(cifar10_path, train=train, download=False, transform=tv_transform("CIFAR10"))
        ref_images, ref_labels = torchvision_tensors(ref)
        assert torch.equal(images, ref_images)
        assert torch.equal(labels, ref_labels)


def test_cifar10_archive_only_is_extracted(tmp_path):
    folder_ds = load_dataset("CIFAR10", write_cifar10(tmp_path / "a", 2, 1), download=False)
    archive_path = write_cifar10(tmp_path / "b", 2, 1, archive=True)
    assert not os.path.exists(os.path.join(archive_path, "cifar-10-batches-py"))
    ds = load_dataset("CIFAR10", archive_path, download=False)
    assert os.path.isfile(os.path.join(archive_path, "cifar-10-batches-py", "data_batch_5"))
    assert torch.equal(ds.images_train, folder_ds.images_train) and torch.equal(ds.labels_test, folder_ds.labels_test)


def test_cifar100_fine_labels_and_archive(cifar100_path, tmp_path):
    ds = load_dataset("CIFAR100", cifar100_path, download=False)
    check_layout(ds, "CIFAR100", 200, 100)
    assert ds.num_classes == 100 and ds.class_names[99] == "fine_99"
    (x_tr, y_tr), _ = make_split(100, 2, 1, 3, 32)
    assert torch.equal(ds.labels_train, torch.from_numpy(y_tr))
    torch.testing.assert_close(ds.images_train, expected_normalised(x_tr, "CIFAR100"), rtol=0, atol=1e-5)
    from_archive = load_dataset("CIFAR100", write_cifar100(tmp_path / "arch", archive=True), download=False)
    assert torch.equal(from_archive.images_test, ds.images_test)


def test_svhn_label_10_is_zero_and_equals_torchvision(svhn_path, monkeypatch):
    ds = load_dataset("SVHN", svhn_path, download=False)
    check_layout(ds, "SVHN", 200, 100)
    assert ds.class_names == [str(d) for d in range(10)]
    (x_tr, y_tr), _ = make_split(10, 20, 10, 3, 32)
    assert torch.equal(ds.labels_train, torch.from_numpy(y_tr)) and (ds.labels_train == 0).sum() == 20
    torch.testing.assert_close(ds.images_train, expected_normalised(x_tr, "SVHN"), rtol=0, atol=1e-5)
    datasets = pytest.importorskip("torchvision.datasets")
    monkeypatch.setattr(datasets.SVHN, "_check_integrity", lambda self: True)
    ref_images, ref_labels = torchvision_tensors(
        datasets.SVHN(svhn_path, split="test", download=False, transform=tv_transform("SVHN")))
    assert torch.equal(ds.images_test, ref_images) and torch.equal(ds.labels_test, ref_labels)


def test_tiny_imagenet_folder_is_converted_once(tiny_imagenet_folder_path, monkeypatch):
    from PIL import Image
    data_path = tiny_imagenet_folder_path
    ds = load_dataset("TinyImageNet", data_path, download=False)
    check_layout(ds, "TinyImageNet", 12, 6)
    assert ds.num_classes == 3 and ds.class_names == [f"thing {i}, object {i}" for i in range(3)]
    pt_path = os.path.join(data_path, "tinyimagenet.pt")
    assert os.path.isfile(pt_path)
    assert not [n for n in os.listdir(data_path) if n.endswith(".tmp")]  # atomic write left no temp file

    # val labels come from val_annotations.txt, images are the decoded JPEGs
    _, (_, y_val) = make_split(3, 4, 2, 3, 64)
    assert torch.equal(ds.labels_test, torch.from_numpy(y_val))
    root = os.path.join(data_path, "tiny-imagenet-200")
    val = np.stack([np.asarray(Image.open(os.path.join(root, "val", "images", f"val_{j}.JPEG")).convert("RGB"))
                    for j in range(6)]).transpose(0, 3, 1, 2)
    torch.testing.assert_close(ds.images_test, expected_normalised(val, "TinyImageNet"), rtol=0, atol=1e-5)
    wnid = tiny_wnids(3)[2]
    first = np.asarray(Image.open(os.path.join(root, "train", wnid, "images", f"{wnid}_0.JPEG")).convert("RGB"))
    idx = ds.indices_class[2][0]
    torch.testing.assert_close(ds.images_train[idx:idx + 1],
                               expected_normalised(first.transpose(2, 0, 1)[None], "TinyImageNet"), rtol=0, atol=1e-5)

    saved = torch.load(pt_path, weights_only=True)
    assert saved["images_train"].dtype == torch.uint8 and saved["images_train"].shape == (12, 3, 64, 64)

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("tinyimagenet.pt was rebuilt")
    monkeypatch.setattr(data_module, "build_tiny_imagenet_file", must_not_rebuild)
    mtime = os.path.getmtime(pt_path)
    again = load_dataset("TinyImageNet", data_path, download=False)
    assert os.path.getmtime(pt_path) == mtime
    assert torch.equal(again.images_train, ds.images_train) and torch.equal(again.labels_test, ds.labels_test)


def test_tiny_imagenet_without_words_uses_wnids(tmp_path):
    ds = load_dataset("TinyImageNet", write_tiny_imagenet_folder(tmp_path, 2, 1, 1, words=False), download=False)
    assert ds.class_names == tiny_wnids(2)


def test_tiny_imagenet_pt_file(tmp_path):
    images, labels = make_class_images(4, 3, 3, 64, seed=3)
    base.save_torch_file_atomic({"classes": ["a", "b", "c", "d"], "images_train": torch.from_numpy(images),
                                  "labels_train": torch.from_numpy(labels), "images_val": torch.from_numpy(images[:5]),
                                  "labels_val": torch.from_numpy(labels[:5])}, tmp_path / "tinyimagenet.pt")
    ds = load_dataset("TinyImageNet", tmp_path, download=False)
    check_layout(ds, "TinyImageNet", 12, 5)
    assert ds.class_names == ["a", "b", "c", "d"]
    torch.testing.assert_close(ds.images_train, expected_normalised(images, "TinyImageNet"), rtol=0, atol=1e-5)


MISSING_HINTS = {"MNIST": "MNIST/raw", "FashionMNIST": "dataset-fashion-mnist", "SVHN": "train_32x32.mat",
                 "CIFAR10": "cifar-10-python.tar.gz", "CIFAR100": "cifar-100-python.tar.gz",
                 "TinyImageNet": "tiny-imagenet-200"}


@pytest.mark.parametrize("name", list(DATASETS))
def test_missing_data_offline_is_a_one_line_user_error(name, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIRS", [str(tmp_path / "no_system_copy")])
    calls = []

    def no_network(*args):
        calls.append(args)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution\nsecond line")
    monkeypatch.setattr(data_module, "_download_with_torchvision", no_network)

    with pytest.raises(UserError) as excinfo:
        load_dataset(name, tmp_path / "data", download=False)
    assert_one_line_user_error(excinfo, name, tmp_path / "data", MISSING_HINTS[name])
    assert not calls  # download=False never touches the network

    with pytest.raises(UserError) as excinfo:
        load_dataset(name, tmp_path / "data", download=True)
    assert_one_line_user_error(excinfo, name, tmp_path / "data", MISSING_HINTS[name])
    if name != "TinyImageNet":  # torchvision cannot download TinyImageNet
        assert calls and "download failed" in str(excinfo.value)


def test_successful_download_is_then_parsed(tmp_path, monkeypatch):
    def fake_download(name, data_path):  # stands in for torchvision writing its usual layout
        write_cifar10(data_path, 1, 1, archive=True)
    monkeypatch.setattr(data_module, "_download_with_torchvision", fake_download)
    ds = load_dataset("CIFAR10", tmp_path, download=True)
    assert len(ds.labels_train) == 10 and len(ds.labels_test) == 10


def test_corrupt_idx_file_is_a_user_error(tmp_path):
    write_mnist(tmp_path, 1, 1)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError) as excinfo:
        load_dataset("MNIST", tmp_path, download=False)
    assert_one_line_user_error(excinfo, str(path))


def test_dataset_to_device_and_name_lookup(mnist_path):
    ds = load_dataset("mnist", mnist_path, download=False)  # case-insensitive, canonical name kept
    assert ds.name == "MNIST"
    moved = ds.to("meta")  # a device that exists everywhere; shows every tensor is moved
    assert moved.images_train.device.type == "meta" and moved.labels_test.device.type == "meta"
    assert all(idx.device.type == "meta" for idx in moved.indices_class)
    assert ds.images_train.device.type == "cpu" and moved.class_names == ds.class_names
    if torch.cuda.is_available():
        on_gpu = ds.to("cuda")
        assert torch.equal(on_gpu.images_test.cpu(), ds.images_test)


def test_unknown_dataset_name_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="ImageNet1k.*CIFAR10"):
        load_dataset("ImageNet1k", tmp_path)


def test_torch_file_helpers(tmp_path):
    res = {"data": [[torch.randn(2, 3, 4, 4), torch.tensor([0, 1])]], "accs_all_exps": {"ConvNet": [0.5, 0.25]}}
    path = tmp_path / "sub" / "res_DC_MNIST_ConvNet_1ipc.pt"
    base.save_torch_file_atomic(res, path)
    loaded = base.load_torch_file(path, "synthetic set")
    assert torch.equal(loaded["data"][0][0], res["data"][0][0]) and loaded["accs_all_exps"] == res["accs_all_exps"]

    base.write_text_atomic(tmp_path / "a" / "b" / "log.txt", "hello\n")
    assert (tmp_path / "a" / "b" / "log.txt").read_text() == "hello\n"
    assert not [p for p in tmp_path.rglob("*.tmp")]

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 definitely not a torch file")
    with pytest.raises(UserError) as excinfo:
        base.load_torch_file(corrupt, "synthetic set")
    assert_one_line_user_error(excinfo, corrupt, "synthetic set")
    with pytest.raises(UserError) as excinfo:
        base.load_torch_file(tmp_path / "missing.pt", "memory file")
    assert_one_line_user_error(excinfo, tmp_path / "missing.pt", "memory file")


def test_fixture_images_are_learnable():
    """A tiny ConvNet trained on 2 images per class must beat chance (10%) clearly."""
    gen = torch.Generator().manual_seed(0)
    (x_tr, y_tr), (x_te, y_te) = make_split(10, 2, 10, 3, 32, seed=0)
    x_tr, x_te = (torch.from_numpy(x).float() / 255 - 0.5 for x in (x_tr, x_te))
    y_tr, y_te = torch.from_numpy(y_tr), torch.from_numpy(y_te)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    head = torch.nn.Linear(16 * 4 * 4, 10)
    for p in (*conv.parameters(), *head.parameters()):  # local generator: no global reseeding
        torch.nn.init.normal_(p, std=0.1, generator=gen)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), head)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    assert acc > 0.5, acc


@pytest.mark.skipif(not os.path.isdir(REAL_FASHION_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    ds = load_dataset("FashionMNIST", tmp_path, download=False)  # empty data_path -> system copy
    check_layout(ds, "FashionMNIST", 60000, 10000)
    assert torch.equal(torch.bincount(ds.labels_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.labels_test), torch.full((10,), 1000))
    # the published mean/std are the statistics of this very training set
    assert abs(ds.images_train.mean().item()) < 0.01 and abs(ds.images_train.std().item() - 1) < 0.01
