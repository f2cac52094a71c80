"""CL_DM.py: class orders, seen-class test sets, memory files, and the benchmark end to end on a tiny 10-class set."""
import json
import os
import re

import numpy as np
import pytest
import torch

import CL_DM
import base
import coreset
import experiment
import utils
from data import load_dataset
from conftest import write_cifar10

STEPS = 5
IPC = 2


@pytest.fixture(scope='module')
def cifar_path(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp('cl_data'), train_per_class=6, test_per_class=3)


def cl_argv(data_path, save_path, method, *extra, num_orders=1):
    return ['--method', method, '--dataset', 'CIFAR10', '--model', 'ConvNetW32', '--ipc', str(IPC),
            '--steps', str(STEPS), '--num_eval', '1', '--num_orders', str(num_orders), '--epoch_eval_train', '0',
            '--batch_train', '32', '--batch_real', '4', '--data_path', str(data_path), '--save_path', str(save_path),
            '--device', 'cpu', '--quiet', *extra]


def read_json(save_path, method):
    path = os.path.join(save_path, f'cl_{method}_CIFAR10_ConvNetW32_{IPC}ipc_{STEPS}steps.json')
    with open(path) as f:
        return json.load(f)


def check_results(res, num_orders, num_eval=1):
    assert [s['classes_seen'] for s in res['steps']] == [2, 4, 6, 8, 10]
    for s in res['steps']:
        assert s['n'] == num_orders * num_eval and len(s['accs']) == num_orders
        # memories of every step so far; test images (3 per class) of exactly the classes seen so far
        assert s['train_images'] == [IPC * s['classes_seen']] * num_orders
        assert s['test_images'] == [3 * s['classes_seen']] * num_orders
        accs = np.asarray(s['accs'])
        assert ((accs >= 0) & (accs <= 1)).all()
        assert s['mean'] == pytest.approx(accs.mean() * 100) and s['std'] == pytest.approx(accs.std() * 100)
    cells = re.findall(r'& (\d+\.\d)\$\\pm\$(\d+\.\d)', res['latex_row'])
    assert len(cells) == STEPS
    assert [float(m) for m, _ in cells] == [round(s['mean'], 1) for s in res['steps']]
    for k, order in enumerate(res['class_orders']):
        np.random.seed(k)
        assert order == np.random.permutation(10).tolist()


def memory_files(data_path, method, num_orders):
    return [CL_DM.memory_path(str(data_path), method, 'CIFAR10', 'ConvNetW32', IPC, STEPS, k)
            for k in range(num_orders)]


# --------------------------------------------------------------------------- pure helpers

def test_class_orders_are_the_reference_numpy_permutations():
    for n in (10, 100):
        for k in range(5):
            np.random.seed(k)
            assert CL_DM.class_order(k, n).tolist() == np.random.permutation(n).tolist()
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    CL_DM.class_order(3, 100)
    assert np.random.rand() == expected  # the global numpy RNG is left alone


def test_steps_partition_the_class_order():
    order = CL_DM.class_order(1, 100)
    for steps in (5, 10, 4):
        parts = [CL_DM.step_classes(order, steps, s) for s in range(steps)]
        assert all(len(p) == 100 // steps for p in parts)
        assert sum(parts, []) == order.tolist()


def test_seen_test_set_holds_exactly_the_seen_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (200,), generator=g)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()  # each image carries its label
    seen = np.array([7, 2, 5])
    img, lab = CL_DM.seen_test_set(images, labels, seen)
    assert set(lab.tolist()) == {2, 5, 7}
    assert lab.numel() == int(sum((labels == c).sum() for c in seen))
    assert torch.equal(img[:, 0, 0, 0].long(), lab)
    assert torch.equal(lab, labels[(labels == 2) | (labels == 5) | (labels == 7)])  # order kept


def test_memory_path_and_missing_file_error(cifar_path, tmp_path, capsys):
    assert CL_DM.memory_path('d', 'DSA', 'CIFAR100', 'ConvNet', 20, 5, 3) == \
        os.path.join('d', 'metasets', 'cl_data', 'cl_res_DSA_CIFAR100_ConvNet_20ipc_5steps_seed3.pt')
    assert os.path.basename(CL_DM.memory_path('d', 'herding', 'CIFAR100', 'ConvNet', 20, 10, 0)) == \
        'cl_herding_CIFAR100_ConvNet_20ipc_10steps_seed0.pt'
    assert os.path.basename(CL_DM.memory_path('d', 'DM', 'CIFAR100', 'ConvNet', 20, 5, 4)) == \
        'cl_DM_CIFAR100_ConvNet_20ipc_5steps_seed4.pt'
    empty = tmp_path / 'no_data_here'  # fails before the dataset is looked for
    with pytest.raises(SystemExit) as exc:
        experiment.cli(lambda: CL_DM.main(cl_argv(empty, tmp_path, 'DM')))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and err.startswith('error: ')
    assert memory_files(empty, 'DM', 1)[0] in err
    assert f'python CL_DM.py --method DM --dataset CIFAR10 --model ConvNetW32 --ipc {IPC} --steps {STEPS} ' \
           f'--data_path {empty} --num_orders 1 --build' in err


@pytest.mark.parametrize('argv_extra, message', [
    (['--steps', '3'], 'does not divide'),
    (['--build'], 'needs none'),
    (['--method', 'DC'], "unknown method 'DC'"),
])
def test_bad_flags_fail_in_one_line(tmp_path, argv_extra, message):
    with pytest.raises((base.UserError, ValueError), match=message):
        CL_DM.main(cl_argv(tmp_path, tmp_path, 'random') + argv_extra)


