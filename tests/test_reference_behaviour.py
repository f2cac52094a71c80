"""Tests that pin the reference's behaviour (issue 15, part 3), checked on recorded runs rather than against
expectations rebuilt from our own helpers: forward hooks on the BatchNorm layers, spies on the optimizers and on the
augmentation entry points, and expected counts and learning rates written out by hand from SPEC §4, §6 and §7.

- BatchNorm while matching (SPEC §4): statistics set from 16 real images per class, frozen during matching, updated
  as in training mode by the inner loop.
- DM with BatchNorm models (SPEC §6): every class in one batch; a smaller --class_chunk is refused in one line.
- The inner loop (SPEC §4): inner_loop epochs after every outer step but the last, DSA on, DC augmentation off.
- The evaluation schedule (SPEC §7): E + 1 epochs, lr x 0.1 with a fresh optimizer after epoch E // 2 + 1,
  momentum 0.9, weight decay 5e-4, in all three implementations (train_and_test, train_and_test_batched and the
  original API's evaluate_synset).

(The DSA op formulas are pinned by hand in tests/test_augment.py, the *_formula_by_hand tests.)"""
import argparse
import inspect
import math

import pytest
import torch
import torch.nn as nn

import base
import experiment
import main_DM
import training
import utils
from augment import ParamDiffAug
from conftest import write_mnist
from data import load_dataset
from networks import get_network

STRATEGY = 'color_crop_cutout_scale_rotate'
BN_PER_CLASS = 16  # SPEC §4: BatchNorm statistics from 16 real images per class


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def mnist_path(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp('mnist'), train_per_class=20, test_per_class=6)


@pytest.fixture(scope='module')
def data(mnist_path):
    return load_dataset('MNIST', mnist_path, download=False)


def make_args(**kw):
    a = dict(method='DC', model='ConvNetBN', dsa_strategy='None', dsa_param=ParamDiffAug(), lr_net=0.01,
             batch_real=8, batch_train=8, dis_metric='ours', lr_img=0.1, device='cpu')
    a.update(kw)
    return argparse.Namespace(**a)


def label_lookup(data):
    """Label of a training image found by its exact pixels: identifies real images independently of the sampler."""
    return {img.numpy().tobytes(): int(lab) for img, lab in zip(data.images_train, data.labels_train)}


def labels_of(images, lookup):
    return [lookup[img.detach().numpy().tobytes()] for img in images]


