"""The loss-buffer scores of the research proposal (SPEC §9c), their per-class buffers, and the two ways of using
them to keep the samples that look clean: online (--clean_select: each real batch of a DC/DSA matching step is the
lowest-scoring part of a larger candidate draw, scored under the network being matched) and offline (--clean_filter:
a scoring network trained on the noisy training set scores every sample once; each class keeps its lowest-scoring
fraction, and any method then runs on what is kept).

With l = cross-entropy, y the given label and y_pred = argmax f(x):
  loss   = l(f(x), y)                                   (the small-loss baseline)
  score  = l(f(x), y) / mean_buffer l_label
  score2 = [l(f(x), y) - l(f(x), y_pred)] / mean_buffer l_label
  score3 = [l(f(x), y) - l(f(x), y_pred)] / (mean_buffer l_label - mean_buffer l_pred)
The buffer means are over one row of recent losses: the row of the sample's given class (--buffer_rows label, the
proposal's label-loss and predicted-loss buffers) or of its predicted class (--buffer_rows pred, the proposal's last
version). Note: with label rows, every candidate of a class shares its denominator, so within a class score ranks
like loss and score3 like score2; the selections here are per class, so they coincide (pred rows differ)."""
import fcntl
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import rng
from base import UserError, check_choice, load_torch_file, log, save_torch_file_atomic, short_error
from networks import check_model_name, get_network
from training import NetRandom, backward_mean_loss, batch_chunks

SCORES = ('none', 'loss', 'score', 'score2', 'score3')
BUFFER_ROWS = ('label', 'pred')
RESUME_KEYS = ('clean_select', 'clean_filter', 'clean_keep', 'buffer_size', 'buffer_rows', 'score_epochs',
               'score_model')
# The zero guard of the denominators: far below any mean cross-entropy of a real buffer (a float32 loss of a
# confident right prediction is ~1e-7), so dividing by it changes nothing but a zero or negative-rounded mean.
EPS = 1e-12
SCORE_BATCH = 256  # batch of the offline scoring network's training


def add_args(parser):
    a = parser.add_argument
    a('--clean_select', type=str, default='none', metavar='SCORE',
      help=f"online selection (DC/DSA): each real batch is the batch_real lowest-{'/'.join(SCORES[1:])} of "
           f"ceil(batch_real / clean_keep) candidates, scored under the network being matched (none: off)")
    a('--clean_filter', type=str, default='none', metavar='SCORE',
      help='offline filter (every method): a scoring network trained on the noisy training set scores every sample; '
           'each class keeps its clean_keep lowest-scoring fraction (none: off)')
    a('--clean_keep', type=float, default=0.5, help='fraction q kept by --clean_select / --clean_filter (0 < q <= 1)')
    a('--buffer_size', type=int, default=512, help='length of each per-class row of the loss buffers')
    a('--buffer_rows', type=str, default='label', choices=BUFFER_ROWS,
      help="denominators from the row of the given class (label) or of the predicted class (pred, the proposal's "
           "last version)")
    a('--score_epochs', type=int, default=3, help='--clean_filter: epochs of the scoring network on the noisy set')
    a('--score_model', type=str, default=None, help='--clean_filter: the scoring network (default: --model)')
    a('--score_cache', type=str, default=None,
      help='--clean_filter: folder of the cached scoring runs (default: save_path), shared by runs on the same data')


def active(kind):
    return kind not in (None, 'none')


def check_args(args):
    check_choice(args.clean_select, SCORES, 'score of --clean_select')
    check_choice(args.clean_filter, SCORES, 'score of --clean_filter')
    if not 0 < args.clean_keep <= 1:
        raise UserError(f'--clean_keep must be in (0, 1], got {args.clean_keep}')
    if args.buffer_size < 1:
        raise UserError(f'--buffer_size must be at least 1, got {args.buffer_size}')
    if args.score_epochs < 1:
        raise UserError(f'--score_epochs must be at least 1, got {args.score_epochs}')
    if args.score_model is not None:
        check_model_name(args.score_model)
    if active(args.clean_select) and args.method not in ('DC', 'DSA'):
        raise UserError(f'--clean_select scores the real batches under the network whose gradients are matched: DC '
                        f'and DSA only, not {args.method}; use --clean_filter {args.clean_select} (offline) instead')


def sample_losses(logits, labels):
    """(l(f(x), y), l(f(x), y_pred), y_pred) per sample from one log-softmax; l_y - l_pred >= 0 exactly."""
    log_p = logits.float().log_softmax(1)
    l_pred, pred = (-log_p).min(1)
    return -log_p.gather(1, labels.unsqueeze(1)).squeeze(1), l_pred, pred


