"""Neural architecture search on proxy sets (DSA paper, Table 6 and Figure 4).

    python NAS.py --dataset CIFAR10 --ground_truth --whole_epochs 100     # whole-set accuracy of every candidate
    python NAS.py --dataset CIFAR10 --proxy random --ipc 10                # 10 random real images per class
    python NAS.py --dataset CIFAR10 --proxy result/res_DSA_CIFAR10_ConvNet_10ipc.pt
    python NAS.py --dataset CIFAR10 --proxy early_stop                     # the whole set, the proxy's batch count
    python NAS.py --dataset FashionMNIST --proxy random --depth 2 3 --width 32 --epochs 100   # a subspace

The candidates are ConvNets, depth x width x activation x normalisation x pooling (720 by default, the paper's
space), built through the model zoo by name: ConvNet_D{depth}_W{width}_{act}_{norm}_{pool}. Each is trained on the
proxy set with the evaluation protocol (training.train_and_test: --epochs + 1 epochs of SGD, momentum 0.9, weight decay
5e-4, lr x0.1 after half) and tested on the real test set. DSA and DM sets train with DSA augmentation, other proxies
without (--dsa_strategy changes that). Proxies:
  random       --ipc real training images per class (from --seed)
  FILE.pt      a learned set (res_*.pt of main.py or main_DM.py, or a published one); --set_index picks the set
  early_stop   the ground-truth training set, but only the batches the proxy training takes: --epochs + 1 epochs of
               ipc x classes images each (the paper: 300 iterations of batch 100), drawn in turn from random
               permutations of the set, with the same lr schedule
The whole-set (ground-truth) accuracy of a candidate: --whole_epochs + 1 epochs on the whole training set (or on
--train_subset images per class), no augmentation. It is cached in save_path/nas_gt_{dataset}.json, which maps
'candidate|whole_epochs|seed' (plus '|sub{N}' with --train_subset) to {"acc", "seconds"} and is rewritten after each
candidate: a run reuses what is there and trains what is missing, and an interruption loses only the candidate in
flight. Every candidate's training is seeded from (--seed, its name) alone, so results do not depend on which other
candidates ran.

A proxy run prints a markdown table like the paper's Table 6 (whole-set accuracy of the best candidate by proxy
accuracy, Spearman's rank correlation between proxy and whole-set accuracy over the top 5% by proxy accuracy and
over all, wall time, storage) and every candidate's accuracies, and writes save_path/nas_{dataset}_{proxy}.json and
a scatter plot like Figure 4, save_path/nas_{dataset}_{proxy}.png. Without the ground truth of all its candidates it
reports the proxy accuracies and prints the --ground_truth command that fills the cache.
"""
import argparse
import dataclasses
import fcntl
import json
import math
import os
import re
import shlex
import sys
import time

import numpy as np
import torch

# Project internals, imported in this one place only (utils.py is being split into modules: repoint them here).
import base
import parallel
import rng
import experiment
import results
import training
import utils
import folders
from data import DATASET_NAMES, DATASETS, check_dataset_args, dataset_info_for, load_dataset_for
from augment import parse_strategy
from networks import CONVNET_ACTS, CONVNET_NORMS, CONVNET_POOLS, convnet_name, get_network

PAPER_SPACE = {
    'depth': (1, 2, 3, 4),
    'width': (32, 64, 128, 256),
    'act': ('sigmoid', 'relu', 'leakyrelu'),
    'norm': ('none', 'batchnorm', 'layernorm', 'instancenorm', 'groupnorm'),
    'pool': ('none', 'maxpooling', 'avgpooling'),
}
SPACE_CHOICES = {'act': CONVNET_ACTS, 'norm': CONVNET_NORMS, 'pool': CONVNET_POOLS}
BUILTIN_PROXIES = ('random', 'early_stop')
TOP_PERCENT = 5  # the correlation the paper reports is over the top 5% of candidates by proxy accuracy
MIN_TOP = 2  # a rank correlation needs two candidates
DEFAULT_LR, DEFAULT_BATCH = 0.01, 256  # the evaluation protocol's lr_net and batch_train

# -----------------------------------------------------------------------------
# search space


