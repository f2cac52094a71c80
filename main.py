"""Dataset condensation by gradient matching (DC) and with differentiable Siamese augmentation (DSA).

    python main.py --dataset CIFAR10 --model ConvNet --ipc 10                       # DC
    python main.py --dataset CIFAR10 --model ConvNet --ipc 10 --init real --method DSA \
                   --dsa_strategy color_crop_cutout_flip_scale_rotate              # DSA
    python main.py --dataset MNIST --model ConvNet --ipc 1 --load_syn res_DC_MNIST_ConvNet_1ipc.pt --eval_mode M
    python main.py --dataset CIFAR10 --model ConvNet --ipc 10 --method herding      # coreset baseline
    python main.py --dataset CIFAR10 --model ConvNet --method whole --num_exp 1     # whole-dataset bound
"""
import argparse

import base
import coreset
import experiment
import labelnoise
import training
import utils
from data import check_ipc_fits, load_dataset_for
from experiment import cli

METHODS = ('DC', 'DSA') + training.BASELINE_METHODS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--method', type=str, default='DC', help=(
        f"one of {', '.join(METHODS)}. random/herding/kcenter/forgetting select ipc real training images per class "
        f"(no learning); whole trains the evaluation models on the full training set (--epoch_eval_train defaults "
        f"to {coreset.WHOLE_EPOCHS} for it). Baselines are evaluated like DC sets (DC augmentation rule), or with DSA "
        f"augmentation when --dsa_strategy is given"))
    experiment.add_common_args(parser)
    parser.add_argument('--dis_metric', type=str, default='ours', help='gradient distance: ours, mse or cos')
    parser.add_argument('--outer_loop', type=int, default=None, help='override the outer loop of the ipc table')
    parser.add_argument('--inner_loop', type=int, default=None, help='override the inner loop of the ipc table')
    parser.add_argument('--feat_epochs', type=int, default=2,
                        help='herding/kcenter: epochs of the --model feature network trained on the full training set '
                             '(cached in save_path as featnet_*.pt)')
    parser.add_argument('--forget_epochs', type=int, default=3,
                        help='forgetting: epochs of full-set training during which forgetting events are counted')
    parser.add_argument('--dsa_condense', type=str, default='siamese', choices=utils.DSA_CONDENSE_MODES,
                        help='DSA while learning (Table 4 of the DSA paper): siamese (one draw for the real and the '
                             'synthetic batch of a class), independent (a draw each), real / syn (augment only that '
                             'batch), none (no augmentation while learning)')
    parser.add_argument('--dsa_eval', type=int, default=1, choices=(0, 1),
                        help='DSA while training the evaluation networks of a DSA set (1, the default) or not (0)')
    parser.set_defaults(dsa_strategy=None)  # unset: DSA takes the paper's strategy; an explicit 'none' is honoured
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    base.check_choice(args.method, METHODS, 'method')
    base.check_choice(args.dis_metric, utils.METRICS, 'dis_metric')
    if args.feat_epochs < 0:
        raise base.UserError(f'--feat_epochs must be >= 0, got {args.feat_epochs}')
    if args.forget_epochs < 2:
        raise base.UserError(f'--forget_epochs must be >= 2 (a forgetting event spans two epochs), '
                              f'got {args.forget_epochs}')
    experiment.check_common_args(args)
    args.default_epoch_eval = 300
    if args.method == 'whole' and args.epoch_eval_train is None:
        args.epoch_eval_train = coreset.WHOLE_EPOCHS
    if args.method == 'DSA' and args.dsa_strategy is None:
        args.dsa_strategy = training.default_dsa_strategy(args.dataset)
        base.log(args, f'DSA strategy not given: using {args.dsa_strategy} (the paper\'s for {args.dataset})')
    learns = args.method in ('DC', 'DSA') and not args.load_syn
    outer_loop, inner_loop = utils.get_loops(args.ipc, args.outer_loop, args.inner_loop) if learns else (None, None)

    data = load_dataset_for(args).to(args.device)
    if args.load_syn:
        return experiment.evaluate_saved(args, data)
    data = labelnoise.prepare(args, data)  # --noise_rate, --clean_filter, --clean_select
    if args.method in training.BASELINE_METHODS:
        return run_baseline(args, data)
    base.log(args, f'{args.method} on {args.dataset} with {args.model}, ipc {args.ipc}: outer_loop {outer_loop}, '
                    f'inner_loop {inner_loop}, {args.Iteration} iterations, device {args.device}')
    return experiment.condense(args, data, lambda image_syn, label_syn, optimizer_img, classes, key: utils.dc_iteration(
        image_syn, label_syn, optimizer_img, data, args, classes, outer_loop, inner_loop, key))


def run_baseline(args, data):
    """Coreset selection (evaluated once, like a DC set at iteration 0) or the whole-dataset bound."""
    aug = f'DSA {args.dsa_strategy}' if training.method_uses_dsa(args.method, args.dsa_strategy) else 'the DC rule'
    if args.method == 'whole':
        base.log(args, f'whole {args.dataset} training set on {args.model}: {args.epoch_eval_train} epochs, '
                        f'augmentation by {aug}, device {args.device}')
        return coreset.run_whole(args, data)
    check_ipc_fits(data, args.ipc)
    base.log(args, f'{args.method} coreset of {args.dataset}, ipc {args.ipc}, features/training by {args.model}, '
                    f'evaluation augmentation by {aug}, device {args.device}')

    # herding and k-center give every experiment the same set, so it is selected once: embedding the 60,000 images
    # of a paper-size training set costs minutes a time on a CPU
    selected = {}

    def init(exp):
        if args.method not in coreset.SEEDLESS_METHODS or not selected:
            selected['indices'] = coreset.select_coreset(args.method, data, args, args.seed + exp)
        indices = selected['indices']
        labelnoise.record_selection(args, exp, indices)
        return data.images_train[indices], data.labels_train[indices]

    return experiment.run_experiments(args, data, init)


if __name__ == '__main__':
    cli(main)
