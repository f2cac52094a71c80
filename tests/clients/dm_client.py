"""A distribution-matching method script in the style of the projects built on the original utils.py (only the
original import line and call forms); it also reads net.embed directly, as they do."""
import argparse
import os

import numpy as np
import torch

from utils import get_loops, get_dataset, get_network, get_eval_pool, evaluate_synset, get_daparam, match_loss, get_time, TensorDataset, epoch, DiffAugment, ParamDiffAug


def main():
    parser = argparse.ArgumentParser(description='Parameter Processing')
    parser.add_argument('--dataset', type=str, default='CIFAR10', help='dataset')
    parser.add_argument('--model', type=str, default='ConvNet', help='model')
    parser.add_argument('--ipc', type=int, default=50, help='image(s) per class')
    parser.add_argument('--Iteration', type=int, default=20000, help='training iterations')
    parser.add_argument('--lr_img', type=float, default=1.0, help='learning rate for updating synthetic images')
    parser.add_argument('--batch_real', type=int, default=256, help='batch size for real data')
    parser.add_argument('--init', type=str, default='real', help='noise/real')
    parser.add_argument('--dsa_strategy', type=str, default='color_crop_cutout_flip_scale_rotate', help='strategy')
    parser.add_argument('--data_path', type=str, default='data', help='dataset path')
    parser.add_argument('--save_path', type=str, default='result', help='path to save results')
    args = parser.parse_args()
    args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args.dsa_param = ParamDiffAug()
    args.dsa = False if args.dsa_strategy in ['none', 'None'] else True
    os.makedirs(args.save_path, exist_ok=True)

    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = get_dataset(args.dataset, args.data_path)
    images_all = torch.cat([torch.unsqueeze(dst_train[i][0], dim=0) for i in range(len(dst_train))], dim=0).to(args.device)
    labels_all = [int(dst_train[i][1]) for i in range(len(dst_train))]
    indices_class = [[] for c in range(num_classes)]
    for i, lab in enumerate(labels_all):
        indices_class[lab].append(i)

    def get_images(c, n):
        idx_shuffle = np.random.permutation(indices_class[c])[:n]
        return images_all[idx_shuffle]

    image_syn = torch.randn(size=(num_classes * args.ipc, channel, im_size[0], im_size[1]), dtype=torch.float, requires_grad=True, device=args.device)
    label_syn = torch.tensor(np.array([np.ones(args.ipc) * i for i in range(num_classes)]), dtype=torch.long, requires_grad=False, device=args.device).view(-1)
    if args.init == 'real':
        for c in range(num_classes):
            image_syn.data[c * args.ipc:(c + 1) * args.ipc] = get_images(c, args.ipc).detach().data
    optimizer_img = torch.optim.SGD([image_syn, ], lr=args.lr_img, momentum=0.5)
    print('%s training begins' % get_time())
    for it in range(args.Iteration + 1):
        net = get_network(args.model, channel, num_classes, im_size).to(args.device)
        net.train()
        for param in list(net.parameters()):
            param.requires_grad = False
        embed = net.module.embed if torch.cuda.device_count() > 1 else net.embed
        loss = torch.tensor(0.0).to(args.device)
        for c in range(num_classes):
            img_real = get_images(c, args.batch_real)
            img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc].reshape((args.ipc, channel, im_size[0], im_size[1]))
            if args.dsa:
                seed = int(time_seed(it, c))
                img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
                img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        print('%s iter = %05d, loss = %.4f' % (get_time(), it, loss.item() / num_classes))
    torch.save({'data': [[image_syn.detach().cpu(), label_syn.cpu()]], 'accs_all_exps': {}},
               os.path.join(args.save_path, 'res_DM_%s_%s_%dipc.pt' % (args.dataset, args.model, args.ipc)))


def time_seed(it, c):
    return 1000 * it + c


if __name__ == '__main__':
    main()