class LossBuffers:
    """One ring buffer row per class of the last `size` (label loss, predicted loss) pairs pushed into it. The
    tensor has one spare column past the ring: pairs that a push overwrites anyway are written there, which keeps
    the push free of host syncs (no boolean indexing)."""

    def __init__(self, num_classes, size, device):
        self.size = size
        self.values = torch.zeros(num_classes, size + 1, 2, device=device)
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)  # pairs ever pushed, per row

    def push(self, rows, l_label, l_pred):
        """Append each pair to its row, in order; all on the device. Of more than `size` pairs for one row only the
        last `size` land in the ring (a ring position is never written twice in one push)."""
        order = torch.argsort(rows, stable=True)
        rows_sorted = rows[order]
        per_row = torch.zeros_like(self.count).index_add_(0, rows, torch.ones_like(rows))
        first = torch.cumsum(per_row, 0) - per_row
        rank = torch.arange(rows.numel(), device=rows.device) - first[rows_sorted]
        slot = (self.count[rows_sorted] + rank) % self.size
        slot = torch.where(rank >= per_row[rows_sorted] - self.size, slot, torch.full_like(slot, self.size))
        self.values[rows_sorted, slot] = torch.stack([l_label, l_pred], 1).to(self.values.dtype)[order]
        self.count += per_row

    def means(self):
        """(num_classes, 2) mean label loss and mean predicted loss of each row (0 for an empty row)."""
        filled = (torch.arange(self.size, device=self.values.device).unsqueeze(0)
                  < self.count.clamp(max=self.size).unsqueeze(1))
        sums = (self.values[:, :self.size] * filled.unsqueeze(2)).sum(1)
        return sums / filled.sum(1, keepdim=True).clamp(min=1)

    def state(self):
        return {'values': self.values, 'count': self.count}

    def load(self, state):
        self.values = state['values'].to(self.values.device).clone()
        self.count = state['count'].to(self.count.device).clone()


def guarded(denominator):
    return denominator.clamp(min=EPS)


def scores(kind, l_label, l_pred, rows, means):
    """The score of each sample (lower looks cleaner). rows: the buffer row of each sample (its given or its
    predicted class); means: LossBuffers.means()."""
    check_choice(kind, SCORES[1:], 'score')
    if kind == 'loss':
        return l_label
    mean_label, mean_pred = means[rows, 0], means[rows, 1]
    if kind == 'score':
        return l_label / guarded(mean_label)
    if kind == 'score2':
        return (l_label - l_pred) / guarded(mean_label)
    return (l_label - l_pred) / guarded(mean_label - mean_pred)


def lowest(values, k):
    """Positions of the k lowest values; ties by position (a stable sort), so the choice is deterministic."""
    return torch.argsort(values, stable=True)[:k]


def buffer_rows_of(kind, labels, pred):
    return labels if kind == 'label' else pred


class OnlineSelector:
    """--clean_select: picks each matched real batch from a larger candidate draw by its score under the network
    being matched (bind), updating the buffers with the candidates' losses first. The picked training indices are
    kept for the pure-rate measurement (labelnoise.end_iteration) and nothing else."""

    def __init__(self, kind, keep, buffer_size, rows, num_classes, device):
        self.kind, self.keep, self.rows = kind, keep, rows
        self.num_classes, self.buffer_size, self.device = num_classes, buffer_size, device
        self.reset()

    def reset(self, state=None):
        self.buffers = LossBuffers(self.num_classes, self.buffer_size, self.device)
        if state is not None:
            self.buffers.load(state)
        self.picked = []

    def state(self):
        return {k: v.detach().cpu().clone() for k, v in self.buffers.state().items()}

    def take_picked(self):
        picked, self.picked = self.picked, []
        return picked

    def candidates(self, batch_real):
        return math.ceil(batch_real / self.keep)

    def bind(self, net):
        """The selection under net: pick(images, indices, c, n) -> the n chosen training indices."""
        def pick(images, indices, c, n):
            with torch.no_grad():
                logits = forward_chunked(net, images)
            labels = torch.full((images.shape[0],), c, dtype=torch.long, device=images.device)
            l_label, l_pred, pred = sample_losses(logits, labels)
            rows = buffer_rows_of(self.rows, labels, pred)
            self.buffers.push(rows, l_label, l_pred)
            chosen = indices[lowest(scores(self.kind, l_label, l_pred, rows, self.buffers.means()), n)]
            self.picked.append(chosen)
            return chosen
        pick.candidates = self.candidates
        return pick


def forward_chunked(net, images):
    """net(images) in the chunks the network runs fastest on (training.batch_chunks)."""
    return torch.cat([net(images[part]) for part in batch_chunks(net, images)])


# ---------------------------------------------------------------------------------------------
# Offline: a scoring network on the noisy training set, cached; per-class selection of the lowest scores
# ---------------------------------------------------------------------------------------------

def score_model(args):
    return args.score_model or args.model


