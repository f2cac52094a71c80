"""The fast paths of issue 7 give the results of the reference paths: batched evaluation (torch.func over networks)
equals one-by-one evaluation, batched per-class gradients equal the per-class loop, the hand-written SGD step equals
torch.optim.SGD, and the opt-in speed flags (channels_last, bf16, compile) take effect where documented."""
import argparse
import dataclasses
import types

import pytest
import torch

import base
import experiment
import training
import utils
from data import load_dataset
from augment import ParamDiffAug
from conftest import write_mnist
from networks import get_network

DSA = 'color_crop_cutout_scale_rotate'


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp('mnist')
    write_mnist(path, train_per_class=6, test_per_class=8)
    return load_dataset('MNIST', str(path), download=False)


def eval_args(**kw):
    a = dict(method='DSA', dsa_strategy=DSA, dsa_param=ParamDiffAug(), epoch_eval_train=3, default_epoch_eval=300,
             lr_net=0.01, batch_train=8, device='cpu', quiet=True, eval_batched='0', bf16=False, channels_last=False,
             compile=False)
    a.update(kw)
    return types.SimpleNamespace(**a)


def small_set(data, per_class=2):
    idx = torch.cat([i[:per_class] for i in data.indices_class])
    return data.images_train[idx], data.labels_train[idx]


def nets_and_randoms(model, data, k, seed=0):
    made = [training.evaluation_network(model, data, 'cpu', (seed, 0, 0, model, i)) for i in range(k)]
    return [m[0] for m in made], [m[1] for m in made]


# ---------------------------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize('model', ['ConvNet', 'MLP'])
@pytest.mark.parametrize('method,dsa', [('DSA', DSA), ('DC', 'None')])  # DC on MNIST: DC augmentation crop_scale_rotate
def test_batched_training_equals_one_by_one(data, model, method, dsa):
    images, labels = small_set(data, 1)  # 10 images, batch 4: three batches per epoch, the last one smaller
    dsa_strategy, dc_strategy, _ = training.eval_settings(method, 'MNIST', model, dsa)
    assert (dsa_strategy is None) == (method == 'DC') and (dc_strategy is None) == (method == 'DSA')
    # 3 epochs: the lr restart after epoch 3 // 2 + 1 = 2 is exercised by epoch 3
    common = (images, labels, data.images_test, data.labels_test, 3, 0.01, 4, dsa_strategy, dc_strategy, ParamDiffAug())

    initial = [flat(net) for net in nets_and_randoms(model, data, 3)[0]]
    loop_nets, rands = nets_and_randoms(model, data, 3)
    loop_accs = [training.train_and_test(net, *common, rand=r) for net, r in zip(loop_nets, rands)]
    batch_nets, rands = nets_and_randoms(model, data, 3)
    batch_accs = training.train_and_test_batched(batch_nets, rands, *common)
    swapped_nets, rands = nets_and_randoms(model, data, 2)
    training.train_and_test_batched(swapped_nets, rands[::-1], *common)  # network 0 trained with network 1's draws

    assert batch_accs == pytest.approx(loop_accs, abs=1.01 / len(data.labels_test))
    # Same training trajectories: the weights differ by a tiny fraction of how far training moved them (rounding
    # differences of the grouped convolutions, now and then a ReLU input within 1e-6 of zero that flips). Different
    # draws (swapped) or initialisations give differences of the order of the movement itself.
    for k in range(3):
        moved = (flat(loop_nets[k]) - initial[k]).norm()
        assert (flat(batch_nets[k]) - flat(loop_nets[k])).norm() < 1e-2 * moved
    assert (flat(swapped_nets[0]) - flat(batch_nets[0])).norm() > 0.3 * (flat(batch_nets[0]) - initial[0]).norm()
    assert (initial[0] - initial[1]).norm() > 0.3 * initial[0].norm()


def flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize('model,method', [('ConvNet', 'DSA'), ('MLP', 'DC')])
def test_evaluate_models_flag_does_not_change_accuracies(data, model, method, monkeypatch):
    images, labels = small_set(data)
    calls = []
    batched_fn = training.train_and_test_batched
    monkeypatch.setattr(training, 'train_and_test_batched', lambda *a, **k: calls.append(len(a[0])) or batched_fn(*a, **k))
    monkeypatch.setattr(training, 'BATCHED_EVAL_PIXELS', 2 * 8 * 28 * 28)  # groups of 2 networks: 2 + 2 + 1 (loop)
    results = {}
    for flag in ('0', '1'):
        base.set_seed(3)
        args = eval_args(method=method, eval_batched=flag)
        results[flag] = training.evaluate_models(images, labels, data, args, model, range(5), (3, 0, 0))
        results[flag + 'rng'] = torch.rand(1)  # neither path draws from the global RNG
    assert calls == [2, 2]
    # equal here; elsewhere a rounding difference may move one test image
    assert results['1'] == pytest.approx(results['0'], abs=1.01 / len(data.labels_test))
    assert torch.equal(results['0rng'], results['1rng'])


def test_batchnorm_models_and_module_flags_fall_back_to_the_loop(data, monkeypatch):
    images, labels = small_set(data, 1)

    def refuse(*a, **k):
        raise AssertionError('batched evaluation used')

    monkeypatch.setattr(training, 'train_and_test_batched', refuse)
    args = eval_args(eval_batched='1', epoch_eval_train=1)
    assert len(training.evaluate_models(images, labels, data, args, 'ConvNetBN', range(2), (0, 0, 0))) == 2
    assert len(training.evaluate_models(images, labels, data, eval_args(eval_batched='1', epoch_eval_train=1,
                                                                     channels_last=True), 'MLP', range(2), (0, 0, 0))) == 2
    with pytest.raises(AssertionError, match='batched evaluation used'):
        training.evaluate_models(images, labels, data, args, 'MLP', range(2), (0, 0, 0))
    # auto: batched only on a GPU
    assert training.flag_on('auto', 'cpu') is False and training.flag_on('auto', 'cuda') is True
    assert training.flag_on('1', 'cpu') is True and training.flag_on('0', 'cuda') is False


def test_sgd_step_equals_torch_optim_sgd():
    torch.manual_seed(0)
    p_ref = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    p_own = [p.detach().clone().requires_grad_(True) for p in p_ref]
    lr = 0.05
    opt = torch.optim.SGD(p_ref, lr=lr, momentum=0.9, weight_decay=5e-4)
    buffers = []
    for step in range(6):
        if step == 3:  # the evaluation protocol's restart: lr x0.1 and a fresh optimizer
            lr *= 0.1
            opt = torch.optim.SGD(p_ref, lr=lr, momentum=0.9, weight_decay=5e-4)
            buffers = []
        grads = [torch.randn_like(p) for p in p_ref]
        for p, g in zip(p_ref, grads):
            p.grad = g.clone()
        opt.step()
        training.sgd_step_(p_own, grads, buffers, lr)
        for a, b in zip(p_ref, p_own):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- gradient matching

@pytest.mark.parametrize('metric', ['ours', 'mse', 'cos'])
@pytest.mark.parametrize('dsa', [None, DSA])
def test_batched_class_gradients_equal_the_loop(data, metric, dsa):
    # in float64: in float32 a ReLU input within rounding of zero can flip between the two paths for some
    # initialisations, which changes a few gradient entries by up to 1e-2 relative; in float64 they agree to 1e-15
    data64 = dataclasses.replace(data, images_train=data.images_train.double())
    net = get_network('ConvNet', data.channel, data.num_classes, data.im_size, device='cpu').double()
    classes = list(range(data.num_classes))
    results = []
    for fn in (utils.class_gradient_loss, utils.class_gradient_loss_batched):
        torch.manual_seed(1)
        image_syn = torch.randn(2 * len(classes), 1, 28, 28, dtype=torch.float64, requires_grad=True)
        loss = fn(net, image_syn, data64, list(enumerate(classes)), 2, 4, metric, (1, 0, 0, 0), dsa, ParamDiffAug())
        loss.backward()
        results.append((loss.detach(), image_syn.grad.clone(), torch.rand(1)))
    (loss_a, grad_a, rng_a), (loss_b, grad_b, rng_b) = results
    assert torch.equal(rng_a, rng_b)  # neither drew from the global RNG
    assert loss_a > 0 and grad_a.abs().sum() > 0
    assert torch.allclose(loss_a, loss_b, rtol=1e-12, atol=0)
    assert torch.allclose(grad_a, grad_b, rtol=0, atol=1e-12 * grad_a.abs().max().item())


