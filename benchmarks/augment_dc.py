"""DC augmentation (SPEC §7, issue 15): speed, agreement of the rotation with scipy, and evaluation accuracy.

    python benchmarks/augment_dc.py speed [--old OLD_AUGMENT.py]     # augment_dc per batch, median of --repeats
    python benchmarks/augment_dc.py scipy                            # dc_rotate vs scipy.ndimage.rotate (order 3)
    python benchmarks/augment_dc.py accuracy [--old OLD_AUGMENT.py]  # ConvNets trained on a fixed FashionMNIST set

--old loads another augment.py (e.g. `git show a8c0a1b:augment.py > /tmp/augment_old.py`) and measures it next to
the current one. speed: batches of 256 images 1x28x28 and 3x32x32 (random normal values), per strategy, median wall
time and median CPU time of this process over --repeats calls after one warm-up call (CPU time is steadier when other
processes share the cores); for scale, one ConvNet forward + backward of the same batch. scipy: real FashionMNIST
test images, normalised as for training, rotated by every integer angle -45..44 both ways. accuracy: --per_class real
training images per class (seed --set_seed), --nets ConvNets (seeds 0..nets-1, the same for every augment.py) trained
by utils.train_and_test with DC augmentation crop_scale_rotate, test accuracy on the first --test_images test images;
mean ± std per augment.py.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

import numpy as np
import scipy.ndimage
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402

SHAPES = [(256, 1, 28, 28), (256, 3, 32, 32)]
STRATEGIES = ['crop_scale_rotate', 'crop_noise', 'crop', 'scale', 'rotate', 'noise']


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versions(old_path):
    """[(label, augment module)]: the current augment.py, then the --old one if given."""
    out = [('new', augment)]
    if old_path:
        out.append(('old', load_module(old_path, 'augment_old')))
    return out


# -----------------------------------------------------------------------------
# speed


def time_calls(fn, repeats):
    """Median wall and CPU (this process) seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def run_speed(args):
    print(f'torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}, '
          f'median of {args.repeats} calls; load average {os.getloadavg()[0]:.1f}')
    print(f"{'batch':>16} {'strategy':>18} " + ' '.join(f'{label + " wall/cpu ms":>22}' for label, _ in
                                                      versions(args.old)))
    for shape in SHAPES:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(args.device)
        for strategy in STRATEGIES:
            cells = []
            for label, module in versions(args.old):
                generator = torch.Generator(args.device).manual_seed(0)
                wall, cpu = time_calls(lambda: module.augment_dc(x, strategy, generator=generator), args.repeats)
                cells.append(f'{wall * 1e3:>10.1f} /{cpu * 1e3:>9.1f}')
            print(f"{'x'.join(map(str, shape)):>16} {strategy:>18} " + ' '.join(f'{c:>22}' for c in cells))
        wall, cpu = time_calls(train_step(x), max(3, args.repeats // 3))
        print(f"{'x'.join(map(str, shape)):>16} {'(ConvNet step)':>18} {f'{wall * 1e3:>10.1f} /{cpu * 1e3:>9.1f}':>22}")


def train_step(x):
    """For scale: a function doing one ConvNet forward + backward on the batch, what each augmented batch is for."""
    import networks
    torch.manual_seed(0)
    net = networks.get_network('ConvNet', x.shape[1], 10, x.shape[2:], device=x.device)
    labels = torch.arange(len(x), device=x.device) % 10
    return lambda: torch.nn.functional.cross_entropy(net(x), labels).backward()


# -----------------------------------------------------------------------------
# agreement with scipy


def scipy_rotate_window(image, angle, cval):
    big = scipy.ndimage.rotate(image, angle, axes=(-2, -1), reshape=True, order=3, cval=cval)
    height, width = image.shape[-2:]
    r, c = int((big.shape[-2] - height) / 2), int((big.shape[-1] - width) / 2)
    return big[:, r:r + height, c:c + width]


def rotate_difference(rotate, x, fill):
    """Mean and max |rotate(x, d) - scipy| over the angles d = -45..44, and the angle of the max."""
    total, count, worst, worst_angle = 0.0, 0, 0.0, None
    for d in range(-45, 45):
        ours = rotate(x, d).numpy()
        ref = np.stack([scipy_rotate_window(im, d, fill) for im in x.numpy()])
        diff = np.abs(ours - ref)
        total, count = total + diff.sum(), count + diff.size
        if diff.max() > worst:
            worst, worst_angle = float(diff.max()), d
    return total / count, worst, worst_angle


def run_scipy(args):
    import utils
    data = utils.get_dataset('FashionMNIST', args.data_path)
    x = data.images_test[:args.images]  # float32, normalised as in training
    fill = float(x.mean(dim=(0, 2, 3)).mean())  # the mean of the channel means
    n = len(x)
    print(f'{n} FashionMNIST test images (normalised, range {float(x.max() - x.min()):.2f}), every integer angle '
          f'-45..44, fill {fill:.4f}; |rotation - scipy.ndimage.rotate(order=3, reshape=True) centre window|')
    rotations = {'new': lambda x, d: augment.dc_rotate(x, fill, torch.full((n,), d))}
    if args.old:  # the old op: continuous angles (turning the other way), bilinear, no enlarged canvas
        old = load_module(args.old, 'augment_old')
        rotations['old'] = lambda x, d: old.dc_rotate(x, torch.full((1, x.shape[1], 1, 1), fill),
                                                      torch.full((n,), float(-d)))  # opposite sign convention
    for label, rotate in rotations.items():
        mean, worst, angle = rotate_difference(rotate, x, fill)
        print(f'{label}: mean {mean:.2e}, max {worst:.2e} (angle {angle})')


# -----------------------------------------------------------------------------
# evaluation accuracy


def fixed_set(data, per_class, seed):
    """per_class random real training images of every class, drawn with a private generator."""
    g = torch.Generator().manual_seed(seed)
    picks = [idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in data.indices_class]
    index = torch.cat(picks)
    return data.images_train[index], data.labels_train[index]


def run_accuracy(args):
    import networks
    import utils
    data = utils.get_dataset('FashionMNIST', args.data_path)
    images, labels = fixed_set(data, args.per_class, args.set_seed)
    test_images, test_labels = data.images_test[:args.test_images], data.labels_test[:args.test_images]
    print(f'FashionMNIST, {len(images)} real images ({args.per_class} per class, seed {args.set_seed}), '
          f'{args.nets} ConvNets x {args.epochs} epochs, lr 0.01, batch 256, dc_strategy crop_scale_rotate, '
          f'tested on the first {len(test_images)} test images')
    results = {}
    for label, module in versions(args.old):
        utils.augment_dc = module.augment_dc  # what train_and_test calls for the DC augmentation
        accs = []
        start = time.perf_counter()
        for seed in range(args.nets):
            torch.manual_seed(seed)
            net = networks.get_network('ConvNet', data.channel, data.num_classes, data.im_size, device='cpu')
            accs.append(utils.train_and_test(net, images, labels, test_images, test_labels, args.epochs, 0.01, 256,
                                             dc_strategy='crop_scale_rotate'))
        results[label] = accs = np.array(accs) * 100
        print(f'{label}: {accs.mean():.2f} ± {accs.std():.2f} %  (each: {", ".join(f"{a:.2f}" for a in accs)}; '
              f'{time.perf_counter() - start:.0f} s)', flush=True)
    utils.augment_dc = augment.augment_dc
    if len(results) == 2:  # same seeds, same initialisations: the per-network difference is paired
        diff = results['new'] - results['old']
        print(f'new - old, network by network: {diff.mean():+.2f} ± {diff.std():.2f} points')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=['speed', 'scipy', 'accuracy'])
    parser.add_argument('--old', default=None, help='another augment.py to measure next to the current one')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--data_path', default='data')
    parser.add_argument('--images', type=int, default=64, help='scipy: number of test images')
    parser.add_argument('--per_class', type=int, default=10)
    parser.add_argument('--set_seed', type=int, default=0)
    parser.add_argument('--nets', type=int, default=5)
    parser.add_argument('--epochs', type=int, default=300)
    parser.add_argument('--test_images', type=int, default=10000, help='accuracy: test on the first N test images')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {'speed': run_speed, 'scipy': run_scipy, 'accuracy': run_accuracy}[args.what](args)


if __name__ == '__main__':
    main()
