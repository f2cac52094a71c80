"""Continual-learning benchmark of the DM paper: class-incremental learning with a memory of ipc images per class.

The classes are split into --steps groups in a random class order (numpy seeds 0..4). At step s a fresh network is
trained on the memories of steps 0..s and tested on the test images of every class seen so far.

    python CL_DM.py --dataset CIFAR100 --model ConvNet --steps 5 --method random          # real images, no file
    python CL_DM.py --dataset CIFAR100 --model ConvNet --steps 5 --method DM              # published memories
    python CL_DM.py --dataset CIFAR100 --model ConvNet --steps 5 --method DM --build      # build them, then evaluate

Memories (herding, DSA, DM) are read from data_path/metasets/cl_data/{cl_herding_,cl_res_DSA_,cl_DM_}
{dataset}_{model}_{ipc}ipc_{steps}steps_seed{K}.pt: a dict whose 'data' is a list over steps of [images, labels].
"""
import argparse
import dataclasses
import os
import shlex
import time
import types

import numpy as np
import torch
from tqdm import tqdm

import base
import coreset
import parallel
import results
import rng
import training
import utils
from augment import parse_strategy
from base import UserError
import folders
from data import (DATASET_NAMES, check_dataset_args, check_ipc_fits, class_indices, dataset_info_for,
                  load_dataset_for)
from experiment import cli
from networks import check_model_name, get_network

METHODS = ('random', 'herding', 'DSA', 'DM')
BUILT_METHODS = ('herding', 'DSA', 'DM')
FILE_PREFIX = {'herding': 'cl_herding_', 'DSA': 'cl_res_DSA_', 'DM': 'cl_DM_'}
MEMORY_DIR = os.path.join('metasets', 'cl_data')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a('--method', type=str, default='random', help=f"memory: {', '.join(METHODS)}")
    a('--dataset', type=str, default='CIFAR100', help=', '.join(DATASET_NAMES))
    a('--model', type=str, default='ConvNet', help='network that builds the memories and is evaluated')
    a('--ipc', type=int, default=20, help='memory images per class')
    a('--steps', type=int, default=5, help='number of class-incremental steps (a divisor of the number of classes)')
    a('--num_eval', type=int, default=3, help='networks trained per class order and step')
    a('--num_orders', type=int, default=5, help='class orders evaluated (numpy seeds 0..num_orders-1; the paper: 5)')
    a('--epoch_eval_train', type=int, default=1000, help='epochs of evaluation training')
    a('--lr_net', type=float, default=0.01, help='learning rate of network training')
    a('--batch_train', type=int, default=256, help='batch size of network training')
    a('--dsa_strategy', type=str, default=None,
      help='DSA augmentation of evaluation and condensation (default: color_crop_cutout_flip_scale_rotate, '
           'no flip on MNIST/SVHN)')
    a('--data_path', type=str, default='./../data', help='dataset folder; memories live in data_path/metasets/cl_data')
    folders.add_folder_args(parser)
    a('--save_path', type=str, default='result', help='folder of the JSON summary')
    a('--seed', type=int, default=0, help='class order K draws its random choices from seed + K')
    a('--device', type=str, default=None, help='cpu, cuda, cuda:N (default: cuda when available)')
    a('--quiet', action='store_true', help='no progress bars or per-step logs')
    a('--unsafe_load', action='store_true', help='load memory files even when they hold Python objects beyond plain '
                                                 'data: only for files you trust')
    b = parser.add_argument_group('building memories (--method herding, DSA or DM)')
    b.add_argument('--build', action='store_true', help='build the missing memory files, then evaluate')
    b.add_argument('--build_only', action='store_true', help='build the missing memory files and stop')
    b.add_argument('--overwrite', action='store_true', help='with --build: rebuild files that already exist')
    b.add_argument('--feat_epochs', type=int, default=10,
                   help="herding: epochs of the feature network trained on each step's real images")
    b.add_argument('--Iteration_dsa', type=int, default=1000, help='DSA iterations per step')
    b.add_argument('--Iteration_dm', type=int, default=20000, help='DM iterations per step')
    b.add_argument('--lr_img', type=float, default=None, help='learning rate of the images (default: DSA 0.1, DM 1)')
    b.add_argument('--batch_real', type=int, default=256, help='real images per class per matching step')
    b.add_argument('--dis_metric', type=str, default='ours', help='DSA gradient distance: ours, mse or cos')
    b.add_argument('--outer_loop', type=int, default=None, help='DSA: override the outer loop of the ipc table')
    b.add_argument('--inner_loop', type=int, default=None, help='DSA: override the inner loop of the ipc table')
    b.add_argument('--class_chunk', type=int, default=0, help='DM: classes optimised at once (0: automatic)')
    return parser.parse_args(argv)


