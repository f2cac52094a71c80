"""Synthetic sets as ordinary image files: a torchvision ImageFolder tree and class-row grids.

    export.save_image_folder(images, labels, class_names, mean, std, 'out/exp0')
    export.save_class_grid(images, labels, mean, std, 'out/vis_set0.png')

Images come in normalised (x - mean) / std, as the scripts store them; the files hold x * std + mean clipped to
[0, 1] and rounded to 8 bits, so reading a file back with ToTensor() + Normalize(mean, std) recovers the stored
image to within half a grey level (1/255 in pixel space). Every file is written under a temporary name and renamed,
so an interruption never leaves a truncated PNG behind.
"""
import os
import re

import numpy as np
import torch
from PIL import Image

from base import atomic_write


def denormalize(images, mean, std):
    """(N, C, H, W) normalised tensor -> the same images in [0, 1], on the CPU as float32."""
    images = images.detach().float().cpu()
    channels = images.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, channels, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


def to_uint8_array(image):
    """(C, H, W) tensor in [0, 1] -> H x W (grey) or H x W x 3 uint8 array, rounded to the nearest level."""
    array = (image * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    if array.shape[0] == 1:
        return array[0]
    return np.ascontiguousarray(array.transpose(1, 2, 0))


def save_png_atomic(array, path):
    """Write a uint8 array as a PNG atomically (base.atomic_write: a temp file whose name starts with '.' and ends in
    '.tmp', so even a leftover after a crash is never taken for an image by ImageFolder, then a rename)."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format='PNG'))


def safe_name(name):
    """A class name usable as one folder name on any filesystem: 'T-shirt/top' -> 'T-shirt_top'."""
    text = re.sub(r'[^A-Za-z0-9._+-]+', '_', str(name)).strip('._')
    return text or 'class'


def class_folder_names(class_names):
    """'00_T-shirt_top', '01_Trouser', ...: the zero-padded index makes ImageFolder's sorted folder order equal the
    label order, whatever the names (its class_to_idx sorts the folder names as strings)."""
    width = max(2, len(str(len(class_names) - 1)))
    return [f'{k:0{width}d}_{safe_name(name)}' for k, name in enumerate(class_names)]


def remove_stale_images(folder, keep):
    """Delete our numbered PNGs in `folder` that this export did not write (a re-export of a smaller set into the
    same folder must not leave old images behind). Files not named like ours are left alone."""
    for entry in os.listdir(folder):
        if re.fullmatch(r'\d+\.png', entry) and entry not in keep:
            os.remove(os.path.join(folder, entry))


def save_image_folder(images, labels, class_names, mean, std, out_dir):
    """Write a synthetic set as out_dir/<NN_class>/<k>.png (torchvision ImageFolder layout).

    images: (N, C, H, W) normalised; labels: (N,) class indices into class_names. Every class gets a folder, even
    one without images, so the folder index equals the label. Grey images are written as 8-bit grey PNGs
    (ImageFolder's default loader turns them into 3 equal channels; pass loader=lambda p: Image.open(p).convert('L')
    to keep one). Returns the list of written paths, in the order of `images`."""
    labels = torch.as_tensor(labels).long().cpu()
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f'expected images N x C x H x W and N labels, got {tuple(images.shape)} and '
                         f'{tuple(labels.shape)}')
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f'labels outside 0..{len(class_names) - 1} for {len(class_names)} class names')
    pixels = denormalize(images, mean, std)
    folders = [os.path.join(out_dir, name) for name in class_folder_names(class_names)]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    width = max(3, len(str(len(labels))))
    written, names_per_class = [], [set() for _ in folders]
    for k in range(len(labels)):
        c = int(labels[k])
        name = f'{len(names_per_class[c]):0{width}d}.png'
        names_per_class[c].add(name)
        path = os.path.join(folders[c], name)
        save_png_atomic(to_uint8_array(pixels[k]), path)
        written.append(path)
    for folder, names in zip(folders, names_per_class):
        remove_stale_images(folder, names)
    return written


def save_synthetic_sets(sets, class_names, mean, std, out_dir):
    """Every experiment of a res_*.pt ([images, labels] pairs) as out_dir/exp{E}/ in ImageFolder layout.
    Returns the experiment folders."""
    folders = []
    for exp, (images, labels) in enumerate(sets):
        folder = os.path.join(out_dir, f'exp{exp}')
        save_image_folder(images, labels, class_names, mean, std, folder)
        folders.append(folder)
    return folders


def images_per_class(labels):
    """The largest number of images of one class (the row length of a class grid)."""
    labels = torch.as_tensor(labels).long().cpu()
    if labels.numel() == 0:
        return 1
    return int(torch.bincount(labels).max())


def save_class_grid(images, labels, mean, std, path, pad=2):
    """One row per class (images sorted by label, stable), de-normalised and clipped, as one PNG written atomically.
    A class with fewer images than the longest row leaves the rest of its row black."""
    from torchvision.utils import make_grid
    labels = torch.as_tensor(labels).long().cpu()
    if labels.numel() == 0:
        raise ValueError('cannot draw a grid of an empty set')
    pixels = denormalize(images, mean, std)
    nrow = images_per_class(labels)
    num_rows = int(labels.max()) + 1
    cells = torch.zeros(num_rows * nrow, *pixels.shape[1:])
    for c in range(num_rows):  # a few hundred copies at most: not a hot path
        members = torch.nonzero(labels == c).flatten()
        cells[c * nrow:c * nrow + len(members)] = pixels[members]
    grid = make_grid(cells, nrow=nrow, padding=pad)  # grey input comes back as 3 equal channels
    save_png_atomic(to_uint8_array(grid), path)
    return path