def scoring_cache_path(args, data):
    folder = args.score_cache or args.save_path
    noise = f'{args.noise_type}{args.noise_rate:g}' if args.noise_rate > 0 else 'clean'
    return os.path.join(folder, f'scoring_{data.name}_{noise}_seed{args.seed}_{score_model(args)}_'
                                f'{args.score_epochs}ep_buf{args.buffer_size}.pt')


def train_scoring_network(data, args):
    """--score_epochs of SGD (lr_net, momentum 0.9, weight decay 5e-4, batch 256, no augmentation) on the noisy
    training set, the per-sample losses of each training batch pushed into both kinds of buffers (so the rows hold
    the last epoch's losses); then one pass scores every sample. Returns the per-sample losses, predicted classes and
    both buffers' row means; every draw from streams addressed by (seed, 'score')."""
    device = data.images_train.device
    with rng.seeded(device, args.seed, 'score', 'net'):
        net = get_network(score_model(args), data.channel, data.num_classes, data.im_size, device=device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr_net, momentum=0.9, weight_decay=5e-4)
    rand = NetRandom(rng.derive_seed(args.seed, 'score', 'order'), rng.derive_seed(args.seed, 'score', 'choice'),
                     device)
    by_label = LossBuffers(data.num_classes, args.buffer_size, device)
    by_pred = LossBuffers(data.num_classes, args.buffer_size, device)
    images, labels = data.images_train, data.labels_train
    n = labels.shape[0]
    net.train()
    for _ in tqdm(range(args.score_epochs), desc='scoring network', leave=False, disable=args.quiet):
        order = rand.perm(n)
        for start in range(0, n, SCORE_BATCH):
            idx = order[start:start + SCORE_BATCH]
            optimizer.zero_grad(set_to_none=True)
            logits = backward_mean_loss(net, images[idx], labels[idx])
            optimizer.step()
            l_label, l_pred, pred = sample_losses(logits, labels[idx])
            by_label.push(labels[idx], l_label, l_pred)
            by_pred.push(pred, l_label, l_pred)
    net.eval()
    with torch.no_grad():
        logits = torch.cat([forward_chunked(net, images[s:s + 1024]) for s in range(0, n, 1024)])
    l_label, l_pred, pred = sample_losses(logits, labels)
    return {'l_label': l_label.cpu(), 'l_pred': l_pred.cpu(), 'pred': pred.cpu(),
            'means_label': by_label.means().cpu(), 'means_pred': by_pred.means().cpu(), 'n': n}


def scoring_run(data, args):
    """train_scoring_network's result, cached in score_cache (or save_path) under the dataset, noise settings, seed,
    scoring model, epochs and buffer size, so the cells of a grid on the same noisy data share one scoring run."""
    path = scoring_cache_path(args, data)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.lock', 'w') as lock:  # cells running side by side (noise.py, torchrun) train it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return cached_or_trained_scoring_run(path, data, args)


def cached_or_trained_scoring_run(path, data, args):
    if os.path.isfile(path):
        try:
            run = load_torch_file(path, 'cached scoring run')
            if run['n'] != data.labels_train.shape[0]:
                raise KeyError(f"{run['n']} samples, not {data.labels_train.shape[0]}")
            log(args, f'scoring run loaded from {path}')
            return run
        except (KeyError, TypeError) as e:
            raise UserError(f'cached scoring run {path} does not fit this training set ({short_error(e)}); delete '
                            f'it so it is recomputed') from e
    log(args, f'training the scoring network ({score_model(args)}, {args.score_epochs} epochs) on the noisy '
              f'training set; cached as {path}')
    run = train_scoring_network(data, args)
    save_torch_file_atomic(run, path)
    return run


def offline_scores(run, labels, kind, rows):
    """Every training sample's score from a scoring run."""
    pred = run['pred'].to(labels.device)
    means = (run['means_label'] if rows == 'label' else run['means_pred']).to(labels.device)
    return scores(kind, run['l_label'].to(labels.device), run['l_pred'].to(labels.device),
                  buffer_rows_of(rows, labels, pred), means)


def keep_count(n, keep):
    """How many of a class's n samples the filter keeps: round(keep * n), at least one."""
    return max(1, int(round(keep * n)))


def select_per_class(values, indices_class, keep):
    """Ascending training indices of each class's keep lowest-valued fraction."""
    kept = [idx[lowest(values[idx], keep_count(idx.numel(), keep))] for idx in indices_class if idx.numel()]
    return torch.sort(torch.cat(kept)).values


def offline_filter(data, args):
    """--clean_filter: the training indices kept (ascending)."""
    run = scoring_run(data, args)
    values = offline_scores(run, data.labels_train, args.clean_filter, args.buffer_rows)
    return select_per_class(values, data.indices_class, args.clean_keep)
