"""Folders of image files as datasets: `--dataset ImageFolder --data_path DIR` (torchvision's ImageFolder layout,
DIR/train/<class>/* and DIR/test/<class>/* or DIR/val/<class>/*) and the ImageNet subsets of the trajectory-matching
work (ImageNette, ImageWoof, ImageFruit, ImageMeow, ImageSquawk, ImageYellow) read from an ImageNet folder
(DIR/train/<wnid>/, DIR/val/<wnid>/).

Every image is decoded once with torchvision.io (whole files, any format it decodes), fitted to the image size, into
a uint8 cache file next to the data (DIR/dc_cache_*.pt, written atomically); later runs load the cache, which is
rebuilt when the list of files or their sizes change. data.load_dataset normalises the result like a built-in dataset,
with the mean and std of the training images. Also the flags of these datasets (--im_size, --channels)."""
import hashlib
import os

import torch
from tqdm import tqdm

from base import UserError, load_torch_file, save_torch_file_atomic, short_error

FOLDER_DATASET = 'ImageFolder'

# The ten classes of each subset, in the label order the trajectory-matching work (Cazenavette et al. 2022) published
# them: (ImageNet class index, wnid, name). ImageNette and ImageWoof are fast.ai's subsets.
IMAGENET_SUBSETS = {
    'ImageNette': [
        (0, 'n01440764', 'tench'), (217, 'n02102040', 'English springer'), (482, 'n02979186', 'cassette player'),
        (491, 'n03000684', 'chain saw'), (497, 'n03028079', 'church'), (566, 'n03394916', 'French horn'),
        (569, 'n03417042', 'garbage truck'), (571, 'n03425413', 'gas pump'), (574, 'n03445777', 'golf ball'),
        (701, 'n03888257', 'parachute')],
    'ImageWoof': [
        (193, 'n02096294', 'Australian terrier'), (182, 'n02093754', 'Border terrier'), (258, 'n02111889', 'Samoyed'),
        (162, 'n02088364', 'beagle'), (155, 'n02086240', 'Shih-Tzu'), (167, 'n02089973', 'English foxhound'),
        (159, 'n02087394', 'Rhodesian ridgeback'), (273, 'n02115641', 'dingo'), (207, 'n02099601', 'golden retriever'),
        (229, 'n02105641', 'Old English sheepdog')],
    'ImageFruit': [
        (953, 'n07753275', 'pineapple'), (954, 'n07753592', 'banana'), (949, 'n07745940', 'strawberry'),
        (950, 'n07747607', 'orange'), (951, 'n07749582', 'lemon'), (957, 'n07768694', 'pomegranate'),
        (952, 'n07753113', 'fig'), (945, 'n07720875', 'bell pepper'), (943, 'n07718472', 'cucumber'),
        (948, 'n07742313', 'Granny Smith')],
    'ImageMeow': [
        (281, 'n02123045', 'tabby cat'), (282, 'n02123159', 'tiger cat'), (283, 'n02123394', 'Persian cat'),
        (284, 'n02123597', 'Siamese cat'), (285, 'n02124075', 'Egyptian cat'), (291, 'n02129165', 'lion'),
        (292, 'n02129604', 'tiger'), (290, 'n02128925', 'jaguar'), (289, 'n02128757', 'snow leopard'),
        (287, 'n02127052', 'lynx')],
    'ImageSquawk': [
        (84, 'n01806143', 'peacock'), (130, 'n02007558', 'flamingo'), (88, 'n01818515', 'macaw'),
        (144, 'n02051845', 'pelican'), (145, 'n02056570', 'king penguin'), (22, 'n01614925', 'bald eagle'),
        (96, 'n01843383', 'toucan'), (9, 'n01518878', 'ostrich'), (100, 'n01860187', 'black swan'),
        (89, 'n01819313', 'sulphur-crested cockatoo')],
    'ImageYellow': [
        (309, 'n02206856', 'bee'), (986, 'n12057211', "yellow lady's slipper"), (954, 'n07753592', 'banana'),
        (951, 'n07749582', 'lemon'), (987, 'n12144580', 'corn'), (779, 'n04146614', 'school bus'),
        (599, 'n03530642', 'honeycomb'), (291, 'n02129165', 'lion'), (72, 'n01773157', 'black and gold garden spider'),
        (11, 'n01531178', 'goldfinch')],
}
SUBSET_IM_SIZE = (128, 128)  # the follow-up methods' resolution for these subsets

