"""The GPU paths on CUDA (issue 23): skipped without a GPU, run by benchmarks/gpu_check.sh where there is one.
The fast paths (torch.func evaluation, vmapped class gradients), bf16 and compile must give the one-by-one results
on CUDA up to float rounding, as the CPU tests (tests/test_speed_paths.py) show for the CPU."""
import argparse
import os

import pytest
import torch

import base
import training
import utils
from augment import ParamDiffAug
import test_speed_paths as speed_paths  # its evaluation settings, on DEVICE
from conftest import write_mnist
from data import load_dataset

# GPU_TESTS_DEVICE=cpu runs the same tests on the CPU (to check the tests themselves on a machine without a GPU)
DEVICE = os.environ.get('GPU_TESTS_DEVICE', 'cuda')
pytestmark = pytest.mark.skipif(DEVICE.startswith('cuda') and not torch.cuda.is_available(),
                                reason='needs CUDA (run by benchmarks/gpu_check.sh)')
DSA = 'color_crop_cutout_flip_scale_rotate'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp('mnist')
    write_mnist(path, train_per_class=8, test_per_class=20)
    return load_dataset('MNIST', str(path), download=False).to(DEVICE)


def eval_args(**kw):
    return speed_paths.eval_args(**{'device': DEVICE, 'epoch_eval_train': 20, **kw})


small_set = speed_paths.small_set


@pytest.mark.parametrize('method', ['DSA', 'DC'])
def test_batched_evaluation_agrees_with_one_by_one_on_cuda(data, method):
    images, labels = small_set(data)
    results = {}
    for flag in ('0', '1'):
        args = eval_args(method=method, eval_batched=flag, dsa_strategy=DSA if method == 'DSA' else 'None')
        results[flag] = training.evaluate_models(images, labels, data, args, 'ConvNet', range(4), (1, 0, 0))
    # the same random numbers on both paths; cuDNN's rounding may move a test image or two, not more
    assert results['1'] == pytest.approx(results['0'], abs=2.01 / len(data.labels_test))
    assert min(results['0']) > 0.2  # learned something (10 classes)


def test_batched_class_gradients_agree_on_cuda(data):
    out = []
    for flag in ('0', '1'):
        args = argparse.Namespace(method='DSA', model='ConvNet', dsa_strategy=DSA, dsa_param=ParamDiffAug(),
                                  lr_net=0.01, batch_real=4, batch_train=8, dis_metric='ours', batched_classes=flag)
        image_syn, label_syn = utils.init_synthetic_set(data, 2, 'real', DEVICE, (0, 0))
        opt = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
        loss = utils.dc_iteration(image_syn, label_syn, opt, data, args, list(range(10)), 2, 1, (0, 0, 0))
        out.append((loss.detach(), image_syn.detach()))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-3)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('flags', [{'bf16': True}, {'compile': True}, {'channels_last': True}])
def test_speed_flags_train_on_cuda(data, flags):
    images, labels = small_set(data)
    base.set_seed(0)
    accs = training.evaluate_models(images, labels, data, eval_args(**flags), 'ConvNet', range(2), (2, 0, 0))
    plain = training.evaluate_models(images, labels, data, eval_args(), 'ConvNet', range(2), (2, 0, 0))
    assert all(a > 0.2 for a in accs)
    if not flags.get('bf16'):  # compile and channels_last change the layout, not the numbers
        assert accs == pytest.approx(plain, abs=2.01 / len(data.labels_test))


def test_dm_iteration_runs_on_cuda_without_host_copies(data):
    args = argparse.Namespace(method='DM', model='ConvNet', dsa_strategy=DSA, dsa_param=ParamDiffAug(), batch_real=4,
                              class_chunk=0)
    image_syn, label_syn = utils.init_synthetic_set(data, 2, 'real', DEVICE, (0, 0))
    before = image_syn.detach().clone()
    opt = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    loss = utils.dm_iteration(image_syn, label_syn, opt, data, args, list(range(10)), (0, 0, 0))
    assert image_syn.device.type == torch.device(DEVICE).type
    assert torch.isfinite(loss) and not torch.equal(image_syn.detach(), before)
