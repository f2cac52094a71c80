"""Label noise as the noisy-label literature sets it up (symmetric, pairflip, asymmetric class maps), applied to the
loaded training set, and the pure rate: the fraction of the samples a method used whose given label is the true one.

The noise replaces data.labels_train and data.indices_class, so every method reads the noisy labels and nothing
else; the true labels live only in a NoiseTruth, which the measurement hooks below read (run_experiment calls them)
and no method does. Which samples are corrupted, and how, is drawn from streams addressed by (seed, 'noise', class):
the same --seed gives the same noisy training set to every method. The test set is never touched."""
import dataclasses

import torch

import cleanscore
import rng
from base import UserError, check_choice, log
from data import class_indices

NOISE_TYPES = ('symmetric', 'pairflip', 'asymmetric')

# Flags a checkpoint must share with the run that resumes it.
RESUME_KEYS = ('noise_rate', 'noise_type') + cleanscore.RESUME_KEYS

# Asymmetric noise flips each mapped class to a similar-looking one; unmapped classes stay clean. MNIST/SVHN and
# CIFAR10 are the maps of the noisy-label literature (e.g. Patrini et al., "Making deep neural networks robust to
# label noise: a loss correction approach", CVPR 2017): 2->7, 3->8, 5<->6, 7->1; truck->automobile, bird->airplane,
# deer->horse, cat<->dog.
DIGIT_MAP = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
CIFAR10_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
# FashionMNIST has no single standard map; ours pairs garments of the same shape family, in the spirit of the digit
# and CIFAR10 maps (each source class goes to the class a human most easily confuses it with): T-shirt/top->Shirt,
# Pullover->Coat, Coat->Pullover, Sandal->Sneaker, Ankle boot->Sneaker. Indices as torchvision's class order.
FASHION_MNIST_MAP = {0: 6, 2: 4, 4: 2, 5: 7, 9: 7}

# CIFAR100: each class goes to the next class of its superclass (cyclically), the construction of Patrini et al.
# (2017). The 20 superclasses of 5 fine classes are the dataset's own (Krizhevsky, "Learning multiple layers of
# features from tiny images", 2009, and the 'coarse_labels' of the cifar-100-python files); fine classes by the
# dataset's fine-label names, whose index is their alphabetical rank (the files' fine_label_names order).
CIFAR100_FINE = (
    'apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle '
    'caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant '
    'flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man '
    'maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree '
    'plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail '
    'snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout '
    'tulip turtle wardrobe whale willow_tree wolf woman worm').split()
CIFAR100_SUPERCLASSES = (
    'beaver dolphin otter seal whale', 'aquarium_fish flatfish ray shark trout', 'orchid poppy rose sunflower tulip',
    'bottle bowl can cup plate', 'apple mushroom orange pear sweet_pepper', 'clock keyboard lamp telephone television',
    'bed chair couch table wardrobe', 'bee beetle butterfly caterpillar cockroach', 'bear leopard lion tiger wolf',
    'bridge castle house road skyscraper', 'cloud forest mountain plain sea', 'camel cattle chimpanzee elephant kangaroo',
    'fox porcupine possum raccoon skunk', 'crab lobster snail spider worm', 'baby boy girl man woman',
    'crocodile dinosaur lizard snake turtle', 'hamster mouse rabbit shrew squirrel', 'maple_tree oak_tree palm_tree '
    'pine_tree willow_tree', 'bicycle bus motorcycle pickup_truck train', 'lawn_mower rocket streetcar tank tractor')


def cifar100_map():
    """{fine class: next fine class of its superclass}, over the 100 classes."""
    out = {}
    for group in CIFAR100_SUPERCLASSES:
        members = sorted(CIFAR100_FINE.index(name) for name in group.split())
        out.update({a: b for a, b in zip(members, members[1:] + members[:1])})
    return out


ASYMMETRIC_MAPS = {'MNIST': DIGIT_MAP, 'SVHN': DIGIT_MAP, 'CIFAR10': CIFAR10_MAP, 'FashionMNIST': FASHION_MNIST_MAP,
                   'CIFAR100': cifar100_map()}


def add_args(parser):
    """The label-noise flags (main.py, main_DM.py) and the clean-sample selection flags of cleanscore."""
    a = parser.add_argument
    a('--noise_rate', type=float, default=0.0,
      help='fraction r of each class whose training label is corrupted (0 <= r < 1; exactly round(r * n_c) per class)')
    a('--noise_type', type=str, default='symmetric',
      help='symmetric (a uniformly drawn other class), pairflip (class c -> c + 1 mod C) or asymmetric (the '
           'literature\'s class maps; README "Noisy labels")')
    cleanscore.add_args(parser)