def parse_space_value(dim, text):
    """One value of a space flag: a positive integer for depth and width, a known name otherwise."""
    if dim in ('depth', 'width'):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise base.UserError(f"--{dim} {text!r} is not a positive integer "
                                  f"(the paper's: {' '.join(map(str, PAPER_SPACE[dim]))})")
        return value
    if text not in SPACE_CHOICES[dim]:
        raise base.UserError(f"--{dim} {text!r} is not one of: {', '.join(SPACE_CHOICES[dim])}")
    return text


def parse_space(args):
    """{dim: values} from the five space flags, each checked; repeated values count once (order kept)."""
    space = {}
    for dim in PAPER_SPACE:
        texts = getattr(args, dim)
        if not texts:
            raise base.UserError(f"--{dim} needs at least one value (the paper's: "
                                  f"{' '.join(map(str, PAPER_SPACE[dim]))})")
        space[dim] = list(dict.fromkeys(parse_space_value(dim, t) for t in texts))
    return space


def search_space(space):
    """The candidates' names, depth-major (the order of the tables and of ties)."""
    return [convnet_name(d, w, a, n, p) for d in space['depth'] for w in space['width'] for a in space['act']
            for n in space['norm'] for p in space['pool']]


def check_buildable(candidates, dataset, info=None):
    """Build every candidate on the meta device (no memory, no RNG): one that cannot exist for the dataset's image
    size fails here, named, before any data is loaded or any training starts."""
    info = DATASETS[dataset] if info is None else info
    with torch.device('meta'):
        for name in candidates:
            get_network(name, info['channel'], info['num_classes'], info['im_size'], device='meta')


def my_share(candidates):
    """The candidates this process trains: all of them in one process; under torchrun rank r of N takes
    candidates r, r + N, ... (results are gathered before the report)."""
    return parallel.Team(shared=True).share(candidates)

# -----------------------------------------------------------------------------
# ranks and correlation


def average_ranks(values):
    """Ranks 1..n of values; tied values share the average of the ranks they span (scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind='stable')
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start  # last position of the run of values equal to values[order[start]]
        while end + 1 < len(values) and values[order[end + 1]] == values[order[start]]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the average ranks. nan for fewer than two pairs or a
    constant side, like scipy.stats.spearmanr."""
    if len(x) != len(y):
        raise ValueError(f'spearman needs two sequences of one length, got {len(x)} and {len(y)}')
    if len(x) < 2:
        return float('nan')
    rx = average_ranks(x)
    ry = average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else float('nan')


