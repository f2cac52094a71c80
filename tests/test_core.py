"""The learning machinery of utils.py: gradient distance, seeding, settings tables, DC and DM iterations."""
import argparse
import math
import random

import numpy as np
import pytest
import torch

import base
import training
import utils
from data import load_dataset
from conftest import write_mnist
from augment import ParamDiffAug


# ---------------------------------------------------------------------------- gradient distance (SPEC §4)

def test_match_loss_ours_by_hand():
    # 2-D gradient with two rows: row 1 parallel (cos 1), row 2 orthogonal (cos 0) -> 0 + 1 = 1 (up to the 1e-6)
    g_syn = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g_real = torch.tensor([[3.0, 0.0], [5.0, 0.0]])
    bias_syn, bias_real = torch.tensor([1.0, -1.0]), torch.tensor([-7.0, 3.0])  # 1-D: contributes nothing
    d = utils.match_loss([g_syn, bias_syn], [g_real, bias_real], 'ours')
    expected = (1 - 3 / (1 * 3 + 1e-6)) + (1 - 0.0)
    assert d.item() == pytest.approx(expected, abs=1e-6)


def test_match_loss_ours_reshapes_conv_and_layernorm_gradients():
    torch.manual_seed(0)
    g4_syn, g4_real = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)    # conv weight: rows = output channels
    g3_syn, g3_real = torch.randn(5, 2, 2), torch.randn(5, 2, 2)          # layernorm weight (C, H, W)
    d = utils.match_loss([g4_syn, g3_syn], [g4_real, g3_real], 'ours').item()

    def rows(a, b):
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return sum(1 - float(a[i] @ b[i]) / (float(a[i].norm() * b[i].norm()) + 1e-6) for i in range(a.shape[0]))
    assert d == pytest.approx(rows(g4_syn, g4_real) + rows(g3_syn, g3_real), rel=1e-5)


def test_match_loss_mse_and_cos_by_hand():
    gs = [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]
    gr = [torch.tensor([[0.0, 2.0]]), torch.tensor([1.0])]
    assert utils.match_loss(gs, gr, 'mse').item() == pytest.approx(1.0 + 0.0 + 4.0)
    # concatenated vectors (1,2,3) and (0,2,1): cos = 7 / (sqrt(14) sqrt(5))
    assert utils.match_loss(gs, gr, 'cos').item() == pytest.approx(1 - 7 / (math.sqrt(14) * math.sqrt(5) + 1e-6), abs=1e-6)


def test_match_loss_zero_for_identical_gradients_and_unknown_metric():
    g = [torch.randn(3, 4), torch.randn(3)]
    assert utils.match_loss(g, g, 'ours').item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="bogus.*ours, mse, cos"):
        utils.match_loss(g, g, 'bogus')


# ---------------------------------------------------------------------------- seeding and settings

def test_set_seed_drives_python_numpy_torch():
    base.set_seed(123)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    base.set_seed(123)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


def test_loop_table_overrides_and_missing_ipc():
    assert utils.get_loops(1) == (1, 1)
    assert utils.get_loops(10) == (10, 50)
    assert utils.get_loops(50) == (50, 10)
    assert utils.get_loops(10, inner_loop=5) == (10, 5)
    assert utils.get_loops(7, 3, 4) == (3, 4)
    with pytest.raises(base.UserError, match='--outer_loop and --inner_loop'):
        utils.get_loops(7)


def test_eval_pools_and_augmentation_rules():
    assert utils.get_eval_pool('S', 'ConvNetBN') == ['ConvNet']
    assert utils.get_eval_pool('S', 'ResNet18BN_AP') == ['ResNet18']
    assert utils.get_eval_pool('SS', 'ConvNetBN') == ['ConvNetBN']
    assert utils.get_eval_pool('M', 'ConvNet') == ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18']
    with pytest.raises(ValueError, match='eval_mode'):
        utils.get_eval_pool('Q', 'ConvNet')
    strategy = 'color_crop_cutout_flip_scale_rotate'
    assert training.eval_settings('DSA', 'CIFAR10', 'ConvNet', strategy) == (strategy, None, 1000)
    assert training.eval_settings('DC', 'CIFAR10', 'ConvNet', strategy) == (None, None, 300)
    assert training.eval_settings('DC', 'MNIST', 'ConvNet', 'None') == (None, 'crop_scale_rotate', 1000)
    assert training.eval_settings('DC', 'CIFAR10', 'ConvNetBN', 'None') == (None, 'crop_noise', 1000)
    assert training.eval_settings('DC', 'MNIST', 'ConvNet', 'None', epoch_eval_train=7)[2] == 7  # explicit value wins


