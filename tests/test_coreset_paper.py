"""Issue 23: the coreset baselines as the DC paper describes them: one feature network and one set of forgetting
statistics per run, cached and shared, and herding as the greedy mean matching of Welling 2009 / iCaRL."""
import os

import pytest
import torch

import base
import coreset
import experiment
import main
from conftest import write_fashion_mnist
from data import load_dataset


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    path = write_fashion_mnist(tmp_path_factory.mktemp('fm'), train_per_class=6, test_per_class=2)
    return load_dataset('FashionMNIST', path)


def run_args(save_path, **flags):
    argv = ['--dataset', 'FashionMNIST', '--model', 'ConvNetW32', '--ipc', '2', '--save_path', str(save_path),
            '--device', 'cpu', '--quiet', '--feat_epochs', '1', '--forget_epochs', '2']
    for k, v in flags.items():
        argv += [f'--{k}', str(v)]
    return experiment.check_common_args(main.parse_args(argv))


def test_forgetting_statistics_are_counted_once_per_run_and_reused(small_data, tmp_path):
    args = run_args(tmp_path)
    first = coreset.select_coreset('forgetting', small_data, args, seed=0)
    path = coreset.forgetting_path(args, small_data.name, args.seed)
    counts = torch.load(path, weights_only=True)
    assert counts.dtype == torch.int64 and counts.shape == (small_data.labels_train.shape[0],)
    stamp = os.stat(path).st_mtime_ns
    # another experiment (seed 1) reuses the file; its tie-breaks are its own
    coreset.select_coreset('forgetting', small_data, args, seed=1)
    assert os.stat(path).st_mtime_ns == stamp
    assert torch.equal(coreset.select_coreset('forgetting', small_data, args, seed=0), first)
    # the picks are the most-forgotten images of each class
    for c, idx in enumerate(small_data.indices_class):
        chosen = first[c * 2:(c + 1) * 2]
        assert counts[chosen].min() >= counts[idx].sort(descending=True).values[1]


def test_feature_network_is_one_per_run_whatever_the_experiment(small_data, tmp_path):
    args = run_args(tmp_path)
    a = coreset.select_coreset('herding', small_data, args, seed=3)
    b = coreset.select_coreset('herding', small_data, args, seed=4)
    assert torch.equal(a, b)  # herding is deterministic given the one network
    assert [f for f in os.listdir(tmp_path) if f.startswith('featnet_')] == [
        f'featnet_FashionMNIST_ConvNetW32_1ep_seed{args.seed}.pt']


def test_wrong_cached_forgetting_statistics_are_one_line(small_data, tmp_path):
    args = run_args(tmp_path)
    base.save_torch_file_atomic(torch.zeros(3, dtype=torch.long), coreset.forgetting_path(args, small_data.name, 0))
    with pytest.raises(base.UserError, match='do not fit'):
        coreset.select_coreset('forgetting', small_data, args, seed=0)


# ----------------------------------------------------------------------------- herding as iCaRL's

def test_herding_matches_means_of_unit_length_embeddings():
    # embeddings of one class; unit length: a (1,0), b (0,1), c (0,-1), d (-1,0), e (0.6,0.8), mean (0.12, 0.16)
    features = torch.tensor([[10., 0.], [0., 1.], [0., -2.], [-1., 0.], [6., 8.]])
    # pick 1, squared distance to the mean: a 0.80, b 0.72, c 1.36, d 1.28, e 0.64 -> e
    # pick 2, mean of {e, x}: a 0.52, b 0.58, c (0.3,-0.1) 0.10, d 0.16 -> c
    # pick 3, mean of {e, c, x}: a 0.222, b (0.2,0.267) 0.018, d 0.115 -> b
    assert coreset.herding_selection(coreset.herding_features(features), 3).tolist() == [4, 2, 1]
    # on the raw embeddings the mean is (3, 1.4) and the small b (distance 9.16) would come first
    assert coreset.herding_selection(features, 1).tolist() == [1]


def test_herding_picks_do_not_depend_on_embedding_norms():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 16, generator=g).relu() + 0.01  # ReLU embeddings, like ConvNet.embed
    scales = torch.rand(40, 1, generator=g) * 10 + 0.1
    picks = coreset.herding_selection(coreset.herding_features(features), 8)
    assert torch.equal(coreset.herding_selection(coreset.herding_features(features * scales), 8), picks)
    assert picks.unique().numel() == 8  # without replacement