def check_args(args):
    """Validate the noise and selection flags before any data is loaded."""
    if not 0 <= args.noise_rate < 1:
        raise UserError(f'--noise_rate must be in [0, 1), got {args.noise_rate}')
    check_choice(args.noise_type, NOISE_TYPES, 'noise type')
    if args.noise_type == 'asymmetric' and args.dataset not in ASYMMETRIC_MAPS:
        raise UserError(f'--noise_type asymmetric has no class map for {args.dataset} (maps for: '
                        f'{", ".join(ASYMMETRIC_MAPS)})')
    cleanscore.check_args(args)


def corrupted_count(n, rate):
    """How many of a class's n samples are corrupted: round(rate * n)."""
    return int(round(rate * n))


def noisy_labels(labels, num_classes, rate, kind, dataset, key):
    """The labels with round(rate * n_c) samples of each class c relabelled. key: (seed,) addresses the draws:
    which samples of class c (a permutation from stream key + ('noise', c)) and, for symmetric noise, their new labels
    (an offset 1..C-1 from the same stream, so never the true class)."""
    out = labels.clone()
    mapping = ASYMMETRIC_MAPS.get(dataset, {}) if kind == 'asymmetric' else None
    for c, idx in enumerate(class_indices(labels, num_classes)):
        if mapping is not None and c not in mapping:
            continue
        gen = rng.generator(labels.device, *key, 'noise', c)
        chosen = idx.to(labels.device)[torch.randperm(idx.numel(), generator=gen, device=labels.device)
                                       [:corrupted_count(idx.numel(), rate)]]
        if kind == 'symmetric':
            offset = torch.randint(1, num_classes, (chosen.numel(),), generator=gen, device=labels.device)
            out[chosen] = (c + offset) % num_classes
        elif kind == 'pairflip':
            out[chosen] = (c + 1) % num_classes
        else:
            out[chosen] = mapping[c]
    return out


@dataclasses.dataclass
class NoiseTruth:
    """The true training labels, aligned with the (noisy, possibly filtered) training set of the run: for measuring
    only. given: the labels the methods see, on the same positions."""
    true: torch.Tensor
    given: torch.Tensor

    def pure_rate(self, indices=None):
        """Fraction of the samples at `indices` (all when None) whose given label is the true one, as a tensor."""
        if indices is None:
            return (self.given == self.true).double().mean()
        indices = indices.to(self.true.device)
        return (self.given[indices] == self.true[indices]).double().mean()

    def subset(self, indices):
        return NoiseTruth(self.true[indices], self.given[indices])


def keep_truth(labels):
    """The copy of the true labels the measurement keeps (its one source; a test replaces it with garbage to show
    that no method reads it)."""
    return labels.clone()


def with_train_labels(data, labels):
    """data with new training labels (and the per-class index lists that follow from them)."""
    return dataclasses.replace(data, labels_train=labels, indices_class=class_indices(labels, data.num_classes))


def subset_train(data, indices):
    """data restricted to the training samples at `indices` (ascending)."""
    labels = data.labels_train[indices]
    return dataclasses.replace(data, images_train=data.images_train[indices], labels_train=labels,
                               indices_class=class_indices(labels, data.num_classes))


def measuring(args):
    return getattr(args, 'noise_truth', None) is not None and args.noise_rate > 0


def prepare(args, data):
    """The training set a run learns from: noisy labels (--noise_rate), then the offline filter (--clean_filter);
    sets up the online selector (--clean_select) and the measurement (args.noise_truth). Call once after loading,
    not for --load_syn evaluations (their test set is clean and their training set unused)."""
    args.noise_truth, args.clean_selector, args.noise_selection = None, None, {}
    if args.noise_rate > 0:
        truth = keep_truth(data.labels_train)
        labels = noisy_labels(data.labels_train, data.num_classes, args.noise_rate, args.noise_type, data.name,
                              (args.seed,))
        data = with_train_labels(data, labels)
        args.noise_truth = NoiseTruth(truth.to(labels.device), labels)
        log(args, f'label noise: {args.noise_type} {args.noise_rate:g}, pure rate of the training set '
                  f'{float(args.noise_truth.pure_rate()) * 100:.2f}%')
    args.pure_rate_training_set = float(args.noise_truth.pure_rate()) if measuring(args) else None
    if cleanscore.active(args.clean_filter):
        kept = cleanscore.offline_filter(data, args)
        data = subset_train(data, kept)
        if args.noise_truth is not None:
            args.noise_truth = args.noise_truth.subset(kept)
        log(args, f'--clean_filter {args.clean_filter}: kept {kept.numel()} training samples' +
            (f', pure rate {float(args.noise_truth.pure_rate()) * 100:.2f}%' if measuring(args) else ''))
    if cleanscore.active(args.clean_select):
        args.clean_selector = cleanscore.OnlineSelector(args.clean_select, args.clean_keep, args.buffer_size,
                                                        args.buffer_rows, data.num_classes, data.images_train.device)
    return data