def check_args(args):
    """Validate every flag before any data is loaded, so a bad value fails in one line."""
    base.check_choice(args.method, METHODS, 'method')
    check_dataset_args(args)
    check_model_name(args.model)
    base.check_choice(args.dis_metric, utils.METRICS, 'dis_metric')
    for flag in ('ipc', 'steps', 'num_eval', 'num_orders', 'batch_train', 'batch_real'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    for flag in ('epoch_eval_train', 'feat_epochs', 'Iteration_dsa', 'Iteration_dm', 'class_chunk'):
        if getattr(args, flag) < 0:
            raise UserError(f'--{flag} must be >= 0, got {getattr(args, flag)}')
    num_classes = dataset_info_for(args)['num_classes']
    if num_classes % args.steps:
        raise UserError(f'--steps {args.steps} does not divide the {num_classes} classes of {args.dataset}')
    if args.dsa_strategy in (None, ''):
        args.dsa_strategy = training.default_dsa_strategy(args.dataset)
    parse_strategy(args.dsa_strategy)
    args.build = args.build or args.build_only
    if args.build and args.method not in BUILT_METHODS:
        raise UserError(f'--build makes memory files for {", ".join(BUILT_METHODS)}; --method {args.method} '
                        f'draws its memories at evaluation time and needs none')
    if args.build and args.method == 'DSA':
        utils.get_loops(args.ipc, args.outer_loop, args.inner_loop)  # an ipc outside the paper's table fails here
    if args.lr_img is None:
        args.lr_img = 1.0 if args.method == 'DM' else 0.1
    base.check_learning_rate(args.lr_img, '--lr_img')
    base.check_learning_rate(args.lr_net, '--lr_net')
    base.check_writable_folder(args.save_path, '--save_path')
    if args.build:
        base.check_writable_folder(os.path.join(args.data_path, MEMORY_DIR), 'memory (--data_path/metasets/cl_data)')
    args.dsa_param = utils.ParamDiffAug()
    args.device = parallel.setup(args.device)  # last: under torchrun only valid flags reach the other processes
    if parallel.rank() != 0:
        args.quiet = True
    return args


# ---------------------------------------------------------------------------------------------
# Class orders, steps and test sets
# ---------------------------------------------------------------------------------------------

def class_order(seed_cl, num_classes):
    """The reference's order: np.random.seed(seed_cl); np.random.permutation(num_classes). A private RandomState
    gives the identical permutation without touching the global numpy RNG."""
    return np.random.RandomState(seed_cl).permutation(num_classes)


def step_classes(order, steps, step):
    """The classes introduced at `step` (a list of ints, in class-order order)."""
    per_step = len(order) // steps
    return [int(c) for c in order[step * per_step:(step + 1) * per_step]]


def seen_test_set(images_test, labels_test, seen):
    """The test images and labels of the classes in `seen` (one mask, on the device of the labels)."""
    seen = torch.as_tensor(seen, dtype=labels_test.dtype, device=labels_test.device)
    mask = torch.isin(labels_test, seen)
    return images_test[mask], labels_test[mask]


# ---------------------------------------------------------------------------------------------
# Memory files
# ---------------------------------------------------------------------------------------------

def memory_path(data_path, method, dataset, model, ipc, steps, seed_cl):
    name = f'{FILE_PREFIX[method]}{dataset}_{model}_{ipc}ipc_{steps}steps_seed{seed_cl}.pt'
    return os.path.join(data_path, MEMORY_DIR, name)


def build_command(args):
    """The command line that builds the memory files of this run."""
    parts = ['python', 'CL_DM.py', '--method', args.method, '--dataset', args.dataset, '--model', args.model,
             '--ipc', str(args.ipc), '--steps', str(args.steps), '--data_path', args.data_path,
             *folders.folder_flags(args)]
    if args.num_orders != 5:
        parts += ['--num_orders', str(args.num_orders)]
    return ' '.join(shlex.quote(p) for p in parts + ['--build'])


def missing_file_error(path, args):
    return UserError(f"memory file {path} does not exist; build it with: {build_command(args)} "
                     f"(or put the published file there)")


def check_memory(obj, path, order, steps, data):
    """The list over steps of (images, labels) of a memory file in the published structure, checked against the
    dataset and the class order: step s may only hold the classes introduced at step s."""
    where = f"memory file {path} is not in the published structure"
    entries = obj.get('data') if isinstance(obj, dict) else None
    if not isinstance(entries, (list, tuple)):
        raise UserError(f"{where} (expected a dict whose 'data' is a list over steps of [images, labels])")
    if len(entries) != steps:
        raise UserError(f"memory file {path} holds {len(entries)} steps, not --steps {steps}; check --steps")
    if 'class_order' in obj and [int(c) for c in obj['class_order']] != [int(c) for c in order]:
        raise UserError(f"memory file {path} was built for another class order; rebuild it with --build --overwrite")
    memory = []
    for s, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not all(torch.is_tensor(t) for t in entry[:2]):
            raise UserError(f"{where} (step {s} is not [images, labels])")
        images, labels = entry[0].detach().float(), entry[1].long()
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"{where} (step {s}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not "
                            f"form N x C x H x W and N)")
        if images.shape[1] != data.channel or tuple(images.shape[2:]) != tuple(data.im_size):
            raise UserError(f"memory file {path} holds {tuple(images.shape[1:])} images but {data.name} has "
                            f"{(data.channel, *data.im_size)}; check --dataset")
        allowed = torch.as_tensor(step_classes(order, steps, s), dtype=torch.long)
        stray = labels[~torch.isin(labels, allowed)].unique()
        if stray.numel():
            raise UserError(f"memory file {path}: step {s} holds classes {stray.tolist()[:5]} that this class order "
                            f"introduces at another step; the file does not belong to --steps {steps} of {data.name}")
        memory.append((images, labels))
    return memory


