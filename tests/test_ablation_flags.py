"""The DSA paper's Table 4 ablations as flags (issue 15): --dsa_condense siamese|independent|real|syn|none and
--dsa_eval 1|0; and --export_png (issue 12): a learned set as a torchvision ImageFolder."""
import pytest
import torch
from torchvision import datasets, transforms

import base
import main
import training
import utils
from conftest import write_mnist

STRATEGY = 'color_crop_cutout_scale_rotate'


@pytest.fixture(scope='module')
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp('mnist'), train_per_class=8, test_per_class=3)


def pair(mode, key):
    x = torch.rand(4, 1, 16, 16)
    real, syn = utils.augment_class_pair(x.clone(), x.clone(), key, 3, STRATEGY, utils.ParamDiffAug(), mode)
    return x, real, syn


def test_siamese_augments_both_batches_alike_and_independent_does_not():
    differ = 0
    for k in range(12):
        x, real, syn = pair('siamese', (k,))
        assert torch.equal(real, syn)  # the same image, the same transform in both batches
        x, real, syn = pair('independent', (k,))
        differ += not torch.equal(real, syn)
    assert differ >= 9  # two draws; they coincide only when both pick the same op with the same parameter


@pytest.mark.parametrize('mode,real_changed,syn_changed', [('real', True, False), ('syn', False, True),
                                                           ('none', False, False)])
def test_one_sided_and_no_augmentation(mode, real_changed, syn_changed):
    changed = {'real': 0, 'syn': 0}
    for k in range(8):
        x, real, syn = pair(mode, (k,))
        changed['real'] += not torch.equal(real, x)
        changed['syn'] += not torch.equal(syn, x)
    assert (changed['real'] > 0) == real_changed and (changed['syn'] > 0) == syn_changed


def test_dsa_with_no_condensation_augmentation_is_dc_with_real_init(mnist, tmp_path):
    common = ['--dataset', 'MNIST', '--data_path', mnist, '--ipc', '1', '--Iteration', '2', '--num_exp', '1',
              '--num_eval', '1', '--epoch_eval_train', '1', '--batch_real', '4', '--init', 'real', '--device', 'cpu',
              '--quiet', '--no_vis']
    main.main(common + ['--method', 'DC', '--save_path', str(tmp_path / 'dc')])
    main.main(common + ['--method', 'DSA', '--dsa_strategy', STRATEGY, '--dsa_condense', 'none',
                        '--save_path', str(tmp_path / 'none')])
    dc = base.load_torch_file(tmp_path / 'dc' / 'res_DC_MNIST_ConvNet_1ipc.pt', 'r')['data'][0][0]
    none = base.load_torch_file(tmp_path / 'none' / 'res_DSA_MNIST_ConvNet_1ipc.pt', 'r')['data'][0][0]
    assert torch.equal(dc, none)


def test_dsa_eval_switches_evaluation_augmentation_off():
    assert training.eval_settings('DSA', 'CIFAR10', 'ConvNet', STRATEGY)[:2] == (STRATEGY, None)
    assert training.eval_settings('DSA', 'CIFAR10', 'ConvNet', STRATEGY, dsa_eval=False) == (None, None, 300)
    assert training.eval_settings('DSA', 'MNIST', 'ConvNetBN', STRATEGY, dsa_eval=False)[:2] == (None, None)


def test_export_png_writes_an_image_folder(mnist, tmp_path):
    main.main(['--dataset', 'MNIST', '--data_path', mnist, '--ipc', '2', '--outer_loop', '1', '--inner_loop', '1',
               '--Iteration', '1', '--num_exp', '1',
               '--num_eval', '1', '--epoch_eval_train', '1', '--batch_real', '4', '--device', 'cpu', '--quiet',
               '--save_path', str(tmp_path / 'res'), '--export_png', str(tmp_path / 'png')])
    stored = base.load_torch_file(tmp_path / 'res' / 'res_DC_MNIST_ConvNet_2ipc.pt', 'r')['data'][0]
    folder = datasets.ImageFolder(str(tmp_path / 'png' / 'exp0'), transform=transforms.Compose([
        transforms.Grayscale(1), transforms.ToTensor(), transforms.Normalize([0.1307], [0.3081])]))
    assert len(folder) == 20 and len(folder.classes) == 10
    images = torch.stack([folder[i][0] for i in range(20)])
    labels = torch.tensor([folder[i][1] for i in range(20)])
    assert torch.equal(labels, stored[1])
    clipped = stored[0].mul(0.3081).add(0.1307).clamp(0, 1)  # what a PNG can hold
    assert (images.mul(0.3081).add(0.1307) - clipped).abs().max() <= 1 / 255 + 1e-6
