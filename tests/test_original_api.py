"""The original utils.py API (SPEC §11, issue 16): other people's scripts run unchanged on this code.

tests/clients/ holds three scripts written the way the projects built on the original code are written, using only
the long import line; they run here end to end. The API's values are checked against SPEC's numbers and against
computations by hand, and evaluate_synset against our own evaluation on the same set and seed."""
import copy
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import training
import utils
from conftest import write_mnist
from data import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = os.path.join(ROOT, 'tests', 'clients')
FASHION_DIR = '/usr/share/datasets/fashion-mnist'
IMPORT_LINE = ('from utils import get_loops, get_dataset, get_network, get_eval_pool, evaluate_synset, get_daparam, '
               'match_loss, get_time, TensorDataset, epoch, DiffAugment, ParamDiffAug')


@pytest.fixture(scope='module')
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp('mnist'), train_per_class=12, test_per_class=6)


def run_client(script, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, os.path.join(CLIENTS, script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_clients_use_only_the_original_import_line():
    for name in ('dc_client.py', 'dm_client.py', 'eval_client.py'):
        source = open(os.path.join(CLIENTS, name)).read()
        project_imports = [line for line in source.splitlines()
                           if re.match(r'(from|import) (utils|data|training|base|experiment|results|coreset)\b', line)]
        assert project_imports == [IMPORT_LINE], name


def test_dsa_client_runs_unchanged(mnist, tmp_path):
    method = 'DSA'
    out = run_client('dc_client.py', '--dataset', 'MNIST', '--data_path', mnist, '--method', method, '--ipc', 1,
                     '--Iteration', 1, '--num_eval', 2, '--epoch_eval_train', 3, '--batch_real', 8,
                     '--dsa_strategy', 'color_crop_cutout_scale_rotate', '--save_path', tmp_path)
    assert len(re.findall(r'iter = \d{4}, loss = \d+\.\d+', out)) == 1
    assert len(re.findall(r'Evaluate_\d\d: epoch = 0003 .* test acc = [01]\.\d{4}', out)) == 2
    res = torch.load(tmp_path / f'res_{method}_MNIST_ConvNet_1ipc.pt')
    images, labels = res['data'][0]
    assert images.shape == (10, 1, 28, 28) and torch.equal(labels, torch.arange(10))
    assert len(res['accs_all_exps']['ConvNet']) == 2


def test_dm_client_then_eval_client(mnist, tmp_path):
    run_client('dm_client.py', '--dataset', 'MNIST', '--data_path', mnist, '--ipc', 2, '--Iteration', 2,
               '--batch_real', 8, '--save_path', tmp_path)
    res = tmp_path / 'res_DM_MNIST_ConvNet_2ipc.pt'
    images, labels = torch.load(res)['data'][0]
    assert images.shape == (20, 1, 28, 28) and torch.equal(labels, torch.arange(10).repeat_interleave(2))
    out = run_client('eval_client.py', '--dataset', 'MNIST', '--data_path', mnist, '--ipc', 2, '--method', 'DM',
                     '--num_eval', 2, '--epoch_eval_train', 2, '--syn_path', res)
    assert re.search(r'Evaluate 2 random ConvNet, mean = [01]\.\d{4}', out)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason='real FashionMNIST (dataset-fashion-mnist) not installed')
def test_dc_client_on_real_fashion_mnist(tmp_path):
    out = run_client('dc_client.py', '--dataset', 'FashionMNIST', '--data_path', tmp_path / 'data', '--method', 'DC',
                     '--ipc', 1, '--Iteration', 10, '--num_eval', 1, '--epoch_eval_train', 30, '--batch_real', 32,
                     '--save_path', tmp_path)
    acc = float(re.search(r'test acc = ([01]\.\d{4})', out).group(1))
    # 10 DC iterations from noise: far above chance (0.1) and above a noise set (about 0.17)
    assert acc > 0.3, out


def test_get_dataset_is_the_original_nine_tuple(mnist):
    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = \
        utils.get_dataset('MNIST', mnist)
    data = load_dataset('MNIST', mnist)
    assert (channel, tuple(im_size), num_classes) == (1, (28, 28), 10)
    assert mean == [0.1307] and std == [0.3081] and len(class_names) == 10
    assert len(dst_train) == 120 and len(dst_test) == 60
    image, label = dst_train[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.equal(image, data.images_train[7]) and type(label) is int and label == int(data.labels_train[7])
    assert testloader.batch_size == 256 and testloader.dataset is dst_test
    batches = list(testloader)
    assert torch.equal(torch.cat([b[0] for b in batches]), data.images_test)


def test_settings_are_spec_values():
    assert utils.get_loops(1) == (1, 1) and utils.get_loops(10) == (10, 50) and utils.get_loops(50) == (50, 10)
    with pytest.raises(Exception, match='ipc 7'):
        utils.get_loops(7)
    assert utils.get_default_convnet_setting() == (128, 3, 'relu', 'instancenorm', 'avgpooling')
    assert utils.get_eval_pool('M', 'ConvNet', 'ConvNet') == ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18']
    assert utils.get_eval_pool('B', 'ConvNet', 'ConvNet') == ['ConvNetBN', 'ConvNetASwishBN', 'AlexNetBN', 'VGG11BN',
                                                              'ResNet18BN']
    assert utils.get_eval_pool('S', 'ConvNetBN', 'ConvNetBN') == ['ConvNet']
    assert utils.get_eval_pool('SS', 'ConvNetBN', 'ConvNet') == ['ConvNetBN']
    assert utils.get_eval_pool('custom', 'ConvNet', 'LeNet') == ['LeNet']  # any other mode: [model_eval]
    base = dict(crop=4, scale=0.2, rotate=45, noise=0.001)
    assert utils.get_daparam('MNIST', 'ConvNet', 'ConvNet', 1) == dict(base, strategy='crop_scale_rotate')
    assert utils.get_daparam('MNIST', 'ConvNet', 'ConvNetBN', 1) == dict(base, strategy='crop_noise')
    assert utils.get_daparam('CIFAR10', 'ConvNet', 'ConvNetBN', 10) == dict(base, strategy='crop_noise')
    assert utils.get_daparam('CIFAR10', 'ConvNet', 'ConvNet', 10) == dict(base, strategy='none')
    p = utils.ParamDiffAug()
    assert (p.aug_mode, p.prob_flip, p.ratio_scale, p.ratio_rotate, p.ratio_crop_pad, p.ratio_cutout, p.brightness,
            p.saturation, p.contrast) == ('S', 0.5, 1.2, 15.0, 0.125, 0.5, 1.0, 2.0, 0.5)
    assert re.fullmatch(r'\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]', utils.get_time())


def test_get_network_original_call_and_attributes():
    net = utils.get_network('ConvNet', 3, 10)  # im_size defaults to (32, 32)
    assert hasattr(net, 'features') and hasattr(net, 'classifier')
    assert net.embed(torch.randn(2, 3, 32, 32)).shape == (2, 2048)
    assert sum(p.numel() for p in net.parameters()) == 320010  # SPEC §10


def test_distances_by_hand():
    g_real = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g_syn = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # rows: 1 - cos = 1 - 1/sqrt(2) and 1 - (-1) = 2 (up to the 1e-6 in the denominator)
    assert float(utils.distance_wb(g_real, g_syn)) == pytest.approx(1 - 2 ** -0.5 + 2, abs=1e-5)
    assert float(utils.distance_wb(torch.ones(5), torch.zeros(5))) == 0  # 1-D parameters do not count
    args = types.SimpleNamespace(dis_metric='mse', device='cpu')
    assert float(utils.match_loss([g_syn, torch.ones(2)], [g_real, torch.zeros(2)], args)) == pytest.approx(
        0 + 1 + 0 + 9 + 1 + 1)
    args.dis_metric = 'ours'
    assert float(utils.match_loss([g_syn, torch.ones(2)], [g_real, torch.zeros(2)], args)) == pytest.approx(
        1 - 2 ** -0.5 + 2, abs=1e-5)


def test_tensor_dataset():
    images = torch.ones(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    ds = utils.TensorDataset(images, torch.tensor([2, 0, 1]))
    assert len(ds) == 3 and ds[1][0].dtype == torch.float32 and not ds[1][0].requires_grad and int(ds[2][1]) == 1


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        CountingSGD.steps += 1
        return super().step(closure)


@pytest.mark.parametrize('ours', [False, True], ids=['torch-dataset', 'utils-TensorDataset'])
def test_epoch_counts_are_exact(ours):
    """A linear model whose predictions are known: loss and accuracy over the loader equal the formulas over all
    samples, whatever the batching; training takes one optimizer step per batch."""
    torch.manual_seed(0)
    n, d, k = 23, 4, 3
    x = torch.randn(n, d)
    y = torch.randint(0, k, (n,))
    net = nn.Linear(d, k)
    logits = net(x).detach()
    expected_acc = float((logits.argmax(1) == y).float().mean())
    expected_loss = float(F.cross_entropy(logits, y))
    ds = utils.TensorDataset(x, y) if ours else torch.utils.data.TensorDataset(x, y)
    args = types.SimpleNamespace(device='cpu', dsa=False, dc_aug_param=None)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False)
    loss, acc = utils.epoch('test', loader, net, None, nn.CrossEntropyLoss(), args, aug=False)
    assert acc == pytest.approx(expected_acc, abs=1e-7) and loss == pytest.approx(expected_loss, rel=1e-5)
    assert not net.training

    CountingSGD.steps = 0
    opt = CountingSGD(net.parameters(), lr=0.0)  # lr 0: the model stays, the counts stay checkable
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True)
    loss, acc = utils.epoch('train', loader, net, opt, nn.CrossEntropyLoss(), args, aug=False)
    assert CountingSGD.steps == 5 and net.training  # ceil(23 / 5) batches
    assert acc == pytest.approx(expected_acc, abs=1e-7) and loss == pytest.approx(expected_loss, rel=1e-5)
    dropped = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False, drop_last=True)
    _, acc = utils.epoch('test', dropped, net, None, nn.CrossEntropyLoss(), args, aug=False)
    assert acc == pytest.approx(float((logits[:20].argmax(1) == y[:20]).float().mean()), abs=1e-7)


