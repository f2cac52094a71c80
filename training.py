"""Training and evaluation of networks (SPEC §7): one epoch on an in-memory set, the evaluation protocol
(train_and_test, and train_and_test_batched for many networks at once with torch.func), the test pass, the CPU
fast paths (cache-sized chunks), and which augmentation and epoch count each method's evaluation uses."""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from augment import DiffAugment, ParamDiffAug, augment_dc, parse_strategy
import rng
from base import short_error
from networks import get_network, has_batchnorm

# Methods whose sets are real-image coresets or the whole training set: the DC paper evaluates them like DC sets
# (DC augmentation rule), so eval_settings needs the list; coreset.py implements them.
BASELINE_METHODS = ('random', 'herding', 'kcenter', 'forgetting', 'whole')

def dc_aug_strategy(dataset, model_eval):
    """DC augmentation during evaluation training (reference get_daparam): MNIST digits get crop/scale/rotate,
    ConvNetBN gets crop/noise, everything else none."""
    strategy = 'none'
    if dataset == 'MNIST':
        strategy = 'crop_scale_rotate'
    if model_eval == 'ConvNetBN':
        strategy = 'crop_noise'
    return strategy


def eval_settings(method, dataset, model_eval, dsa_strategy, epoch_eval_train=None, default_epochs=300, dsa_eval=True):
    """Augmentation and epoch count for training one evaluation model (SPEC §1, §7).

    Returns (dsa_strategy or None, dc_strategy or None, epochs). DSA-style methods augment with DSA; DC uses the DC
    augmentation rule, and so do the coreset baselines (BASELINE_METHODS) unless a DSA strategy is given, as the DC
    paper evaluates them like DC sets. dsa_eval False (--dsa_eval 0, the DSA paper's Table 4 ablations) trains the
    evaluation networks of a DSA-style set without augmentation. Epochs: 1000 when any augmentation is on, else
    default_epochs, unless the user set them."""
    uses_dsa = method_uses_dsa(method, dsa_strategy)
    dsa = dsa_strategy if uses_dsa and dsa_eval else None
    dc = None
    if not uses_dsa and (method == 'DC' or method in BASELINE_METHODS):
        strategy = dc_aug_strategy(dataset, model_eval)
        dc = None if strategy == 'none' else strategy
    if epoch_eval_train is not None:
        epochs = epoch_eval_train
    else:
        epochs = 1000 if (dsa or dc) else default_epochs
    return dsa, dc, epochs


def method_uses_dsa(method, dsa_strategy):
    if dsa_strategy in (None, '', 'none', 'None'):
        return False
    return method != 'DC'


def default_dsa_strategy(dataset):
    """Digits must not be mirrored (SPEC §5)."""
    if dataset in ('MNIST', 'SVHN'):
        return 'color_crop_cutout_scale_rotate'
    return 'color_crop_cutout_flip_scale_rotate'


def augment_batch(images, dsa_strategy=None, dc_strategy=None, dsa_param=None):
    """Independent (per-image) augmentation for network training, from the global RNG."""
    if dsa_strategy:
        return DiffAugment(images, dsa_strategy, param=dsa_param)
    if dc_strategy:
        return augment_dc(images, dc_strategy)
    return images


class NetRandom:
    """The private random streams of one evaluation network: its batch orders and its augmentation draws.

    Evaluation draws every random number of network k from its own NetRandom, so training the networks one by one
    or all together (train_and_test_batched) draws the same numbers and gives the same accuracies. Batch orders and
    augmentation parameters come from a generator on the device; the DSA op group is picked from a CPU generator,
    so picking it never waits for the GPU (a device generator would need a .item() per batch)."""

    def __init__(self, seed, choice_seed, device):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(int(seed))
        self.choice_generator = torch.Generator('cpu').manual_seed(int(choice_seed))

    def perm(self, n):
        return torch.randperm(n, generator=self.generator, device=self.device)

    def state(self):
        """Where both streams stand (CPU byte tensors), for a network stopped between epochs."""
        return {'generator': self.generator.get_state().cpu(), 'choice_generator': self.choice_generator.get_state()}

    def set_state(self, state):
        self.generator.set_state(state['generator'])
        self.choice_generator.set_state(state['choice_generator'])

    def augment(self, images, dsa_strategy=None, dc_strategy=None, dsa_param=None):
        """Like augment_batch: DSA with per-image parameters (one op group per call in aug_mode 'S'), else DC."""
        if dsa_strategy:
            param = dsa_param or ParamDiffAug()
            groups = parse_strategy(dsa_strategy)
            if param.aug_mode == 'S' and len(groups) > 1:
                # DiffAugment would pick the group itself; picking it here keeps the draw on the CPU. Given a single
                # group, DiffAugment draws no choice.
                dsa_strategy = groups[int(torch.randint(len(groups), (1,), generator=self.choice_generator))]
            return DiffAugment(images, dsa_strategy, param=param, generator=self.generator)
        if dc_strategy:
            return augment_dc(images, dc_strategy, generator=self.generator)
        return images