# --------------------------------------------------------------------------- end to end

def test_random_end_to_end(cifar_path, tmp_path):
    out = CL_DM.main(cl_argv(cifar_path, tmp_path, 'random', num_orders=2))
    res = read_json(tmp_path, 'random')
    check_results(res, num_orders=2)
    assert out['latex_row'] == res['latex_row'] and res['memory_files'] is None


def test_published_format_file_loads_and_is_checked(cifar_path, tmp_path):
    data = load_dataset('CIFAR10', cifar_path)
    order = CL_DM.class_order(0, 10)
    published = []
    for s in range(STEPS):
        classes = CL_DM.step_classes(order, STEPS, s)
        idx = torch.cat([data.indices_class[c][:IPC] for c in classes])
        published.append([data.images_train[idx].clone().requires_grad_(False), data.labels_train[idx].clone()])
    path = memory_files(cifar_path, 'DSA', 1)[0]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'data': published}, path)
    try:
        CL_DM.main(cl_argv(cifar_path, tmp_path, 'DSA'))
        check_results(read_json(tmp_path, 'DSA'), num_orders=1)
        memory = CL_DM.load_memory(path, order, STEPS, data)
        assert all(torch.equal(m[0], p[0]) and torch.equal(m[1], p[1]) for m, p in zip(memory, published))
        with pytest.raises(base.UserError, match='introduces at another step'):
            CL_DM.check_memory({'data': published[::-1]}, path, order, STEPS, data)
        with pytest.raises(base.UserError, match='another class order'):  # our own files record their order
            CL_DM.check_memory({'data': published, 'class_order': order[::-1].tolist()}, path, order, STEPS, data)
        with pytest.raises(base.UserError, match='not --steps 10'):
            CL_DM.check_memory({'data': published}, path, order, 10, data)
    finally:
        os.remove(path)


@pytest.mark.parametrize('method, num_orders, budget', [
    ('herding', 1, ['--feat_epochs', '1']),
    ('DSA', 1, ['--Iteration_dsa', '1', '--outer_loop', '2', '--inner_loop', '1']),  # inner loop runs once
    ('DM', 1, ['--Iteration_dm', '2']),
])
def test_build_then_evaluate(cifar_path, tmp_path, monkeypatch, method, num_orders, budget):
    os.symlink(os.path.join(cifar_path, 'cifar-10-batches-py'), tmp_path / 'cifar-10-batches-py')
    data_path = tmp_path  # memories go under tmp_path/metasets, private to this test
    # the shared loops / selection run on the classes of one step at a time
    calls = []
    name = {'herding': 'herding_selection', 'DSA': 'dc_iteration', 'DM': 'dm_iteration'}[method]
    owner = coreset if method == 'herding' else utils
    real_fn = getattr(owner, name)

    def spy(*a, **kw):
        calls.append(a[0].shape[0] if method == 'herding' else list(a[5]))  # features rows / classes
        return real_fn(*a, **kw)
    monkeypatch.setattr(owner, name, spy)
    CL_DM.main(cl_argv(data_path, tmp_path / 'res', method, '--build', *budget, num_orders=num_orders))
    check_results(read_json(tmp_path / 'res', method), num_orders=num_orders)
    if method == 'herding':
        assert calls == [6] * 10  # one selection per class, among its 6 training images
    else:
        iterations = int(budget[1])
        expected = [CL_DM.step_classes(CL_DM.class_order(k, 10), STEPS, s)
                    for k in range(num_orders) for s in range(STEPS) for _ in range(iterations)]
        assert calls == expected

    data = load_dataset('CIFAR10', data_path)
    train = data.images_train.flatten(1)
    for k, path in enumerate(memory_files(data_path, method, num_orders)):
        obj = torch.load(path, map_location='cpu', weights_only=True)  # the published structure
        assert len(obj['data']) == STEPS
        order = CL_DM.class_order(k, 10)
        for s, (images, labels) in enumerate(obj['data']):
            classes = CL_DM.step_classes(order, STEPS, s)
            assert images.shape == (IPC * len(classes), 3, 32, 32) and images.dtype == torch.float32
            assert labels.tolist() == np.repeat(classes, IPC).tolist()  # the step's classes only, original labels
            # herding selects real images of the class; DSA/DM move them away from every real image
            same = (images.flatten(1)[:, None] == train[None]).all(-1)  # exact copies of training images
            if method == 'herding':
                assert (same.sum(1) == 1).all()
                nearest = same.float().argmax(1)
                assert torch.equal(data.labels_train[nearest], labels)
                assert len(set(nearest.tolist())) == len(nearest)  # no image selected twice
            else:
                assert not same.any()

    if method != 'DM':
        return
    # the built files are kept by a second --build, and evaluating them alone gives the same numbers
    mtimes = [os.path.getmtime(p) for p in memory_files(data_path, method, num_orders)]
    CL_DM.main(cl_argv(data_path, tmp_path / 'res2', method, '--build', *budget, num_orders=num_orders))
    assert [os.path.getmtime(p) for p in memory_files(data_path, method, num_orders)] == mtimes
    assert read_json(tmp_path / 'res2', method)['steps'] == read_json(tmp_path / 'res', method)['steps']
