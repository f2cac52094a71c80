"""What a learning run records beyond its result, for the DSA paper's Figures 5 and 6: the norms of the real and
synthetic batches' gradients while matching (--grad_stats ITERS), and the synthetic set every N iterations
(--snapshot_every N) in a file of its own (snap_{stem}_exp{E}.pt, rewritten atomically at each snapshot)."""
import os

import torch

import parallel
from base import UserError, load_torch_file, save_torch_file_atomic
from results import config_dict

LEARNING_METHODS = ('DC', 'DSA', 'DM')


def add_trace_args(parser):
    """--grad_stats and --snapshot_every (called once from experiment.add_common_args)."""
    parser.add_argument('--grad_stats', type=int, nargs='+', default=None, metavar='IT',
                        help='DC/DSA: at these iterations record, per class and outer step, the norm of the gradient '
                             'of the loss on the real batch and on the synthetic batch into the JSON (Figure 5 of '
                             'the DSA paper; report.py --fig5 draws them)')
    parser.add_argument('--snapshot_every', type=int, default=0, metavar='N',
                        help='keep the synthetic set every N iterations (and the last) in save_path/snap_*_exp{E}.pt '
                             '(Figure 6 of the DSA paper; report.py --fig6 draws them); 0: none')


def check_trace_args(args):
    """Fail before any data is loaded: both flags need a learning run of one process."""
    method = getattr(args, 'method', None)
    learns = method in LEARNING_METHODS and not args.load_syn
    if args.snapshot_every < 0:
        raise UserError(f'--snapshot_every must be >= 0, got {args.snapshot_every}')
    if args.snapshot_every and not learns:
        raise UserError(f'--snapshot_every needs a learning run (DC, DSA or DM without --load_syn), not {method}')
    if args.grad_stats is None:
        return
    if method not in ('DC', 'DSA') or args.load_syn:
        raise UserError(f'--grad_stats needs gradient matching (--method DC or DSA without --load_syn), not {method}')
    bad = [it for it in args.grad_stats if not 0 <= it < args.Iteration]
    if bad:
        raise UserError(f'--grad_stats iterations must lie in 0..{args.Iteration - 1} (--Iteration {args.Iteration}), '
                        f'got {bad}')
    if args.resume:
        raise UserError('--grad_stats cannot be combined with --resume: the norms recorded before the checkpoint '
                        'are not in it; rerun without --resume')
    if parallel.launched():
        raise UserError('--grad_stats records the classes of one process; run it without torchrun')


def gradient_norms(grads):
    """Per-class L2 norm of the whole gradient (all matched parameters together): grads is a list over parameters
    of (K, *shape) tensors; returns (K,)."""
    return torch.stack([g.detach().flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()


class GradNormRecorder:
    """The gradient norms of the chosen iterations; tensors are kept on the device and read once at the end, so
    recording adds no host sync to the matching loop."""

    def __init__(self, iterations):
        self.iterations = set(iterations)
        self.pending = []  # (exp, iteration, outer step, classes, real norms, synthetic norms)

    def at(self, key):
        """The recorder of one matching step, key (seed, experiment, iteration, outer step), or None when that
        iteration is not recorded."""
        if key[2] not in self.iterations:
            return None
        return StepRecorder(self, key[1], key[2], key[3])

    def entries(self):
        """JSON rows {'exp', 'iteration', 'outer_step', 'class', 'real', 'syn'}, in recording order."""
        rows = []
        for exp, it, step, classes, real, syn in self.pending:
            for c, r, s in zip(classes, real.tolist(), syn.tolist()):
                rows.append({'exp': exp, 'iteration': it, 'outer_step': step, 'class': c, 'real': r, 'syn': s})
        return rows


class StepRecorder:
    def __init__(self, owner, exp, iteration, outer_step):
        self.owner, self.exp, self.iteration, self.outer_step = owner, exp, iteration, outer_step

    def add(self, classes, gw_real, gw_syn, stacked=False):
        """Record classes' gradients: per-parameter lists, with a leading class dimension when stacked."""
        if not stacked:
            gw_real, gw_syn = [g.unsqueeze(0) for g in gw_real], [g.unsqueeze(0) for g in gw_syn]
        self.owner.pending.append((self.exp, self.iteration, self.outer_step, list(classes),
                                   gradient_norms(gw_real), gradient_norms(gw_syn)))


def grad_recorder(args):
    """The run's recorder (made on first use), or None without --grad_stats."""
    if not getattr(args, 'grad_stats', None):
        return None
    if getattr(args, 'grad_recorder', None) is None:
        args.grad_recorder = GradNormRecorder(args.grad_stats)
    return args.grad_recorder


def step_recorder(args, key):
    """What matching_step passes down to the class losses: a StepRecorder at a recorded iteration, else None."""
    recorder = grad_recorder(args)
    return recorder.at(key) if recorder is not None else None


def trace_summary(args):
    """Extra JSON fields of the run summary: {'grad_stats': rows} with --grad_stats, else {}."""
    recorder = grad_recorder(args)
    return {'grad_stats': recorder.entries()} if recorder is not None else {}


# ---------------------------------------------------------------------------------------------
# Snapshots of the synthetic set (Figure 6)
# ---------------------------------------------------------------------------------------------

def snapshot_path(save_path, stem, exp):
    return os.path.join(save_path, f'snap_{stem}_exp{exp}.pt')


class SnapshotKeeper:
    """The synthetic set at iterations 0, N, 2N, ... and the last, kept in one file per experiment that is
    rewritten atomically after each snapshot (an interruption leaves the previous complete file)."""

    def __init__(self, path, every, last_iteration, labels, mean, std, config, start_it=0, unsafe=False):
        self.path, self.every, self.last = path, every, last_iteration
        self.state = {'config': config, 'iterations': [], 'images': [], 'labels': labels.detach().cpu(),
                      'mean': list(mean), 'std': list(std)}
        if start_it > 0 and os.path.isfile(path):  # --resume: keep what was taken before the checkpoint
            old = load_snapshots(path, unsafe)
            keep = [k for k, it in enumerate(old['iterations']) if it < start_it]
            self.state['iterations'] = [old['iterations'][k] for k in keep]
            self.state['images'] = [old['images'][k] for k in keep]

    def observe(self, it, image_syn):
        if it % self.every and it != self.last:
            return
        self.state['iterations'].append(int(it))
        self.state['images'].append(image_syn.detach().cpu().clone())
        save_torch_file_atomic(self.state, self.path)


def snapshot_keeper(args, data, stem, exp, label_syn, start_it, writes):
    """The experiment's SnapshotKeeper with --snapshot_every on a process that writes files, else None."""
    every = getattr(args, 'snapshot_every', 0)
    if not every or not writes:
        return None
    return SnapshotKeeper(snapshot_path(args.save_path, stem, exp), every, args.Iteration, label_syn, data.mean,
                          data.std, config_dict(args), start_it, getattr(args, 'unsafe_load', False))


def load_snapshots(path, unsafe=False):
    """A snap_*.pt: {'config', 'iterations', 'images' (list of N x C x H x W), 'labels', 'mean', 'std'}, checked."""
    obj = load_torch_file(path, 'snapshot file', unsafe=unsafe)
    keys = ('iterations', 'images', 'labels', 'mean', 'std')
    if not isinstance(obj, dict) or any(k not in obj for k in keys) or len(obj['iterations']) != len(obj['images']):
        raise UserError(f"'{path}' is not a snapshot file of --snapshot_every (expected {', '.join(keys)})")
    if not obj['iterations']:
        raise UserError(f"'{path}' holds no snapshot yet")
    return obj