def load_memory(path, order, steps, data, unsafe=False):
    return check_memory(base.load_torch_file(path, 'continual-learning memory', unsafe=unsafe), path, order, steps, data)


# ---------------------------------------------------------------------------------------------
# Building memories: random, herding, DSA, DM on the classes of one step
# ---------------------------------------------------------------------------------------------

def real_images(data, classes, ipc, key):
    """ipc random training images of each class, class after class, with their (original) labels; class c's draw
    is addressed by (key, c)."""
    images = torch.cat([utils.sample_class_images(data, c, ipc, utils.class_generator(data, key, 'memory', c))
                        for c in classes])
    labels = torch.as_tensor(classes, device=images.device).repeat_interleave(ipc)
    return images, labels


def condense_args(args, method):
    """The namespace utils.dc_iteration / utils.dm_iteration read, for one method."""
    return types.SimpleNamespace(method=method, model=args.model, dsa_strategy=args.dsa_strategy,
                                 dsa_param=args.dsa_param, lr_net=args.lr_net, batch_real=args.batch_real,
                                 batch_train=args.batch_train, dis_metric=args.dis_metric, quiet=args.quiet)


def condense_step(data, classes, args, key, desc=''):
    """DSA (gradient matching) or DM (distribution matching) on the classes of one step only, from real images.
    key: (seed, class order, step); iteration it draws from (key, it)."""
    image_syn, label_syn = real_images(data, classes, args.ipc, key)
    image_syn = image_syn.detach().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
    cargs = condense_args(args, args.method)
    if args.method == 'DSA':
        outer_loop, inner_loop = utils.get_loops(args.ipc, args.outer_loop, args.inner_loop)
        iterations = args.Iteration_dsa

        def step(it):
            return utils.dc_iteration(image_syn, label_syn, optimizer, data, cargs, classes, outer_loop, inner_loop,
                                      key + (it,))
    else:
        iterations = args.Iteration_dm

        def step(it):
            return utils.dm_iteration(image_syn, label_syn, optimizer, data, cargs, classes, key + (it,),
                                      args.class_chunk or None)
    bar = tqdm(range(iterations), desc=desc, leave=False, disable=args.quiet)
    for it in bar:
        loss = float(step(it))
        if not np.isfinite(loss):
            raise UserError(f'the matching loss became {loss} at iteration {it} ({desc}); lower --lr_img')
        bar.set_postfix(loss=f'{loss:.4f}')
    return image_syn.detach(), label_syn


