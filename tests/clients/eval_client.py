"""Evaluate a stored synthetic set the way the projects built on the original utils.py do: torch.load the res file,
then evaluate_synset on every model of the pool (only the original import line and call forms)."""
import argparse

import numpy as np
import torch

from utils import get_loops, get_dataset, get_network, get_eval_pool, evaluate_synset, get_daparam, match_loss, get_time, TensorDataset, epoch, DiffAugment, ParamDiffAug


def main():
    parser = argparse.ArgumentParser(description='Parameter Processing')
    parser.add_argument('--dataset', type=str, default='CIFAR10', help='dataset')
    parser.add_argument('--model', type=str, default='ConvNet', help='model')
    parser.add_argument('--ipc', type=int, default=1, help='image(s) per class')
    parser.add_argument('--eval_mode', type=str, default='S', help='eval_mode')
    parser.add_argument('--num_eval', type=int, default=20, help='the number of evaluating randomly initialized models')
    parser.add_argument('--epoch_eval_train', type=int, default=300, help='epochs to train a model with synthetic data')
    parser.add_argument('--lr_net', type=float, default=0.01, help='learning rate for updating network parameters')
    parser.add_argument('--batch_train', type=int, default=256, help='batch size for training networks')
    parser.add_argument('--dsa_strategy', type=str, default='color_crop_cutout_flip_scale_rotate', help='strategy')
    parser.add_argument('--method', type=str, default='DSA', help='DC/DSA/DM')
    parser.add_argument('--data_path', type=str, default='data', help='dataset path')
    parser.add_argument('--syn_path', type=str, required=True, help='res_*.pt file')
    args = parser.parse_args()
    args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args.dsa_param = ParamDiffAug()
    args.dsa = args.method in ['DSA', 'DM']

    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = get_dataset(args.dataset, args.data_path)
    saved = torch.load(args.syn_path, map_location='cpu')
    model_eval_pool = get_eval_pool(args.eval_mode, args.model, args.model)
    for model_eval in model_eval_pool:
        args.dc_aug_param = None if args.dsa else get_daparam(args.dataset, args.model, model_eval, args.ipc)
        accs = []
        for exp, (image_syn, label_syn) in enumerate(saved['data']):
            for it_eval in range(args.num_eval):
                net_eval = get_network(model_eval, channel, num_classes, im_size).to(args.device)
                _, acc_train, acc_test = evaluate_synset(it_eval, net_eval, image_syn, label_syn, testloader, args)
                accs.append(acc_test)
        print('%s Evaluate %d random %s, mean = %.4f std = %.4f' % (get_time(), len(accs), model_eval, np.mean(accs), np.std(accs)))


if __name__ == '__main__':
    main()
