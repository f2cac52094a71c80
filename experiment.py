"""The experiment runner shared by main.py, main_DM.py and the baselines: num_exp experiments of learning (or
selecting) a set, evaluations on the eval pool, checkpoints for --resume, result files; --load_syn evaluation of
stored sets; and the command-line flags every script shares, with their validation."""
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import export
import folders
import labelnoise
import parallel
from augment import ParamDiffAug, parse_strategy
from base import (UserError, check_choice, check_learning_rate, check_writable_folder, load_torch_file, log,
                  save_torch_file_atomic, set_seed)
from data import DATASET_NAMES, check_dataset_args, check_ipc_fits
from networks import check_model_name, get_network, has_batchnorm
from results import (checkpoint_name, config_dict, report_results, result_stem, save_results, save_vis,
                     stored_accuracies, summarize, synthetic_sets, write_progress_summary)
from learning_trace import add_trace_args, check_trace_args, snapshot_keeper, trace_summary
from training import evaluate_models
from utils import EVAL_MODES, get_eval_pool, init_synthetic_set, real_init_indices, team_of

RESUME_KEYS = ('method', 'dataset', 'model', 'ipc', 'Iteration', 'seed', 'init', 'lr_img', 'batch_real', 'dsa_strategy',
               'dis_metric', 'num_exp', 'feat_epochs', 'forget_epochs', 'dsa_condense') + labelnoise.RESUME_KEYS
# Iterations between the checks that the processes of a class split still hold the same synthetic set.
CHECK_EVERY = 10


def evaluate_pool(images, labels, data, args, eval_pool, tag, key, known=None, on_networks=None, partial=None,
                  on_epoch=None):
    """Accuracies of every model of the pool trained on one set; prints mean and std per model. key: (seed,
    experiment, iteration). The (model, network) pairs are spread over the team (torchrun) and gathered in a fixed
    order; each network is addressed by its key, so the accuracies do not depend on the number of processes, nor on
    which of them were known before: known {(model, index): accuracy} are not trained again (a resumed evaluation),
    and on_networks(model, indices, accs) hears of each network (or group) this process finishes. A network trained
    alone keeps going between epochs: on_epoch(model, index, state) hears where it stands, and partial = (model,
    index, state) goes on from there (training.train_and_test's resume), whichever process trains it."""
    known = dict(known or {})
    team = team_of(args)
    mine = team.share((m, k) for m in eval_pool for k in range(args.num_eval) if (m, k) not in known)
    done = {}
    for model_eval in eval_pool:
        indices = [k for m, k in mine if m == model_eval]
        hook = None if on_networks is None else (lambda ks, a, m=model_eval: on_networks(m, ks, a))
        going_on = None if on_epoch is None else (lambda k, st, m=model_eval: on_epoch(m, k, st))
        accs = evaluate_models(images, labels, data, args, model_eval, indices, key, desc=f'{tag} eval {model_eval}',
                               on_group=hook, partial=partial[1:] if partial and partial[0] == model_eval else None,
                               on_epoch=going_on)
        done.update({(model_eval, k): a for k, a in zip(indices, accs)})
    for part in team.gather(done):
        done.update(part)
    done.update(known)
    accs = {m: [done[(m, k)] for k in range(args.num_eval)] for m in eval_pool}
    for model_eval, a in accs.items():
        a = np.asarray(a)
        log(args, f'{tag}: evaluate {len(a)} random {model_eval}, mean = {a.mean():.4f} std = {a.std():.4f}')
    return accs


def eval_iterations(args):
    its = set()
    if args.eval_mode in ('S', 'SS') and args.eval_every > 0:
        its = set(range(0, args.Iteration + 1, args.eval_every))
    its.add(args.Iteration)  # always evaluate the final set (the reference skips it when Iteration % 500 != 0)
    return its


def save_checkpoint(path, args, state):
    save_torch_file_atomic({'config': config_dict(args), **state}, path)


def load_checkpoint(path, args, keys=RESUME_KEYS):
    """The checkpoint at path to go on from with --resume, refused when it was written with other values of `keys`;
    None when there is none, or without --resume: that run starts afresh and overwrites (then deletes) a stopped run's
    checkpoint, hours of work, so it says so even with --quiet (rank 0 only)."""
    if not os.path.exists(path):
        return None
    if not args.resume:
        if parallel.rank() == 0:
            print(f"warning: '{path}' holds a stopped run's progress; this run starts afresh and overwrites it "
                  f"(add --resume to continue from it)", file=sys.stderr)
        return None
    ckpt = load_torch_file(path, 'checkpoint', unsafe=getattr(args, 'unsafe_load', False))
    old = ckpt.get('config', {})
    for key in keys:
        if key in old and old[key] != getattr(args, key, None):
            raise UserError(f"checkpoint '{path}' was written with --{key} {old[key]}, not {getattr(args, key, None)}; "
                            f"rerun with the same flags or without --resume")
    return ckpt


