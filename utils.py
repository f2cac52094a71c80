"""The face researchers know. The original utils.py API (SPEC §11), so that scripts written against it run unchanged
on this code: get_dataset, get_network, get_eval_pool, evaluate_synset, epoch, get_daparam, augment, match_loss,
distance_wb, get_loops, get_time, TensorDataset, DiffAugment, ParamDiffAug, get_default_convnet_setting. Below it,
the shared loops of the three methods: one DC/DSA iteration (gradient matching, SPEC §4) and one DM iteration
(distribution matching, SPEC §6), with the gradient distance and the papers' settings they use.

The modules underneath own the rest: data.py (datasets), training.py (training and evaluation of networks),
networks.py (the model zoo), augment.py (DSA and DC augmentation), base.py (errors, files, seeds)."""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.dataloader import default_collate

from augment import DiffAugment, ParamDiffAug, augment_dc
from base import UserError, check_choice
from data import load_dataset
from learning_trace import step_recorder
from networks import get_network, has_batchnorm
import rng
from parallel import Team
from training import (NetRandom, backward_mean_loss, batch_chunks, dc_aug_strategy, embed_chunked, flag_on,
                      mean_loss_grads, method_uses_dsa, train_epoch)

__all__ = ['get_dataset', 'get_network', 'get_eval_pool', 'evaluate_synset', 'epoch', 'get_daparam', 'augment',
           'match_loss', 'distance_wb', 'get_loops', 'get_time', 'TensorDataset', 'DiffAugment', 'ParamDiffAug',
           'get_default_convnet_setting']

# ---------------------------------------------------------------------------------------------
# Gradient distance (SPEC §4) and the papers' settings
# ---------------------------------------------------------------------------------------------

METRICS = ('ours', 'mse', 'cos')


def match_loss(gw_syn, gw_real, args='ours'):
    """Distance between two lists of per-parameter gradients (SPEC §4): match_loss_classes of a single class.
    args: the original's args (its dis_metric is used; the parameter keeps the original's name, so keyword callers
    work), or the metric itself: 'ours', 'mse' or 'cos'."""
    metric = getattr(args, 'dis_metric', args)
    return match_loss_classes([g.unsqueeze(0) for g in gw_syn], [g.unsqueeze(0) for g in gw_real], metric)[0]


def match_loss_classes(gw_syn, gw_real, metric='ours'):
    """match_loss of K classes at once: gradients stacked along a leading class dimension; returns (K,) distances.

    'ours': per layer, gradients as (out, rest) rows, summed 1 - cos between rows; 1-D parameters (biases, norm
    weights) contribute nothing, as in the reference. 'mse' and 'cos' compare the concatenated gradient vectors."""
    check_choice(metric, METRICS, 'distance metric')
    if metric == 'ours':
        dis = torch.zeros(gw_real[0].shape[0], device=gw_real[0].device, dtype=gw_real[0].dtype)
        for g_syn, g_real in zip(gw_syn, gw_real):
            if g_real.dim() == 2:  # a 1-D parameter per class
                continue
            g_syn = g_syn.flatten(2)
            g_real = g_real.flatten(2)
            cos = (g_syn * g_real).sum(-1) / (g_syn.norm(dim=-1) * g_real.norm(dim=-1) + 1e-6)
            dis = dis + (1 - cos).sum(-1)
        return dis
    vec_syn = torch.cat([g.flatten(1) for g in gw_syn], dim=1)
    vec_real = torch.cat([g.flatten(1) for g in gw_real], dim=1)
    if metric == 'mse':
        return ((vec_syn - vec_real) ** 2).sum(-1)
    return 1 - (vec_syn * vec_real).sum(-1) / (vec_syn.norm(dim=-1) * vec_real.norm(dim=-1) + 1e-6)


# ipc -> (outer_loop, inner_loop) of gradient matching (SPEC §4)
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