FOLDER_DATASETS = (FOLDER_DATASET,) + tuple(IMAGENET_SUBSETS)
DEFAULT_CHANNELS = 3
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.gif', '.webp')  # what this torchvision.io decodes without extras
TEST_SPLITS = ('test', 'val')  # the first one present is the test set
CACHE_FORMAT = 1


def canonical_name(name):
    """The folder dataset's canonical spelling of name (case-insensitive), or None when it is not one."""
    names = {n.lower(): n for n in FOLDER_DATASETS}
    return names.get(name.lower()) if isinstance(name, str) else None


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def add_folder_args(parser):
    """--im_size and --channels, for the scripts whose --dataset may be a folder dataset."""
    a = parser.add_argument
    a('--im_size', type=int, nargs=2, default=None, metavar=('H', 'W'),
      help='ImageFolder / ImageNet subsets: fit every image to H x W (scaled to cover it, then centre-cropped); '
           f'default: the images\' size when they all agree (ImageFolder), {SUBSET_IM_SIZE[0]}x{SUBSET_IM_SIZE[1]} '
           '(ImageNet subsets)')
    a('--channels', type=int, default=None, choices=(1, 3),
      help='ImageFolder / ImageNet subsets: 1 (grayscale) or 3 (RGB, the default)')
    return parser


def folder_flags(args):
    """The --im_size / --channels flags of args as command-line words (none when unset), for the commands a
    script suggests, so a suggested command reads the folder dataset at the same shape."""
    words = []
    if getattr(args, 'im_size', None) is not None:
        words += ['--im_size', *map(str, args.im_size)]
    if getattr(args, 'channels', None) is not None:
        words += ['--channels', str(args.channels)]
    return words


def check_folder_args(args):
    """Validate --im_size / --channels / --data_path of a folder dataset before any data is loaded."""
    im_size, channels = getattr(args, 'im_size', None), getattr(args, 'channels', None)
    name = canonical_name(args.dataset)
    if name is None:
        if im_size is not None or channels is not None:
            raise UserError(f'--im_size and --channels apply to {", ".join(FOLDER_DATASETS)} only; '
                            f'{args.dataset} has a fixed image shape')
        return args
    args.dataset = name
    if im_size is not None and min(im_size) < 1:
        raise UserError(f'--im_size must be two positive integers H W, got {im_size[0]} {im_size[1]}')
    folder_classes(name, args.data_path)  # the layout and the class folders; the images are checked when read
    return args


def loader_options(args):
    """The keyword arguments of data.load_dataset that the folder flags give (empty for the built-in datasets)."""
    if canonical_name(args.dataset) is None:
        return {}
    im_size = getattr(args, 'im_size', None)
    return dict(im_size=None if im_size is None else tuple(im_size), channels=getattr(args, 'channels', None),
                quiet=getattr(args, 'quiet', False))


# ---------------------------------------------------------------------------------------------
# The files of a folder dataset
# ---------------------------------------------------------------------------------------------

def split_dirs(name, data_path):
    """(train folder, test folder) of a folder dataset under data_path, or a UserError saying what is missing."""
    root = os.fspath(data_path)
    layout = ('train/<wnid>/ and val/<wnid>/ (the ImageNet layout)' if name in IMAGENET_SUBSETS
              else 'train/<class>/* and test/<class>/* (or val/<class>/*)')
    train = os.path.join(root, 'train')
    tests = [os.path.join(root, s) for s in TEST_SPLITS if os.path.isdir(os.path.join(root, s))]
    if not os.path.isdir(train) or not tests:
        raise UserError(f'{name}: --data_path {root} must hold {layout}; '
                        f'{"no train/ folder" if not os.path.isdir(train) else "no test/ or val/ folder"} there')
    return train, tests[0]


def image_files(class_dir):
    """(path, size in bytes) of the image files under class_dir (recursively, sorted); other files are skipped."""
    found = []
    for directory, subdirs, names in os.walk(class_dir, followlinks=True):
        subdirs.sort()
        for n in sorted(names):
            if n.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(directory, n)
                found.append((path, os.path.getsize(path)))
    return found


