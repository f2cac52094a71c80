"""Coreset baselines (random, herding, k-center, forgetting: ipc real training images per class) and the
whole-dataset bound, evaluated by the experiment runner like DC sets."""
import os
import time

import torch
from tqdm import tqdm

import labelnoise
import parallel
import rng
from base import UserError, check_choice, load_torch_file, log, save_torch_file_atomic, set_seed, short_error
from data import check_ipc_fits
from experiment import (RESUME_KEYS, checkpoint_path, chosen_experiments, evaluate_pool, load_checkpoint, part_stem,
                        remove_checkpoints, save_checkpoint)
from networks import get_network
from results import report_results, result_stem, save_results, write_progress_summary
from training import BASELINE_METHODS, backward_mean_loss, embed_chunked
from utils import get_eval_pool

SELECTION_METHODS = tuple(m for m in BASELINE_METHODS if m != 'whole')  # real-image coresets, ipc per class
# picks that depend on the run's one feature network alone, not on the experiment's seed: one set for every experiment
SEEDLESS_METHODS = ('herding', 'kcenter')


BASELINE_BATCH = 256  # batch of the feature / forgetting networks trained on the full set


WHOLE_EPOCHS = 30  # --epoch_eval_train default of --method whole (a full pass is ~N/ipc times longer)
# The flags a whole-bound checkpoint checks: the run's, and those that shape each network's training (--num_eval and
# --eval_mode may change: the networks a resumed run lacks are trained, those it has are kept).
WHOLE_RESUME_KEYS = RESUME_KEYS + ('epoch_eval_train', 'lr_net', 'batch_train', 'im_size', 'channels', 'dsa_eval',
                                   'bf16')
# A whole-bound network takes 2-3 hours on a 2-core CPU: its checkpoint also keeps the network in training, at most
# this many seconds apart (an epoch is minutes on a CPU, a second on a GPU), so a stopped run loses minutes, not hours.
WHOLE_PARTIAL_SECONDS = 60.0


def _check_pick_count(n, ipc):
    if not 1 <= ipc <= n:
        raise ValueError(f'cannot select {ipc} distinct examples out of {n}')


def random_selection(n, ipc, generator):
    """ipc distinct positions out of n, uniformly at random (the DC paper's 'Random'), drawn from generator."""
    _check_pick_count(n, ipc)
    return torch.randperm(n, generator=generator, device=generator.device)[:ipc]


def herding_selection(features, ipc):
    """Greedy herding, the DC authors' rule (their pseudocode, VICO-UoE/DatasetCondensation issue #15): step t adds
    the unselected row nearest to t * mean - (sum of the rows selected so far), i.e. the row that brings the mean
    of the selected rows closest to the mean of all rows. Run on the raw penultimate embeddings, as theirs is (no
    scaling to unit length, unlike iCaRL's). features: (n, d). Returns ipc distinct positions in pick order."""
    n = features.shape[0]
    _check_pick_count(n, ipc)
    target = features.mean(0)
    total = torch.zeros_like(target)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    picks = []
    for t in range(1, ipc + 1):
        # squared distance to the target of the mean after adding each candidate, all candidates at once
        dist = ((total + features) / t - target).pow(2).sum(1).masked_fill(taken, float('inf'))
        i = torch.argmin(dist)
        picks.append(i)
        taken[i] = True
        total = total + features[i]
    return torch.stack(picks)


def _distances_to(features, point):
    # the direct formula, not the matmul expansion: exact, so hand-made ties and zeros stay exact
    return torch.cdist(features, point.unsqueeze(0), compute_mode='donot_use_mm_for_euclid_dist').squeeze(1)


def kcenter_selection(features, ipc):
    """Greedy k-center (farthest-point) selection: start from the row closest to the mean, then repeatedly add
    the row farthest from everything selected so far. features: (n, d). Returns ipc distinct positions in pick order."""
    _check_pick_count(features.shape[0], ipc)
    first = torch.argmin(_distances_to(features, features.mean(0)))
    min_dist = _distances_to(features, features[first])
    taken = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    taken[first] = True
    picks = [first]
    for _ in range(ipc - 1):
        i = torch.argmax(min_dist.masked_fill(taken, -1.0))  # -1: duplicates at distance 0 are still pickable
        picks.append(i)
        taken[i] = True
        min_dist = torch.minimum(min_dist, _distances_to(features, features[i]))
    return torch.stack(picks)