EVAL_POOLS = {
    'M': ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18'],
    'B': ['ConvNetBN', 'ConvNetASwishBN', 'AlexNetBN', 'VGG11BN', 'ResNet18BN'],
    'W': ['ConvNetW32', 'ConvNetW64', 'ConvNetW128', 'ConvNetW256'],
    'D': ['ConvNetD1', 'ConvNetD2', 'ConvNetD3', 'ConvNetD4'],
    'A': ['ConvNetAS', 'ConvNetAR', 'ConvNetAL', 'ConvNetASwish'],
    'P': ['ConvNetNP', 'ConvNetMP', 'ConvNetAP'],
    'N': ['ConvNetNN', 'ConvNetBN', 'ConvNetLN', 'ConvNetIN', 'ConvNetGN'],
}


EVAL_MODES = ('S', 'SS') + tuple(EVAL_POOLS)


def get_loops(ipc, outer_loop=None, inner_loop=None):
    """(outer_loop, inner_loop) for gradient matching; explicit values override the paper's table."""
    if outer_loop is not None and inner_loop is not None:
        return outer_loop, inner_loop
    if ipc not in LOOPS:
        raise UserError(f"no loop settings for ipc {ipc} (known: {', '.join(map(str, LOOPS))}); pass --outer_loop and "
                        f"--inner_loop (the authors advise 50 10 or 20 25 with --init real)")
    table_outer, table_inner = LOOPS[ipc]
    return (table_outer if outer_loop is None else outer_loop), (table_inner if inner_loop is None else inner_loop)


def get_eval_pool(eval_mode, model, model_eval=None):
    """Models a synthetic set is evaluated on. 'S' swaps BatchNorm for instance norm (ConvNetBN -> ConvNet), 'SS' is
    the model itself. As the original, any other mode gives [model_eval] when model_eval is given; without it an
    unknown mode is an error."""
    if model_eval is not None and eval_mode not in EVAL_MODES:
        return [model_eval]
    check_choice(eval_mode, EVAL_MODES, 'eval_mode')
    if eval_mode == 'S':
        return [model[:model.index('BN')] if 'BN' in model else model]
    if eval_mode == 'SS':
        return [model]
    return list(EVAL_POOLS[eval_mode])


# ---------------------------------------------------------------------------------------------
# The original API (SPEC §11): same names, arguments and return values, on the fast code underneath
# ---------------------------------------------------------------------------------------------

def get_default_convnet_setting():
    """(width, depth, act, norm, pooling) of the default ConvNet."""
    return 128, 3, 'relu', 'instancenorm', 'avgpooling'


def get_time():
    """A printable timestamp, e.g. '[2021-04-01 12:00:00]'."""
    return time.strftime('[%Y-%m-%d %H:%M:%S]')


def distance_wb(gwr, gws):
    """The 'ours' distance of one parameter's gradients (real first, as the original): rows of the (out, rest)
    reshaped gradients, summed 1 - cos; a 1-D parameter (bias, norm weight) contributes 0."""
    return match_loss_classes([gws.unsqueeze(0)], [gwr.unsqueeze(0)], 'ours')[0]


class TensorDataset(torch.utils.data.Dataset):
    """Item i is (images[i], labels[i]); images are stored as float, both detached (as the original)."""

    def __init__(self, images, labels):
        self.images = images.detach().float()
        self.labels = labels.detach()

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __len__(self):
        return self.images.shape[0]


class LabelledImages(TensorDataset):
    """A dataset split as get_dataset returns it: item i is (image tensor, int label), like torchvision's datasets,
    whose .targets list it also has (scripts build their per-class index lists from it, item by item)."""

    def __init__(self, images, labels):
        super().__init__(images, labels)
        self.targets = self.labels.tolist()

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