def distribution_mode(args):
    """'single' (one process), 'experiments' (process r runs experiments r, r+N, ...) or 'classes' (all processes on
    one experiment at a time, each with a share of its classes and of its evaluation networks): the latter with
    --dist_classes, or when there are fewer experiments than processes."""
    world = parallel.world_size()
    if world == 1:
        return 'single'
    return 'classes' if getattr(args, 'dist_classes', False) or len(chosen_experiments(args)) < world else 'experiments'


def parse_experiments(spec, num_exp):
    """--experiments: '3', '1-4' or '0,2-3' -> the sorted experiment indices, each within 0..num_exp-1; None -> all."""
    if spec is None:
        return list(range(num_exp))
    chosen = set()
    for part in str(spec).split(','):
        bounds = part.strip().split('-')
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise UserError(f"--experiments takes indices and ranges such as 3, 1-4 or 0,2-3; got '{spec}'")
        first, last = int(bounds[0]), int(bounds[-1])
        if first > last or last >= num_exp:
            raise UserError(f"--experiments '{spec}': every experiment must lie in 0..{num_exp - 1} (--num_exp "
                            f"{num_exp}), ranges written low-high")
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def chosen_experiments(args):
    """The experiments this run does: all of range(num_exp), or the part --experiments names."""
    return parse_experiments(getattr(args, 'experiments', None), args.num_exp)


def format_experiments(indices):
    """[0, 1, 2, 4] -> '0-2,4': the part's name in its result files."""
    runs = []
    for k in indices:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ','.join(str(a) if a == b else f'{a}-{b}' for a, b in runs)


def part_stem(args, stem):
    """The stem of a run's res_*.pt / res_*.json: a part (--experiments) gets its own files, '..._exp1-4', so that
    the parts of one run can share a folder without overwriting each other; checkpoints keep the plain stem."""
    if getattr(args, 'experiments', None) is None:
        return stem
    return f'{stem}_exp{format_experiments(chosen_experiments(args))}'


def run_experiments(args, data, init_fn, step_fn=None):
    """num_exp experiments: init_fn(exp) -> (image_syn, label_syn); step_fn(exp, it, image_syn, label_syn, optimizer)
    -> loss. Evaluates on the eval pool at the evaluation iterations, checkpoints each experiment every
    args.checkpoint_every iterations, and writes res_*.pt, the vis pngs and the JSON summary atomically (rank 0 only
    under torchrun, in experiment order). Returns the summary dict."""
    stem = result_stem(args.method, args.dataset, args.model, args.ipc)
    json_path = os.path.join(args.save_path, f'res_{part_stem(args, stem)}.json')
    os.makedirs(args.save_path, exist_ok=True)
    mode = distribution_mode(args)
    chosen = chosen_experiments(args)
    args.team = parallel.Team(shared=(mode != 'experiments'))
    whole_world = args.team.size == parallel.world_size()  # then every process knows every finished experiment
    main_process = parallel.rank() == 0
    mine = chosen if mode != 'experiments' else chosen[parallel.rank()::parallel.world_size()]
    if mode != 'single':
        log(args, f'{parallel.world_size()} processes split the {mode}')
    t_start = time.time()
    results = {}
    for exp in mine:
        results[exp] = run_experiment(args, data, exp, init_fn, step_fn, stem, writes=main_process or not whole_world,
                                      show=main_process and whole_world)
        if main_process and whole_world:
            accs_so_far = merged_accuracies(results, args)
            save_results(res_path(args, stem), [results[e]['data'] for e in sorted(results)], accs_so_far, args,
                         {'seconds': time.time() - t_start})
            if len(results) < len(chosen):
                write_progress_summary(args, accs_so_far, sorted(results), json_path, t_start)
    for part in parallel.gather_to_all(results if not whole_world else {}):
        results.update(part)
    if main_process and not whole_world:  # what each process kept for rank 0: the sets, their grids and exports
        for exp in sorted(results):
            save_snapshots(args, data, stem, exp, results[exp]['vis'])
            export_set(args, data, exp, results[exp]['data'])
        save_results(res_path(args, stem), [results[e]['data'] for e in sorted(results)],
                     merged_accuracies(results, args), args, {'seconds': time.time() - t_start})
    if main_process:
        remove_checkpoints(args, stem, chosen)
    ordered = [results[e] for e in sorted(results)]
    return report_results(args, merged_accuracies(results, args), len(chosen), json_path, t_start,
                          experiments_run=sorted(results),
                          experiment_seconds=[results[e].get('seconds') for e in sorted(results)],
                          history=[h for r in ordered for h in r['history']],
                          loss_history=[h for r in ordered for h in r['loss_history']],
                          res_file=res_path(args, stem), processes=parallel.world_size(), split=mode,
                          **labelnoise.report_fields(args, ordered), **trace_summary(args))


