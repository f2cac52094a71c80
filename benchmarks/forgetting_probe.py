"""Why forgetting at FashionMNIST ipc 10 lands above the paper (issue 23): forgetting sets from statistics of two
lengths and two readings of "most forgotten", each evaluated with the paper's protocol (ConvNet, 300 epochs, no
augmentation, the full test set) on a few networks.

    python benchmarks/forgetting_probe.py --save_path result/paper_fmnist --epochs 20 --short 10 --num_eval 2

It trains the forgetting network once for --epochs E epochs, exactly as `main.py --method forgetting
--forget_epochs E` would (same random stream, same training), keeping its per-epoch record of which images it
classified correctly (cached in save_path as forgetting_history_*.pt). The constant learning rate makes the first
--short K epochs of that run the K-epoch run itself, so the probe checks its first K epochs against main.py's cached
K-epoch statistics (forgetting_*_{K}ep_*.pt) when they are there. Variants, for K and for E epochs:
  - ours: the ipc images forgotten most often, ties at random (what `--method forgetting` picks; with K epochs and
    the seed's experiment 0 they are the picks of main.py's experiment 0, and its first networks are the same);
  - Toneva et al.'s reading: images never classified correctly count as forgotten infinitely often (they come
    first, at random among themselves), then the most forgotten.
Prints per variant how many never-learned images each class has and the picks hold, the overlap with the first
variant, then the accuracies.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coreset  # noqa: E402
import experiment  # noqa: E402
import main  # noqa: E402
import training  # noqa: E402
from base import load_torch_file, save_torch_file_atomic  # noqa: E402
from data import load_dataset  # noqa: E402


def correctness_history(data, args, epochs):
    """(epochs, N) bool: was each training image classified correctly in its own forward pass of each epoch; the
    training of coreset.forgetting_statistics with --forget_epochs epochs. Cached in save_path."""
    path = os.path.join(args.save_path, f'forgetting_history_{data.name}_{args.model}_{epochs}ep_seed{args.seed}.pt')
    if os.path.isfile(path):
        return load_torch_file(path, 'cached correctness history').to(data.labels_train.device)
    history = coreset.forgetting_history(data, args, args.seed, epochs, quiet=False)
    save_torch_file_atomic(history.cpu(), path)
    return history


def never_first(counts, never_learned):
    """Toneva et al.'s order: never-learned images as if forgotten infinitely often."""
    return torch.where(never_learned, counts.new_full((), counts.numel() + 1), counts)


def main_probe():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--save_path', default='result/paper_fmnist')
    p.add_argument('--data_path', default=None, help="FashionMNIST's folder (default: main.py's)")
    p.add_argument('--epochs', type=int, default=20, help='length E of the forgetting run')
    p.add_argument('--short', type=int, default=10, help='the shorter length K read from its first epochs')
    p.add_argument('--ipc', type=int, default=10)
    p.add_argument('--num_eval', type=int, default=2)
    p.add_argument('--only', type=int, nargs='+', default=None, choices=(1, 2, 3, 4),
                   help='evaluate only these variants (1 ours K, 2 Toneva K, 3 ours E, 4 Toneva E; default: all)')
    a = p.parse_args()
    if not 2 <= a.short <= a.epochs:
        p.error(f'--short must lie in [2, --epochs], got {a.short}')
    args = main.parse_args(['--dataset', 'FashionMNIST', '--model', 'ConvNet', '--method', 'forgetting', '--ipc',
                            str(a.ipc), '--save_path', a.save_path, '--quiet']
                           + (['--data_path', a.data_path] if a.data_path else []))
    experiment.check_common_args(args)
    args.default_epoch_eval = 300
    data = load_dataset(args.dataset, args.data_path).to(args.device)
    history = correctness_history(data, args, a.epochs)
    args.forget_epochs = a.short
    cached = coreset.forgetting_path(args, data.name, args.seed)  # main.py's K-epoch statistics
    variants = []
    for epochs in (a.short, a.epochs):
        counts = coreset.forgetting_counts(history[:epochs])
        if epochs == a.short and os.path.isfile(cached):
            same = torch.equal(counts.cpu(), load_torch_file(cached, 'cached forgetting statistics').cpu())
            print(f'first {a.short} of {a.epochs} epochs give the cached {a.short}-epoch statistics: {same}',
                  flush=True)
        never = ~history[:epochs].any(0)
        print(f'{epochs} epochs: forgetting events {torch.bincount(counts).tolist()}; never learned '
              f'{int(never.sum())} ({[int(never[idx].sum()) for idx in data.indices_class]} per class)', flush=True)
        variants += [(f'{epochs} ep, most forgotten (ours)', counts, never),
                     (f'{epochs} ep, never learned first (Toneva)', never_first(counts, never), never)]
    chosen = [(name, coreset.forgetting_picks(data, scores, a.ipc, args.seed), never)
              for name, scores, never in variants]
    for name, indices, never in chosen:
        print(f'{name}: never-learned picks {int(never[indices].sum())} of {indices.numel()}, shared with the first '
              f'variant {int(torch.isin(indices, chosen[0][1]).sum())}', flush=True)
    for k in (a.only or range(1, len(chosen) + 1)):
        name, indices, _ = chosen[k - 1]
        accs = training.evaluate_models(data.images_train[indices], data.labels_train[indices], data, args, 'ConvNet',
                                        range(a.num_eval), (args.seed, 0, 0))
        print(f'{name}: accs {[round(100 * x, 2) for x in accs]} mean {100 * np.mean(accs):.2f}', flush=True)


if __name__ == '__main__':
    main_probe()