def get_dataset(dataset, data_path):
    """The original 9-tuple: channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader.

    The whole set is read once into normalised tensors (data.load_dataset: offline files first, no per-image PIL
    transform); dst_train / dst_test are TensorDatasets over them and testloader a DataLoader over dst_test (batch
    256, no shuffling). epoch() recognises loaders over a TensorDataset and slices the tensors instead of collating
    items."""
    data = load_dataset(dataset, data_path)
    dst_train = LabelledImages(data.images_train, data.labels_train)
    dst_test = LabelledImages(data.images_test, data.labels_test)
    testloader = DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
    return (data.channel, data.im_size, data.num_classes, data.class_names, data.mean, data.std, dst_train, dst_test,
            testloader)


def get_daparam(dataset, model, model_eval, ipc):
    """The DC augmentation parameters for evaluating model_eval (SPEC §7): crop 4, scale 0.2, rotate 45, noise 0.001;
    strategy crop_scale_rotate on MNIST, crop_noise for ConvNetBN, else 'none'."""
    return dict(crop=4, scale=0.2, rotate=45, noise=0.001, strategy=dc_aug_strategy(dataset, model_eval))


def augment(images, dc_aug_param, device):
    """The DC augmentation of a batch (SPEC §7) with the parameters of get_daparam; strategy 'none' or no parameters
    returns the images unchanged."""
    if not dc_aug_param or dc_aug_param.get('strategy') in (None, '', 'none', 'None'):
        return images
    return augment_dc(images.to(device), dc_aug_param['strategy'], param=dc_aug_param)


def _augment_as_args_say(img, args):
    """epoch()'s augmentation: DSA when args.dsa, else the DC augmentation of args.dc_aug_param."""
    if getattr(args, 'dsa', False):
        return DiffAugment(img, args.dsa_strategy, param=args.dsa_param)
    return augment(img, getattr(args, 'dc_aug_param', None), args.device)


def _tensor_batches(dataloader, device):
    """The batches of a DataLoader over a TensorDataset, sliced from the tensors on the device (one permutation per
    pass when the loader shuffles), or None for any other loader, which is then iterated as it is."""
    ds = dataloader.dataset
    if not (isinstance(ds, TensorDataset) and type(dataloader.batch_sampler) is BatchSampler
            and dataloader.collate_fn is default_collate):
        return None
    sampler, n = dataloader.sampler, len(ds)
    if type(sampler) is SequentialSampler:
        order = None
    elif type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == n:
        order = torch.randperm(n, generator=sampler.generator).to(device)
    else:
        return None
    images, labels = ds.images.to(device), ds.labels.to(device)
    size = dataloader.batch_sampler.batch_size
    stop = n - n % size if dataloader.batch_sampler.drop_last else n
    slices = [slice(start, start + size) for start in range(0, stop, size)]
    return ((images[s], labels[s]) if order is None else (images[order[s]], labels[order[s]]) for s in slices)


def _plain_cross_entropy(criterion):
    """Whether criterion is nn.CrossEntropyLoss with its defaults (then training may run in cache-sized chunks)."""
    return (type(criterion) is nn.CrossEntropyLoss and criterion.weight is None and criterion.reduction == 'mean'
            and criterion.ignore_index == -100 and criterion.label_smoothing == 0)


def _epoch_sums(mode, dataloader, net, optimizer, criterion, args, aug):
    """epoch() without the host sync: (sum of batch loss x batch size, number correct) as device tensors, and the
    number of samples."""
    device = args.device
    train = mode == 'train'
    net.train(train)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    batches = _tensor_batches(dataloader, device)
    if batches is None:
        batches = dataloader
    with torch.set_grad_enabled(train):
        for datum in batches:
            img = datum[0].float().to(device)
            lab = datum[1].long().to(device)
            if aug:
                img = _augment_as_args_say(img, args)
            if train and _plain_cross_entropy(criterion):
                optimizer.zero_grad(set_to_none=True)
                out = backward_mean_loss(net, img, lab)  # chunked on the CPU: same gradient, faster
                optimizer.step()
                loss = F.cross_entropy(out, lab)
            elif train:
                out = net(img)
                loss = criterion(out, lab)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                out = torch.cat([net(img[part]) for part in batch_chunks(net, img)])
                loss = criterion(out, lab)
            loss_sum += loss.detach() * lab.shape[0]
            correct += (out.argmax(-1) == lab).sum()
            count += lab.shape[0]
    return loss_sum, correct, count