def res_path(args, stem):
    return os.path.join(args.save_path, f'res_{part_stem(args, stem)}.pt')


def checkpoint_path(args, stem, exp):
    return os.path.join(args.save_path, checkpoint_name(stem, exp))


def remove_checkpoints(args, stem, experiments):
    """The end of a run: its results are written, so the experiments' checkpoints go."""
    for exp in experiments:
        path = checkpoint_path(args, stem, exp)
        if os.path.exists(path):
            os.remove(path)


def merged_accuracies(results, args):
    """{model: accuracies of every finished experiment, in experiment order}."""
    pool = get_eval_pool(args.eval_mode, args.model)
    return {m: [a for e in sorted(results) for a in results[e]['accs'].get(m, [])] for m in pool}


def save_snapshots(args, data, stem, exp, snapshots):
    """The vis grids of an experiment: snapshots are (iteration, images) pairs."""
    for it, images in snapshots:
        save_vis(os.path.join(args.save_path, f'vis_{stem}_exp{exp}_iter{it}.png'), images, data.mean, data.std,
                 nrow=args.ipc)


def export_set(args, data, exp, images_labels):
    """--export_png: a finished experiment's set as PNG files in torchvision's ImageFolder layout."""
    if getattr(args, 'export_png', None):
        images, labels = images_labels
        export.save_image_folder(images, labels, data.class_names, data.mean, data.std,
                                 os.path.join(args.export_png, f'exp{exp}'))


