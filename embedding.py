"""Where the synthetic images sit among the real ones (report.py --embed): a network trained on the real training set
(coreset.feature_net, cached) embeds a real sample per class and every synthetic image; PCA and LDA, fitted on the
real sample, project both to two dimensions; one scatter per projection, and per class the distance of each
synthetic point to its class's real mean relative to the class's spread. numpy and scipy only for the algebra."""
import os
from types import SimpleNamespace

import numpy as np
import scipy.linalg
import torch

import rng
from base import UserError, get_device
from coreset import embed_images, feature_net
from data import load_dataset
from networks import check_model_name
from results import load_synthetic_sets

# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------


def pca_fit(x, k=2):
    """(mean, components (k, d), explained variance ratio (k,)) of the rows of x, by SVD of the centred data."""
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = s ** 2
    return mean, vt[:k], variance[:k] / variance.sum()


def lda_fit(x, y, k=2, ridge=1e-3):
    """(directions (k, d), share of the discriminant ratio (k,)) of Fisher's LDA: the generalized eigenvectors of the
    between-class scatter S_b against the within-class scatter S_w (S_w plus a small ridge, relative to its trace, so
    that features of more dimensions than samples per class stay solvable), largest first."""
    classes = np.unique(y)
    mean = x.mean(0)
    d = x.shape[1]
    s_w = np.zeros((d, d))
    s_b = np.zeros((d, d))
    for c in classes:
        xc = x[y == c]
        mc = xc.mean(0)
        s_w += (xc - mc).T @ (xc - mc)
        s_b += len(xc) * np.outer(mc - mean, mc - mean)
    s_w += ridge * np.trace(s_w) / d * np.eye(d)
    values, vectors = scipy.linalg.eigh(s_b, s_w)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0, None)
    directions = vectors[:, order[:k]].T
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions, values[:k] / max(values.sum(), 1e-30)


def relative_distances(real, real_labels, points, point_labels):
    """Per point, ||point - mean of its class's real sample|| / spread of that class (root mean squared distance of
    the class's real points to their mean), and whether its class's mean is the nearest real class mean."""
    classes = np.unique(real_labels)
    means = np.stack([real[real_labels == c].mean(0) for c in classes])
    spread = np.array([np.sqrt(((real[real_labels == c] - means[k]) ** 2).sum(1).mean())
                       for k, c in enumerate(classes)])
    index = np.searchsorted(classes, point_labels)
    to_all = np.linalg.norm(points[:, None, :] - means[None], axis=2)
    ratio = to_all[np.arange(len(points)), index] / spread[index]
    return ratio, to_all.argmin(1) == index


# ---------------------------------------------------------------------------------------------
# report.py --embed
# ---------------------------------------------------------------------------------------------

def real_sample(data, per_class, device, seed=0):
    """Indices of per_class random training images of each class (all of a smaller class)."""
    picks = []
    for c, idx in enumerate(data.indices_class):
        n = min(per_class, idx.numel())
        order = torch.randperm(idx.numel(), generator=rng.generator(device, seed, 'embed', c), device=device)
        picks.append(idx[order[:n]])
    return torch.cat(picks)


def check_embed_args(args):
    if not args.dataset:
        raise UserError('--embed needs --dataset (the dataset the set was learned from)')
    if args.embed_per_class < 2 or args.embed_epochs < 0 or args.embed_exp < 0:
        raise UserError('--embed_per_class must be >= 2, --embed_epochs and --embed_exp >= 0')
    check_model_name(args.embed_model)
    if not os.path.isfile(args.embed):
        raise UserError(f"--embed file '{args.embed}' does not exist")


