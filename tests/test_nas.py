"""NAS.py: the search space, Spearman's correlation, the top-5% selection, the ground-truth cache (reuse, completion
after an interruption), the proxies, the report end to end on a tiny dataset, and bad input."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

import NAS
import base
import experiment
import training
from conftest import write_mnist
from networks import get_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 and 4 tiny candidates (width 4: each trains in a fraction of a second on 60 images)
SPACE_2 = ['--depth', '1', '--width', '4', '--act', 'relu', '--norm', 'none', 'instancenorm', '--pool', 'avgpooling']
SPACE_4 = SPACE_2[:-1] + ['none', 'avgpooling']
TRAIN_CANDIDATE = NAS.train_candidate  # the unpatched one, for wrappers
FAST = ['--device', 'cpu', '--quiet', '--epochs', '1', '--whole_epochs', '1', '--ipc', '1']


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('mnist')
    write_mnist(path, train_per_class=6, test_per_class=2)
    return str(path)


def run_nas(data_path, save_path, *flags):
    return NAS.main(['--dataset', 'MNIST', '--data_path', str(data_path), '--save_path', str(save_path), *FAST,
                     *flags])


def gt_cache(save_path):
    with open(os.path.join(save_path, 'nas_gt_MNIST.json')) as f:
        return json.load(f)


def count_trainings(monkeypatch, fail_after=None):
    """Wrap NAS.train_candidate: record the candidates it trains; raise KeyboardInterrupt after fail_after."""
    trained = []
    real = TRAIN_CANDIDATE

    def counting(name, *args, **kwargs):
        if fail_after is not None and len(trained) == fail_after:
            raise KeyboardInterrupt
        trained.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(NAS, 'train_candidate', counting)
    return trained


def save_learned_set(path, n_per_class=1, shape=(1, 28, 28), config=None):
    images = torch.randn(10 * n_per_class, *shape)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    obj = {'data': [[images, labels]], 'accs_all_exps': {}}
    if config is not None:
        obj['config'] = config
    torch.save(obj, path)
    return str(path)

# -----------------------------------------------------------------------------
# search space


def test_paper_space_has_720_distinct_buildable_candidates():
    args = NAS.parse_args([])
    candidates = NAS.search_space(NAS.parse_space(args))
    assert len(candidates) == 720 and len(set(candidates)) == 720
    assert candidates[0] == 'ConvNet_D1_W32_sigmoid_none_none'
    assert 'ConvNet_D3_W128_relu_instancenorm_avgpooling' in candidates
    for dataset in ('MNIST', 'CIFAR10'):
        NAS.check_buildable(candidates, dataset)


def test_space_flags_restrict_and_deduplicate():
    args = NAS.parse_args(['--depth', '2', '2', '3', '--width', '64', '--act', 'relu', '--norm', 'batchnorm',
                           '--pool', 'none', 'maxpooling'])
    assert NAS.search_space(NAS.parse_space(args)) == [
        'ConvNet_D2_W64_relu_batchnorm_none', 'ConvNet_D2_W64_relu_batchnorm_maxpooling',
        'ConvNet_D3_W64_relu_batchnorm_none', 'ConvNet_D3_W64_relu_batchnorm_maxpooling']


def meta_count(name, channel, im_size):
    with torch.device('meta'):
        net = get_network(name, channel, 10, im_size, device='meta')
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize('candidate,variant,cifar10,mnist', [  # SPEC §10
    ('ConvNet_D3_W128_relu_instancenorm_avgpooling', 'ConvNet', 320_010, 317_706),
    ('ConvNet_D3_W32_relu_instancenorm_avgpooling', 'ConvNetW32', 24_714, 24_138),
    ('ConvNet_D1_W128_relu_instancenorm_avgpooling', 'ConvNetD1', 331_530, 329_226),
    ('ConvNet_D4_W128_relu_instancenorm_avgpooling', 'ConvNetD4', 452_490, 450_186),
    ('ConvNet_D3_W128_relu_instancenorm_maxpooling', 'ConvNetMP', 320_010, 317_706),
    ('ConvNet_D3_W128_relu_instancenorm_none', 'ConvNetNP', 1_610_250, 1_607_946),
    ('ConvNet_D3_W128_relu_layernorm_avgpooling', 'ConvNetLN', 663_306, 661_002),
    ('ConvNet_D3_W128_relu_none_avgpooling', 'ConvNetNN', 319_242, 316_938),
    ('ConvNet_D3_W128_sigmoid_instancenorm_avgpooling', 'ConvNetAS', 320_010, 317_706),
])
def test_candidate_parameter_counts(candidate, variant, cifar10, mnist):
    assert meta_count(candidate, 3, (32, 32)) == meta_count(variant, 3, (32, 32)) == cifar10
    assert meta_count(candidate, 1, (28, 28)) == meta_count(variant, 1, (28, 28)) == mnist

# -----------------------------------------------------------------------------
# Spearman, ranks, top 5%


def test_average_ranks_equal_scipy_rankdata():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 5, size=rng.integers(1, 30))
        assert np.array_equal(NAS.average_ranks(x), scipy.stats.rankdata(x))


def test_spearman_equals_scipy_with_ties():
    cases = [([1, 2, 2, 3, 4], [2, 1, 3, 3, 5]),
             ([0.5, 0.5, 0.5, 0.9], [0.1, 0.3, 0.2, 0.4]),
             ([1, 2, 3, 4], [4, 3, 2, 1]),
             ([0.81, 0.82, 0.82, 0.80, 0.75, 0.75], [0.88, 0.90, 0.87, 0.90, 0.70, 0.71])]
    rng = np.random.default_rng(1)
    for _ in range(30):  # accuracies on a small test set: many ties
        n = int(rng.integers(3, 60))
        cases.append((rng.integers(0, 6, n) / 20, rng.integers(0, 6, n) / 20))
    for x, y in cases:
        expected = scipy.stats.spearmanr(x, y).statistic
        if np.isnan(expected):
            assert np.isnan(NAS.spearman(x, y))
        else:
            assert NAS.spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert NAS.spearman([1, 2, 3], [4, 3, 2]) == pytest.approx(-1.0)


def test_spearman_is_nan_where_undefined():
    assert np.isnan(NAS.spearman([0.5], [0.7]))
    assert np.isnan(NAS.spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))  # a constant side has no ranking
    with pytest.raises(ValueError):
        NAS.spearman([1, 2], [1, 2, 3])


@pytest.mark.parametrize('n,k', [(720, 36), (100, 5), (41, 3), (40, 2), (24, 2), (2, 2), (1, 1), (0, 0)])
def test_top_count(n, k):
    assert NAS.top_count(n) == k


def test_rank_by_proxy_breaks_ties_by_space_order():
    accs = {'a': 0.5, 'b': 0.7, 'c': 0.5, 'd': 0.9}
    assert NAS.rank_by_proxy(['a', 'b', 'c', 'd'], accs) == ['d', 'b', 'a', 'c']

# -----------------------------------------------------------------------------
# ground-truth cache


def test_ground_truth_cache_is_reused_and_completed(mnist_dir, tmp_path, monkeypatch):
    run_nas(mnist_dir, tmp_path, '--ground_truth', *SPACE_2)
    first = gt_cache(tmp_path)
    assert sorted(first) == ['ConvNet_D1_W4_relu_instancenorm_avgpooling|1|0', 'ConvNet_D1_W4_relu_none_avgpooling|1|0']
    assert all(0 <= v['acc'] <= 1 and v['seconds'] >= 0 for v in first.values())

    trained = count_trainings(monkeypatch)
    run_nas(mnist_dir, tmp_path, '--ground_truth', *SPACE_4)  # a larger space: only its new candidates train
    assert trained == ['ConvNet_D1_W4_relu_none_none', 'ConvNet_D1_W4_relu_instancenorm_none']
    second = gt_cache(tmp_path)
    assert len(second) == 4 and all(second[k] == v for k, v in first.items())

    run_nas(mnist_dir, tmp_path, '--ground_truth', *SPACE_4)
    assert len(trained) == 2  # nothing left to train
    run_nas(mnist_dir, tmp_path, '--ground_truth', '--whole_epochs', '2', *SPACE_2)  # other epochs: other keys
    assert len(trained) == 4 and len(gt_cache(tmp_path)) == 6


def test_interrupted_ground_truth_keeps_finished_candidates(mnist_dir, tmp_path, monkeypatch, capsys):
    count_trainings(monkeypatch, fail_after=3)
    with pytest.raises(SystemExit) as exc:
        run_nas(mnist_dir, tmp_path / 'cut', '--ground_truth', *SPACE_4)
    assert exc.value.code == 130
    assert 'run the same command again' in capsys.readouterr().err
    assert len(gt_cache(tmp_path / 'cut')) == 3  # everything but the candidate in flight

    trained = count_trainings(monkeypatch)
    run_nas(mnist_dir, tmp_path / 'cut', '--ground_truth', *SPACE_4)
    assert trained == ['ConvNet_D1_W4_relu_instancenorm_avgpooling']
    # each candidate is seeded by its name: the resumed cache equals an uninterrupted run's
    run_nas(mnist_dir, tmp_path / 'full', '--ground_truth', *SPACE_4)
    cut, full = gt_cache(tmp_path / 'cut'), gt_cache(tmp_path / 'full')
    assert {k: v['acc'] for k, v in cut.items()} == {k: v['acc'] for k, v in full.items()}


def test_train_subset_is_its_own_cache_key(mnist_dir, tmp_path):
    run_nas(mnist_dir, tmp_path, '--ground_truth', '--train_subset', '3', *SPACE_2)
    assert all(key.endswith('|1|0|sub3') for key in gt_cache(tmp_path))


def test_unreadable_cache_is_one_line_error(mnist_dir, tmp_path):
    (tmp_path / 'nas_gt_MNIST.json').write_text('{not json')
    with pytest.raises(base.UserError, match='unreadable'):
        run_nas(mnist_dir, tmp_path, '--ground_truth', *SPACE_2)

# -----------------------------------------------------------------------------
# proxies and the report, end to end


def test_end_to_end_writes_table_json_and_png(mnist_dir, tmp_path, capsys):
    report = run_nas(mnist_dir, tmp_path, '--ground_truth', '--proxy', 'random', *SPACE_4)
    out = capsys.readouterr().out
    assert '| | random (1 img/cls) | Whole dataset |' in out
    for row in ('| Performance (%) |', '| Correlation (top 5%: 2 of 4) |', '| Correlation (all 4) |',
                '| Time cost (min) |', '| Storage (imgs) | 10 | 60 |'):
        assert row in out
    assert out.count('ConvNet_D1_W4_') >= 4

    with open(tmp_path / 'nas_MNIST_random_1ipc.json') as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    rows = saved['candidates']
    assert len(rows) == 4 and saved['top_count'] == 2 and [r['top'] for r in rows] == [True, True, False, False]
    assert [r['proxy_acc'] for r in rows] == sorted((r['proxy_acc'] for r in rows), reverse=True)
    assert saved['best_by_proxy'] == rows[0]
    assert saved['best_by_whole']['whole_acc'] == max(r['whole_acc'] for r in rows)
    assert saved['storage_images'] == 10 and saved['ground_truth']['missing'] == 0
    for key, chosen in (('spearman_all', rows), ('spearman_top', rows[:2])):
        expected = scipy.stats.spearmanr([r['proxy_acc'] for r in chosen], [r['whole_acc'] for r in chosen]).statistic
        assert saved[key] is None if np.isnan(expected) else saved[key] == pytest.approx(expected)
    assert saved['search_seconds'] > 0 and saved['candidates_per_minute'] > 0
    with open(tmp_path / 'nas_MNIST_random_1ipc.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_missing_ground_truth_prints_the_command_that_fills_it(mnist_dir, tmp_path, capsys):
    report = run_nas(mnist_dir, tmp_path, '--proxy', 'random', *SPACE_4)
    out = capsys.readouterr().out
    assert '4 of 4 candidates lack ground truth' in out
    assert report['spearman_top'] is None and report['spearman_all'] is None
    assert all(r['proxy_acc'] is not None and r['whole_acc'] is None for r in report['candidates'])
    assert not os.path.exists(tmp_path / 'nas_MNIST_random_1ipc.png')
    command = report['ground_truth']['fill_command']
    assert command in out and '--ground_truth' in command

    argv = shlex.split(command)
    assert argv[:2] == ['python', 'NAS.py']
    NAS.main(argv[2:] + ['--device', 'cpu', '--quiet'])
    report = run_nas(mnist_dir, tmp_path, '--proxy', 'random', *SPACE_4)
    assert report['ground_truth']['missing'] == 0 and os.path.exists(tmp_path / 'nas_MNIST_random_1ipc.png')


def test_candidates_are_seeded_by_name_not_by_order(mnist_dir, tmp_path):
    both = run_nas(mnist_dir, tmp_path, '--proxy', 'random', *SPACE_2)
    alone = run_nas(mnist_dir, tmp_path, '--proxy', 'random', *SPACE_2[:-4], 'instancenorm', '--pool', 'avgpooling')
    acc = lambda report: {r['candidate']: r['proxy_acc'] for r in report['candidates']}
    assert acc(alone).items() <= acc(both).items()


def test_early_stop_takes_the_proxy_batches_from_the_whole_set(mnist_dir, tmp_path, monkeypatch):
    seen = []
    real = training.train_epoch

    def recording(net, optimizer, images, labels, batch_size, *args, **kwargs):
        seen.append((images.shape[0], batch_size, optimizer.param_groups[0]['lr']))
        return real(net, optimizer, images, labels, batch_size, *args, **kwargs)

    monkeypatch.setattr(training, 'train_epoch', recording)
    report = run_nas(mnist_dir, tmp_path, '--proxy', 'early_stop', '--epochs', '4', '--ipc', '2',
                     '--batch_train', '8', *SPACE_2[:-4], 'none', '--pool', 'avgpooling')
    # 4 + 1 epochs of ipc x classes = 20 images each, lr x0.1 after epoch 4 // 2 + 1, as train_and_test does
    assert seen == [(20, 8, 0.01)] * 4 + [(20, 8, pytest.approx(0.001))]
    assert report['storage_images'] == 60 and report['augmentation'] == 'none'
    assert report['proxy'] == 'early_stop_2ipc'


@pytest.mark.parametrize('file_name,config,method,augmentation', [
    ('res_DSA_MNIST_ConvNet_1ipc.pt', {'method': 'DSA', 'dataset': 'MNIST'}, 'DSA', 'color_crop_cutout_scale_rotate'),
    ('res_DM_MNIST_ConvNet_1ipc.pt', None, 'DM', 'color_crop_cutout_scale_rotate'),  # published: no config
    ('res_DC_MNIST_ConvNet_1ipc.pt', None, 'DC', 'none'),
    ('my_set.pt', None, None, 'none'),
])
def test_learned_set_proxy_and_its_augmentation(mnist_dir, tmp_path, file_name, config, method, augmentation):
    path = save_learned_set(tmp_path / file_name, config=config)
    report = run_nas(mnist_dir, tmp_path, '--proxy', path, *SPACE_2)
    assert report['augmentation'] == augmentation
    assert report['storage_images'] == 10 and report['num_candidates'] == 2
    assert report['proxy'] == os.path.splitext(file_name)[0] + '_set0'
    assert report['proxy_description'].startswith(method or 'learned')


def test_dsa_strategy_flag_overrides_the_rule(mnist_dir, tmp_path):
    report = run_nas(mnist_dir, tmp_path, '--proxy', 'random', '--dsa_strategy', 'crop_flip', *SPACE_2)
    assert report['augmentation'] == 'crop_flip'
    path = save_learned_set(tmp_path / 'res_DSA_MNIST_ConvNet_1ipc.pt')
    assert run_nas(mnist_dir, tmp_path, '--proxy', path, '--dsa_strategy', 'none', *SPACE_2)['augmentation'] == 'none'

# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2


def bad_input_cases(tmp_path):
    cifar_set = save_learned_set(tmp_path / 'res_DSA_CIFAR10_ConvNet_1ipc.pt', shape=(3, 32, 32))
    fashion_set = save_learned_set(tmp_path / 'res_DSA_FashionMNIST_ConvNet_1ipc.pt',
                                   config={'method': 'DSA', 'dataset': 'FashionMNIST'})
    mnist_set = save_learned_set(tmp_path / 'res_DSA_MNIST_ConvNet_1ipc.pt')
    return [
        (['--proxy', 'foo'], "unknown --proxy 'foo'"),
        (['--proxy', str(tmp_path / 'missing.pt')], 'no such file'),
        (['--proxy', cifar_set], 'holds (3, 32, 32) images'),
        (['--proxy', fashion_set, *SPACE_2], 'learned on FashionMNIST'),
        (['--proxy', mnist_set, '--set_index', '3', *SPACE_2], '--set_index 3 is out of range'),
        ([], 'nothing to do'),
        (['--proxy', 'random', '--depth'], '--depth needs at least one value'),
        (['--proxy', 'random', '--depth', '0'], "--depth '0' is not a positive integer"),
        (['--proxy', 'random', '--width', 'x'], "--width 'x' is not a positive integer"),
        (['--proxy', 'random', '--act', 'tanh'], "--act 'tanh' is not one of"),
        (['--proxy', 'random', '--norm', 'foo'], "--norm 'foo' is not one of"),
        (['--proxy', 'random', '--pool', 'sumpooling'], "--pool 'sumpooling' is not one of"),
        (['--proxy', 'random', '--depth', '9', '--width', '4'],
         'ConvNet_D9_W4_sigmoid_none_maxpooling cannot be built for 28x28'),
        (['--proxy', 'random', '--depth', '1', '--width', '6', '--norm', 'groupnorm'],
         'ConvNet_D1_W6_sigmoid_groupnorm_none'),
        (['--proxy', 'random', '--ipc', '100', *SPACE_2], '--ipc 100 is larger than the smallest class'),
        (['--ground_truth', '--train_subset', '0'], '--train_subset must be at least 1'),
        (['--proxy', 'random', '--epochs', '-1'], '--epochs must be at least 0'),
        (['--proxy', 'random', '--dsa_strategy', 'crop_spin'], "unknown augmentation op 'spin'"),
        (['--proxy', 'random', '--bogus'], 'unrecognized arguments: --bogus'),
        (['--proxy', 'random', '--dataset', 'Foo'], "unknown dataset 'Foo'"),
    ]


def test_bad_input_is_one_line_and_exit_2(mnist_dir, tmp_path, capsys):
    for argv, expected in bad_input_cases(tmp_path):
        full = ['--dataset', 'MNIST', '--data_path', mnist_dir, '--save_path', str(tmp_path), '--device', 'cpu',
                '--quiet', *argv]
        with pytest.raises(SystemExit) as exc:
            experiment.cli(lambda: NAS.main(full))
        err = capsys.readouterr().err
        assert exc.value.code == 2, argv
        assert err.startswith('error: ') and err.count('\n') == 1, (argv, err)
        assert expected in err, (argv, err)


def test_command_line_exit_status(mnist_dir, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'NAS.py'), '--dataset', 'MNIST', '--data_path',
                             mnist_dir, '--proxy', 'random', '--depth', '6', '--pool', 'avgpooling'],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith('error: ConvNet_D6_W32_sigmoid_none_avgpooling cannot be built for 28x28')
    assert result.stderr.count('\n') == 1 and result.stdout == ''