def epoch(mode, dataloader, net, optimizer, criterion, args, aug):
    """One pass over dataloader, as the original: mode 'train' trains (net.train(), one optimizer step per batch),
    anything else evaluates (net.eval(), no gradients). aug: DSA (args.dsa, args.dsa_strategy, args.dsa_param) or
    the DC augmentation (args.dc_aug_param). Returns (mean loss, accuracy in [0, 1])."""
    net = net.to(args.device)
    criterion = criterion.to(args.device)
    loss_sum, correct, count = _epoch_sums(mode, dataloader, net, optimizer, criterion, args, aug)
    count = max(1, count)
    return loss_sum.item() / count, correct.item() / count


def evaluate_synset(it_eval, net, images_train, labels_train, testloader, args):
    """Train net on a (synthetic) set with the evaluation protocol of SPEC §7 and test it, as the original:
    args.epoch_eval_train + 1 epochs of SGD (args.lr_net, momentum 0.9, weight decay 5e-4, batch args.batch_train),
    lr x 0.1 with a new optimizer after epoch epoch_eval_train // 2 + 1, augmentation as epoch(aug=True); then one
    pass over testloader. Returns (net, last epoch's training accuracy, test accuracy)."""
    net = net.to(args.device)
    lr = float(args.lr_net)
    epochs = int(args.epoch_eval_train)
    decay_epoch = epochs // 2 + 1
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    criterion = nn.CrossEntropyLoss().to(args.device)
    trainloader = DataLoader(TensorDataset(images_train.to(args.device), labels_train.to(args.device)),
                             batch_size=args.batch_train, shuffle=True, num_workers=0)
    start = time.time()
    for ep in range(epochs + 1):
        loss_train, correct_train, n_train = _epoch_sums('train', trainloader, net, optimizer, criterion, args, True)
        if ep == decay_epoch:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    time_train = time.time() - start
    loss_train, acc_train = loss_train.item() / max(1, n_train), correct_train.item() / max(1, n_train)
    _, acc_test = epoch('test', testloader, net, optimizer, criterion, args, aug=False)
    print(f'{get_time()} Evaluate_{it_eval:02d}: epoch = {epochs:04d} train time = {int(time_train)} s train loss = '
          f'{loss_train:.6f} train acc = {acc_train:.4f}, test acc = {acc_test:.4f}')
    return net, acc_train, acc_test


# ---------------------------------------------------------------------------------------------
# Synthetic sets and the learning loops: one DC/DSA iteration (SPEC §4), one DM iteration (SPEC §6)
# ---------------------------------------------------------------------------------------------

def team_of(args):
    """The processes sharing this experiment (parallel.Team); a team of one outside torchrun's class split."""
    return getattr(args, 'team', None) or SOLO


SOLO = Team(shared=False)


def sample_class_indices(data, c, n, gen):
    """Training-set indices of n random images of class c, without replacement, from the generator gen (on the
    device of the data)."""
    idx = data.indices_class[c]
    return idx[torch.randperm(idx.shape[0], generator=gen, device=idx.device)[:n]]


def sample_class_images(data, c, n, gen):
    return data.images_train[sample_class_indices(data, c, n, gen)]


def class_generator(data, key, purpose, c):
    """The stream of one purpose ('real', 'init', 'bn', ...) for class c under key, on the data's device."""
    return rng.generator(data.images_train.device, *key, purpose, c)


def synthetic_labels(num_classes, ipc, device):
    return torch.arange(num_classes, device=device).repeat_interleave(ipc)