def autocast(device, enabled):
    """bfloat16 autocast on the device's type when enabled (--bf16), else a no-op context."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bool(enabled))


def train_epoch(net, optimizer, images, labels, batch_size, dsa_strategy=None, dc_strategy=None, dsa_param=None,
                rand=None, bf16=False, channels_last=False):
    """One pass over an in-memory set in random order. Nothing leaves the device.

    rand: a NetRandom for the batch order and augmentation (default: the global RNG). bf16: forward under bfloat16
    autocast. channels_last: feed the batches in channels_last memory format (the network should be in it too)."""
    net.train()
    n = images.shape[0]
    order = rand.perm(n) if rand is not None else torch.randperm(n, device=images.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if rand is not None:
            img = rand.augment(images[idx], dsa_strategy, dc_strategy, dsa_param)
        else:
            img = augment_batch(images[idx], dsa_strategy, dc_strategy, dsa_param)
        if channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        backward_mean_loss(net, img, labels[idx], bf16)
        optimizer.step()


# On the CPU a convolutional network runs fastest on batches whose largest activation (the first layer's output)
# stays in the caches: for ConvNet on 28x28 images, chunks of 16-20 images make forward+backward 1.7x and the
# forward 2.4x faster than batches of 256 or 1024 (docs/PERFORMANCE.md). The bound is in floats of that activation.
CPU_CHUNK_FLOATS = 2 * 1024 * 1024


def cpu_chunk_size(net, images):
    """How many images net should take per forward on the CPU, or None for the whole batch at once: on a GPU, for
    networks without convolutions, and while a BatchNorm layer uses batch statistics (chunks would change them)."""
    if images.device.type != 'cpu' or images.dim() != 4:
        return None
    modules = list(net.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    if not convs or any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in modules):
        return None
    return max(1, CPU_CHUNK_FLOATS // (convs[0].out_channels * images.shape[-2] * images.shape[-1]))


def batch_chunks(net, images):
    """Slices that cut a batch into the chunks net should take (cpu_chunk_size), or one slice for all of it."""
    n = images.shape[0]
    chunk = cpu_chunk_size(net, images) or max(1, n)
    return [slice(s, s + chunk) for s in range(0, n, chunk)]


def embed_chunked(net, images):
    """net.embed(images), computed chunk by chunk (batch_chunks) and concatenated; gradients flow into each chunk."""
    parts = [net.embed(images[part]) for part in batch_chunks(net, images)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def chunk_losses(net, images, labels, bf16=False):
    """(loss, logits) per chunk of the batch (batch_chunks), where loss is the chunk's share of the batch's mean
    cross-entropy: the chunk losses sum to that mean, so their gradients sum to its gradient up to float rounding."""
    n = images.shape[0]
    for part in batch_chunks(net, images):
        with autocast(images.device, bf16):
            out = net(images[part])
        if bf16:
            out = out.float()  # the loss in full precision
        yield F.cross_entropy(out, labels[part], reduction='sum') / n, out


def backward_mean_loss(net, images, labels, bf16=False):
    """backward() of the mean cross-entropy of a batch, chunk by chunk into .grad (chunk_losses). Returns the logits,
    detached."""
    outs = []
    for loss, out in chunk_losses(net, images, labels, bf16):
        loss.backward()
        outs.append(out.detach())
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def mean_loss_grads(net, params, images, labels, create_graph=False):
    """torch.autograd.grad of the mean cross-entropy of a batch w.r.t. params, summed over its chunks (chunk_losses).
    create_graph=True keeps the result differentiable w.r.t. the images."""
    total = None
    for loss, _ in chunk_losses(net, images, labels):
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return list(total)


@torch.inference_mode()
def test_accuracy(net, images, labels, batch_size=1024, bf16=False, channels_last=False):
    """Accuracy over a whole tensor set, in batches of batch_size (on the CPU, cache-sized chunks: cpu_chunk_size);
    the count stays on the device until the end. channels_last: feed the batches in channels_last memory format
    (the network should be in it too); bf16: forward under bfloat16 autocast."""
    net.eval()
    batch_size = min(batch_size, cpu_chunk_size(net, images) or batch_size)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        img = images[start:start + batch_size]
        if channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        with autocast(img.device, bf16):
            out = net(img)
        correct += (out.argmax(1) == labels[start:start + batch_size]).sum()
    return correct.item() / max(1, images.shape[0])


COMPILE_ERROR = None  # why torch.compile failed in this process, once it has: later networks skip it silently


class SoftCompiled:
    """torch.compile(net) that fails soft: if compiling is unavailable or fails (no C++ compiler, unsupported op), it
    says so in one line on stderr (once per process) and runs net eagerly. Exposes what training needs of a module."""

    def __init__(self, net):
        self.net = net
        self.compiled = None
        if COMPILE_ERROR is None:
            try:
                self.compiled = torch.compile(net)
            except Exception as e:  # e.g. a Python version or platform torch.compile does not support
                self._give_up(e)

    def _give_up(self, e):
        global COMPILE_ERROR
        COMPILE_ERROR = short_error(e, 120)
        print(f'warning: torch.compile is unavailable here ({COMPILE_ERROR}); running eagerly', file=sys.stderr)
        self.compiled = None

    def __call__(self, x):
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as e:  # compilation happens on the first calls: a failure shows up here
                self._give_up(e)
        return self.net(x)

    def train(self, mode=True):
        self.net.train(mode)
        return self

    def modules(self):
        return self.net.modules()

    def eval(self):
        return self.train(False)


def tensors_to_cpu(obj):
    """A copy of a nest of dicts and lists with every tensor copied to the CPU (a state to save)."""
    if isinstance(obj, dict):
        return {k: tensors_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors_to_cpu(v) for v in obj)
    return obj.detach().cpu().clone() if torch.is_tensor(obj) else obj


def train_and_test(net, images_train, labels_train, images_test, labels_test, epochs, lr, batch_size,
                   dsa_strategy=None, dc_strategy=None, dsa_param=None, rand=None, bf16=False, channels_last=False,
                   compile=False, resume=None, on_epoch=None):
    """The evaluation protocol: epochs+1 epochs of SGD (momentum 0.9, wd 5e-4), lr x0.1 with a fresh optimizer
    after epoch epochs//2, then test accuracy.

    rand: the network's NetRandom (default: the global RNG). bf16 / channels_last / compile: the opt-in speed flags
    (bfloat16 autocast of training and test forwards, channels_last network and batches, torch.compile).
    A network that takes hours (the whole-dataset bound on a CPU) can stop between epochs and go on: on_epoch(state)
    is called after every epoch but the last with a function that returns the training's state (network, optimizer,
    learning rate, rand's streams, epochs done), and resume= such a state goes on from there, to the same bits as a
    training never stopped. Both need rand."""
    images_train = images_train.detach()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = SoftCompiled(net) if compile else net
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    decay_epoch = epochs // 2 + 1
    first = 0
    if resume is not None:
        first, lr = resume['epoch'], resume['lr']
        net.load_state_dict(resume['net'])
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        optimizer.load_state_dict(resume['optimizer'])
        rand.set_state(resume['rand'])
    for ep in range(first, epochs + 1):
        train_epoch(model, optimizer, images_train, labels_train, batch_size, dsa_strategy, dc_strategy, dsa_param,
                    rand, bf16, channels_last)
        if ep == decay_epoch:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        if on_epoch is not None and ep < epochs:
            on_epoch(lambda ep=ep, lr=lr, optimizer=optimizer: {
                'epoch': ep + 1, 'epochs': epochs, 'lr': lr, 'rand': rand.state(),
                'net': tensors_to_cpu(net.state_dict()),
                'optimizer': tensors_to_cpu(optimizer.state_dict())})
    return test_accuracy(model, images_test, labels_test, bf16=bf16, channels_last=channels_last)


# Networks x images a batched test forward takes at once (the one-by-one test pass takes 1024 images).
BATCHED_TEST_IMAGES = 1024


# Bound on networks x batch x pixels that batched evaluation training holds at once (activations scale with it).
BATCHED_EVAL_PIXELS = 4_000_000


def sgd_step_(params, grads, momentum_buffers, lr, momentum=0.9, weight_decay=5e-4):
    """In place, what torch.optim.SGD(lr, momentum, weight_decay) does on its step (no dampening, no nesterov):
    d = g + wd * p; buf = d on the first step, else momentum * buf + d; p -= lr * buf. Works on stacked tensors of
    many networks at once. momentum_buffers is a list, empty for a fresh optimizer, filled on the first step."""
    with torch.no_grad():
        d = torch._foreach_add(grads, params, alpha=weight_decay)
        if not momentum_buffers:
            momentum_buffers.extend(torch.clone(x).detach() for x in d)
        else:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_add_(momentum_buffers, d)
        torch._foreach_add_(params, momentum_buffers, alpha=-lr)


def train_and_test_batched(nets, rands, images_train, labels_train, images_test, labels_test, epochs, lr, batch_size,
                           dsa_strategy=None, dc_strategy=None, dsa_param=None, bf16=False):
    """train_and_test of several networks of one architecture (without BatchNorm) at once: their parameters are
    stacked (torch.func.stack_module_state) and one vmapped forward/backward serves them all. Network k keeps its own
    initialisation, batch orders and augmentation draws (rands[k]), so the accuracies equal those of train_and_test
    with rand=rands[k] up to float rounding. Returns the list of test accuracies."""
    images_train = images_train.detach()
    skeleton = nets[0]  # functional_call only borrows its structure; the stacked tensors are the parameters
    for net in nets:
        net.train()
    params, buffers = stack_module_state(nets)
    names, values = list(params), list(params.values())

    def forward(p, b, x):
        if bf16:  # autocast does not reach inside vmap: the forward runs on bfloat16 copies (fp32 master weights)
            p = {name: v.to(torch.bfloat16) for name, v in p.items()}
            x = x.to(torch.bfloat16)
        return functional_call(skeleton, (p, b), (x,))

    forward_each = vmap(forward)  # network k on its own batch x[k]
    forward_shared = vmap(forward, in_dims=(0, 0, None))  # every network on the same batch
    n, k = images_train.shape[0], len(nets)
    momentum_buffers = []
    decay_epoch = epochs // 2 + 1
    for ep in range(epochs + 1):
        orders = [r.perm(n) for r in rands]
        for start in range(0, n, batch_size):
            idx = [o[start:start + batch_size] for o in orders]
            img = torch.stack([r.augment(images_train[i], dsa_strategy, dc_strategy, dsa_param)
                               for r, i in zip(rands, idx)])
            lab = torch.stack([labels_train[i] for i in idx])
            out = forward_each(params, buffers, img)
            # the sum of the networks' mean losses: each network's gradient is that of its own mean loss
            loss = F.cross_entropy(out.float().flatten(0, 1), lab.flatten(), reduction='sum') / lab.shape[1]
            grads = torch.autograd.grad(loss, values)
            sgd_step_(values, list(grads), momentum_buffers, lr)
        if ep == decay_epoch:
            lr *= 0.1
            momentum_buffers = []  # a fresh optimizer: the momentum restarts
    params = {name: v.detach() for name, v in zip(names, values)}
    with torch.no_grad():  # leave each network trained, as train_and_test does
        for i, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.copy_(params[name][i])
    skeleton.eval()
    correct = torch.zeros(k, dtype=torch.long, device=images_test.device)
    step = max(1, BATCHED_TEST_IMAGES // k)
    with torch.inference_mode():
        for start in range(0, images_test.shape[0], step):
            out = forward_shared(params, buffers, images_test[start:start + step])
            correct += (out.argmax(-1) == labels_test[start:start + step]).sum(1)
    return (correct.double() / max(1, images_test.shape[0])).tolist()


def flag_on(value, device):
    """An on/off/auto speed flag: 'auto' (or None) means on exactly when the device is a GPU."""
    if value in (None, 'auto'):
        return torch.device(device).type == 'cuda'
    return str(value).lower() not in ('0', 'false', 'off', 'no')


def eval_group_size(num_eval, n_train, batch_size, im_size):
    """How many evaluation networks train together: bounded by BATCHED_EVAL_PIXELS (networks x batch x pixels)."""
    per_net = min(batch_size, max(1, n_train)) * im_size[0] * im_size[1]
    return max(1, min(num_eval, BATCHED_EVAL_PIXELS // per_net))


def evaluation_network(model_eval, data, device, key):
    """Evaluation network `key` = (seed, experiment, iteration, model, index) and its private random streams (batch
    orders, augmentation): all drawn from streams addressed by the key, so a network is the same whichever process
    trains it, in which group, and whatever else the run evaluates."""
    with rng.seeded(device, *key, 'net'):
        net = get_network(model_eval, data.channel, data.num_classes, data.im_size, device=device)
    return net, NetRandom(rng.derive_seed(*key, 'train'), rng.derive_seed(*key, 'choice'), device)


def evaluate_models(images, labels, data, args, model_eval, indices, key, desc='', on_group=None, partial=None,
                    on_epoch=None):
    """Train the evaluation networks `indices` (their numbers among the num_eval of this evaluation) of one
    architecture on a (synthetic) set; return their test accuracies in that order. key: (seed, experiment, iteration).
    on_group(indices, accs), if given, is called as each network (or group trained together) finishes: a long
    evaluation can keep what it has (the whole-dataset bound's checkpoints). A network trained alone can also keep
    where it stands between epochs: on_epoch(index, state) hears of it (train_and_test's on_epoch), and partial =
    (index, state) goes on from such a state (that network is trained alone, first).

    Models without BatchNorm are trained together in groups (train_and_test_batched) when --eval_batched is on (auto:
    on a GPU); otherwise, and with --channels_last or --compile (which act on modules), one by one. Both paths draw
    the same random numbers, so the accuracies agree to float rounding."""
    dsa, dc, epochs = eval_settings(args.method, data.name, model_eval, args.dsa_strategy, args.epoch_eval_train,
                                    args.default_epoch_eval, bool(int(getattr(args, 'dsa_eval', 1))))
    bf16, channels_last, compile = (getattr(args, f, False) for f in ('bf16', 'channels_last', 'compile'))
    indices = list(indices)
    if not indices:
        return []

    def alone(k, net, rand, resume=None):  # network k trained by itself: the one path that keeps its epochs
        return train_and_test(net, images, labels, data.images_test, data.labels_test, epochs, args.lr_net,
                              args.batch_train, dsa, dc, args.dsa_param, rand, bf16, channels_last, compile,
                              resume=resume, on_epoch=None if on_epoch is None else (lambda st: on_epoch(k, st)))
    if partial is not None and partial[0] in indices:
        k, state = partial
        acc = alone(k, *evaluation_network(model_eval, data, args.device, (*key, model_eval, k)), resume=state)
        if on_group is not None:
            on_group([k], [acc])
        rest = [i for i in indices if i != k]
        more = iter(evaluate_models(images, labels, data, args, model_eval, rest, key, desc, on_group,
                                    on_epoch=on_epoch))
        return [acc if i == k else next(more) for i in indices]
    first = evaluation_network(model_eval, data, args.device, (*key, model_eval, indices[0]))
    batched = (flag_on(getattr(args, 'eval_batched', 'auto'), args.device) and not has_batchnorm(first[0])
               and not channels_last and not compile and len(indices) > 1)
    group = eval_group_size(len(indices), images.shape[0], args.batch_train, data.im_size) if batched else 1
    accs = []
    with tqdm(total=len(indices), desc=desc or f'eval {model_eval}', leave=False, disable=args.quiet) as bar:
        while len(accs) < len(indices):
            members = indices[len(accs):len(accs) + group]
            made = [first if not accs and i == 0 else evaluation_network(model_eval, data, args.device,
                                                                         (*key, model_eval, k))
                    for i, k in enumerate(members)]
            nets, rands = [m[0] for m in made], [m[1] for m in made]
            if len(members) > 1:
                new = train_and_test_batched(nets, rands, images, labels, data.images_test, data.labels_test,
                                             epochs, args.lr_net, args.batch_train, dsa, dc, args.dsa_param, bf16)
            else:
                new = [alone(members[0], nets[0], rands[0])]
            accs += new
            if on_group is not None:
                on_group(members, new)
            bar.update(len(members))
    return accs