def class_dirs(split_dir):
    """The class folders of a split, in ImageFolder's (sorted) order."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def folder_classes(name, data_path):
    """(folder names, display names) of the classes, in label order."""
    train, _ = split_dirs(name, data_path)
    if name in IMAGENET_SUBSETS:
        wnids = [w for _, w, _ in IMAGENET_SUBSETS[name]]
        missing = [w for w in wnids if not os.path.isdir(os.path.join(train, w))]
        if missing:
            raise UserError(f'{name}: {train} lacks the class folders {", ".join(missing)}; --data_path must be an '
                            f'ImageNet folder with train/<wnid>/ and val/<wnid>/')
        return wnids, [n for _, _, n in IMAGENET_SUBSETS[name]]
    classes = class_dirs(train)
    if len(classes) < 2:
        raise UserError(f'ImageFolder: {train} holds {len(classes)} class folder(s); condensation needs at least two '
                        f'classes, one sub-folder of images each')
    return classes, classes


def list_split(name, split_dir, folders):
    """(files, labels) of one split: files as (path, size) pairs, labels the class positions in folders. Every class
    folder present must hold images; the test split may lack classes but may not add any."""
    files, labels = [], []
    present = set(class_dirs(split_dir))
    extra = sorted(present - set(folders)) if name not in IMAGENET_SUBSETS else []
    if extra:
        raise UserError(f'{name}: {split_dir} has class folders the training set lacks: {", ".join(extra)}; every '
                        f'test class must also be a folder of train/')
    for label, folder in enumerate(folders):
        if folder not in present:
            if name in IMAGENET_SUBSETS:
                raise UserError(f'{name}: {split_dir} lacks the class folder {folder}; the ImageNet validation images '
                                f'must be sorted into val/<wnid>/ folders')
            continue
        found = image_files(os.path.join(split_dir, folder))
        if not found:
            raise UserError(f'{name}: class folder {os.path.join(split_dir, folder)} holds no image files '
                            f'({", ".join(IMAGE_EXTENSIONS)}); add images or remove the folder')
        files += found
        labels += [label] * len(found)
    return files, labels


def signature(root, files_by_split, im_size, channels):
    """What the cache was built from: every file's path relative to root, its size and label, and the settings."""
    h = hashlib.sha256(f'{CACHE_FORMAT} {im_size} {channels}\n'.encode())
    for split, (files, labels) in files_by_split.items():
        for (path, size), label in zip(files, labels):
            h.update(f'{split}\t{label}\t{os.path.relpath(path, root)}\t{size}\n'.encode())
    return h.hexdigest()


def cache_path(name, data_path, im_size, channels):
    size = 'native' if im_size is None else f'{im_size[0]}x{im_size[1]}'
    return os.path.join(os.fspath(data_path), f'dc_cache_{name}_{size}_{channels}ch.pt')


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def fit(img, im_size):
    """uint8 (C, h, w) -> (C, H, W): scaled (antialiased) so that it covers H x W, then centre-cropped, as
    Resize + CenterCrop do; an image of the right size is returned as it is."""
    from torchvision.transforms.v2 import functional as TF
    h, w = img.shape[-2:]
    H, W = im_size
    if (h, w) == (H, W):
        return img
    scale = max(H / h, W / w)
    size = [max(H, round(h * scale)), max(W, round(w * scale))]
    img = TF.resize(img, size, antialias=True)
    top, left = (size[0] - H) // 2, (size[1] - W) // 2
    return img[:, top:top + H, left:left + W]


def decode_files(files, im_size, channels, desc, quiet):
    """uint8 (N, channels, H, W) of the files, decoded with torchvision.io one whole file at a time. im_size None:
    every image must have the first one's size."""
    from torchvision.io import ImageReadMode, decode_image
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out = None
    for i, (path, _) in enumerate(tqdm(files, desc=desc, disable=quiet, unit='img')):
        try:
            img = decode_image(path, mode=mode, apply_exif_orientation=True)
        except Exception as e:  # torchvision raises RuntimeError for corrupt or unsupported data
            raise UserError(f'cannot decode the image {path} ({short_error(e)}); replace or remove the file') from e
        if out is None:
            size = tuple(im_size) if im_size is not None else tuple(img.shape[-2:])
            out = torch.empty((len(files), channels) + size, dtype=torch.uint8)
        if im_size is None and tuple(img.shape[-2:]) != out.shape[-2:]:
            raise UserError(f'the images differ in size ({out.shape[-2]}x{out.shape[-1]} in {files[0][0]}, '
                            f'{img.shape[-2]}x{img.shape[-1]} in {path}); pass --im_size H W to fit them to one size')
        out[i] = fit(img, out.shape[-2:])
    return out