def embed_report(args):
    """Embed, project, draw and print (see the module docstring); returns the paths of the two pictures."""
    check_embed_args(args)
    device = get_device(args.device)
    data = load_dataset(args.dataset, args.data_path).to(device)
    sets = load_synthetic_sets(args.embed, data.channel, data.im_size, data.num_classes)
    if args.embed_exp >= len(sets):
        raise UserError(f'{args.embed} holds {len(sets)} experiment(s); --embed_exp {args.embed_exp} is not one')
    images, labels = sets[args.embed_exp]
    os.makedirs(args.embed_cache, exist_ok=True)
    net = feature_net(data, SimpleNamespace(save_path=args.embed_cache, model=args.embed_model, feat_epochs=args.embed_epochs,
                                            device=device, lr_net=0.01, quiet=False), seed=0)
    index = real_sample(data, args.embed_per_class, device)
    real = embed_images(net, data.images_train, index).double().cpu().numpy()
    real_labels = data.labels_train[index].cpu().numpy()
    images = images.to(device)
    syn = embed_images(net, images, torch.arange(images.shape[0], device=device)).double().cpu().numpy()
    syn_labels = labels.numpy()
    mean, components, explained = pca_fit(real)
    directions, shares = lda_fit(real, real_labels)
    name = os.path.splitext(os.path.basename(args.embed))[0]
    name = name[4:] if name.startswith('res_') else name
    stem = f'embed_{os.path.basename(os.path.dirname(os.path.abspath(args.embed)))}-{name}_exp{args.embed_exp}'
    paths = []
    for what, project, share in (('pca', lambda z: (z - mean) @ components.T, explained),
                                 ('lda', lambda z: z @ directions.T, shares)):
        path = os.path.join(args.out, f'{stem}_{what}.png')
        scatter(project(real), real_labels, project(syn), syn_labels, data.class_names, share, what, name, path)
        paths.append(path)
    print_embedding_summary(name, args, real, real_labels, syn, syn_labels, explained, shares, data.class_names)
    for path in paths:
        print(f'written {path}')
    return paths


def print_embedding_summary(name, args, real, real_labels, syn, syn_labels, explained, shares, class_names):
    ratio, nearest = relative_distances(real, real_labels, syn, syn_labels)
    print(f'{name}: {len(syn)} synthetic images among {len(real)} real ({args.embed_per_class} per class), '
          f'{args.embed_model} trained {args.embed_epochs} epoch(s) on the real training set, features of '
          f'{real.shape[1]} dimensions')
    print(f'PCA explained variance of the real sample: PC1 {100 * explained[0]:.1f}%, PC2 {100 * explained[1]:.1f}%; '
          f'LDA share of the discriminant ratio: LD1 {100 * shares[0]:.1f}%, LD2 {100 * shares[1]:.1f}%')
    print('distance of each synthetic point to its class\'s real mean / the class\'s spread (RMS distance of its real '
          'points to their mean); * = its class\'s mean is not the nearest class mean')
    for c in np.unique(syn_labels):
        mine = syn_labels == c
        cells = ' '.join(f'{r:.2f}' + ('' if ok else '*') for r, ok in zip(ratio[mine], nearest[mine]))
        print(f'  class {c} ({class_names[c]}): {cells}')
    print(f'all classes: median {np.median(ratio):.2f}, nearest to its own class mean {nearest.sum()}/{len(ratio)}')


def scatter(real_2d, real_labels, syn_2d, syn_labels, class_names, share, what, name, path):
    """Real points small and light, synthetic points as large edged markers, one colour per class."""
    from plots import pyplot, save_figure_atomic
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap('tab10' if len(class_names) <= 10 else 'tab20')
    for c in np.unique(real_labels):
        colour = cmap(int(c) % cmap.N)
        ax.scatter(*real_2d[real_labels == c].T, s=6, alpha=0.35, color=colour, label=f'{c} {class_names[c]}')
        ax.scatter(*syn_2d[syn_labels == c].T, s=160, marker='*', color=colour, edgecolors='black', linewidths=0.8)
    axis = 'PC' if what == 'pca' else 'LD'
    ax.set_xlabel(f'{axis}1 ({100 * share[0]:.1f}%)')
    ax.set_ylabel(f'{axis}2 ({100 * share[1]:.1f}%)')
    ax.set_title(f'{name}: {what.upper()} of the real sample; stars = synthetic images', fontsize=9)
    ax.legend(fontsize=6, markerscale=2, loc='best')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
