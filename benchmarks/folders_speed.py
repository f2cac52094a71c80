"""--dataset ImageFolder on real data: FashionMNIST (all 70,000 images) exported as grey PNGs in torchvision's
ImageFolder layout, then read three ways on the same files in the same run:

  1. our loader building its cache (torchvision.io decode of every file, the uint8 cache written),
  2. our loader reading the cache it built,
  3. torchvision.datasets.ImageFolder (PIL, ToTensor) read once through a DataLoader (batch 256, no workers).

It also checks that the exported tree loads back into the built-in loader's tensors.

    python benchmarks/folders_speed.py --root /tmp/fmnist_png      # exports on the first call (a few minutes)
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import export  # noqa: E402
import folders  # noqa: E402
from base import write_json_atomic  # noqa: E402


def export_fashion_mnist(builtin, root):
    """train/ and test/ of the built-in FashionMNIST as <NN_class>/<k>.png (export.save_image_folder)."""
    for split, images, labels in (('train', builtin.images_train, builtin.labels_train),
                                  ('test', builtin.images_test, builtin.labels_test)):
        export.save_image_folder(images, labels, builtin.class_names, builtin.mean, builtin.std,
                                 os.path.join(root, split))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def torchvision_pass(root):
    """Images per second of torchvision's ImageFolder + DataLoader over train/ and test/ (grey, as ours reads)."""
    from PIL import Image
    from torchvision import datasets, transforms

    def grey(path):
        with Image.open(path) as im:
            return im.convert('L')

    n = 0
    start = time.perf_counter()
    for split in ('train', 'test'):
        ds = datasets.ImageFolder(os.path.join(root, split), transform=transforms.ToTensor(), loader=grey)
        for images, _ in torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False, num_workers=0):
            n += len(images)
    return n, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default='/tmp/fmnist_png', help='where the PNG tree is (exported when missing)')
    p.add_argument('--data_path', default='data', help='where the built-in FashionMNIST loader looks')
    p.add_argument('--out', default='benchmarks/out/folders_speed.json')
    a = p.parse_args()
    builtin = data.load_dataset('FashionMNIST', a.data_path)
    report = {'threads': torch.get_num_threads(), 'images': len(builtin.labels_train) + len(builtin.labels_test)}
    if not os.path.isdir(os.path.join(a.root, 'test')):
        _, report['export_s'] = timed(lambda: export_fashion_mnist(builtin, a.root))
    cache = folders.cache_path(folders.FOLDER_DATASET, a.root, None, 1)
    if os.path.exists(cache):
        os.remove(cache)
    _, report['build_s'] = timed(lambda: folders.load_folder_splits('ImageFolder', a.root, channels=1, quiet=True))
    loaded, report['cache_load_s'] = timed(lambda: data.load_dataset('ImageFolder', a.root, channels=1, quiet=True))
    report['cache_bytes'] = os.path.getsize(cache)
    report['png_bytes'] = sum(size for split in ('train', 'test')
                              for cls in folders.class_dirs(os.path.join(a.root, split))
                              for _, size in folders.image_files(os.path.join(a.root, split, cls)))
    n, report['torchvision_s'] = torchvision_pass(a.root)
    assert n == report['images']
    for key in ('build', 'cache_load', 'torchvision'):
        report[f'{key}_images_per_s'] = round(report['images'] / report[f'{key}_s'])
    report['mean_std_builtin'] = [builtin.mean, builtin.std]
    report['mean_std_folder'] = [loaded.mean, loaded.std]
    report['class_names_folder'] = loaded.class_names
    # the tree is class-major with files in dataset order (zero-padded names), i.e. the built-in set sorted stably
    for split in ('train', 'test'):
        labels = getattr(builtin, f'labels_{split}')
        order = torch.argsort(labels, stable=True)
        report[f'labels_equal_{split}'] = bool(torch.equal(getattr(loaded, f'labels_{split}'), labels[order]))
        report[f'max_abs_diff_{split}'] = float((getattr(loaded, f'images_{split}')
                                                 - getattr(builtin, f'images_{split}')[order]).abs().max())
    print(json.dumps(report, indent=2))
    write_json_atomic(a.out, report)


if __name__ == '__main__':
    main()
