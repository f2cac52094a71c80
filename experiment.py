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

from augment import ParamDiffAug, parse_strategy
from base import (UserError, check_choice, get_device, get_rng_state, load_torch_file, log, save_torch_file_atomic,
                  set_rng_state, set_seed)
from data import DATASETS, check_ipc_fits
from networks import MODEL_NAMES
from results import (config_dict, report_results, result_stem, save_results, save_vis, stored_accuracies, summarize,
                     synthetic_sets)
from training import evaluate_models
from utils import EVAL_MODES, get_eval_pool, init_synthetic_set

RESUME_KEYS = ('method', 'dataset', 'model', 'ipc', 'Iteration', 'seed', 'init', 'lr_img', 'batch_real', 'dsa_strategy',
               'dis_metric', 'num_exp', 'feat_epochs', 'forget_epochs')


def evaluate_pool(images, labels, data, args, eval_pool, tag):
    """Accuracies of every model of the pool trained on one set; prints mean and std per model."""
    accs = {}
    for model_eval in eval_pool:
        accs[model_eval] = evaluate_models(images, labels, data, args, model_eval, args.num_eval,
                                           desc=f'{tag} eval {model_eval}')
        a = np.asarray(accs[model_eval])
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


def load_checkpoint(path, args):
    if not os.path.exists(path):
        return None
    ckpt = load_torch_file(path, 'checkpoint', unsafe=getattr(args, 'unsafe_load', False))
    old = ckpt.get('config', {})
    for key in RESUME_KEYS:
        if key in old and old[key] != getattr(args, key, None):
            raise UserError(f"checkpoint '{path}' was written with --{key} {old[key]}, not {getattr(args, key, None)}; "
                            f"rerun with the same flags or without --resume")
    return ckpt


def run_experiments(args, data, init_fn, step_fn=None):
    """num_exp experiments: init_fn(exp) -> (image_syn, label_syn); step_fn(it, image_syn, label_syn, optimizer) -> loss.
    Evaluates on the eval pool at the evaluation iterations, checkpoints every args.checkpoint_every iterations,
    and writes res_*.pt, the vis png and the JSON summary atomically. Returns the summary dict."""
    stem = result_stem(args.method, args.dataset, args.model, args.ipc)
    os.makedirs(args.save_path, exist_ok=True)
    res_path = os.path.join(args.save_path, f'res_{stem}.pt')
    ckpt_path = os.path.join(args.save_path, f'ckpt_{stem}.pt')
    eval_pool = get_eval_pool(args.eval_mode, args.model)
    eval_its = eval_iterations(args) if step_fn is not None else {0}
    iterations = args.Iteration if step_fn is not None else 0

    state = {'exp': 0, 'it': 0, 'data_save': [], 'accs_all_exps': {m: [] for m in eval_pool}, 'history': [],
             'seconds': 0.0}
    ckpt = load_checkpoint(ckpt_path, args) if args.resume else None
    if ckpt is not None:
        state.update({k: ckpt[k] for k in state})
        log(args, f'resuming from {ckpt_path}: experiment {state["exp"]}, iteration {state["it"]}')
    t_start = time.time() - state['seconds']

    for exp in range(state['exp'], args.num_exp):
        if ckpt is not None and ckpt.get('image_syn') is not None and ckpt['exp'] == exp:
            image_syn = ckpt['image_syn'].to(args.device).requires_grad_(True)
            label_syn = ckpt['label_syn'].to(args.device)
            start_it = ckpt['it']
        else:
            set_seed(args.seed + exp)
            image_syn, label_syn = init_fn(exp)
            start_it = 0
        optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5) if step_fn is not None else None
        if ckpt is not None and ckpt.get('optimizer') is not None and ckpt['exp'] == exp:
            optimizer_img.load_state_dict(ckpt['optimizer'])
            set_rng_state(ckpt['rng'])
        ckpt = None
        log(args, f'================== Exp {exp} ==================')
        bar = tqdm(range(start_it, iterations + 1), desc=f'exp {exp}', disable=args.quiet or iterations == 0)
        for it in bar:
            if it in eval_its:
                accs = evaluate_pool(image_syn.detach(), label_syn, data, args, eval_pool, f'exp {exp} iter {it}')
                for m, a in accs.items():
                    state['history'].append({'exp': exp, 'iteration': it, 'model': m, 'accs': a})
                    if it == iterations:
                        state['accs_all_exps'][m] += a
                if args.save_vis:
                    save_vis(os.path.join(args.save_path, f'vis_{stem}_exp{exp}_iter{it}.png'), image_syn,
                             data.mean, data.std, nrow=args.ipc)
            if it == iterations:
                break
            loss = float(step_fn(it, image_syn, label_syn, optimizer_img))
            if not math.isfinite(loss):
                raise UserError(f'the matching loss became {loss} at experiment {exp} iteration {it}; lower --lr_img '
                                f'(results of finished experiments are in {args.save_path})')
            bar.set_postfix(loss=f'{loss:.4f}')
            if args.checkpoint_every > 0 and (it + 1) % args.checkpoint_every == 0 and it + 1 < iterations:
                save_checkpoint(ckpt_path, args, {
                    **state, 'exp': exp, 'it': it + 1, 'seconds': time.time() - t_start,
                    'image_syn': image_syn.detach().cpu(), 'label_syn': label_syn.cpu(),
                    'optimizer': optimizer_img.state_dict(), 'rng': get_rng_state()})
        state['data_save'].append([image_syn.detach().cpu().clone(), label_syn.cpu().clone()])
        state['seconds'] = time.time() - t_start
        save_results(res_path, state['data_save'], state['accs_all_exps'], args, {'seconds': state['seconds']})
        if args.checkpoint_every > 0 and exp + 1 < args.num_exp:
            save_checkpoint(ckpt_path, args, {**state, 'exp': exp + 1, 'it': 0})

    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    return report_results(args, state['accs_all_exps'], args.num_exp, os.path.join(args.save_path, f'res_{stem}.json'),
                          t_start, history=state['history'], res_file=res_path)


