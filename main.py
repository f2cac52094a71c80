"""Dataset condensation by gradient matching (DC) and with differentiable Siamese augmentation (DSA).

    python main.py --dataset CIFAR10 --model ConvNet --ipc 10                       # DC
    python main.py --dataset CIFAR10 --model ConvNet --ipc 10 --init real --method DSA \
                   --dsa_strategy color_crop_cutout_flip_scale_rotate              # DSA
    python main.py --dataset MNIST --model ConvNet --ipc 1 --load_syn res_DC_MNIST_ConvNet_1ipc.pt --eval_mode M
"""
import argparse

import utils
from utils import cli

METHODS = ('DC', 'DSA')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--method', type=str, default='DC', help=f"one of {', '.join(METHODS)}")
    utils.add_common_args(parser)
    parser.add_argument('--dis_metric', type=str, default='ours', help='gradient distance: ours, mse or cos')
    parser.add_argument('--outer_loop', type=int, default=None, help='override the outer loop of the ipc table')
    parser.add_argument('--inner_loop', type=int, default=None, help='override the inner loop of the ipc table')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    utils.check_choice(args.method, METHODS, 'method')
    utils.check_choice(args.dis_metric, utils.METRICS, 'dis_metric')
    utils.check_common_args(args)
    args.default_epoch_eval = 300
    if args.method == 'DSA' and args.dsa_strategy in ('None', 'none', ''):
        args.dsa_strategy = utils.default_dsa_strategy(args.dataset)
        utils.log(args, f'DSA strategy not given: using {args.dsa_strategy} (the paper\'s for {args.dataset})')
    outer_loop, inner_loop = (None, None) if args.load_syn else utils.get_loops(args.ipc, args.outer_loop, args.inner_loop)

    data = utils.get_dataset(args.dataset, args.data_path).to(args.device)
    if args.load_syn:
        return utils.evaluate_saved(args, data)
    utils.check_ipc_fits(data, args.ipc)
    utils.log(args, f'{args.method} on {args.dataset} with {args.model}, ipc {args.ipc}: outer_loop {outer_loop}, '
                    f'inner_loop {inner_loop}, {args.Iteration} iterations, device {args.device}')
    classes = list(range(data.num_classes))

    def init(exp):
        return utils.init_synthetic_set(data, args.ipc, args.init, args.device)

    def step(it, image_syn, label_syn, optimizer_img):
        return utils.dc_iteration(image_syn, label_syn, optimizer_img, data, args, classes, outer_loop, inner_loop)

    return utils.run_experiments(args, data, init, step)


if __name__ == '__main__':
    cli(main)