def real_init_indices(data, ipc, key):
    """Training-set indices of the real images --init real starts from: ipc per class, in class order."""
    for c in range(data.num_classes):
        if data.indices_class[c].numel() < ipc:
            raise UserError(f"class {c} has {data.indices_class[c].numel()} training images, fewer than ipc {ipc}")
    return torch.cat([sample_class_indices(data, c, ipc, class_generator(data, key, 'init', c))
                      for c in range(data.num_classes)])


def init_synthetic_set(data, ipc, init, device, key):
    """ipc images per class in class order: Gaussian noise, or random real images of the class. key: (seed,
    experiment), the address of every draw."""
    check_choice(init, ('noise', 'real'), '--init')
    shape = (data.num_classes * ipc, data.channel, *data.im_size)
    image_syn = torch.randn(shape, generator=rng.generator(device, *key, 'noise'), device=device)
    if init == 'real':
        image_syn[:] = data.images_train[real_init_indices(data, ipc, key)].to(device)
    return image_syn.requires_grad_(True), synthetic_labels(data.num_classes, ipc, device)


def freeze_bn_from_real(net, data, classes, key, n_per_class=16):
    """BatchNorm statistics from n real images per class (all classes, whatever share of them this process
    matches), then frozen (eval mode) while matching."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    img = torch.cat([sample_class_images(data, c, n_per_class, class_generator(data, key, 'bn', c)) for c in classes])
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch the statistics are exactly that batch's
    net.train()
    with torch.no_grad():
        net(img)
    for m in bns:
        m.eval()


DSA_CONDENSE_MODES = ('siamese', 'independent', 'real', 'syn', 'none')


def condense_dsa(args):
    """The DSA strategy used while learning the set (matching and inner-loop training), or None: none for DC, and
    none with --dsa_condense none (the DSA paper's Table 4 ablations)."""
    if not method_uses_dsa(args.method, args.dsa_strategy) or getattr(args, 'dsa_condense', 'siamese') == 'none':
        return None
    return args.dsa_strategy


def augment_class_pair(img_real, img_syn, key, c, dsa_strategy, dsa_param, mode='siamese'):
    """DSA of the real and the synthetic batch of class c while matching. siamese: one draw for both (the method);
    independent: a draw for each; real / syn: only that batch is augmented (Table 4 of the DSA paper)."""
    if not dsa_strategy or mode == 'none':
        return img_real, img_syn
    seeds = rng.generator('cpu', *key, 'dsa', c)
    seed_real = rng.draw_int(seeds)
    seed_syn = rng.draw_int(seeds) if mode == 'independent' else seed_real
    if mode in ('siamese', 'independent', 'real'):
        img_real = DiffAugment(img_real, dsa_strategy, seed=seed_real, param=dsa_param)
    if mode in ('siamese', 'independent', 'syn'):
        img_syn = DiffAugment(img_syn, dsa_strategy, seed=seed_syn, param=dsa_param)
    return img_real, img_syn


def class_batches(data, image_syn, i, c, ipc, batch_real, key, dsa_strategy=None, dsa_param=None, mode='siamese',
                  select=None):
    """The real batch and the synthetic images of class c (the i-th class), augmented by augment_class_pair.
    select (--clean_select, cleanscore.OnlineSelector.bind): the real batch is the batch_real it picks out of
    select.candidates(batch_real) drawn from the same stream."""
    if select is None:
        img_real = sample_class_images(data, c, batch_real, class_generator(data, key, 'real', c))
    else:
        candidates = sample_class_indices(data, c, select.candidates(batch_real), class_generator(data, key, 'real', c))
        img_real = data.images_train[select(data.images_train[candidates], candidates, c, batch_real)]
    img_syn = image_syn[i * ipc:(i + 1) * ipc]
    return augment_class_pair(img_real, img_syn, key, c, dsa_strategy, dsa_param, mode)


def class_pair_loss(net, params, img_real, img_syn, c, metric, stats=None):
    """Distance between the gradients of the real and of the synthetic batch of class c (the latter differentiable).
    stats: a learning_trace.StepRecorder that records both gradients' norms (--grad_stats), or None."""
    lab_real = torch.full((img_real.shape[0],), c, device=img_real.device, dtype=torch.long)
    lab_syn = torch.full((img_syn.shape[0],), c, device=img_syn.device, dtype=torch.long)
    gw_real = [g.detach() for g in mean_loss_grads(net, params, img_real, lab_real)]
    gw_syn = mean_loss_grads(net, params, img_syn, lab_syn, create_graph=True)
    if stats is not None:
        stats.add([c], gw_real, gw_syn)
    return match_loss(gw_syn, gw_real, metric)


def class_gradient_loss(net, image_syn, data, members, ipc, batch_real, metric, key, dsa_strategy=None,
                        dsa_param=None, mode='siamese', select=None, stats=None):
    """Sum over members (i, c) -- class c, the i-th class of the set -- of the distance between the gradients of the
    real and of the synthetic batch of that class."""
    params = [p for p in net.parameters() if p.requires_grad]
    loss = torch.zeros((), device=image_syn.device)
    for i, c in members:
        img_real, img_syn = class_batches(data, image_syn, i, c, ipc, batch_real, key, dsa_strategy, dsa_param, mode,
                                          select)
        loss = loss + class_pair_loss(net, params, img_real, img_syn, c, metric, stats)
    return loss


def class_gradients(net, images, labels, create_graph=False):
    """Gradients of the cross-entropy of each class's batch w.r.t. the network's parameters, all classes in one
    computation: images (K, n, C, H, W), labels (K,) -> list over parameters of (K, *shape) tensors.

    Each class gets its own copy of the parameters (expanded views: no memory); one vmapped forward runs class k's
    batch through copy k, and autograd.grad of the sum of the per-class mean losses gives, w.r.t. copy k, the gradient
    of class k. create_graph=True keeps the result differentiable w.r.t. the images (the synthetic set) by ordinary
    autograd. (vmap over torch.func.grad gives the same numbers but needs about twice the memory and time.)"""
    k, n = images.shape[:2]
    names = [name for name, _ in net.named_parameters()]
    copies = [p.detach().unsqueeze(0).expand(k, *p.shape).requires_grad_(True) for p in net.parameters()]
    buffers = dict(net.named_buffers())

    def forward(params, x):
        return functional_call(net, (dict(zip(names, params)), buffers), (x,))

    out = vmap(forward)(copies, images)
    loss = F.cross_entropy(out.flatten(0, 1), labels.repeat_interleave(n), reduction='sum') / n
    return list(torch.autograd.grad(loss, copies, create_graph=create_graph))


# Bound on classes x (batch_real + ipc) x pixels that one batched gradient computation takes: activation memory
# scales with it (ConvNet, batch_real 256, 10 classes of 28x28 images: about 6 GB).
BATCHED_CLASS_PIXELS = 3_000_000


def class_gradient_loss_batched(net, image_syn, data, members, ipc, batch_real, metric, key, dsa_strategy=None,
                                dsa_param=None, mode='siamese', select=None, stats=None):
    """class_gradient_loss with the per-class gradients of many classes computed together (class_gradients), for
    networks without BatchNorm. The same random draws (each addressed by its class), so the loss and its gradient on
    image_syn equal the loop's to float rounding. Classes go in chunks bounded by
    BATCHED_CLASS_PIXELS; when real batches differ in size (a class smaller than batch_real) it falls back to the
    per-class loop on the same batches."""
    if not members:
        return torch.zeros((), device=image_syn.device)
    classes = [c for _, c in members]
    pairs = [class_batches(data, image_syn, i, c, ipc, batch_real, key, dsa_strategy, dsa_param, mode, select)
             for i, c in members]
    if len({real.shape[0] for real, _ in pairs}) > 1:
        params = [p for p in net.parameters() if p.requires_grad]
        return sum(class_pair_loss(net, params, real, syn, c, metric, stats) for (real, syn), c in zip(pairs, classes))
    h, w = image_syn.shape[2:]
    most = max(1, BATCHED_CLASS_PIXELS // ((pairs[0][0].shape[0] + ipc) * h * w))
    chunk = math.ceil(len(classes) / math.ceil(len(classes) / most))  # even chunks of at most `most` classes
    loss = 0
    for start in range(0, len(classes), chunk):
        members = range(start, min(start + chunk, len(classes)))
        labels = torch.as_tensor([classes[i] for i in members], device=image_syn.device)
        gw_real = [g.detach() for g in class_gradients(net, torch.stack([pairs[i][0] for i in members]), labels)]
        gw_syn = class_gradients(net, torch.stack([pairs[i][1] for i in members]), labels, create_graph=True)
        if stats is not None:
            stats.add([classes[i] for i in members], gw_real, gw_syn, stacked=True)
        loss = loss + match_loss_classes(gw_syn, gw_real, metric).sum()
    return loss


def matching_step(net, image_syn, optimizer_img, data, args, classes, dsa, key):
    """One update of the synthetic set: BatchNorm frozen from real images, the gradient-matching loss over classes
    (all classes in one vmapped computation with --batched_classes, auto: on a GPU; BatchNorm models class by class),
    one optimizer step. key: (seed, experiment, iteration, outer step). Under torchrun's class split each process
    takes its share of the classes and one all-reduce sums the gradients, so every process takes the same step.
    Returns the loss (over all classes), detached."""
    team = team_of(args)
    ipc = image_syn.shape[0] // len(classes)
    batched = flag_on(getattr(args, 'batched_classes', 'auto'), image_syn.device) and not has_batchnorm(net)
    gradient_loss = class_gradient_loss_batched if batched else class_gradient_loss
    freeze_bn_from_real(net, data, classes, key)
    members = team.share(enumerate(classes))
    selector = getattr(args, 'clean_selector', None)  # --clean_select: candidates scored under this network
    loss = gradient_loss(net, image_syn, data, members, ipc, args.batch_real, args.dis_metric, key, dsa, args.dsa_param,
                         getattr(args, 'dsa_condense', 'siamese'), selector.bind(net) if selector else None,
                         step_recorder(args, key))
    optimizer_img.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    return step_shared(image_syn, optimizer_img, loss, team)


def step_shared(image_syn, optimizer_img, loss, team):
    """The optimizer step on the synthetic set after each process of the team added its classes' gradients: one
    all-reduce sums them (and the loss), so every process takes the same step. Returns the summed loss, detached."""
    if team.size > 1:
        if image_syn.grad is None:  # a process with no class left (more processes than classes)
            image_syn.grad = torch.zeros_like(image_syn)
        team.all_reduce_sum_(image_syn.grad)
        loss = team.all_reduce_sum_(loss.detach().clone())
    optimizer_img.step()
    return loss.detach()


def train_on_synthetic(net, optimizer_net, image_syn, label_syn, args, dsa, epochs, key):
    """The network follows the synthetic set: epochs of training on a frozen copy of it (no DC augmentation while
    learning, DSA if the method uses it), batch orders and augmentation from streams addressed by key. Every process
    of a team trains the same network the same way; rank 0's result is then broadcast, since GPU kernels need not be
    bit-identical across processes."""
    syn_train = image_syn.detach().clone()
    rand = NetRandom(rng.derive_seed(*key, 'inner'), rng.derive_seed(*key, 'inner', 'choice'), image_syn.device)
    for _ in range(epochs):
        train_epoch(net, optimizer_net, syn_train, label_syn, args.batch_train, dsa, None, args.dsa_param, rand)
    team_of(args).broadcast_(list(net.parameters()) + list(net.buffers()))


def fresh_network(args, data, device, key):
    """The iteration's randomly initialised network, its initialisation drawn from the stream of key."""
    with rng.seeded(device, *key, 'net'):
        return get_network(args.model, data.channel, data.num_classes, data.im_size, device=device)


def dc_iteration(image_syn, label_syn, optimizer_img, data, args, classes, outer_loop, inner_loop, key):
    """One outer iteration of gradient matching on a freshly initialised network; returns the mean loss (tensor).
    key: (seed, experiment, iteration), the address of every random draw of the iteration."""
    dsa = condense_dsa(args)
    net = fresh_network(args, data, image_syn.device, key)
    net.train()
    optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
    loss_sum = torch.zeros((), device=image_syn.device)
    for ol in range(outer_loop):
        loss_sum += matching_step(net, image_syn, optimizer_img, data, args, classes, dsa, key + (ol,))
        if ol == outer_loop - 1:
            break
        train_on_synthetic(net, optimizer_net, image_syn, label_syn, args, dsa, inner_loop, key + (ol,))
    return loss_sum / (len(classes) * outer_loop)


def auto_class_chunk(num_classes, ipc, batch_real, im_size, bn):
    """How many classes to embed at once. BN models see all classes together (as in the paper); otherwise bound
    the images*pixels per chunk so a large set (TinyImageNet ipc 50) fits in host memory."""
    if bn:
        return num_classes
    per_class = (ipc + batch_real) * im_size[0] * im_size[1]
    return max(1, min(num_classes, 4_000_000 // per_class))


def class_means(emb, counts):
    """Mean embedding of consecutive groups of rows of sizes counts."""
    seg = torch.repeat_interleave(torch.arange(len(counts), device=emb.device),
                                  torch.as_tensor(counts, device=emb.device))
    sums = torch.zeros(len(counts), emb.shape[1], device=emb.device, dtype=emb.dtype).index_add_(0, seg, emb)
    return sums / torch.as_tensor(counts, device=emb.device, dtype=emb.dtype).unsqueeze(1)


def dm_iteration(image_syn, label_syn, optimizer_img, data, args, classes, key, class_chunk=None):
    """One distribution-matching step: mean embeddings of real and synthetic images of each class are pulled together
    under a fresh random network. Classes are processed in chunks (under torchrun's class split, this process's share
    of them); gradients accumulate, one optimizer step. key: (seed, experiment, iteration)."""
    team = team_of(args)
    ipc = image_syn.shape[0] // len(classes)
    dsa = condense_dsa(args)
    mode = getattr(args, 'dsa_condense', 'siamese')
    net = fresh_network(args, data, image_syn.device, key)
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    members = team.share(enumerate(classes))
    chunk = class_chunk or auto_class_chunk(len(classes), ipc, args.batch_real, data.im_size, has_batchnorm(net))
    optimizer_img.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=image_syn.device)
    for start in range(0, len(members), chunk):
        reals, syns = [], []
        for i, c in members[start:start + chunk]:
            img_real = sample_class_images(data, c, args.batch_real, class_generator(data, key, 'real', c))
            img_real, img_syn = augment_class_pair(img_real, image_syn[i * ipc:(i + 1) * ipc], key, c, dsa,
                                                   args.dsa_param, mode)
            reals.append(img_real)
            syns.append(img_syn)
        with torch.no_grad():
            mean_real = class_means(embed_chunked(net, torch.cat(reals)), [r.shape[0] for r in reals])
        mean_syn = class_means(embed_chunked(net, torch.cat(syns)), [s.shape[0] for s in syns])
        loss = ((mean_real - mean_syn) ** 2).sum()
        loss.backward()
        loss_sum += loss.detach()
    return step_shared(image_syn, optimizer_img, loss_sum, team) / len(classes)
