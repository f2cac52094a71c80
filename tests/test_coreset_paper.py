"""Issue 23: the coreset baselines as the DC paper describes them: one feature network and one set of forgetting
statistics per run, cached and shared, and herding and k-center as the authors' pseudocode describes them."""
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


@pytest.mark.parametrize('method', ['herding', 'kcenter'])
def test_herding_and_kcenter_select_one_set_per_run_for_every_experiment(tmp_path, monkeypatch, method):
    # their picks depend on the run's feature network alone, so main.py selects once (embedding a paper-size
    # training set costs minutes on a CPU) and every experiment trains on that set
    assert method in coreset.SEEDLESS_METHODS
    path = write_fashion_mnist(tmp_path / 'fm', train_per_class=6, test_per_class=2)
    data = load_dataset('FashionMNIST', path)
    args = run_args(tmp_path / 'probe')
    by_seed = [coreset.select_coreset(method, data, args, seed=s) for s in (0, 1, 2)]
    assert all(torch.equal(p, by_seed[0]) for p in by_seed)
    embedded, real_embed = [], coreset.embed_images
    monkeypatch.setattr(coreset, 'embed_images', lambda net, images, idx: embedded.append(idx) or real_embed(
        net, images, idx))
    main.main(['--dataset', 'FashionMNIST', '--data_path', str(path), '--save_path', str(tmp_path / 'out'),
               '--model', 'ConvNetW32', '--method', method, '--ipc', '2', '--num_exp', '3', '--num_eval', '1',
               '--epoch_eval_train', '1', '--feat_epochs', '1', '--device', 'cpu', '--quiet', '--no_vis'])
    assert len(embedded) == 10  # one embedding of each class for the three experiments
    sets = base.load_torch_file(str(tmp_path / 'out' / f'res_{method}_FashionMNIST_ConvNetW32_2ipc.pt'), 'r')['data']
    assert len(sets) == 3
    for images, labels in sets:
        assert torch.equal(images, data.images_train[by_seed[0]].cpu())
        assert torch.equal(labels, data.labels_train[by_seed[0]].cpu())


def test_wrong_cached_forgetting_statistics_are_one_line(small_data, tmp_path):
    args = run_args(tmp_path)
    base.save_torch_file_atomic(torch.zeros(3, dtype=torch.long), coreset.forgetting_path(args, small_data.name, 0))
    with pytest.raises(base.UserError, match='do not fit'):
        coreset.select_coreset('forgetting', small_data, args, seed=0)


# ----------------------------------------------------------------------------- herding and k-center as the authors'
# Their pseudocode (PatrickZH, VICO-UoE/DatasetCondensation issues #15 and #21), run class by class on the features:
#   herding:  det = mean * (i + 1) - sum(features[selected]); pick argmin distance(det, features[left])
#   k-center: start from argmin distance(features, mean); then argmax of the distance to the nearest centre

def authors_herding(features, num):
    mean = features.mean(0, keepdim=True)
    selected, left = [], list(range(features.shape[0]))
    for i in range(num):
        det = mean * (i + 1) - features[selected].sum(0, keepdim=True)
        j = int(torch.cdist(det, features[left]).argmin())
        selected.append(left.pop(j))
    return selected


def authors_kcenter(features, ipc):
    centres = [int(torch.cdist(features, features.mean(0, keepdim=True))[:, 0].argsort()[0])]
    for _ in range(ipc - 1):
        centres.append(int(torch.cdist(features, features[centres]).min(-1).values.argmax()))
    return centres


def test_herding_is_the_authors_greedy_rule_on_raw_embeddings():
    # embeddings of one class: a (10,0), b (0,1), c (0,-2), d (-1,0), e (6,8); mean (3, 1.4)
    features = torch.tensor([[10., 0.], [0., 1.], [0., -2.], [-1., 0.], [6., 8.]])
    # pick 1, det = mean (3, 1.4); squared distances a 50.96, b 9.16, c 20.56, d 17.96, e 52.56 -> b
    # pick 2, det = 2 mean - b = (6, 1.8): a 19.24, c 50.44, d 52.24, e 38.44 -> a
    # pick 3, det = 3 mean - b - a = (-1, 3.2): c 28.04, d 10.24, e 72.04 -> d
    assert coreset.herding_selection(features, 3).tolist() == [1, 0, 3]
    assert authors_herding(features, 3) == [1, 0, 3]
    # iCaRL's reading (unit-length embeddings) would pick e, c, b: not the authors'
    assert coreset.herding_selection(torch.nn.functional.normalize(features, dim=1), 3).tolist() == [4, 2, 1]


def test_herding_agrees_with_the_authors_pseudocode_on_relu_embeddings():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(60, 16, generator=g).relu() * (torch.rand(60, 1, generator=g) * 10 + 0.1)
    picks = coreset.herding_selection(features, 12)
    assert picks.tolist() == authors_herding(features, 12)
    assert picks.unique().numel() == 12  # without replacement


@pytest.mark.parametrize('method, rule', [('herding', authors_herding), ('kcenter', authors_kcenter)])
def test_coresets_select_on_the_raw_penultimate_embeddings_of_the_feature_network(small_data, tmp_path, method, rule):
    args = run_args(tmp_path)
    picks = coreset.select_coreset(method, small_data, args, seed=0)
    net = coreset.feature_net(small_data, args, args.seed)  # the cached network the selection used
    with torch.no_grad():
        expected = [int(idx[rule(net.embed(small_data.images_train[idx]).float(), 2)][k])
                    for idx in small_data.indices_class for k in range(2)]
    assert picks.tolist() == expected


def test_forgetting_probe_reads_the_short_statistics_from_the_first_epochs_of_a_longer_run(small_data, tmp_path,
                                                                                             monkeypatch):
    # benchmarks/forgetting_probe.py compares K- and E-epoch statistics from one E-epoch run: that rests on the first
    # K epochs of the longer run being main.py's K-epoch run (same stream, constant learning rate), record for record
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
    import forgetting_probe
    args = run_args(tmp_path)
    history = forgetting_probe.correctness_history(small_data, args, 4)
    assert history.shape == (4, small_data.labels_train.shape[0]) and history.dtype == torch.bool
    recorded, real_train = [], coreset.train_full_set
    monkeypatch.setattr(coreset, 'train_full_set', lambda *a, **k: recorded.append(real_train(*a, **k)) or recorded[-1])
    coreset.forgetting_statistics(small_data, args, args.seed)  # main.py's, --forget_epochs 2
    assert torch.equal(recorded[0], history[:2])
    assert 0 < int(history[:2].sum()) < history[:2].numel()  # a record that can tell runs apart
    # never learned first: the never-learned image outranks the most forgotten one, the rest keep their order
    counts, never = torch.tensor([0, 2, 1, 0]), torch.tensor([True, False, False, False])
    scores = forgetting_probe.never_first(counts, never)
    assert torch.argsort(scores, descending=True, stable=True).tolist() == [0, 1, 2, 3]