def bn_layers(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def record_bn(net):
    """Per BatchNorm layer, one record per forward: mode, input, output, affine parameters and the running
    statistics right after the forward."""
    records = {m: [] for m in bn_layers(net)}

    def hook(m, inputs, out):
        records[m].append(dict(training=m.training, x=inputs[0].detach().clone(), out=out.detach().clone(),
                               weight=m.weight.detach().clone(), bias=m.bias.detach().clone(),
                               mean=m.running_mean.clone(), var=m.running_var.clone(),
                               tracked=int(m.num_batches_tracked)))

    handles = [m.register_forward_hook(hook) for m in records]
    return records, handles


def normalise_by_hand(x, mean, var, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel, in float64."""
    shape = (1, -1, 1, 1)
    return ((x.double() - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
            * weight.double().view(shape) + bias.double().view(shape))


# ---------------------------------------------------------------------------------------------------------------
# 1. BatchNorm while matching (ConvNetBN)
# ---------------------------------------------------------------------------------------------------------------

def test_bn_statistics_after_freezing_are_those_of_16_real_images_per_class(data):
    torch.manual_seed(0)
    net = get_network('ConvNetBN', data.channel, data.num_classes, data.im_size, device='cpu')
    bns = bn_layers(net)
    assert len(bns) == 3
    for m in bns:  # stale statistics of an earlier training must not leak into the frozen ones
        m.running_mean.fill_(5.0)
        m.running_var.fill_(7.0)
        m.num_batches_tracked.fill_(9)
    net.eval()
    batches = []
    net.features.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].detach().clone()))
    records, _ = record_bn(net)
    classes = list(range(data.num_classes))

    utils.freeze_bn_from_real(net, data, classes, (0, 0, 0, 0))

    # one forward, of 16 distinct real training images of every class
    assert len(batches) == 1
    labels = labels_of(batches[0], label_lookup(data))
    assert sorted(labels) == sorted(c for c in classes for _ in range(BN_PER_CLASS))
    assert len({img.numpy().tobytes() for img in batches[0]}) == BN_PER_CLASS * len(classes)
    for m in bns:
        (rec,) = records[m]
        assert rec['training']  # the statistics come from a training-mode forward ...
        assert rec['x'].shape[0] == BN_PER_CLASS * len(classes)
        x = rec['x'].double()
        batch_mean = x.mean(dim=(0, 2, 3))
        batch_var = x.var(dim=(0, 2, 3), unbiased=True)  # what BatchNorm stores as running_var
        assert torch.allclose(m.running_mean.double(), batch_mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(m.running_var.double(), batch_var, rtol=1e-4, atol=1e-5)
        assert not m.training  # ... and are then frozen


def test_bn_statistics_do_not_change_while_matching(data):
    args = make_args()
    classes = list(range(data.num_classes))
    net = utils.fresh_network(args, data, 'cpu', (0, 0, 0))
    net.train()
    image_syn, _ = utils.init_synthetic_set(data, 1, 'real', 'cpu', (0, 0))
    optimizer_img = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    records, _ = record_bn(net)

    utils.matching_step(net, image_syn, optimizer_img, data, args, classes, None, (0, 0, 0, 0))

    for m in bn_layers(net):
        freeze, matching = records[m][0], records[m][1:]
        assert freeze['training'] and freeze['x'].shape[0] == BN_PER_CLASS * len(classes)
        # a real batch and a synthetic batch per class went through every layer, all with BN in eval mode
        assert sum(r['x'].shape[0] for r in matching) == len(classes) * (args.batch_real + 1)
        assert all(not r['training'] for r in matching)
        for r in matching:
            assert torch.equal(r['mean'], freeze['mean']) and torch.equal(r['var'], freeze['var'])
            assert r['tracked'] == freeze['tracked']
            # and the forward normalised with the frozen statistics, not the batch's
            expected = normalise_by_hand(r['x'], freeze['mean'], freeze['var'], r['weight'], r['bias'], m.eps)
            assert torch.allclose(r['out'].double(), expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(m.running_mean, freeze['mean']) and torch.equal(m.running_var, freeze['var'])
    assert image_syn.grad is not None and image_syn.grad.abs().sum() > 0  # the matching did happen


def test_inner_loop_updates_bn_statistics_in_training_mode(data):
    args = make_args(batch_train=8)
    classes = list(range(data.num_classes))
    ipc, epochs = 1, 2
    net = utils.fresh_network(args, data, 'cpu', (0, 0, 0))
    net.train()
    image_syn, label_syn = utils.init_synthetic_set(data, ipc, 'real', 'cpu', (0, 0))
    optimizer_img = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
    utils.matching_step(net, image_syn, optimizer_img, data, args, classes, None, (0, 0, 0, 0))
    frozen = {m: (m.running_mean.clone(), m.running_var.clone()) for m in bn_layers(net)}
    records, _ = record_bn(net)

    utils.train_on_synthetic(net, optimizer_net, image_syn, label_syn, args, None, epochs, (0, 0, 0, 0))

    # 10 synthetic images in batches of 8: 8 + 2 per epoch, every batch through every layer in training mode
    sizes = [8, 2] * epochs
    for m in bn_layers(net):
        recs = records[m]
        assert [r['x'].shape[0] for r in recs] == sizes
        assert all(r['training'] for r in recs)
        mean, var = frozen[m]
        for r in recs:
            x = r['x'].double()
            # normalised by the batch's own statistics (biased variance), as BatchNorm in training mode
            expected = normalise_by_hand(x, x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False), r['weight'],
                                         r['bias'], m.eps)
            assert torch.allclose(r['out'].double(), expected, rtol=1e-4, atol=1e-4)
            # running statistics updated after every batch by PyTorch's training-mode rule for the module's momentum
            # (None: cumulative average over num_batches_tracked batches)
            f = 1.0 / r['tracked'] if m.momentum is None else m.momentum
            mean = (1 - f) * mean.double() + f * x.mean(dim=(0, 2, 3))
            var = (1 - f) * var.double() + f * x.var(dim=(0, 2, 3), unbiased=True)
            assert torch.allclose(r['mean'].double(), mean, rtol=1e-4, atol=1e-5)
            assert torch.allclose(r['var'].double(), var, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(m.running_mean, frozen[m][0])  # they did change


# ---------------------------------------------------------------------------------------------------------------
# 2. DM with BatchNorm models
# ---------------------------------------------------------------------------------------------------------------

def test_dm_bn_model_embeds_every_class_in_one_batch(data, monkeypatch):
    args = make_args(method='DM', model='ConvNetBN', batch_real=4, lr_img=1.0)
    classes = list(range(data.num_classes))
    ipc = 2
    image_syn, label_syn = utils.init_synthetic_set(data, ipc, 'noise', 'cpu', (0, 0))
    before = image_syn.detach().clone()
    optimizer_img = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    seen = []  # per forward of the feature extractor: input, grad mode, modes of the BatchNorm layers
    make_network = utils.fresh_network

    def spy(*a, **k):
        net = make_network(*a, **k)
        net.features.register_forward_pre_hook(lambda module, inputs: seen.append(dict(
            x=inputs[0].detach().clone(), grad=torch.is_grad_enabled(),
            bn_training=[m.training for m in bn_layers(net)])))
        return net

    monkeypatch.setattr(utils, 'fresh_network', spy)
    utils.dm_iteration(image_syn, label_syn, optimizer_img, data, args, classes, (0, 0, 0), class_chunk=None)

    # two forwards: the real images of all classes (no gradient), then the whole synthetic set
    assert len(seen) == 2
    real, syn = seen
    assert not real['grad'] and syn['grad']
    assert sorted(labels_of(real['x'], label_lookup(data))) == sorted(c for c in classes
                                                                     for _ in range(args.batch_real))
    assert torch.equal(syn['x'], before)  # ipc images of every class, in class order
    # with the BatchNorm layers in training mode, so their statistics are those of all classes together
    assert all(real['bn_training']) and all(syn['bn_training']) and len(real['bn_training']) == 3


def dm_argv(mnist_path, tmp_path, model, chunk):
    return ['--dataset', 'MNIST', '--data_path', mnist_path, '--model', model, '--ipc', '1',
            '--class_chunk', str(chunk), '--Iteration', '1', '--num_exp', '1', '--num_eval', '1',
            '--epoch_eval_train', '1', '--device', 'cpu', '--quiet', '--save_path', str(tmp_path)]


def test_main_dm_refuses_a_class_chunk_that_splits_batchnorm_statistics(mnist_path, tmp_path, monkeypatch, capsys):
    condensed = []
    monkeypatch.setattr(experiment, 'condense', lambda args, data, step: condensed.append(args.model))
    with pytest.raises(base.UserError) as refused:
        main_DM.main(dm_argv(mnist_path, tmp_path, 'ConvNetBN', 3))
    message = str(refused.value)
    assert 'BatchNorm' in message and '--class_chunk 3' in message and '\n' not in message
    assert condensed == []
    # what a user sees: one line on stderr and exit status 2
    with pytest.raises(SystemExit) as exited:
        experiment.cli(lambda: main_DM.main(dm_argv(mnist_path, tmp_path, 'ConvNetBN', 3)))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'BatchNorm' in err
    # not refused: every class in one chunk on the BN model, and any chunk on a model without BatchNorm
    main_DM.main(dm_argv(mnist_path, tmp_path, 'ConvNetBN', 10))
    main_DM.main(dm_argv(mnist_path, tmp_path, 'ConvNet', 3))
    assert condensed == ['ConvNetBN', 'ConvNet']


# ---------------------------------------------------------------------------------------------------------------
# 3. The inner loop of gradient matching
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method,strategy', [('DSA', STRATEGY), ('DC', 'None')])
def test_inner_loop_epochs_and_augmentation(data, monkeypatch, method, strategy):
    # DC on MNIST: the evaluation would use the DC augmentation (crop_scale_rotate); the inner loop must not
    outer_loop, inner_loop = 3, 2
    classes, ipc, batch_train = [0, 1, 2], 2, 4
    args = make_args(method=method, model='ConvNet', dsa_strategy=strategy, batch_train=batch_train, batch_real=4)
    image_syn, label_syn = utils.init_synthetic_set(data, ipc, 'real', 'cpu', (0, 0))
    image_syn = image_syn.detach()[:len(classes) * ipc].clone().requires_grad_(True)
    label_syn = label_syn[:len(classes) * ipc]
    events, optimizers, epoch_calls, inner_aug, matching_aug = [], [], [], [], []

    class RecordingSGD(torch.optim.SGD):
        def __init__(self, params, *a, **k):
            super().__init__(params, *a, **k)
            optimizers.append(self)

        def step(self, closure=None):
            mine = any(p is image_syn for group in self.param_groups for p in group['params'])
            events.append('img' if mine else 'net')
            if not mine:
                assert self is net_optimizers()[0]  # one network optimizer for the whole iteration
            return super().step(closure)

    def net_optimizers():
        return [o for o in optimizers if not any(p is image_syn for g in o.param_groups for p in g['params'])]

    train_epoch = utils.train_epoch

    def epoch_spy(net, optimizer, images, labels, batch_size, dsa_strategy=None, dc_strategy=None, *a, **k):
        events.append('epoch')
        epoch_calls.append((dsa_strategy, dc_strategy, batch_size, images.shape[0]))
        return train_epoch(net, optimizer, images, labels, batch_size, dsa_strategy, dc_strategy, *a, **k)

    def dsa_spy(record, original):
        def spy(x, strategy='', seed=-1, param=None, generator=None):
            record.append((strategy, seed, x.shape[0]))
            return original(x, strategy, seed=seed, param=param, generator=generator)
        return spy

    def no_dc_augmentation(*a, **k):
        raise AssertionError('DC augmentation used while learning the set')

    monkeypatch.setattr(torch.optim, 'SGD', RecordingSGD)
    monkeypatch.setattr(utils, 'train_epoch', epoch_spy)
    monkeypatch.setattr(training, 'DiffAugment', dsa_spy(inner_aug, training.DiffAugment))
    monkeypatch.setattr(utils, 'DiffAugment', dsa_spy(matching_aug, utils.DiffAugment))
    monkeypatch.setattr(training, 'augment_dc', no_dc_augmentation)
    monkeypatch.setattr(utils, 'augment_dc', no_dc_augmentation)
    optimizer_img = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)

    utils.dc_iteration(image_syn, label_syn, optimizer_img, data, args, classes, outer_loop, inner_loop, (0, 0, 0))

    # by hand: 6 synthetic images in batches of 4 -> 2 network steps per epoch; inner_loop epochs after each
    # update of the set except the last; nothing after it
    steps_per_epoch = math.ceil(len(classes) * ipc / batch_train)
    assert steps_per_epoch == 2
    one_epoch = ['epoch'] + ['net'] * steps_per_epoch
    assert events == (['img'] + one_epoch * inner_loop) * (outer_loop - 1) + ['img']
    assert len(epoch_calls) == (outer_loop - 1) * inner_loop == 4
    (net_optimizer,) = net_optimizers()
    group = net_optimizer.param_groups[0]
    assert group['lr'] == args.lr_net and group['momentum'] == 0  # plain SGD at lr_net (the reference's)
    assert all(dc is None and size == batch_train and n == len(classes) * ipc for _, dc, size, n in epoch_calls)
    if method == 'DSA':
        assert all(dsa == STRATEGY for dsa, *_ in epoch_calls)
        # one independent (unseeded, per-image) DSA draw per training batch, of the strategy (or the op group of it
        # that was picked for the batch)
        assert len(inner_aug) == events.count('net')
        assert all(seed in (None, -1) and op in [STRATEGY] + STRATEGY.split('_') for op, seed, _ in inner_aug)
        # while matching: a seeded (Siamese) draw for the real and for the synthetic batch of each class
        assert len(matching_aug) == 2 * len(classes) * outer_loop
        assert all(isinstance(seed, int) and seed != -1 for _, seed, _ in matching_aug)
    else:
        assert all(dsa is None for dsa, *_ in epoch_calls)
        assert inner_aug == [] and matching_aug == []


# ---------------------------------------------------------------------------------------------------------------
# 4. The evaluation schedule
# ---------------------------------------------------------------------------------------------------------------

LR = 0.01

# (epochs E, training images n, batch) -> the learning rate of every optimizer step, written out by hand:
# E + 1 epochs of ceil(n / batch) steps; lr for epochs 0 .. E // 2 + 1, lr x 0.1 after
SCHEDULES = [
    (4, 10, 4, [LR] * 12 + [LR * 0.1] * 3),  # 5 epochs x 3 steps; decay after epoch 3
    (5, 10, 4, [LR] * 12 + [LR * 0.1] * 6),  # 6 epochs x 3 steps; decay after epoch 3
    (6, 8, 4, [LR] * 10 + [LR * 0.1] * 4),   # 7 epochs x 2 steps; decay after epoch 4
    (1, 6, 4, [LR] * 4),                     # 2 epochs x 2 steps; the decay after epoch 1 comes after the last step
]


def recording_sgd(log, optimizers):
    class RecordingSGD(torch.optim.SGD):
        def __init__(self, params, *a, **k):
            super().__init__(params, *a, **k)
            optimizers.append(self)

        def step(self, closure=None):
            group = self.param_groups[0]
            fresh = all(self.state[p].get('momentum_buffer') is None for p in group['params'])
            log.append(dict(optimizer=optimizers.index(self), lr=group['lr'], momentum=group['momentum'],
                            weight_decay=group['weight_decay'], dampening=group['dampening'],
                            nesterov=group['nesterov'], fresh=fresh))
            return super().step(closure)
    return RecordingSGD


def check_schedule(log, expected_lrs):
    assert [s['lr'] for s in log] == pytest.approx(expected_lrs, rel=1e-12)
    decay = [i for i in range(len(expected_lrs)) if expected_lrs[i] < LR]
    first_decayed = decay[0] if decay else None
    for i, s in enumerate(log):
        assert s['momentum'] == 0.9 and s['weight_decay'] == 5e-4 and s['dampening'] == 0 and not s['nesterov']
        # a new optimizer for the decayed epochs: its momentum starts from nothing
        assert s['optimizer'] == (0 if first_decayed is None or i < first_decayed else 1)
        assert s['fresh'] == (i == 0 or i == first_decayed)


def mlp_and_set(data, n, seed=0):
    torch.manual_seed(seed)
    net = get_network('MLP', data.channel, data.num_classes, data.im_size, device='cpu')
    return net, data.images_train[:n], data.labels_train[:n]


def training_batch_sizes(net):
    sizes = []
    net.register_forward_pre_hook(lambda module, inputs: sizes.append(inputs[0].shape[0]) if module.training else None)
    return sizes


@pytest.mark.parametrize('epochs,n,batch,expected_lrs', SCHEDULES)
def test_train_and_test_schedule(data, monkeypatch, epochs, n, batch, expected_lrs):
    log, optimizers = [], []
    monkeypatch.setattr(torch.optim, 'SGD', recording_sgd(log, optimizers))
    net, images, labels = mlp_and_set(data, n)
    sizes = training_batch_sizes(net)
    acc = training.train_and_test(net, images, labels, data.images_test, data.labels_test, epochs, LR, batch)
    assert 0 <= acc <= 1
    check_schedule(log, expected_lrs)
    assert sizes == [min(batch, n - s) for s in range(0, n, batch)] * (epochs + 1)


@pytest.mark.parametrize('epochs,n,batch,expected_lrs', SCHEDULES[:2])
def test_original_api_evaluate_synset_schedule(data, monkeypatch, epochs, n, batch, expected_lrs, capsys):
    log, optimizers = [], []
    monkeypatch.setattr(torch.optim, 'SGD', recording_sgd(log, optimizers))
    net, images, labels = mlp_and_set(data, n)
    sizes = training_batch_sizes(net)
    testloader = torch.utils.data.DataLoader(utils.TensorDataset(data.images_test, data.labels_test), batch_size=256)
    args = argparse.Namespace(device='cpu', lr_net=LR, epoch_eval_train=epochs, batch_train=batch, dsa=False,
                              dc_aug_param=None)
    utils.evaluate_synset(0, net, images, labels, testloader, args)
    check_schedule(log, expected_lrs)
    assert sizes == [min(batch, n - s) for s in range(0, n, batch)] * (epochs + 1)


# ---------------------------------------------------------------------------------------------------------------
# 5. The same schedule in batched evaluation (torch.func)
# ---------------------------------------------------------------------------------------------------------------

def test_batched_evaluation_keeps_the_schedule(data, monkeypatch):
    epochs, batch, k = 4, 8, 3
    idx = torch.cat([i[:2] for i in data.indices_class])  # 20 images: batches of 8, 8, 4
    images, labels = data.images_train[idx], data.labels_train[idx]
    # by hand: 5 epochs x 3 steps; decay after epoch 4 // 2 + 1 = 3
    expected_lrs = [LR] * 12 + [LR * 0.1] * 3
    common = (images, labels, data.images_test, data.labels_test, epochs, LR, batch, STRATEGY, None, ParamDiffAug())

    batched_log = []
    sgd_step = training.sgd_step_
    signature = inspect.signature(sgd_step)

    def step_spy(*a, **kw):
        bound = signature.bind(*a, **kw)
        bound.apply_defaults()
        buffers = bound.arguments['momentum_buffers']
        batched_log.append(dict(lr=bound.arguments['lr'], momentum=bound.arguments['momentum'],
                                weight_decay=bound.arguments['weight_decay'], fresh=not buffers, buffers=buffers))
        return sgd_step(*a, **kw)

    monkeypatch.setattr(training, 'sgd_step_', step_spy)
    made = [training.evaluation_network('MLP', data, 'cpu', (0, 0, 0, 'MLP', i)) for i in range(k)]
    batched_accs = training.train_and_test_batched([m[0] for m in made], [m[1] for m in made], *common)

    assert [s['lr'] for s in batched_log] == pytest.approx(expected_lrs, rel=1e-12)
    assert all(s['momentum'] == 0.9 and s['weight_decay'] == 5e-4 for s in batched_log)
    assert [s['fresh'] for s in batched_log] == [i in (0, 12) for i in range(15)]
    # one momentum state for the first 12 steps, a new one (the fresh optimizer) for the last 3
    assert all(s['buffers'] is batched_log[0]['buffers'] for s in batched_log[:12])
    assert all(s['buffers'] is batched_log[12]['buffers'] for s in batched_log[12:])
    assert batched_log[12]['buffers'] is not batched_log[0]['buffers']

    # one by one, with the same initialisations and random streams: the same schedule and the same accuracies
    loop_accs = []
    for i in range(k):
        log, optimizers = [], []
        monkeypatch.setattr(torch.optim, 'SGD', recording_sgd(log, optimizers))
        net, rand = training.evaluation_network('MLP', data, 'cpu', (0, 0, 0, 'MLP', i))
        loop_accs.append(training.train_and_test(net, *common, rand=rand))
        check_schedule(log, expected_lrs)
    assert batched_accs == pytest.approx(loop_accs, abs=1.01 / len(data.labels_test))
