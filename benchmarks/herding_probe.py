"""Why herding at FashionMNIST ipc 10 lands above the paper (issue 23): herding sets from several embeddings and
feature-network lengths, each evaluated with the paper's protocol (ConvNet, 300 epochs, no augmentation, the full
test set) on a few networks.

    python benchmarks/herding_probe.py --save_path result/paper_fmnist --epochs 2 5 --num_eval 2

Variants per feature network of E epochs (trained once and cached in save_path like main.py's, so a later
`main.py --method herding --feat_epochs E` reuses it): greedy herding on the raw embedding, greedy herding on the
L2-normalised embedding (iCaRL's), the ipc images nearest the class mean (no greedy correction); --variants N
keeps the first N. Prints each feature network's test accuracy, then per variant how far the picks lie from their class
mean (mean distance / mean distance of all the class's images: how typical they are, in the variant's embedding and
in the raw one) and how many picks it shares with the first variant, then the accuracies.
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
from data import load_dataset  # noqa: E402


def nearest_to_mean(features, ipc):
    return torch.cdist(features, features.mean(0, keepdim=True)).squeeze(1).argsort()[:ipc]


def picks_per_class(data, embed, rule, ipc):
    return torch.cat([idx[rule(embed(idx), ipc)] for idx in data.indices_class])


def typicality(data, embed, indices):
    """Mean distance of the picks to their class mean over the mean distance of all the class's images."""
    ratios = []
    for idx in data.indices_class:
        f = embed(idx)
        d = torch.cdist(f, f.mean(0, keepdim=True)).squeeze(1)
        chosen = torch.isin(idx, indices)
        ratios.append(float(d[chosen].mean() / d.mean()))
    return float(np.mean(ratios))


def evaluate(data, args, indices, num_eval):
    images, labels = data.images_train[indices], data.labels_train[indices]
    return training.evaluate_models(images, labels, data, args, 'ConvNet', range(num_eval), (args.seed, 0, 0))


def main_probe():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--save_path', default='result/paper_fmnist')
    p.add_argument('--epochs', type=int, nargs='+', default=[2, 5])
    p.add_argument('--num_eval', type=int, default=2)
    p.add_argument('--ipc', type=int, default=10)
    p.add_argument('--only', type=int, nargs='+', default=None, choices=(1, 2, 3),
                   help='evaluate only these variants (1 raw, 2 L2-normalised, 3 nearest to mean; default: all kept)')
    p.add_argument('--no_accuracy', action='store_true', help="skip the feature network's test pass")
    p.add_argument('--variants', type=int, default=3, help='the first N of: raw, L2-normalised, nearest to mean')
    a = p.parse_args()
    args = main.parse_args(['--dataset', 'FashionMNIST', '--model', 'ConvNet', '--method', 'herding', '--ipc',
                            str(a.ipc), '--save_path', a.save_path, '--quiet'])
    experiment.check_common_args(args)
    args.default_epoch_eval = 300
    data = load_dataset(args.dataset, args.data_path).to(args.device)
    for epochs in a.epochs:
        args.feat_epochs = epochs
        net = coreset.feature_net(data, args, args.seed)
        if not a.no_accuracy:
            accuracy = training.test_accuracy(net, data.images_test, data.labels_test)
            print(f'featnet {epochs} ep: test accuracy {100 * accuracy:.2f}', flush=True)
        cache = {}

        def raw(idx, net=net, cache=cache):  # one embedding pass per class, shared by every variant
            key = int(idx[0])
            if key not in cache:
                cache[key] = coreset.embed_images(net, data.images_train, idx).float()
            return cache[key]

        l2 = lambda idx, raw=raw: torch.nn.functional.normalize(raw(idx), dim=1)  # noqa: E731
        variants = ((f'featnet {epochs} ep, raw embedding, greedy herding', raw, coreset.herding_selection),
                    (f'featnet {epochs} ep, L2-normalised, greedy herding', l2, coreset.herding_selection),
                    (f'featnet {epochs} ep, raw embedding, nearest to mean', raw, nearest_to_mean))
        chosen = [(name, embed, picks_per_class(data, embed, rule, a.ipc))
                  for name, embed, rule in variants[:a.variants]]
        for name, embed, indices in chosen:  # the cheap part first: how typical the picks are, how much they overlap
            print(f'{name}: typicality {typicality(data, embed, indices):.3f} (raw embedding '
                  f'{typicality(data, raw, indices):.3f}), shared with the first variant '
                  f'{int(torch.isin(indices, chosen[0][2]).sum())} of {indices.numel()}', flush=True)
        evaluated = [chosen[k - 1] for k in a.only] if a.only else chosen
        for name, _, indices in evaluated:
            accs = evaluate(data, args, indices, a.num_eval)
            print(f'{name}: accs {[round(100 * x, 2) for x in accs]} mean {100 * np.mean(accs):.2f}', flush=True)


if __name__ == '__main__':
    main_probe()