def test_augment_follows_dc_aug_param():
    x = torch.randn(6, 1, 28, 28)
    assert utils.augment(x, dict(crop=4, scale=0.2, rotate=45, noise=0.001, strategy='none'), 'cpu') is x
    assert utils.augment(x, None, 'cpu') is x
    noisy = utils.augment(x, dict(crop=4, scale=0.2, rotate=45, noise=0.5, strategy='noise'), 'cpu')
    assert noisy.shape == x.shape and 0.3 < float((noisy - x).std()) < 0.7  # noise 0.5 taken from the dict


@pytest.mark.parametrize('dsa', [False, True], ids=['no-aug', 'DSA'])
def test_evaluate_synset_agrees_with_our_evaluation(mnist, dsa):
    """Same set, same initial network, same seed: evaluate_synset (original API) and training.train_and_test draw
    the same batch orders and augmentations from the global RNG, so they reach the same accuracy (up to a test
    sample flipped by float rounding of differently chunked test batches)."""
    data = load_dataset('MNIST', mnist)
    _, _, _, _, _, _, _, _, testloader = utils.get_dataset('MNIST', mnist)
    images, labels = data.images_train[:40], data.labels_train[:40]
    strategy = 'color_crop_cutout_scale_rotate'
    args = types.SimpleNamespace(device='cpu', lr_net=0.01, epoch_eval_train=6, batch_train=16, dsa=dsa,
                                 dsa_strategy=strategy, dsa_param=utils.ParamDiffAug(), dc_aug_param=None)
    torch.manual_seed(3)
    net = utils.get_network('ConvNet', 1, 10, (28, 28))
    twin = copy.deepcopy(net)
    torch.manual_seed(11)
    _, acc_train, acc_api = utils.evaluate_synset(0, net, images, labels, testloader, args)
    torch.manual_seed(11)
    acc_ours = training.train_and_test(twin, images, labels, data.images_test, data.labels_test, 6, 0.01, 16,
                                       dsa_strategy=strategy if dsa else None, dsa_param=args.dsa_param)
    assert 0 <= acc_train <= 1
    assert abs(acc_api - acc_ours) <= 1 / len(data.labels_test) + 1e-12