def run_experiment(args, data, exp, init_fn, step_fn, stem, writes, show):
    """One experiment, resumed from its checkpoint with --resume. writes: this process writes its checkpoints;
    show: it writes the vis grids and exports as they come (otherwise they travel in the result to rank 0).
    Returns {'exp', 'data': [images, labels], 'accs': {model: [...]}, 'history', 'loss_history', 'vis', 'seconds'},
    where 'seconds' is the experiment's wall time over all the sessions that ran it (the checkpoint carries the time
    spent before a resume; None when it comes from a checkpoint written before checkpoints kept it)."""
    t_session = time.time()
    eval_pool = get_eval_pool(args.eval_mode, args.model)
    eval_its = eval_iterations(args) if step_fn is not None else {0}
    iterations = args.Iteration if step_fn is not None else 0
    path = checkpoint_path(args, stem, exp)
    ckpt = load_checkpoint(path, args)
    if ckpt is not None and ckpt.get('done'):
        log(args, f'experiment {exp} was finished before: taken from {path}')
        return ckpt['result']
    set_seed(args.seed + exp)  # for code of the user's that draws from the global RNG; none of ours does
    if ckpt is not None:
        image_syn = ckpt['image_syn'].to(args.device).requires_grad_(True)
        label_syn = ckpt['label_syn'].to(args.device)
        start_it, result = ckpt['it'], ckpt['result']
        log(args, f'resuming experiment {exp} from {path} at iteration {start_it}')
    else:
        image_syn, label_syn = init_fn(exp)
        start_it = 0
        result = {'exp': exp, 'accs': {m: [] for m in eval_pool}, 'history': [], 'loss_history': [], 'vis': [],
                  'seconds': 0.0}
    labelnoise.start_experiment(args, result, exp, resumed=ckpt is not None)
    optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5) if step_fn is not None else None
    keeper = snapshot_keeper(args, data, stem, exp, label_syn, start_it, writes) if step_fn is not None else None
    if ckpt is not None and ckpt.get('optimizer') is not None:
        optimizer_img.load_state_dict(ckpt['optimizer'])
    team = team_of(args)
    seconds_before = result.get('seconds')

    def keep_time():
        if seconds_before is not None:
            result['seconds'] = round(seconds_before + time.time() - t_session, 3)
    log(args, f'================== Exp {exp} ==================')
    bar = tqdm(range(start_it, iterations + 1), desc=f'exp {exp}', disable=args.quiet or iterations == 0)
    for it in bar:
        if keeper is not None:
            keeper.observe(it, image_syn)
        if it in eval_its:
            accs = evaluate_pool(image_syn.detach(), label_syn, data, args, eval_pool, f'exp {exp} iter {it}',
                                 (args.seed, exp, it))
            for m, a in accs.items():
                result['history'].append({'exp': exp, 'iteration': it, 'model': m, 'accs': a})
                if it == iterations:
                    result['accs'][m] = a
            if args.save_vis:
                snapshot = (it, image_syn.detach().cpu().clone())
                if show:
                    save_snapshots(args, data, stem, exp, [snapshot])
                else:
                    result['vis'].append(snapshot)
        if it == iterations:
            break
        loss = float(step_fn(exp, it, image_syn, label_syn, optimizer_img))
        if not math.isfinite(loss):
            raise UserError(f'the matching loss became {loss} at experiment {exp} iteration {it}; lower --lr_img '
                            f'(results of finished experiments are in {args.save_path})')
        result['loss_history'].append({'exp': exp, 'iteration': it, 'loss': loss})
        labelnoise.end_iteration(args, result, exp, it, team)
        bar.set_postfix(loss=f'{loss:.4f}')
        if (it + 1) % CHECK_EVERY == 0 or it + 1 == iterations:
            team.check_identical(image_syn, 'synthetic set')
        if writes and args.checkpoint_every > 0 and (it + 1) % args.checkpoint_every == 0 and it + 1 < iterations:
            keep_time()
            save_checkpoint(path, args, {'exp': exp, 'it': it + 1, 'image_syn': image_syn.detach().cpu(),
                                         'label_syn': label_syn.cpu(), 'optimizer': optimizer_img.state_dict(),
                                         'result': result})
    result['data'] = [image_syn.detach().cpu().clone(), label_syn.cpu().clone()]
    keep_time()
    if show:
        export_set(args, data, exp, result['data'])
    if writes and args.checkpoint_every > 0:
        save_checkpoint(path, args, {'exp': exp, 'done': True, 'result': result})
    return result


def condense(args, data, iteration):
    """Learn num_exp synthetic sets of all classes, initialised by --init, with
    iteration(image_syn, label_syn, optimizer_img, classes, key) -> loss (one DC/DSA or DM step), where key =
    (seed, experiment, iteration) addresses every random draw of the step."""
    check_ipc_fits(data, args.ipc)
    if (distribution_mode(args) == 'classes' and args.method == 'DM'
            and has_batchnorm(get_network(args.model, data.channel, data.num_classes, data.im_size, device='cpu'))):
        raise UserError(f'DM with {args.model} cannot split its classes over processes: its BatchNorm statistics must '
                        f'see all classes in one batch (as in the paper); run at least as many experiments as '
                        f'processes (--num_exp), so that the experiments are split instead')
    classes = list(range(data.num_classes))

    def init(exp):
        if args.init == 'real' and labelnoise.measuring(args):
            labelnoise.record_selection(args, exp, real_init_indices(data, args.ipc, (args.seed, exp)))
        return init_synthetic_set(data, args.ipc, args.init, args.device, (args.seed, exp))

    def step(exp, it, image_syn, label_syn, optimizer_img):
        return iteration(image_syn, label_syn, optimizer_img, classes, (args.seed, exp, it))

    return run_experiments(args, data, init, step)