def test_batched_classes_fall_back_when_real_batches_differ(data, monkeypatch):
    # class 3 has only 3 training images, fewer than batch_real: real batches differ in size
    small = data.indices_class[3][:3]
    indices = [small if c == 3 else idx for c, idx in enumerate(data.indices_class)]
    uneven = dataclasses.replace(data, indices_class=indices)
    monkeypatch.setattr(utils, 'class_gradients', lambda *a, **k: pytest.fail('vmap path with uneven batches'))
    net = get_network('MLP', data.channel, data.num_classes, data.im_size, device='cpu')
    results = []
    for fn in (utils.class_gradient_loss, utils.class_gradient_loss_batched):
        torch.manual_seed(2)
        image_syn = torch.randn(10, 1, 28, 28, requires_grad=True)
        loss = fn(net, image_syn, uneven, list(enumerate(range(10))), 1, 5, 'ours', (2, 0, 0, 0), DSA, ParamDiffAug())
        loss.backward()
        results.append((loss.detach(), image_syn.grad))
    assert torch.allclose(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1])


def test_dc_iteration_flag_does_not_change_the_synthetic_set(data, monkeypatch):
    monkeypatch.setattr(utils, 'BATCHED_CLASS_PIXELS', 4 * (4 + 2) * 28 * 28)  # chunks of 4 classes: 4 + 4 + 2
    out = []
    for flag in ('0', '1'):
        args = argparse.Namespace(method='DSA', model='ConvNet', dsa_strategy=DSA, dsa_param=ParamDiffAug(),
                                  lr_net=0.01, batch_real=4, batch_train=8, dis_metric='ours', batched_classes=flag)
        base.set_seed(0)
        image_syn, label_syn = utils.init_synthetic_set(data, 2, 'real', 'cpu', (0, 0))
        opt = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
        loss = utils.dc_iteration(image_syn, label_syn, opt, data, args, list(range(10)), 2, 1, (0, 0, 0))
        out.append((loss.detach(), image_syn.detach()))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-4)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- flags, host syncs

def test_speed_flags_parse_with_defaults_off():
    parser = experiment.add_common_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.eval_batched, args.batched_classes) == ('auto', 'auto')
    assert not (args.channels_last or args.bf16 or args.compile)
    args = parser.parse_args(['--eval_batched', '0', '--batched_classes', '1', '--channels_last', '--bf16',
                              '--compile'])
    assert (args.eval_batched, args.batched_classes, args.channels_last, args.bf16, args.compile) == ('0', '1', True,
                                                                                                      True, True)


def test_channels_last_and_bf16_take_effect(data):
    images, labels = small_set(data, 1)
    net = get_network('ConvNet', data.channel, data.num_classes, data.im_size, device='cpu')
    dtypes, layouts = [], []
    net.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    second_conv = net.features[4]  # 128 input channels: channels_last is a real layout change there
    second_conv.register_forward_hook(lambda m, i, o: layouts.append(
        (i[0].is_contiguous(memory_format=torch.channels_last), i[0].is_contiguous())))
    training.train_and_test(net, images, labels, data.images_test, data.labels_test, 1, 0.01, 8, DSA, None,
                         ParamDiffAug(), bf16=True, channels_last=True)
    assert second_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert layouts and set(layouts) == {(True, False)}  # training and test forwards
    assert dtypes and set(dtypes) == {torch.bfloat16}
    # the batched path autocasts too
    nets, rands = nets_and_randoms('MLP', data, 2)
    dtypes = []
    nets[0].fc_3.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    training.train_and_test_batched(nets, rands, images, labels, data.images_test, data.labels_test, 1, 0.01, 8,
                                 bf16=True)
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_compile_flag_takes_effect_and_fails_soft(data, monkeypatch, capsys):
    images, labels = small_set(data, 1)
    calls = []

    def fake_compile(net):  # stands in for torch.compile: a compiled callable that records its use
        return lambda x: calls.append(x.shape) or net(x)

    monkeypatch.setattr(torch, 'compile', fake_compile)
    args = eval_args(compile=True, epoch_eval_train=1, eval_batched='1')
    base.set_seed(0)
    accs = training.evaluate_models(images, labels, data, args, 'MLP', range(2), (0, 0, 0))
    assert len(calls) > 0  # every training and test forward went through the compiled callable
    base.set_seed(0)
    assert accs == training.evaluate_models(images, labels, data, eval_args(epoch_eval_train=1), 'MLP', range(2),
                                            (0, 0, 0))

    def broken_compile(net):
        return lambda x: (_ for _ in ()).throw(RuntimeError('no C++ compiler\nfound'))

    monkeypatch.setattr(torch, 'compile', broken_compile)
    monkeypatch.setattr(training, 'COMPILE_ERROR', None)
    base.set_seed(0)
    # eager after the failure
    assert training.evaluate_models(images, labels, data, args, 'MLP', range(2), (0, 0, 0)) == accs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'torch.compile is unavailable' in err[0] and 'no C++ compiler found' in err[0]