def forgetting_counts(correct_history):
    """Forgetting events per example: how often it goes from correctly classified at one epoch to incorrectly
    classified at the next. correct_history: (epochs, N) bool. Returns (N,) int64."""
    h = torch.as_tensor(correct_history, dtype=torch.bool)
    return (h[:-1] & ~h[1:]).sum(0, dtype=torch.long)


def forgetting_selection(counts, ipc, generator):
    """The ipc most-forgotten positions; ties broken at random (a random order from generator, then a stable sort by
    count)."""
    _check_pick_count(counts.numel(), ipc)
    perm = torch.randperm(counts.numel(), generator=generator, device=counts.device)
    order = torch.argsort(counts[perm], descending=True, stable=True)
    return perm[order[:ipc]]


def train_full_set(net, data, epochs, lr, batch_size=BASELINE_BATCH, desc='train', quiet=False):
    """Plain SGD (momentum 0.9, wd 5e-4, no augmentation) on the whole training set.

    Returns the (epochs, N) bool record of whether each example was classified correctly in its own training
    forward pass of each epoch; it stays on the device."""
    images, labels = data.images_train, data.labels_train
    n = labels.shape[0]
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    correct = torch.zeros(epochs, n, dtype=torch.bool, device=labels.device)
    net.train()
    for ep in tqdm(range(epochs), desc=desc, leave=False, disable=quiet):
        order = torch.randperm(n, device=labels.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            out = backward_mean_loss(net, images[idx], labels[idx])
            optimizer.step()
            correct[ep, idx] = out.argmax(1) == labels[idx]
    return correct


def _forked_rng(device):
    """Context in which the global torch RNG may be reseeded: the CPU and CUDA states are restored on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.device(device).type == 'cuda' else []
    return torch.random.fork_rng(devices=devices)


def featnet_path(args, dataset, seed):
    return os.path.join(args.save_path, f'featnet_{dataset}_{args.model}_{args.feat_epochs}ep_seed{seed}'
                                        f'{labelnoise.file_tag(args)}.pt')


def feature_net(data, args, seed):
    """A --model network trained on the full training set for --feat_epochs epochs, in eval mode.

    Cached as a state dict in save_path (featnet_{dataset}_{model}_{epochs}ep_seed{seed}.pt) and reused by the
    herding and k-center runs. It is built and trained from torch seed `seed` inside a forked RNG, so the
    network depends only on its file name and the caller's random stream is the same whether or not the cache
    existed (delete the file after changing --lr_net or the data)."""
    path = featnet_path(args, data.name, seed)
    with _forked_rng(args.device):
        torch.manual_seed(seed)
        net = get_network(args.model, data.channel, data.num_classes, data.im_size, device=args.device)
        if os.path.isfile(path):
            try:
                net.load_state_dict(load_torch_file(path, 'cached feature network'))
            except (RuntimeError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"cached feature network {path} does not fit --model {args.model} on {data.name} "
                                f"({short_error(e)}); delete it so it is retrained") from e
            log(args, f'feature network loaded from {path}')
        else:
            log(args, f'training the feature network ({args.model}, {args.feat_epochs} epochs, seed {seed})')
            train_full_set(net, data, args.feat_epochs, args.lr_net, desc='feature net', quiet=args.quiet)
            save_torch_file_atomic({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
    return net.eval()


def forgetting_path(args, dataset, seed):
    return os.path.join(args.save_path, f'forgetting_{dataset}_{args.model}_{args.forget_epochs}ep_seed{seed}.pt')


def forgetting_statistics(data, args, seed):
    """Forgetting events of every training image over --forget_epochs epochs of a --model network trained on the
    full set from stream (seed, 'forgetting'). Cached in save_path (forgetting_{dataset}_{model}_{epochs}ep_seed
    {seed}.pt, a (N,) int64 tensor) and shared by the experiments and ipcs of a run, like the feature network:
    full-set training is most of a forgetting run's cost on a CPU."""
    path = forgetting_path(args, data.name, seed)
    n = data.labels_train.shape[0]
    if os.path.isfile(path):
        counts = load_torch_file(path, 'cached forgetting statistics')
        if not (isinstance(counts, torch.Tensor) and counts.shape == (n,)):
            raise UserError(f'cached forgetting statistics {path} do not fit the {n} training images of {data.name}; '
                            f'delete the file so they are recomputed')
        log(args, f'forgetting statistics loaded from {path}')
        return counts.to(data.labels_train.device)
    log(args, f'counting forgetting events ({args.model}, {args.forget_epochs} epochs, seed {seed})')
    counts = forgetting_counts(forgetting_history(data, args, seed, args.forget_epochs, quiet=args.quiet))
    save_torch_file_atomic(counts.cpu(), path)
    return counts


def forgetting_history(data, args, seed, epochs, quiet):
    """The (epochs, N) correctness record of the forgetting network: a --model network trained on the full set from
    stream (seed, 'forgetting'), its initialisation and batch orders."""
    with rng.seeded(args.device, seed, 'forgetting'):
        net = get_network(args.model, data.channel, data.num_classes, data.im_size, device=args.device)
        return train_full_set(net, data, epochs, args.lr_net, desc='forgetting', quiet=quiet)


def forgetting_picks(data, counts, ipc, seed):
    """Per class, the ipc most-forgotten training images by per-image counts (ties from stream (seed,
    'forgetting', class)); training-set indices, classes in order."""
    return torch.cat([idx[forgetting_selection(counts[idx], ipc, rng.generator(idx.device, seed, 'forgetting', c))]
                      for c, idx in enumerate(data.indices_class)])


@torch.inference_mode()
def embed_images(net, images, indices, batch_size=1024):
    """net.embed of images[indices], in batches, on the images' device."""
    return torch.cat([embed_chunked(net, images[indices[start:start + batch_size]])
                      for start in range(0, indices.shape[0], batch_size)])


def select_coreset(method, data, args, seed):
    """Training-set indices of a coreset: args.ipc per class, classes in order. The feature network of
    herding/k-center and the forgetting statistics are trained once per run, from --seed (args.seed), and cached, as
    the DC paper extracts features from one network trained on the whole set; `seed` (the experiment's) addresses
    the random picks and the tie-breaks of each class."""
    check_choice(method, SELECTION_METHODS, 'coreset method')
    check_ipc_fits(data, args.ipc)
    if method == 'forgetting':
        return forgetting_picks(data, forgetting_statistics(data, args, args.seed), args.ipc, seed)
    net = feature_net(data, args, args.seed) if method in ('herding', 'kcenter') else None
    picks = []
    for c, idx in enumerate(data.indices_class):
        if method == 'random':
            pos = random_selection(idx.numel(), args.ipc, rng.generator(idx.device, seed, 'random', c))
        else:  # herding / kcenter: on the feature network's raw penultimate embeddings
            select = herding_selection if method == 'herding' else kcenter_selection
            pos = select(embed_images(net, data.images_train, idx).float(), args.ipc)
        picks.append(idx[pos])
    return torch.cat(picks)


def coreset(method, data, args, seed):
    """(images, labels) of a coreset: the dataset's own normalised tensors, ipc per class in class order."""
    indices = select_coreset(method, data, args, seed)
    return data.images_train[indices], data.labels_train[indices]


def run_whole(args, data):
    """The 'whole dataset' bound: each model of the eval pool trained num_eval times per experiment on the full
    training set with the evaluation protocol (evaluate_pool), reported like run_experiments. res_whole_*.pt keeps
    'accs_all_exps' and an empty 'data' (the set is the training set itself). Under torchrun the networks of each
    evaluation are spread over the processes. Each network takes an hour or more on a CPU, so each experiment has a
    checkpoint (ckpt_whole_*_exp{E}.pt, unless --checkpoint_every 0) that keeps every network as it finishes (under
    torchrun: those of rank 0, and all of them at the experiment's end) and the one in training at its last epoch
    (WHOLE_PARTIAL_SECONDS apart); --resume trains only the networks it lacks, the stopped one from that epoch, which
    are the same networks (addressed by seed, experiment, model and index) as in a run never stopped.
    Returns the summary dict."""
    args.team = parallel.Team(shared=True)
    stem = result_stem(args.method, args.dataset, args.model, args.ipc)
    res_path = os.path.join(args.save_path, f'res_{part_stem(args, stem)}.pt')
    json_path = os.path.join(args.save_path, f'res_{part_stem(args, stem)}.json')
    eval_pool = get_eval_pool(args.eval_mode, args.model)
    accs_all_exps, history, seconds = {m: [] for m in eval_pool}, [], []
    chosen, done = chosen_experiments(args), []
    t_start = time.time()
    for exp in chosen:
        set_seed(args.seed + exp)
        log(args, f'================== Exp {exp} ==================')
        accs, exp_seconds = whole_experiment(args, data, eval_pool, stem, exp)
        seconds.append(exp_seconds)
        for m, a in accs.items():
            accs_all_exps[m] += a
            history.append({'exp': exp, 'iteration': 0, 'model': m, 'accs': a})
        if parallel.rank() == 0:
            save_results(res_path, [], accs_all_exps, args, {'seconds': time.time() - t_start})
        done.append(exp)
        if len(done) < len(chosen):
            write_progress_summary(args, accs_all_exps, done, json_path, t_start)
    if parallel.rank() == 0:
        remove_checkpoints(args, stem, chosen)
    return report_results(args, accs_all_exps, len(chosen), json_path, t_start, history=history, res_file=res_path,
                          experiments_run=chosen, experiment_seconds=seconds,
                          **labelnoise.report_fields(args, []))


def going_on(args, kept, known):
    """(model, index, state) of the network a whole-bound checkpoint kept in training, or None: none was kept, it
    finished since, or it was trained on another kind of device (whose random streams this one cannot take up: it is
    trained again from its start, the same network)."""
    if not kept or (kept['model'], kept['index']) in known:
        return None
    if kept.get('device') != torch.device(args.device).type:
        log(args, f"network {kept['index']} of {kept['model']} was stopped in training on {kept.get('device')}: "
                  f"on {args.device} it starts again")
        return None
    return kept['model'], kept['index'], kept['state']


def whole_experiment(args, data, eval_pool, stem, exp):
    """One experiment of the whole-dataset bound, resumed from its checkpoint with --resume: ({model: accuracies},
    the experiment's seconds over all the sessions that trained its networks)."""
    t_session = time.time()
    path = checkpoint_path(args, stem, exp)
    ckpt = load_checkpoint(path, args, WHOLE_RESUME_KEYS) or {}
    known = {(m, k): a for m, accs in ckpt.get('networks', {}).items() for k, a in accs.items()}
    seconds = lambda: round(ckpt.get('seconds', 0.0) + time.time() - t_session, 3)  # over the sessions so far
    partial = going_on(args, ckpt.get('partial'), known)
    if ckpt:
        log(args, f'resuming experiment {exp} from {path}: {len(known)} network(s) trained before'
                  + (f'; network {partial[1]} of {partial[0]} goes on from epoch {partial[2]["epoch"]} of its '
                     f'{partial[2]["epochs"] + 1}' if partial else ''))
    writes = parallel.rank() == 0 and args.checkpoint_every > 0
    last_write = time.time()

    def keep(networks, in_training=None):
        by_model = {}
        for (m, k), a in sorted(networks.items()):
            by_model.setdefault(m, {})[k] = float(a)
        extra = {} if in_training is None else {'partial': in_training}
        nonlocal last_write
        save_checkpoint(path, args, {'exp': exp, 'networks': by_model, 'seconds': seconds(), **extra})
        last_write = time.time()

    def finished(model, indices, accs):
        known.update({(model, k): a for k, a in zip(indices, accs)})
        if writes:
            keep(known)

    def epoch_done(model, k, state):
        if time.time() - last_write >= WHOLE_PARTIAL_SECONDS:
            keep(known, {'model': model, 'index': k, 'device': torch.device(args.device).type, 'state': state()})
    accs = evaluate_pool(data.images_train, data.labels_train, data, args, eval_pool, f'exp {exp} whole',
                         (args.seed, exp, 0), known=known, on_networks=finished, partial=partial,
                         on_epoch=epoch_done if writes else None)
    if writes:  # every process's networks, now gathered
        keep({(m, k): a for m, a_m in accs.items() for k, a in enumerate(a_m)})
    return accs, seconds()
