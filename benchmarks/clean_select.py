"""The cost of online clean selection (--clean_select, issue 21) per DC iteration, next to no selection.

    python benchmarks/clean_select.py --device cpu --threads 1 --repeats 5
    python benchmarks/clean_select.py --device cuda --ipc 1 10 --batch_real 256

For each setting: one DC iteration (utils.dc_iteration: a fresh ConvNet, outer steps of matching, inner training) on
FashionMNIST-sized data (the real training set when the loader finds it, else random 28x28 images with 6,000 per
class), without selection and with --clean_select score at --clean_keep q (ceil(batch_real / q) candidates per class
scored by one no-grad forward, then the batch_real lowest matched). Median wall and CPU time of this process over
--repeats iterations after one warm-up, the same iteration keys for both, so both do the same work apart from the
selection.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import base  # noqa: E402
import cleanscore  # noqa: E402
import main as main_dc  # noqa: E402
import utils  # noqa: E402
from data import DatasetTensors, class_indices, load_dataset  # noqa: E402


def dataset(device):
    try:
        return load_dataset('FashionMNIST', 'data').to(device), 'real FashionMNIST'
    except base.UserError:
        gen = torch.Generator().manual_seed(0)
        labels = torch.arange(10).repeat_interleave(6000)
        images = torch.randn(60000, 1, 28, 28, generator=gen)
        data = DatasetTensors('FashionMNIST', 1, (28, 28), 10, [str(c) for c in range(10)], [0.0], [1.0], images,
                              labels, images[:1000], labels[:1000], class_indices(labels, 10))
        return data.to(device), 'random stand-in (60,000 x 1 x 28 x 28)'


def time_iterations(data, args, ipc, repeats):
    """Median (wall, CPU) seconds of one DC iteration, after one warm-up."""
    outer, inner = utils.get_loops(ipc)
    image_syn, label_syn = utils.init_synthetic_set(data, ipc, 'noise', args.device, (0, 0))
    optimizer = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
    wall, cpu = [], []
    for it in range(repeats + 1):
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        float(utils.dc_iteration(image_syn, label_syn, optimizer, data, args, list(range(10)), outer, inner,
                                 (0, 0, it)))
        if it:
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--ipc', type=int, nargs='+', default=[1])
    p.add_argument('--batch_real', type=int, nargs='+', default=[64, 256])
    p.add_argument('--keep', type=float, default=0.5)
    p.add_argument('--score', default='score', choices=cleanscore.SCORES[1:])
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    data, what = dataset(opts.device)
    print(f'# DC iteration, ConvNet, {what}, device {opts.device}, {torch.get_num_threads()} thread(s), median of '
          f'{opts.repeats}; selection: --clean_select {opts.score} --clean_keep {opts.keep}')
    print('| ipc | batch_real | candidates | no selection s (CPU s) | selection s (CPU s) | ratio |')
    print('|---|---|---|---|---|---|')
    for ipc in opts.ipc:
        for batch_real in opts.batch_real:
            args = main_dc.parse_args(['--dataset', 'FashionMNIST', '--ipc', str(ipc), '--batch_real',
                                       str(batch_real), '--device', opts.device, '--quiet'])
            args.device, args.dsa_param, args.clean_selector = opts.device, utils.ParamDiffAug(), None
            plain = time_iterations(data, args, ipc, opts.repeats)
            args.clean_selector = cleanscore.OnlineSelector(opts.score, opts.keep, 512, 'label', 10, opts.device)
            chosen = time_iterations(data, args, ipc, opts.repeats)
            print(f'| {ipc} | {batch_real} | {args.clean_selector.candidates(batch_real)} | {plain[0]:.3f} '
                  f'({plain[1]:.3f}) | {chosen[0]:.3f} ({chosen[1]:.3f}) | {chosen[0] / plain[0]:.2f} |', flush=True)


if __name__ == '__main__':
    main()