def test_no_host_sync_inside_the_batch_loops(data, monkeypatch):
    images, labels = small_set(data, 3)  # 30 images, batch 8: four batches per epoch
    count = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, 'item', lambda self: count.append(1) or item(self))
    nets, rands = nets_and_randoms('ConvNet', data, 2)
    training.train_and_test(nets[0], images, labels, data.images_test, data.labels_test, 3, 0.01, 8, DSA, None,
                         ParamDiffAug(), rand=rands[0])
    assert len(count) == 1  # the final accuracy only
    count.clear()
    training.train_and_test_batched(nets, rands, images, labels, data.images_test, data.labels_test, 3, 0.01, 8, DSA)
    assert len(count) == 0


def test_cpu_chunk_size():
    convnet = get_network('ConvNet', 1, 10, (28, 28), device='cpu')
    x = torch.zeros(2, 1, 28, 28)
    assert training.cpu_chunk_size(convnet, x) == training.CPU_CHUNK_FLOATS // (128 * 28 * 28) == 20
    assert training.cpu_chunk_size(get_network('ConvNetD4', 3, 200, (64, 64), device='cpu'), torch.zeros(1, 3, 64, 64)) == 4
    assert training.cpu_chunk_size(convnet, x.to('meta')) is None  # not on the CPU: one batch
    assert training.cpu_chunk_size(get_network('MLP', 1, 10, (28, 28), device='cpu'), x) is None
    bn = get_network('ConvNetBN', 1, 10, (28, 28), device='cpu')
    assert training.cpu_chunk_size(bn.train(), x) is None  # batch statistics: chunks would change them
    assert training.cpu_chunk_size(bn.eval(), x) == 20


def test_cpu_chunks_give_the_results_of_whole_batches(data, monkeypatch):
    # float64, so that the chunked and the whole-batch sums agree to 1e-12 (in float32: to rounding)
    net = get_network('ConvNet', data.channel, data.num_classes, data.im_size, device='cpu').double()
    images, labels = data.images_train[:23].double(), data.labels_train[:23]
    params = list(net.parameters())
    results = {}
    for floats, name in ((3 * 128 * 28 * 28, 'chunks of 3'), (10**12, 'whole')):
        monkeypatch.setattr(training, 'CPU_CHUNK_FLOATS', floats)
        syn = images[:7].clone().requires_grad_(True)
        grads = training.mean_loss_grads(net, params, syn, labels[:7], create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()  # the matching loss's path back into the images
        net.zero_grad()
        logits = training.backward_mean_loss(net, images, labels)
        results[name] = ([g.detach() for g in grads], syn.grad, [p.grad.clone() for p in params], logits,
                         training.embed_chunked(net, images), training.test_accuracy(net, images, labels))
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    training.test_accuracy(net, images, labels)
    monkeypatch.setattr(training, 'CPU_CHUNK_FLOATS', 3 * 128 * 28 * 28)
    training.test_accuracy(net, images, labels)
    assert calls == [23] + [3] * 7 + [2]
    chunked, whole = results['chunks of 3'], results['whole']
    for a, b in zip(chunked, whole):
        if isinstance(a, list):
            assert all(torch.allclose(x, y, rtol=1e-12, atol=1e-14) for x, y in zip(a, b))
        elif isinstance(a, torch.Tensor):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
        else:
            assert a == b