def evaluate_saved(args, data):
    """--load_syn: evaluate every set stored in a res_*.pt on the eval pool, without learning (under torchrun the
    evaluation networks are spread over the processes). The accuracies the file itself records (the original code
    stores numpy floats) are shown beside ours and kept in the JSON; the vis grid of each set is written next to it."""
    obj = load_torch_file(args.load_syn, 'synthetic set', unsafe=args.unsafe_load)
    sets = synthetic_sets(obj, args.load_syn, data.channel, data.im_size, data.num_classes)
    stored = summarize(stored_accuracies(obj))
    for model, s in stored.items():
        log(args, f'the file records {s["n"]} accuracies of {model}: mean = {s["mean"]:.2f}% std = {s["std"]:.2f}%')
    name = os.path.splitext(os.path.basename(args.load_syn))[0]
    if parallel.rank() == 0:
        if getattr(args, 'export_png', None):
            export.save_synthetic_sets(sets, data.class_names, data.mean, data.std, args.export_png)
        if args.save_vis:
            for exp, (images, labels) in enumerate(sets):
                export.save_class_grid(images, labels, data.mean, data.std,
                                       os.path.join(args.save_path, f'vis_{name}_exp{exp}.png'))
    args.team = parallel.Team(shared=True)
    eval_pool = get_eval_pool(args.eval_mode, args.model)
    accs_all = {m: [] for m in eval_pool}
    t_start = time.time()
    for exp, (images, labels) in enumerate(sets):
        set_seed(args.seed + exp)
        accs = evaluate_pool(images.to(args.device), labels.to(args.device), data, args, eval_pool, f'set {exp}',
                             (args.seed, exp, 0))
        for m, a in accs.items():
            accs_all[m] += a
    out = os.path.join(args.save_path, f'eval_{name}_{args.eval_mode}.json')
    summary = report_results(args, accs_all, len(sets), out, t_start, file=os.path.abspath(args.load_syn),
                             stored_results=stored)
    log(args, f'summary written to {out}')
    return summary


def add_common_args(parser, **defaults):
    """Flags every condensation script has; defaults differ per script (SPEC §1)."""
    d = dict(dataset='CIFAR10', model='ConvNet', ipc=1, eval_mode='S', num_exp=5, num_eval=20, epoch_eval_train=None,
             Iteration=1000, lr_img=0.1, lr_net=0.01, batch_real=256, batch_train=256, init='noise', dsa_strategy='None',
             data_path='data', save_path='result', eval_every=500)
    d.update(defaults)
    a = parser.add_argument
    a('--dataset', type=str, default=d['dataset'], help=', '.join(DATASET_NAMES))
    a('--model', type=str, default=d['model'],
      help='network to condense with: a name of networks.MODEL_NAMES or ConvNet_D{depth}_W{width}_{act}_{norm}_{pool}')
    a('--ipc', type=int, default=d['ipc'], help='images per class')
    a('--eval_mode', type=str, default=d['eval_mode'], help='S SS M B W D A P N (see SPEC)')
    a('--num_exp', type=int, default=d['num_exp'], help='number of experiments')
    a('--experiments', type=str, default=None, metavar='LIST',
      help="run only these of the num_exp experiments, e.g. 1-4 or 0,2: each is exactly that experiment of the whole "
           "run, so parts run on other machines or days add up (files res_*_exp1-4.*; report.py joins the parts)")
    a('--num_eval', type=int, default=d['num_eval'], help='networks trained per evaluation')
    a('--epoch_eval_train', type=int, default=d['epoch_eval_train'],
      help='epochs of evaluation training (default: 1000 with augmentation, else 300)')
    a('--Iteration', type=int, default=d['Iteration'], help='learning iterations')
    a('--lr_img', type=float, default=d['lr_img'], help='learning rate of the synthetic images')
    a('--lr_net', type=float, default=d['lr_net'], help='learning rate of network training')
    a('--batch_real', type=int, default=d['batch_real'], help='real images per class per step')
    a('--batch_train', type=int, default=d['batch_train'], help='batch size of network training')
    a('--init', type=str, default=d['init'], help='noise or real: initialisation of the synthetic set')
    a('--dsa_strategy', type=str, default=d['dsa_strategy'], help="DSA ops joined by '_', or None")
    a('--data_path', type=str, default=d['data_path'], help='dataset folder')
    folders.add_folder_args(parser)
    a('--save_path', type=str, default=d['save_path'], help='results folder')
    a('--eval_every', type=int, default=d['eval_every'], help='evaluation interval for eval_mode S/SS')
    a('--seed', type=int, default=0, help='experiment k uses seed + k; drives every random choice')
    a('--device', type=str, default=None, help='cpu, cuda, cuda:N (default: cuda when available)')
    a('--resume', action='store_true', help='continue from the checkpoint in save_path')
    a('--checkpoint_every', type=int, default=100,
      help='iterations between checkpoints (0: none); --method whole keeps each network as it finishes and the '
           'one in training at its last epoch')
    a('--load_syn', type=str, default=None, help='evaluate the sets of a res_*.pt without learning')
    a('--unsafe_load', action='store_true', help='load user files (--load_syn, checkpoints, tinyimagenet.pt) even when '
                                                 'they hold Python objects beyond plain data: only for files you trust')
    a('--no_vis', dest='save_vis', action='store_false', help='do not write vis png grids')
    a('--export_png', type=str, default=None, metavar='DIR',
      help='also write the synthetic images (de-normalised) as PNG files in torchvision ImageFolder layout: '
           'DIR/exp{E}/{NN}_{class}/{k}.png, after learning or for the sets of --load_syn')
    # scale-out (torchrun; README "Many GPUs and many machines")
    a('--dist_classes', action='store_true', help='under torchrun: split the classes of each experiment over the '
                                                 'processes (automatic when there are fewer experiments than processes)')
    a('--dist_timeout', type=int, default=parallel.DEFAULT_TIMEOUT_S,
      help='under torchrun: seconds a process waits for the others before the job ends (a crashed or hung rank)')
    a('--quiet', action='store_true', help='no progress bars or per-evaluation logs')
    labelnoise.add_args(parser)  # --noise_rate, --noise_type, --clean_select/--clean_filter (README "Noisy labels")
    # speed (docs/PERFORMANCE.md): none of these changes results beyond float rounding, except --bf16
    a('--eval_batched', type=str, default='auto', choices=SPEED_FLAG_CHOICES,
      help='train the num_eval networks together with torch.func (models without BatchNorm); auto: on a GPU')
    a('--batched_classes', type=str, default='auto', choices=SPEED_FLAG_CHOICES,
      help='DC/DSA: per-class gradients of all classes in one vmapped computation (models without BatchNorm); '
           'auto: on a GPU')
    a('--channels_last', action='store_true', help='evaluation networks and batches in channels_last memory format '
                                                   '(implies one-by-one evaluation)')
    a('--bf16', action='store_true', help='bfloat16 autocast in evaluation training and test forwards')
    a('--compile', action='store_true', help='torch.compile the evaluation networks (implies one-by-one evaluation; '
                                             'falls back to eager with a warning when unavailable)')
    add_trace_args(parser)  # --grad_stats, --snapshot_every (learning_trace.py)
    return parser