# ---------------------------------------------------------------------------------------------
# Measurement hooks of the runner (experiment.run_experiment): they alone read the true labels
# ---------------------------------------------------------------------------------------------

def record_selection(args, exp, indices):
    """The training-set indices an experiment's set was selected from (coresets, real initialisation)."""
    if measuring(args):
        args.noise_selection[exp] = float(args.noise_truth.pure_rate(indices))


def start_experiment(args, result, exp, resumed):
    """A fresh experiment starts with empty loss buffers and takes its selection's pure rate; a resumed one gets the
    buffers it had."""
    selector = getattr(args, 'clean_selector', None)
    if selector is not None:
        selector.reset(result.get('clean_buffers') if resumed else None)
    if not resumed and measuring(args):
        result['pure_rate_selection'] = getattr(args, 'noise_selection', {}).pop(exp, None)
        result['pure_rate_history'] = []


def end_iteration(args, result, exp, it, team):
    """After an iteration of online selection: the pure rate of the real samples it matched (one host sync per
    iteration, summed over the processes of a class split), and the buffers into the result for checkpoints."""
    selector = getattr(args, 'clean_selector', None)
    if selector is None:
        return
    picked = selector.take_picked()
    result['clean_buffers'] = selector.state()
    if not measuring(args) or not picked:
        return
    picked = torch.cat(picked)
    counts = torch.stack([(args.noise_truth.given[picked] == args.noise_truth.true[picked]).sum().double(),
                          torch.tensor(float(picked.numel()), dtype=torch.float64, device=picked.device)])
    counts = team.all_reduce_sum_(counts)
    result.setdefault('pure_rate_history', []).append(
        {'exp': exp, 'iteration': it, 'pure_rate': float(counts[0] / counts[1])})


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def report_fields(args, results):
    """{'pure_rate': {...}, 'pure_rate_history': [...]} for the JSON summary (nothing without noise). 'used' is the
    headline: the matched batches' mean (online), else the final selections' (coresets), else the kept set's."""
    if not measuring(args):
        return {}
    history = [h for r in results for h in r.get('pure_rate_history', [])]
    online = mean_or_none([h['pure_rate'] for h in history]) if getattr(args, 'clean_selector', None) else None
    selection = mean_or_none([r.get('pure_rate_selection') for r in results])
    kept = float(args.noise_truth.pure_rate())
    learns = args.method in ('DC', 'DSA', 'DM')
    used = online if online is not None else (kept if learns or selection is None else selection)
    out = {'pure_rate': {'used': used, 'training_set': args.pure_rate_training_set, 'kept': kept,
                         'selection': selection, 'online': online, 'kept_samples': int(args.noise_truth.true.numel())}}
    if online is not None:
        out['pure_rate_history'] = history
    return out


def pure_rate_line(pure_rate):
    """The final line of a noisy run."""
    parts = [f"Pure rate of the samples used = {pure_rate['used'] * 100:.2f}%",
             f"training set {pure_rate['training_set'] * 100:.2f}%", f"kept {pure_rate['kept'] * 100:.2f}%"]
    for key in ('selection', 'online'):
        if pure_rate.get(key) is not None:
            parts.append(f'{key} {pure_rate[key] * 100:.2f}%')
    return ', '.join(parts)


def file_tag(args):
    """A suffix for cached files computed from the training set (feature networks): '' on clean, unfiltered data."""
    tag = ''
    if getattr(args, 'noise_rate', 0) > 0:
        tag += f'_{args.noise_type}{args.noise_rate:g}s{args.seed}'
    if cleanscore.active(getattr(args, 'clean_filter', None)):
        tag += f'_{args.clean_filter}{args.clean_keep:g}_{args.score_epochs}ep'
    return tag