def top_count(n):
    """How many candidates make the top TOP_PERCENT: rounded up, at least MIN_TOP, at most n."""
    return min(n, max(MIN_TOP, -(-n * TOP_PERCENT // 100)))


def rank_by_proxy(names, proxy_accs):
    """Names by proxy accuracy, best first; ties keep the space order."""
    return sorted(names, key=lambda name: -proxy_accs[name])

# -----------------------------------------------------------------------------
# training one candidate


def new_candidate(name, data, args):
    """A freshly initialised candidate and its NetRandom, from streams addressed by (seed, name) alone, so an
    accuracy does not depend on which candidates ran before it, or in which process."""
    with rng.seeded(args.device, args.seed, 'nas', name):
        net = get_network(name, data.channel, data.num_classes, data.im_size, device=args.device)
    return net, training.NetRandom(rng.derive_seed(args.seed, 'nas', name, 'train'),
                                   rng.derive_seed(args.seed, 'nas', name, 'choice'), args.device)


def train_candidate(name, images, labels, data, epochs, args, dsa_strategy=None):
    """Test accuracy of a candidate trained on (images, labels) by the evaluation protocol."""
    net, rand = new_candidate(name, data, args)
    return training.train_and_test(net, images, labels, data.images_test, data.labels_test, epochs, args.lr_net,
                                args.batch_train, dsa_strategy, rand=rand)


def train_candidate_early_stop(name, images, labels, data, args, chunk, dsa_strategy=None):
    """Test accuracy of a candidate trained like train_candidate on a proxy of `chunk` images for args.epochs, but
    with every epoch's chunk drawn afresh from (images, labels): the same batches, batch size and lr schedule as the
    proxy training, on data from the whole set.

    training.train_and_test keeps one training set for all epochs, so its schedule (lr x0.1 with a fresh optimizer
    after epoch epochs // 2) is replayed here over training.train_epoch."""
    net, rand = new_candidate(name, data, args)
    epochs, lr = args.epochs, args.lr_net
    total = chunk * (epochs + 1)
    passes = -(-total // images.shape[0])
    stream = torch.cat([rand.perm(images.shape[0]) for _ in range(passes)])[:total]
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    decay_epoch = epochs // 2 + 1
    for ep in range(epochs + 1):
        idx = stream[ep * chunk:(ep + 1) * chunk]
        training.train_epoch(net, optimizer, images[idx], labels[idx], args.batch_train, dsa_strategy, rand=rand)
        if ep == decay_epoch:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return training.test_accuracy(net, data.images_test, data.labels_test)

# -----------------------------------------------------------------------------
# training sets: proxies and the ground truth's


def check_per_class(data, n, flag):
    smallest = min(int(idx.numel()) for idx in data.indices_class)
    if n > smallest:
        raise base.UserError(f'{flag} {n} is larger than the smallest class of {data.name} ({smallest} training '
                              f'images)')


def random_per_class(data, n, seed):
    """n random real training images per class, class after class, drawn from `seed`. With one seed, the n images
    of a smaller draw are among those of a larger one (each class draws one permutation)."""
    idx = torch.cat([utils.sample_class_indices(data, c, n, utils.class_generator(data, (seed,), 'nas-random', c))
                     for c in range(data.num_classes)])
    return data.images_train[idx], data.labels_train[idx]


@dataclasses.dataclass
class TrainingSet:
    images: torch.Tensor
    labels: torch.Tensor
    description: str


def ground_truth_set(args, data):
    """The set the ground truth trains on (and early stopping draws from): the whole training set, or
    --train_subset random images per class of it."""
    if not args.train_subset:
        return TrainingSet(data.images_train, data.labels_train,
                           f'whole training set ({data.images_train.shape[0]} images)')
    check_per_class(data, args.train_subset, '--train_subset')
    images, labels = random_per_class(data, args.train_subset, args.seed)
    return TrainingSet(images, labels, f'training subset of {args.train_subset} random images per class '
                                       f'({images.shape[0]} images, --train_subset {args.train_subset})')


@dataclasses.dataclass
class Proxy:
    tag: str  # in the output file names
    label: str  # the table's column
    description: str
    images: torch.Tensor
    labels: torch.Tensor
    dsa_strategy: str
    storage: int  # training images the search needs
    chunk: int = 0  # early_stop: images per proxy epoch (0: train on all images every epoch)


def learned_set_method(path, obj):
    """DC, DSA or DM for a res_*.pt: its 'config' when it has one (ours), else its file name; None if unknown."""
    config = obj.get('config') if isinstance(obj, dict) else None
    if isinstance(config, dict) and config.get('method'):
        return str(config['method'])
    match = re.match(r'res_(DC|DSA|DM)_', os.path.basename(path))
    return match.group(1) if match else None


def load_file_proxy(args):
    """The set --proxy FILE names (images, labels, method), checked against --dataset before any data is loaded."""
    info = dataset_info_for(args)
    sets = results.load_synthetic_sets(args.proxy, info['channel'], info['im_size'], info['num_classes'])
    obj = base.load_torch_file(args.proxy, 'synthetic set')
    config = obj.get('config') if isinstance(obj.get('config'), dict) else {}
    if config.get('dataset') not in (None, args.dataset):
        raise base.UserError(f"'{args.proxy}' was learned on {config['dataset']}, not {args.dataset}; "
                              f"check --dataset")
    if args.set_index >= len(sets):
        raise base.UserError(f"--set_index {args.set_index} is out of range: '{args.proxy}' holds {len(sets)} "
                              f"set(s)")
    images, labels = sets[args.set_index]
    return images, labels, learned_set_method(args.proxy, obj)


def proxy_augmentation(args, method):
    """DSA strategy of the proxy training: --dsa_strategy when given, else the dataset's DSA strategy for DSA and
    DM sets (the way they are evaluated) and none for the others."""
    if args.dsa_strategy != 'auto':
        return args.dsa_strategy if parse_strategy(args.dsa_strategy) else None
    return training.default_dsa_strategy(args.dataset) if method in ('DSA', 'DM') else None


def make_proxy(args, data, gt_set, file_proxy=None):
    if args.proxy == 'random':
        check_per_class(data, args.ipc, '--ipc')
        images, labels = random_per_class(data, args.ipc, args.seed)
        dsa = proxy_augmentation(args, 'random')
        return Proxy(f'random_{args.ipc}ipc', f'random ({args.ipc} img/cls)',
                     f'{args.ipc} random real training images per class (seed {args.seed})',
                     images, labels, dsa, images.shape[0])
    if args.proxy == 'early_stop':
        chunk = args.ipc * data.num_classes
        batches = (args.epochs + 1) * -(-chunk // args.batch_train)
        dsa = proxy_augmentation(args, 'early_stop')
        return Proxy(f'early_stop_{args.ipc}ipc', 'early-stopping',
                     f'early stopping on the {gt_set.description}: {args.epochs + 1} epochs of {chunk} images '
                     f'(--ipc {args.ipc} x {data.num_classes} classes), {batches} batches of up to '
                     f'{args.batch_train}', gt_set.images, gt_set.labels, dsa, gt_set.images.shape[0], chunk)
    images, labels, method = file_proxy
    dsa = proxy_augmentation(args, method)
    stem = os.path.splitext(os.path.basename(args.proxy))[0]
    return Proxy(f'{stem}_set{args.set_index}', f'{method or "learned"} ({images.shape[0]} imgs)',
                 f"{method or 'learned (method unknown)'} set {args.set_index} of {args.proxy} ({images.shape[0]} "
                 f"images)", images.to(args.device), labels.to(args.device), dsa, images.shape[0])


def proxy_accuracy(name, proxy, data, args):
    if proxy.chunk:
        return train_candidate_early_stop(name, proxy.images, proxy.labels, data, args, proxy.chunk,
                                          proxy.dsa_strategy)
    return train_candidate(name, proxy.images, proxy.labels, data, args.epochs, args, proxy.dsa_strategy)

# -----------------------------------------------------------------------------
# ground-truth cache


def gt_cache_path(args):
    return os.path.join(args.save_path, f'nas_gt_{args.dataset}.json')


def gt_key(name, args):
    key = f'{name}|{args.whole_epochs}|{args.seed}'
    return f'{key}|sub{args.train_subset}' if args.train_subset else key


def load_gt_cache(path):
    """{key: {'acc', 'seconds'}} of the cache file; {} when there is none yet."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError) as e:
        raise base.UserError(f'the ground-truth cache {path} is unreadable ({e}); delete it to start it afresh')
    if not isinstance(cache, dict):
        raise base.UserError(f'the ground-truth cache {path} is not a JSON object; delete it to start it afresh')
    return cache


def record_ground_truth(path, key, acc, seconds):
    """Add one candidate's result to the cache file, re-read first under a lock so that entries other processes
    (torchrun) wrote in the meantime are kept; the atomic rewrite leaves either the old or the new file after an
    interruption."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = load_gt_cache(path)
        cache[key] = {'acc': acc, 'seconds': seconds}
        base.write_json_atomic(path, cache)


def run_ground_truth(args, data, candidates, gt_set):
    """Train and cache the whole-set accuracy of every candidate of this process that the cache lacks."""
    path = gt_cache_path(args)
    cache = load_gt_cache(path)
    mine = my_share(candidates)
    todo = [name for name in mine if gt_key(name, args) not in cache]
    base.log(args, f'ground truth: {len(mine) - len(todo)} of {len(mine)} candidates cached in {path}; training '
                    f'{len(todo)} for {args.whole_epochs} + 1 epochs on the {gt_set.description}')
    start = time.time()
    done = 0
    try:
        for name in todo:
            t = time.time()
            acc = train_candidate(name, gt_set.images, gt_set.labels, data, args.whole_epochs, args)
            seconds = time.time() - t
            record_ground_truth(path, gt_key(name, args), acc, seconds)
            done += 1
            base.log(args, f'[{done}/{len(todo)}] {name}: whole-set accuracy {acc * 100:.2f}% ({seconds:.1f} s)')
    except KeyboardInterrupt:
        print(f'interrupted: {done} new candidate(s) are saved in {path}; run the same command again to train the '
              f'other {len(todo) - done}', file=sys.stderr)
        raise SystemExit(130)
    parallel.gather_to_all(len(todo))  # every process's candidates are in the cache before anyone reads it
    minutes = (time.time() - start) / 60
    rate = f', {len(todo) / minutes:.2f} candidates per minute' if todo and minutes > 0 else ''
    if parallel.rank() == 0:
            print(f'ground truth on {args.dataset}: {len(todo)} trained, {len(mine) - len(todo)} reused from {path} '
              f'({args.whole_epochs} + 1 epochs on the {gt_set.description}); {minutes:.2f} min{rate}')

# -----------------------------------------------------------------------------
# the proxy search and its report


def run_proxy_search(args, data, candidates, proxy):
    """{name: proxy test accuracy} of this process's candidates, and the wall time in seconds."""
    mine = my_share(candidates)
    base.log(args, f'proxy {proxy.description}; augmentation {proxy.dsa_strategy or "none"}; {len(mine)} '
                    f'candidates, {args.epochs} + 1 epochs each, device {args.device}')
    accs = {}
    start = time.time()
    for k, name in enumerate(mine):
        t = time.time()
        accs[name] = proxy_accuracy(name, proxy, data, args)
        base.log(args, f'[{k + 1}/{len(mine)}] {name}: proxy accuracy {accs[name] * 100:.2f}% '
                        f'({time.time() - t:.1f} s)')
    for part in parallel.gather_to_all(accs):  # every process's candidates, for the report
        accs.update(part)
    return accs, time.time() - start


def fill_command(args):
    """The --ground_truth command that fills the cache for this run's space and settings."""
    parts = ['python', 'NAS.py', '--dataset', args.dataset, '--data_path', args.data_path, '--save_path',
             args.save_path, '--ground_truth', '--whole_epochs', str(args.whole_epochs), '--seed', str(args.seed),
             *folders.folder_flags(args)]
    if args.train_subset:
        parts += ['--train_subset', str(args.train_subset)]
    if args.lr_net != DEFAULT_LR:
        parts += ['--lr_net', str(args.lr_net)]
    if args.batch_train != DEFAULT_BATCH:
        parts += ['--batch_train', str(args.batch_train)]
    for dim, values in args.space.items():
        parts += [f'--{dim}', *map(str, values)]
    return ' '.join(shlex.quote(p) for p in parts)


def finite_or_none(x):
    return None if x is None or math.isnan(x) else x


def build_report(args, proxy, candidates, proxy_accs, search_seconds, gt_set):
    """Everything the table, the JSON and the plot show, as a JSON-able dict (accuracies as fractions)."""
    names = [name for name in candidates if name in proxy_accs]
    cache = load_gt_cache(gt_cache_path(args))
    whole = {name: cache.get(gt_key(name, args)) for name in names}
    missing = [name for name in names if whole[name] is None]
    ranked = rank_by_proxy(names, proxy_accs)
    top = ranked[:top_count(len(ranked))]
    rows = [{'candidate': name, 'proxy_acc': proxy_accs[name],
             'whole_acc': whole[name]['acc'] if whole[name] else None, 'top': name in top} for name in ranked]
    complete = not missing and len(names) > 0
    report = {
        'dataset': args.dataset, 'proxy': proxy.tag, 'proxy_label': proxy.label, 'proxy_description': proxy.description,
        'augmentation': proxy.dsa_strategy or 'none', 'epochs': args.epochs, 'lr_net': args.lr_net,
        'batch_train': args.batch_train, 'seed': args.seed, 'space': args.space, 'num_candidates': len(names),
        'candidates': rows,
        'best_by_proxy': rows[0] if rows else None,
        'best_by_whole': max((r for r in rows if r['whole_acc'] is not None), key=lambda r: r['whole_acc'],
                             default=None),
        'top_percent': TOP_PERCENT, 'top_count': len(top),
        'spearman_top': None, 'spearman_all': None,
        'search_seconds': search_seconds,
        'candidates_per_minute': len(names) / (search_seconds / 60) if search_seconds > 0 else None,
        'storage_images': proxy.storage,
        'ground_truth': {'cache': gt_cache_path(args), 'whole_epochs': args.whole_epochs,
                         'train_subset': args.train_subset, 'description': gt_set.description,
                         'storage_images': int(gt_set.images.shape[0]), 'missing': len(missing),
                         'seconds': sum(whole[name]['seconds'] for name in names) if complete else None,
                         'fill_command': fill_command(args) if missing else None},
    }
    if complete:
        top_rows = rows[:len(top)]
        report['spearman_top'] = finite_or_none(spearman([r['proxy_acc'] for r in top_rows],
                                                         [r['whole_acc'] for r in top_rows]))
        report['spearman_all'] = finite_or_none(spearman([r['proxy_acc'] for r in rows],
                                                         [r['whole_acc'] for r in rows]))
    return report


def pct(acc):
    return '—' if acc is None else f'{acc * 100:.2f}'


def num(x, digits=2):
    return '—' if x is None else f'{x:.{digits}f}'


def report_markdown(report):
    """The paper's Table 6 for this proxy, then every candidate, best proxy accuracy first."""
    gt = report['ground_truth']
    best, best_whole = report['best_by_proxy'], report['best_by_whole']
    complete = gt['missing'] == 0
    n, k = report['num_candidates'], report['top_count']
    lines = [
        f"### NAS on {report['dataset']}: {report['proxy_label']}, {n} candidates",
        '',
        f"| | {report['proxy_label']} | Whole dataset |",
        '|---|---|---|',
        f"| Performance (%) | {pct(best['whole_acc'] if best else None)} | "
        f"{pct(best_whole['whole_acc'] if best_whole else None)} |",
        f"| Correlation (top {report['top_percent']}%: {k} of {n}) | {num(report['spearman_top'])} | "
        f"{num(1.0) if complete else '—'} |",
        f"| Correlation (all {n}) | {num(report['spearman_all'])} | {num(1.0) if complete else '—'} |",
        f"| Time cost (min) | {num(report['search_seconds'] / 60, 1)} | "
        f"{num(gt['seconds'] / 60 if gt['seconds'] is not None else None, 1)} |",
        f"| Storage (imgs) | {report['storage_images']} | {gt['storage_images']} |",
        '',
        f"Proxy: {report['proxy_description']}; augmentation {report['augmentation']}; {report['epochs']} + 1 "
        f"epochs per candidate.",
        f"Whole dataset: {gt['whole_epochs']} + 1 epochs on the {gt['description']}, no augmentation "
        f"(cache {gt['cache']}).",
    ]
    if best:
        lines.append(f"Performance: whole-set accuracy of the best candidate by proxy accuracy, {best['candidate']} "
                     f"(proxy {pct(best['proxy_acc'])}%); whole dataset: the best whole-set accuracy"
                     f"{', ' + best_whole['candidate'] if best_whole else ''}.")
    if not complete:
        lines.append(f"{gt['missing']} of {n} candidates lack ground truth, so there is no correlation yet. "
                     f"Fill the cache with:")
        lines += ['', f"    {gt['fill_command']}", '']
    lines += ['', '| rank | candidate | proxy acc (%) | whole-set acc (%) | top 5% |', '|---|---|---|---|---|']
    for rank, row in enumerate(report['candidates'], 1):
        lines.append(f"| {rank} | {row['candidate']} | {pct(row['proxy_acc'])} | {pct(row['whole_acc'])} | "
                     f"{'*' if row['top'] else ''} |")
    return '\n'.join(lines)


def plot_scatter(report, path):
    """Proxy vs whole-set accuracy of every candidate, the top TOP_PERCENT marked (the paper's Figure 4)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    rows = report['candidates']
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for top, color, label in ((False, 'tab:gray', 'candidates'),
                              (True, 'tab:red', f"top {report['top_percent']}% by proxy ({report['top_count']})")):
        chosen = [r for r in rows if r['top'] == top]
        ax.scatter([r['proxy_acc'] * 100 for r in chosen], [r['whole_acc'] * 100 for r in chosen], s=18, c=color,
                   alpha=0.8, label=label)
    ax.set_xlabel(f"proxy accuracy (%): {report['proxy_label']}")
    ax.set_ylabel('whole-set accuracy (%)')
    ax.set_title(f"{report['dataset']}, {report['num_candidates']} candidates: Spearman top "
                 f"{num(report['spearman_top'])}, all {num(report['spearman_all'])}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + '.tmp.png'  # written whole, then renamed: never a truncated PNG
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def write_report(args, report):
    """Print the table; write the JSON and, with the ground truth complete, the scatter plot (rank 0 only)."""
    if parallel.rank() != 0:
        return
    print(report_markdown(report))
    stem = os.path.join(args.save_path, f"nas_{args.dataset}_{report['proxy']}")
    base.write_json_atomic(stem + '.json', report)
    base.log(args, f'report written to {stem}.json')
    if report['ground_truth']['missing'] == 0 and report['candidates']:
        plot_scatter(report, stem + '.png')
        base.log(args, f'scatter plot written to {stem}.png')

# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = base.OneLineParser(script='NAS.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a('--dataset', type=str, default='CIFAR10', help=', '.join(DATASET_NAMES))
    a('--proxy', type=str, default=None, help='random, early_stop or a res_*.pt file of learned sets')
    a('--ipc', type=int, default=10, help='random: images per class; early_stop: images per epoch per class')
    a('--set_index', type=int, default=0, help='which set of the --proxy file (default: the first)')
    a('--epochs', type=int, default=300, help='proxy training epochs (trains epochs + 1, as the evaluation does)')
    a('--dsa_strategy', type=str, default='auto',
      help="proxy training augmentation: auto (the dataset's DSA strategy for DSA/DM sets, none otherwise), none, "
           "or DSA ops joined by '_' for any proxy")
    a('--ground_truth', action='store_true', help='train the candidates missing from the ground-truth cache')
    a('--whole_epochs', type=int, default=100, help='ground-truth training epochs (trains whole_epochs + 1)')
    a('--train_subset', type=int, default=None,
      help='ground truth (and early_stop) on N random training images per class instead of the whole set')
    for dim, values in PAPER_SPACE.items():
        a(f'--{dim}', type=str, nargs='*', default=[str(v) for v in values],
          help=f"search space: {dim} values (default: {' '.join(map(str, values))})")
    a('--lr_net', type=float, default=DEFAULT_LR, help='learning rate of candidate training')
    a('--batch_train', type=int, default=DEFAULT_BATCH, help='batch size of candidate training')
    a('--seed', type=int, default=0, help='seeds the proxy set, the training subset and every candidate')
    a('--data_path', type=str, default='data', help='dataset folder')
    folders.add_folder_args(parser)
    a('--save_path', type=str, default='result', help='results folder (reports and the ground-truth cache)')
    a('--device', type=str, default=None, help='cpu, cuda, cuda:N (default: cuda when available)')
    a('--quiet', action='store_true', help='no progress lines (the report is still printed)')
    return parser.parse_args(argv)


def check_args(args):
    """Validate every flag before any data is loaded; returns the candidates. Bad input fails in one line."""
    check_dataset_args(args)
    if args.proxy is None and not args.ground_truth:
        raise base.UserError('nothing to do: give --proxy random|early_stop|FILE.pt and/or --ground_truth')
    if args.proxy is not None and args.proxy not in BUILTIN_PROXIES and not os.path.isfile(args.proxy):
        raise base.UserError(f"unknown --proxy {args.proxy!r}: use random, early_stop or the path of a res_*.pt "
                              f"file (no such file)")
    for flag, low in (('ipc', 1), ('epochs', 0), ('whole_epochs', 0), ('batch_train', 1), ('set_index', 0)):
        if getattr(args, flag) < low:
            raise base.UserError(f'--{flag} must be at least {low}, got {getattr(args, flag)}')
    if args.train_subset is not None and args.train_subset < 1:
        raise base.UserError(f'--train_subset must be at least 1, got {args.train_subset}')
    base.check_learning_rate(args.lr_net, '--lr_net')
    base.check_writable_folder(args.save_path, '--save_path')
    if args.dsa_strategy != 'auto':
        parse_strategy(args.dsa_strategy)
    args.space = parse_space(args)
    candidates = search_space(args.space)
    check_buildable(candidates, args.dataset, dataset_info_for(args))
    args.device = parallel.setup(args.device)  # last: under torchrun only valid flags reach the other processes
    if parallel.rank() != 0:
        args.quiet = True
    return candidates


def main(argv=None):
    args = parse_args(argv)
    candidates = check_args(args)
    file_proxy = None
    if args.proxy is not None and args.proxy not in BUILTIN_PROXIES:
        file_proxy = load_file_proxy(args)
    data = load_dataset_for(args).to(args.device)
    gt_set = ground_truth_set(args, data)
    if args.ground_truth:
        run_ground_truth(args, data, candidates, gt_set)
    if args.proxy is None:
        return None
    proxy = make_proxy(args, data, gt_set, file_proxy)
    proxy_accs, seconds = run_proxy_search(args, data, candidates, proxy)
    report = build_report(args, proxy, candidates, proxy_accs, seconds, gt_set)
    write_report(args, report)
    return report


if __name__ == '__main__':
    experiment.cli(main)