# ---------------------------------------------------------------------------- learning loops on a tiny dataset

def tiny_args(**kw):
    a = dict(method='DC', model='ConvNet', dsa_strategy='None', dsa_param=ParamDiffAug(), lr_net=0.01, batch_real=16,
             batch_train=256, dis_metric='ours', lr_img=0.1)
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.fixture
def mnist_data(tmp_path):
    write_mnist(tmp_path, train_per_class=16, test_per_class=4)
    return load_dataset('MNIST', str(tmp_path), download=False)


def test_gradient_matching_loss_decreases_on_a_fixed_network(mnist_data):
    base.set_seed(0)
    data = mnist_data
    net = utils.get_network('ConvNet', data.channel, data.num_classes, data.im_size, device='cpu')
    image_syn, _ = utils.init_synthetic_set(data, 1, 'noise', 'cpu', (0, 0))
    opt = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    classes = list(range(data.num_classes))
    losses = []
    for _ in range(15):
        # the same key every step, so the same real batches: only the synthetic images change
        loss = utils.class_gradient_loss(net, image_syn, data, list(enumerate(classes)), 1, 16, 'ours', (1,))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_dc_iteration_updates_the_synthetic_set_with_bn_model(mnist_data):
    base.set_seed(0)
    args = tiny_args(model='ConvNetBN', method='DSA', dsa_strategy='color_crop_cutout_scale_rotate')
    image_syn, label_syn = utils.init_synthetic_set(mnist_data, 2, 'real', 'cpu', (0, 0))
    before = image_syn.detach().clone()
    opt = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    loss = utils.dc_iteration(image_syn, label_syn, opt, mnist_data, args, list(range(10)), 2, 2, (0, 0, 0))
    assert torch.isfinite(loss) and loss.item() > 0
    assert not torch.equal(before, image_syn.detach())


def test_dm_loss_decreases(mnist_data):
    base.set_seed(0)
    args = tiny_args(method='DM', dsa_strategy='None', lr_img=1.0)
    image_syn, label_syn = utils.init_synthetic_set(mnist_data, 2, 'noise', 'cpu', (0, 0))
    opt = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    losses = []
    for it in range(20):  # the same key every step: the same random network and real batch
        losses.append(utils.dm_iteration(image_syn, label_syn, opt, mnist_data, args, list(range(10)), (5,)).item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize('dsa', ['None', 'color_crop_cutout_scale_rotate'])
def test_dm_class_chunks_equal_joint_optimisation(mnist_data, dsa):
    args = tiny_args(method='DM', dsa_strategy=dsa, lr_img=1.0)
    results = []
    for chunk in (None, 1, 3):
        base.set_seed(0)
        image_syn, label_syn = utils.init_synthetic_set(mnist_data, 2, 'real', 'cpu', (0, 0))
        opt = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
        for it in range(3):
            utils.dm_iteration(image_syn, label_syn, opt, mnist_data, args, list(range(10)), (0, 0, it),
                               class_chunk=chunk)
        results.append(image_syn.detach())
    assert torch.allclose(results[0], results[1], atol=1e-5)
    assert torch.allclose(results[0], results[2], atol=1e-5)


def test_dm_on_subset_of_classes_and_bn_model(mnist_data):
    base.set_seed(0)
    args = tiny_args(model='ConvNetBN', method='DM', dsa_strategy='color_crop_cutout_scale_rotate', lr_img=1.0)
    image_syn, label_syn = utils.init_synthetic_set(mnist_data, 3, 'real', 'cpu', (0, 0))
    image_syn = image_syn.detach()[:9].clone().requires_grad_(True)   # classes 0..2 only
    opt = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    loss = utils.dm_iteration(image_syn, label_syn[:9], opt, mnist_data, args, [0, 1, 2], (0, 0, 0))
    assert torch.isfinite(loss) and image_syn.grad is not None and image_syn.grad.abs().sum() > 0


def test_evaluation_learns_real_images_above_chance(mnist_data):
    base.set_seed(0)
    data = mnist_data
    net = utils.get_network('ConvNet', data.channel, data.num_classes, data.im_size, device='cpu')
    acc = training.train_and_test(net, data.images_train, data.labels_train, data.images_test, data.labels_test,
                               epochs=20, lr=0.01, batch_size=64)
    assert acc > 0.5  # chance is 0.1