def condense(args, data, iteration):
    """Learn num_exp synthetic sets of all classes, initialised by --init, with
    iteration(image_syn, label_syn, optimizer_img, classes) -> loss (one DC/DSA or DM step)."""
    check_ipc_fits(data, args.ipc)
    classes = list(range(data.num_classes))

    def init(exp):
        return init_synthetic_set(data, args.ipc, args.init, args.device)

    def step(it, image_syn, label_syn, optimizer_img):
        return iteration(image_syn, label_syn, optimizer_img, classes)

    return run_experiments(args, data, init, step)


def evaluate_saved(args, data):
    """--load_syn: evaluate every set stored in a res_*.pt on the eval pool, without learning. The accuracies the
    file itself records (the original code stores numpy floats) are shown beside ours and kept in the JSON."""
    obj = load_torch_file(args.load_syn, 'synthetic set', unsafe=args.unsafe_load)
    sets = synthetic_sets(obj, args.load_syn, data.channel, data.im_size, data.num_classes)
    stored = summarize(stored_accuracies(obj))
    for model, s in stored.items():
        log(args, f'the file records {s["n"]} accuracies of {model}: mean = {s["mean"]:.2f}% std = {s["std"]:.2f}%')
    eval_pool = get_eval_pool(args.eval_mode, args.model)
    accs_all = {m: [] for m in eval_pool}
    t_start = time.time()
    for exp, (images, labels) in enumerate(sets):
        set_seed(args.seed + exp)
        accs = evaluate_pool(images.to(args.device), labels.to(args.device), data, args, eval_pool,
                             f'set {exp}')
        for m, a in accs.items():
            accs_all[m] += a
    name = os.path.splitext(os.path.basename(args.load_syn))[0]
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
    a('--dataset', type=str, default=d['dataset'], help='MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100, TinyImageNet')
    a('--model', type=str, default=d['model'], help='network to condense with (see networks.MODEL_NAMES)')
    a('--ipc', type=int, default=d['ipc'], help='images per class')
    a('--eval_mode', type=str, default=d['eval_mode'], help='S SS M B W D A P N (see SPEC)')
    a('--num_exp', type=int, default=d['num_exp'], help='number of experiments')
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
    a('--save_path', type=str, default=d['save_path'], help='results folder')
    a('--eval_every', type=int, default=d['eval_every'], help='evaluation interval for eval_mode S/SS')
    a('--seed', type=int, default=0, help='experiment k uses seed + k; drives every random choice')
    a('--device', type=str, default=None, help='cpu, cuda, cuda:N (default: cuda when available)')
    a('--resume', action='store_true', help='continue from the checkpoint in save_path')
    a('--checkpoint_every', type=int, default=100, help='iterations between checkpoints (0: none)')
    a('--load_syn', type=str, default=None, help='evaluate the sets of a res_*.pt without learning')
    a('--unsafe_load', action='store_true', help='load user files (--load_syn, checkpoints, tinyimagenet.pt) even when '
                                                 'they hold Python objects beyond plain data: only for files you trust')
    a('--no_vis', dest='save_vis', action='store_false', help='do not write vis png grids')
    a('--quiet', action='store_true', help='no progress bars or per-evaluation logs')
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
    return parser


SPEED_FLAG_CHOICES = ('auto', '1', '0')


def check_common_args(args):
    """Validate flags before any data is loaded: every bad value fails in one line."""
    check_choice(args.dataset, list(DATASETS), 'dataset')
    check_choice(args.model, MODEL_NAMES, 'model')
    check_choice(args.eval_mode, EVAL_MODES, 'eval_mode')
    for name in get_eval_pool(args.eval_mode, args.model):
        check_choice(name, MODEL_NAMES, 'model')
    check_choice(args.init, ('noise', 'real'), 'init')
    parse_strategy(args.dsa_strategy)
    for flag in ('ipc', 'num_exp', 'num_eval', 'batch_real', 'batch_train'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    if args.Iteration < 0:
        raise UserError(f'--Iteration must be >= 0, got {args.Iteration}')
    if args.epoch_eval_train is not None and args.epoch_eval_train < 0:
        raise UserError(f'--epoch_eval_train must be >= 0, got {args.epoch_eval_train}')
    if args.load_syn is not None and not os.path.isfile(args.load_syn):
        raise UserError(f"--load_syn file '{args.load_syn}' does not exist")
    args.device = get_device(args.device)
    args.dsa_param = ParamDiffAug()
    return args


def cli(main_fn):
    """Run a script's main; bad input ends in one line on stderr and exit status 2, never a traceback."""
    try:
        main_fn()
    except (UserError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted: rerun with --resume to continue from the last checkpoint', file=sys.stderr)
        sys.exit(130)