def build_cache(name, files_by_split, im_size, channels, quiet):
    """The cache dict of a folder dataset: images and labels of both splits, decoded. When im_size is None the test
    images must have the training images' size too."""
    cache = {'format': CACHE_FORMAT}
    for split, (files, labels) in files_by_split.items():
        images = decode_files(files, im_size, channels, f'decoding {name} {split}', quiet)
        train_size = tuple(cache['images_train'].shape[-2:]) if split != 'train' else None
        if train_size is not None and tuple(images.shape[-2:]) != train_size:
            raise UserError(f'{name}: the test images are {images.shape[-2]}x{images.shape[-1]} but the training '
                            f'images {train_size[0]}x{train_size[1]}; pass --im_size H W to fit them to one size')
        cache[f'images_{split}'] = images
        cache[f'labels_{split}'] = torch.tensor(labels, dtype=torch.int64)
    return cache


def read_cache(path, expected):
    """The cache at path when it was built from the same files and settings, else None (missing, stale or unreadable:
    then it is rebuilt)."""
    if not os.path.isfile(path):
        return None
    try:
        cache = load_torch_file(path, 'image cache')
    except UserError:
        return None
    if not isinstance(cache, dict) or cache.get('signature') != expected or cache.get('format') != CACHE_FORMAT:
        return None
    return cache


def write_cache(path, cache, quiet):
    try:
        save_torch_file_atomic(cache, path)
    except OSError as e:  # a read-only data folder: decode again next time rather than fail
        if not quiet:
            tqdm.write(f'warning: cannot write the image cache {path} ({short_error(e)}); the images will be '
                       f'decoded again next run')


def once_per_node(fn):
    """Under torchrun, the first process of each machine runs fn (building the cache) before the others, which then
    find the cache it wrote; the atomic write keeps machines that share a folder from seeing a half-written file."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    first = int(os.environ.get('LOCAL_RANK', '0')) == 0
    result = fn() if first else None
    dist.barrier()
    return result if first else fn()


def load_folder_splits(name, data_path, im_size=None, channels=None, quiet=False):
    """({'train': (uint8 images, labels), 'test': (...)}, class names) of a folder dataset, from the cache when it
    is current, else decoded (and cached)."""
    name = canonical_name(name)
    channels = DEFAULT_CHANNELS if channels is None else int(channels)
    if channels not in (1, 3):
        raise UserError(f'--channels must be 1 or 3, got {channels}')
    if im_size is None and name in IMAGENET_SUBSETS:
        im_size = SUBSET_IM_SIZE
    im_size = None if im_size is None else (int(im_size[0]), int(im_size[1]))
    folders, class_names = folder_classes(name, data_path)
    train_dir, test_dir = split_dirs(name, data_path)
    files_by_split = {'train': list_split(name, train_dir, folders), 'test': list_split(name, test_dir, folders)}
    expected = signature(data_path, files_by_split, im_size, channels)
    path = cache_path(name, data_path, im_size, channels)

    def current_cache():
        cache = read_cache(path, expected)
        if cache is None:
            cache = build_cache(name, files_by_split, im_size, channels, quiet)
            cache['signature'] = expected
            write_cache(path, cache, quiet)
        return cache

    cache = once_per_node(current_cache)
    splits = {s: (cache[f'images_{s}'], cache[f'labels_{s}']) for s in ('train', 'test')}
    return splits, list(class_names)


def folder_info(name, data_path, im_size=None, channels=None):
    """channel, im_size, num_classes of a folder dataset without decoding it (for the checks that come before the
    load): an ImageFolder without --im_size takes the size of its first training image."""
    name = canonical_name(name)
    folders, _ = folder_classes(name, data_path)
    if im_size is None:
        if name in IMAGENET_SUBSETS:
            im_size = SUBSET_IM_SIZE
        else:
            train_dir, _ = split_dirs(name, data_path)
            first = image_files(os.path.join(train_dir, folders[0]))[:1]
            if not first:
                raise UserError(f'ImageFolder: class folder {os.path.join(train_dir, folders[0])} holds no image '
                                f'files ({", ".join(IMAGE_EXTENSIONS)})')
            im_size = tuple(decode_files(first, None, 1, '', True).shape[-2:])
    return dict(channel=DEFAULT_CHANNELS if channels is None else int(channels), im_size=tuple(im_size),
                num_classes=len(folders))


def channel_stats(images):
    """Per-channel mean and std (population) of uint8 (N, C, H, W) images scaled to [0, 1], from the histogram of
    each channel (exact, and no float copy of the set); rounded to 4 decimals like the built-in datasets' values."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        if not var > 0:
            raise UserError(f'channel {c} of the training images has the same value everywhere: it cannot be '
                            f'normalised; check the images (or use --channels 1 for grayscale scans)')
        means.append(round(float(mean), 4))
        stds.append(round(float(var.sqrt()), 4))
    return means, stds
