"""Dataset condensation by distribution matching (DM).

    python main_DM.py --dataset CIFAR10 --model ConvNet --ipc 10 \
                      --dsa_strategy color_crop_cutout_flip_scale_rotate --init real --lr_img 1 --num_exp 5 --num_eval 5
    python main_DM.py --dataset CIFAR10 --model ConvNetBN --ipc 50 --init real --lr_img 1 --eval_mode B
    python main_DM.py --dataset TinyImageNet --model ConvNetD4 --ipc 50 --class_chunk 4      # bounded memory
"""
import argparse

import base
import experiment
import labelnoise
import utils
from data import load_dataset_for
from experiment import cli
from networks import get_network, has_batchnorm


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_common_args(parser, ipc=50, eval_mode='SS', epoch_eval_train=1000, Iteration=20000, lr_img=1.0,
                          init='real', dsa_strategy='color_crop_cutout_flip_scale_rotate', eval_every=2000)
    parser.add_argument('--class_chunk', type=int, default=0,
                        help='classes optimised at once (0: automatic; smaller needs less memory)')
    parser.add_argument('--dis_metric', type=str, default=None,
                        help='accepted for command lines copied from main.py, and ignored: DM has no gradient distance')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.method = 'DM'
    if args.class_chunk < 0:
        raise base.UserError(f'--class_chunk must be >= 0, got {args.class_chunk}')
    experiment.check_common_args(args)
    if args.dis_metric is not None:
        base.log(args, f'--dis_metric {args.dis_metric} is ignored: distribution matching has no gradient distance')
    args.default_epoch_eval = 1000

    data = load_dataset_for(args).to(args.device)
    if args.load_syn:
        return experiment.evaluate_saved(args, data)
    data = labelnoise.prepare(args, data)  # --noise_rate, --clean_filter
    if 0 < args.class_chunk < data.num_classes and has_batchnorm(
            get_network(args.model, data.channel, data.num_classes, data.im_size, device='cpu')):
        raise base.UserError(f'--class_chunk {args.class_chunk} is refused for {args.model}: its BatchNorm statistics '
                             f'must see all {data.num_classes} classes in one batch (as in the paper); use '
                             f'--class_chunk 0, or a model without BatchNorm')
    base.log(args, f'DM on {args.dataset} with {args.model}, ipc {args.ipc}, {args.Iteration} iterations, '
                    f'DSA {args.dsa_strategy}, device {args.device}')
    return experiment.condense(args, data, lambda image_syn, label_syn, optimizer_img, classes, key: utils.dm_iteration(
        image_syn, label_syn, optimizer_img, data, args, classes, key, args.class_chunk or None))


if __name__ == '__main__':
    cli(main)