def herding_step(data, classes, args, key, desc=''):
    """Herding (coreset.herding_selection) of ipc real images per class of one step, in the embedding of a --model
    network trained for --feat_epochs epochs on the real images of this step's classes only, so that no class of a
    later step influences the memory. Returns the dataset's own tensors with their original labels."""
    idx = torch.cat([data.indices_class[c] for c in classes])
    labels = data.labels_train[idx]
    step_data = dataclasses.replace(data, images_train=data.images_train[idx], labels_train=labels,
                                    indices_class=class_indices(labels, data.num_classes))
    with rng.seeded(args.device, *key, 'herding'):  # the feature network's initialisation and batch orders
        net = get_network(args.model, data.channel, data.num_classes, data.im_size, device=args.device)
        coreset.train_full_set(net, step_data, args.feat_epochs, args.lr_net, batch_size=args.batch_train,
                               desc=f'{desc} features', quiet=args.quiet)
    net.eval()
    picks = []
    for c in classes:
        features = coreset.embed_images(net, data.images_train, data.indices_class[c]).float()
        picks.append(data.indices_class[c][coreset.herding_selection(features, args.ipc)])
    picks = torch.cat(picks)
    return data.images_train[picks], data.labels_train[picks]


def build_memory(data, order, args, seed_cl):
    """The memory of one class order: a list over steps of (images, labels) on the CPU."""
    memory = []
    for s in range(args.steps):
        classes = step_classes(order, args.steps, s)
        desc = f'{args.method} order {seed_cl} step {s + 1}/{args.steps}'
        key = (args.seed, seed_cl, s)
        if args.method == 'herding':
            images, labels = herding_step(data, classes, args, key, desc)
        else:
            images, labels = condense_step(data, classes, args, key, desc)
        memory.append((images.cpu().clone(), labels.cpu().clone()))
    return memory


def build_memories(data, args):
    """Write each missing memory file of the run (every one with --overwrite), one class order at a time, atomically.
    Under torchrun the class orders are spread over the processes; each writes the files of its orders."""
    for seed_cl in parallel.Team(shared=True).share(range(args.num_orders)):
        path = memory_path(args.data_path, args.method, args.dataset, args.model, args.ipc, args.steps, seed_cl)
        if os.path.exists(path) and not args.overwrite:
            base.log(args, f'{path} exists: kept (pass --overwrite to rebuild it)')
            continue
        order = class_order(seed_cl, data.num_classes)
        t0 = time.time()
        memory = build_memory(data, order, args, seed_cl)
        unrelated = ('build', 'build_only', 'overwrite', 'quiet', 'save_path', 'num_eval', 'epoch_eval_train')
        config = {k: v for k, v in results.config_dict(args).items() if k not in unrelated}
        base.save_torch_file_atomic({'data': [[images, labels] for images, labels in memory],
                                      'class_order': [int(c) for c in order], 'config': config,
                                      'seconds': round(time.time() - t0, 3)}, path)
        base.log(args, f'wrote {path} ({time.time() - t0:.1f} s)')


