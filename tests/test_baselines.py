"""Coreset baselines (random, herding, k-center, forgetting) and the whole-dataset bound of main.py.

Selection rules are checked on hand-made features whose greedy picks are worked out in the comments; the
pipeline runs in-process through main.main on tiny FashionMNIST-format data (MLP evaluation keeps it fast).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import main
import base
import coreset
import experiment
import training
import utils
from data import load_dataset
from conftest import write_fashion_mnist

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(data_path, save_path, method, *extra):
    return main.main(['--dataset', 'FashionMNIST', '--data_path', str(data_path), '--save_path', str(save_path),
                      '--method', method, '--device', 'cpu', '--quiet', *extra])


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    """10 classes x 8 training images (smallest class 8), loaded as DatasetTensors, and its data_path."""
    path = write_fashion_mnist(tmp_path_factory.mktemp('fm_small'), train_per_class=8, test_per_class=4)
    return load_dataset('FashionMNIST', path), path


def selection_args(save_path, ipc=3, model='ConvNetW32'):
    args = main.parse_args(['--dataset', 'FashionMNIST', '--model', model, '--ipc', str(ipc), '--save_path',
                            str(save_path), '--device', 'cpu', '--quiet', '--feat_epochs', '1', '--forget_epochs', '2'])
    return experiment.check_common_args(args)


# ----------------------------------------------------------------------------- selection rules

def test_herding_follows_the_running_mean():
    # mean of the five points is (0, 0).
    # pick 1: the point nearest the mean, (-1, 0).
    # pick 2: the mean of {(-1,0), x} nearest (0,0): x=(4,0) gives (1.5,0) -> 2.25, x=(0,+-3) gives 2.5, (-3,0) 4.
    # pick 3: (-3,0) makes the running mean exactly (0,0).
    # Ranking by distance to the mean would instead take a point at distance 3 second, not (4, 0).
    features = torch.tensor([[4., 0.], [-1., 0.], [-3., 0.], [0., 3.], [0., -3.]])
    assert coreset.herding_selection(features, 3).tolist() == [1, 0, 2]
    assert sorted(coreset.herding_selection(features, 5).tolist()) == [0, 1, 2, 3, 4]


def test_kcenter_starts_at_the_mean_and_covers_every_cluster():
    # three tight clusters and one point exactly at the overall mean (0, 10/3)
    jitter = torch.tensor([[0., 0.], [0.3, 0.], [0., 0.3]])
    clusters = torch.cat([c + jitter for c in torch.tensor([[10., 0.], [-10., 0.], [0., 10.]])])
    centre = clusters.mean(0, keepdim=True)
    features = torch.cat([clusters[:4], centre, clusters[4:]])  # the centre at position 4, not first
    picks = coreset.kcenter_selection(features, 4)
    assert picks[0].item() == 4
    cluster_of = lambda i: (i if i < 4 else i - 1) // 3  # noqa: E731
    assert sorted(cluster_of(i) for i in picks[1:].tolist()) == [0, 1, 2]
    # coverage: every point lies within the cluster diameter of a selected point
    radius = torch.cdist(features, features[picks]).min(1).values.max()
    assert radius <= 0.3 * 2 ** 0.5 + 1e-6


def test_selection_rules_reject_more_picks_than_examples():
    with pytest.raises(ValueError):
        coreset.herding_selection(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError):
        coreset.kcenter_selection(torch.zeros(3, 2), 4)


def test_forgetting_counts_on_a_crafted_sequence():
    T, F = True, False
    history = torch.tensor([  # epochs x examples
        [T, T, F, F, T],
        [T, F, F, T, F],
        [T, T, F, F, F],
        [T, F, F, T, T],
    ])
    # example 1: T->F twice; 3: T->F once (F->T does not count); 4: T->F once; 0 and 2 never
    assert coreset.forgetting_counts(history).tolist() == [0, 2, 0, 1, 1]
    assert coreset.forgetting_counts(history[:1]).tolist() == [0, 0, 0, 0, 0]


def test_forgetting_selection_takes_the_most_forgotten_and_breaks_ties_with_the_seed():
    counts = torch.tensor([0, 2, 0, 1, 1, 2])
    gen = lambda seed: torch.Generator().manual_seed(seed)
    assert sorted(coreset.forgetting_selection(counts, 2, gen(0)).tolist()) == [1, 5]
    third = []
    for seed in range(12):
        picks = coreset.forgetting_selection(counts, 3, gen(seed)).tolist()
        assert sorted(picks[:2]) == [1, 5] and picks[2] in (3, 4)
        assert coreset.forgetting_selection(counts, 3, gen(seed)).tolist() == picks  # same seed, same choice
        third.append(picks[2])
    assert set(third) == {3, 4}  # the tie really is broken at random


def test_baselines_are_evaluated_with_the_dc_rule_unless_dsa_is_asked_for():
    for method in training.BASELINE_METHODS:
        assert training.eval_settings(method, 'MNIST', 'ConvNet', 'None') == (None, 'crop_scale_rotate', 1000)
        assert training.eval_settings(method, 'CIFAR10', 'ConvNetBN', 'None', default_epochs=300)[1] == 'crop_noise'
        assert training.eval_settings(method, 'CIFAR10', 'ConvNet', 'None', default_epochs=300) == (None, None, 300)
        assert training.eval_settings(method, 'MNIST', 'ConvNet', 'crop_flip', 20) == ('crop_flip', None, 20)
    assert training.eval_settings('DM', 'MNIST', 'ConvNet', 'None')[1] is None  # other methods unchanged


# ----------------------------------------------------------------------------- selection on a dataset

@pytest.mark.parametrize('method', coreset.SELECTION_METHODS)
def test_each_selection_returns_ipc_distinct_indices_per_class(method, small_data, tmp_path):
    data, _ = small_data
    args = selection_args(tmp_path)
    base.set_seed(5)
    indices = coreset.select_coreset(method, data, args, seed=5)
    assert indices.dtype == torch.int64 and indices.shape == (data.num_classes * args.ipc,)
    assert indices.unique().numel() == indices.numel()
    assert torch.equal(data.labels_train[indices], utils.synthetic_labels(data.num_classes, args.ipc, 'cpu'))
    base.set_seed(5)
    assert torch.equal(coreset.select_coreset(method, data, args, seed=5), indices)  # reproducible from the seed
    base.set_seed(5)
    images, labels = coreset.coreset(method, data, args, seed=5)
    assert torch.equal(images, data.images_train[indices]) and torch.equal(labels, data.labels_train[indices])


def test_feature_network_is_cached_and_does_not_disturb_the_random_stream(small_data, tmp_path):
    data, _ = small_data
    args = selection_args(tmp_path)
    path = coreset.featnet_path(args, data.name, args.seed)  # one network per run, from --seed
    base.set_seed(7)
    trained = coreset.select_coreset('herding', data, args, seed=7)
    after_training = torch.rand(3)
    assert os.path.isfile(path)
    stamp = os.stat(path).st_mtime_ns
    base.set_seed(7)
    cached = coreset.select_coreset('herding', data, args, seed=7)
    assert torch.equal(cached, trained) and torch.equal(torch.rand(3), after_training)
    coreset.select_coreset('kcenter', data, args, seed=7)
    assert os.stat(path).st_mtime_ns == stamp  # reused, not retrained
    state = torch.load(path, map_location='cpu', weights_only=True)
    assert set(state) == set(utils.get_network('ConvNetW32', 1, 10, (28, 28), device='cpu').state_dict())


# ----------------------------------------------------------------------------- main.py runs

def test_random_run_writes_real_images_in_the_published_structure(small_data, tmp_path, capsys):
    data, data_path = small_data
    run_main(data_path, tmp_path, 'random', '--model', 'MLP', '--ipc', '2', '--num_exp', '2', '--num_eval', '1',
             '--epoch_eval_train', '2', '--seed', '3')
    res = torch.load(tmp_path / 'res_random_FashionMNIST_MLP_2ipc.pt', map_location='cpu', weights_only=True)
    assert len(res['data']) == 2 and list(res['accs_all_exps']) == ['MLP'] and len(res['accs_all_exps']['MLP']) == 2
    args = selection_args(tmp_path, ipc=2, model='MLP')
    for exp, (images, labels) in enumerate(res['data']):
        assert images.dtype == torch.float32 and images.shape == (20, 1, 28, 28)
        assert labels.dtype == torch.int64 and labels.tolist() == [c for c in range(10) for _ in range(2)]
        # experiment k is the selection drawn from seed + k, byte for byte the dataset's tensors
        base.set_seed(3 + exp)
        indices = coreset.select_coreset('random', data, args, seed=3 + exp)
        assert torch.equal(images, data.images_train[indices]) and torch.equal(labels, data.labels_train[indices])
    assert not torch.equal(res['data'][0][0], res['data'][1][0])
    summary = json.loads((tmp_path / 'res_random_FashionMNIST_MLP_2ipc.json').read_text())
    assert summary['results']['MLP']['n'] == 2 and summary['config']['method'] == 'random'
    assert (tmp_path / 'vis_random_FashionMNIST_MLP_2ipc_exp1_iter0.png').is_file()
    assert 'Run 2 experiments, train on MLP, evaluate 2 random MLP, mean = ' in capsys.readouterr().out


def test_whole_dataset_beats_random_ipc1(tmp_path, capsys):
    # noisy gratings: one image per class is a poor representative, the full set is not
    data_path = write_fashion_mnist(tmp_path / 'data', train_per_class=20, test_per_class=20, noise=0.5)
    common = ['--model', 'MLP', '--ipc', '1', '--num_exp', '1', '--num_eval', '2', '--epoch_eval_train', '20',
              '--batch_train', '32']
    random_acc = run_main(data_path, tmp_path, 'random', *common)['MLP']['mean']
    whole_acc = run_main(data_path, tmp_path, 'whole', *common)['MLP']['mean']
    assert whole_acc > random_acc + 20, (whole_acc, random_acc)
    res = torch.load(tmp_path / 'res_whole_FashionMNIST_MLP_1ipc.pt', map_location='cpu', weights_only=True)
    assert res['data'] == [] and len(res['accs_all_exps']['MLP']) == 2
    summary = json.loads((tmp_path / 'res_whole_FashionMNIST_MLP_1ipc.json').read_text())
    assert summary['results']['MLP']['mean'] == pytest.approx(whole_acc)
    assert summary['config']['epoch_eval_train'] == 20
    assert 'evaluate 2 random MLP, mean = ' in capsys.readouterr().out.splitlines()[-1]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('extra, words', [
    (['--method', 'kmeans'], ["unknown method 'kmeans'", 'herding']),
    (['--method', 'herding', '--ipc', '9'], ['--ipc 9', 'smallest class', '8']),
    (['--method', 'forgetting', '--forget_epochs', '1'], ['--forget_epochs']),
])
def test_bad_input_is_one_line_and_exit_2(extra, words, small_data, tmp_path, capsys):
    _, data_path = small_data
    argv = ['--dataset', 'FashionMNIST', '--data_path', str(data_path), '--save_path', str(tmp_path), '--device',
            'cpu', '--quiet', *extra]
    with pytest.raises(SystemExit) as exc:
        experiment.cli(lambda: main.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err
    for w in words:
        assert w in err


def test_unknown_method_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), '--method', 'Herding', '--save_path',
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown method 'Herding'") and '\n' not in proc.stderr.strip()