SPEED_FLAG_CHOICES = ('auto', '1', '0')


def check_common_args(args):
    """Validate flags before any data is loaded: every bad value fails in one line."""
    check_dataset_args(args)
    check_model_name(args.model)
    check_choice(args.eval_mode, EVAL_MODES, 'eval_mode')
    for name in get_eval_pool(args.eval_mode, args.model):
        check_model_name(name)
    check_choice(args.init, ('noise', 'real'), 'init')
    labelnoise.check_args(args)
    parse_strategy(args.dsa_strategy)
    for flag in ('ipc', 'num_exp', 'num_eval', 'batch_real', 'batch_train'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    chosen_experiments(args)  # a malformed or out-of-range --experiments fails here, in one line
    if args.Iteration < 0:
        raise UserError(f'--Iteration must be >= 0, got {args.Iteration}')
    if args.epoch_eval_train is not None and args.epoch_eval_train < 0:
        raise UserError(f'--epoch_eval_train must be >= 0, got {args.epoch_eval_train}')
    if args.load_syn is not None and not os.path.isfile(args.load_syn):
        raise UserError(f"--load_syn file '{args.load_syn}' does not exist")
    check_learning_rate(args.lr_img, '--lr_img')
    check_learning_rate(args.lr_net, '--lr_net')
    check_writable_folder(args.save_path, '--save_path')  # fail now, not after hours of learning
    if getattr(args, 'export_png', None):
        check_writable_folder(args.export_png, '--export_png')
    if args.dist_timeout < 1:
        raise UserError(f'--dist_timeout must be at least 1 second, got {args.dist_timeout}')
    check_trace_args(args)
    args.dsa_param = ParamDiffAug()
    # last: under torchrun this joins the other processes, which only valid flags may reach
    args.device = parallel.setup(args.device, args.dist_timeout)
    if parallel.rank() != 0:
        args.quiet = True  # only rank 0 prints and shows progress
    return args


def cli(main_fn):
    """Run a script's main; bad input ends in one line on stderr and exit status 2, never a traceback. Under torchrun
    every process reports its own error line (tagged with its rank): a failing process ends the job, and torchrun
    stops the others."""
    try:
        main_fn()
        parallel.finish()
    except (UserError, ValueError) as e:
        where = f'[rank {parallel.rank()}] ' if parallel.launched() else ''
        print(f'{where}error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted: rerun with --resume to continue from the last checkpoint', file=sys.stderr)
        sys.exit(130)
    finally:
        parallel.shutdown()