def random_memory(data, order, steps, ipc, key):
    """The baseline memory: ipc random real images of each class of each step, addressed by (key, step, class)."""
    return [real_images(data, step_classes(order, steps, s), ipc, key + (s,)) for s in range(steps)]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def evaluate_order(memory, order, data, args, seed_cl):
    """Per step s: the num_eval test accuracies of fresh networks trained on memories 0..s and tested on the classes
    seen so far, and the (train, test) set sizes."""
    accs, sizes = [], []
    for s in range(args.steps):
        images = torch.cat([m[0] for m in memory[:s + 1]]).to(args.device)
        labels = torch.cat([m[1] for m in memory[:s + 1]]).to(args.device)
        seen = order[:(s + 1) * (len(order) // args.steps)]
        images_test, labels_test = seen_test_set(data.images_test, data.labels_test, seen)
        step_accs = []
        bar = tqdm(range(args.num_eval), desc=f'eval order {seed_cl} step {s + 1}/{args.steps}', leave=False,
                   disable=args.quiet)
        for k in bar:
            net, rand = training.evaluation_network(args.model, data, args.device, (args.seed, seed_cl, s, 'eval', k))
            step_accs.append(training.train_and_test(net, images, labels, images_test, labels_test,
                                                     args.epoch_eval_train, args.lr_net, args.batch_train,
                                                     dsa_strategy=args.dsa_strategy, dc_strategy=None,
                                                     dsa_param=args.dsa_param, rand=rand))
        base.log(args, f'order {seed_cl} step {s + 1}: {len(seen)} classes seen, train on {len(labels)} images, '
                        f'test on {len(labels_test)}: mean acc {100 * np.mean(step_accs):.2f}%')
        accs.append(step_accs)
        sizes.append((len(labels), len(labels_test)))
    return accs, sizes


def step_summary(accs_orders):
    """accs_orders[k][s][e] -> per step (mean %, std %, n) over every class order and evaluation."""
    per_step = np.asarray(accs_orders, dtype=np.float64).transpose(1, 0, 2).reshape(len(accs_orders[0]), -1)
    return [(float(a.mean() * 100), float(a.std() * 100), int(a.size)) for a in per_step]


def latex_row(summary):
    """'& 65.1$\\pm$1.2 & 60.3$\\pm$0.9 ...' (one cell per step), ready to paste after the method's name."""
    return ' '.join(f'& {m:.1f}$\\pm${s:.1f}' for m, s, _ in summary)


def result_path(args):
    name = f'cl_{args.method}_{args.dataset}_{args.model}_{args.ipc}ipc_{args.steps}steps.json'
    return os.path.join(args.save_path, name)


def main(argv=None):
    args = check_args(parse_args(argv))
    paths = [memory_path(args.data_path, args.method, args.dataset, args.model, args.ipc, args.steps, k)
             if args.method in BUILT_METHODS else None for k in range(args.num_orders)]
    if not args.build:  # fail before the (slow) dataset load
        for path in paths:
            if path is not None and not os.path.isfile(path):
                raise missing_file_error(path, args)

    data = load_dataset_for(args).to(args.device)
    if data.num_classes % args.steps:  # a TinyImageNet file may hold fewer than 200 classes
        raise UserError(f'--steps {args.steps} does not divide the {data.num_classes} classes of {data.name}')
    if args.method == 'random' or args.build:
        check_ipc_fits(data, args.ipc)
    if args.build:
        build_memories(data, args)
        parallel.gather_to_all(None)  # every process's memory files are written before any is read
        if args.build_only:
            return None

    t0 = time.time()
    evaluated = {}  # class order -> (accuracies, sizes); under torchrun the orders are spread over the processes
    for seed_cl in parallel.Team(shared=True).share(range(args.num_orders)):
        order = class_order(seed_cl, data.num_classes)
        if args.method == 'random':
            memory = random_memory(data, order, args.steps, args.ipc, (args.seed, seed_cl))
        else:
            memory = load_memory(paths[seed_cl], order, args.steps, data, args.unsafe_load)
        evaluated[seed_cl] = evaluate_order(memory, order, data, args, seed_cl)
    for part in parallel.gather_to_all(evaluated):
        evaluated.update(part)
    orders = [[int(c) for c in class_order(k, data.num_classes)] for k in range(args.num_orders)]
    accs_orders = [evaluated[k][0] for k in range(args.num_orders)]
    sizes_orders = [evaluated[k][1] for k in range(args.num_orders)]
    if parallel.rank() != 0:  # rank 0 alone reports and writes
        return None

    summary = step_summary(accs_orders)
    print(f'\n==================== {args.method} on {args.dataset}, {args.steps} steps, ipc {args.ipc} '
          f'====================')
    per_step = len(orders[0]) // args.steps
    for s, (m, sd, n) in enumerate(summary):
        print(f'step {s + 1}: {(s + 1) * per_step} classes, mean = {m:.2f}% std = {sd:.2f}% over {n} runs')
    row = latex_row(summary)
    print(f'LaTeX: {args.method} {row} \\\\')
    out = result_path(args)
    base.write_json_atomic(out, {
        'config': results.config_dict(args),
        'steps': [{'step': s + 1, 'classes_seen': (s + 1) * per_step, 'mean': m, 'std': sd, 'n': n,
                   'accs': [accs[s] for accs in accs_orders], 'train_images': [sz[s][0] for sz in sizes_orders],
                   'test_images': [sz[s][1] for sz in sizes_orders]} for s, (m, sd, n) in enumerate(summary)],
        'latex_row': row, 'class_orders': orders,
        'memory_files': [os.path.abspath(p) for p in paths] if args.method in BUILT_METHODS else None,
        'wall_seconds': round(time.time() - t0, 3)})
    base.log(args, f'summary written to {out}')
    return {'steps': summary, 'latex_row': row, 'json': out}


if __name__ == '__main__':
    cli(main)
