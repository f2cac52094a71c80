"""Label noise, the loss-buffer scores (SPEC §9c), clean selection online and offline, the pure rate, and noise.py.

Expected values are worked out in the tests by hand (math on the hand-made logits, class maps written out as
names); the pipeline runs in-process through main.main / main_DM.main on tiny FashionMNIST-format data."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import base
import cleanscore
import experiment
import labelnoise
import main
import main_DM
import utils
from conftest import write_fashion_mnist
from data import load_dataset

pytestmark = pytest.mark.usefixtures('one_thread')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def fm_path(tmp_path_factory):
    """10 classes x 30 training and 10 test images in the FashionMNIST IDX format."""
    return write_fashion_mnist(tmp_path_factory.mktemp('fm_noise'), train_per_class=30, test_per_class=10)


def common(data_path, save_path, *extra):
    return ['--dataset', 'FashionMNIST', '--data_path', str(data_path), '--save_path', str(save_path),
            '--device', 'cpu', '--quiet', '--no_vis', '--model', 'ConvNetW32', '--num_exp', '1', '--num_eval', '1',
            '--epoch_eval_train', '2', *extra]


def read_json(folder):
    [name] = [f for f in os.listdir(folder) if f.startswith('res_') and f.endswith('.json')]
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------

def class_sorted_labels(sizes):
    return torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(sizes)])


def test_exact_counts_per_class_and_symmetric_never_keeps_the_class():
    sizes = [10, 7, 3, 20]  # rate 0.3: round(3.0) = 3, round(2.1) = 2, round(0.9) = 1, round(6.0) = 6
    labels = class_sorted_labels(sizes)[torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    noisy = labelnoise.noisy_labels(labels, 4, 0.3, 'symmetric', 'X', (0,))
    changed = noisy != labels
    assert [int(changed[labels == c].sum()) for c in range(4)] == [3, 2, 1, 6]
    assert noisy.min() >= 0 and noisy.max() <= 3


def test_pairflip_maps_c_to_c_plus_one():
    labels = class_sorted_labels([5, 5, 5])
    noisy = labelnoise.noisy_labels(labels, 3, 0.4, 'pairflip', 'X', (3,))
    for c, target in ((0, 1), (1, 2), (2, 0)):
        moved = noisy[(labels == c) & (noisy != labels)]
        assert moved.tolist() == [target, target]  # round(0.4 * 5) = 2


def test_asymmetric_maps_written_out_by_hand():
    labels = class_sorted_labels([10] * 10)
    noisy = labelnoise.noisy_labels(labels, 10, 0.5, 'asymmetric', 'MNIST', (0,))
    digits = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
    for c in range(10):
        moved = noisy[(labels == c) & (noisy != labels)].tolist()
        assert moved == ([digits[c]] * 5 if c in digits else [])
    cifar = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    by_name = {cifar[a]: cifar[b] for a, b in labelnoise.ASYMMETRIC_MAPS['CIFAR10'].items()}
    assert by_name == {'truck': 'automobile', 'bird': 'airplane', 'deer': 'horse', 'cat': 'dog', 'dog': 'cat'}
    fine = labelnoise.CIFAR100_FINE
    cmap = labelnoise.ASYMMETRIC_MAPS['CIFAR100']
    assert len(fine) == 100 and fine[0] == 'apple' and fine[99] == 'worm' and fine == sorted(fine)
    named = {fine[a]: fine[b] for a, b in cmap.items()}
    # fruit and vegetables (apple 0, mushroom 51, orange 53, pear 57, sweet pepper 83), cyclic in index order
    assert [named[n] for n in ('apple', 'mushroom', 'orange', 'pear', 'sweet_pepper')] == \
        ['mushroom', 'orange', 'pear', 'sweet_pepper', 'apple']
    assert named['whale'] == 'beaver' and named['beaver'] == 'dolphin' and named['woman'] == 'baby'
    assert sorted(cmap) == list(range(100)) and sorted(cmap.values()) == list(range(100))


def test_noise_is_determined_by_the_seed():
    labels = class_sorted_labels([20] * 5)
    a = labelnoise.noisy_labels(labels, 5, 0.4, 'symmetric', 'X', (7,))
    b = labelnoise.noisy_labels(labels, 5, 0.4, 'symmetric', 'X', (7,))
    c = labelnoise.noisy_labels(labels, 5, 0.4, 'symmetric', 'X', (8,))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_method_sees_the_same_noisy_set_and_the_test_set_is_clean(fm_path, tmp_path, monkeypatch):
    seen = []
    prepare = labelnoise.prepare

    def capture(args, data):
        out = prepare(args, data)
        seen.append((out.labels_train.clone(), out.labels_test.clone(), [i.clone() for i in out.indices_class]))
        return out

    monkeypatch.setattr(labelnoise, 'prepare', capture)
    noise = ['--noise_rate', '0.4', '--noise_type', 'symmetric', '--ipc', '1']
    main.main(common(fm_path, tmp_path / 'a', '--method', 'random', *noise))
    main_DM.main(common(fm_path, tmp_path / 'b', '--Iteration', '1', '--batch_real', '4', *noise))
    clean = load_dataset('FashionMNIST', fm_path)
    (train_a, test_a, idx_a), (train_b, test_b, idx_b) = seen
    assert torch.equal(train_a, train_b) and all(torch.equal(x, y) for x, y in zip(idx_a, idx_b))
    assert torch.equal(test_a, clean.labels_test) and torch.equal(test_b, clean.labels_test)
    assert int((train_a != clean.labels_train).sum()) == 10 * 12  # round(0.4 * 30) per class
    for c in range(10):
        assert torch.equal(idx_a[c], torch.nonzero(train_a == c).flatten())
    pure = read_json(tmp_path / 'a')['pure_rate']
    assert pure['training_set'] == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------
# Scores and buffers
# ---------------------------------------------------------------------------------------------

def lse(row):
    return math.log(sum(math.exp(v) for v in row))


def test_scores_equal_hand_computed_values():
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.5]]
    labels = [0, 0, 2, 2]
    l_y = [lse(r) - r[y] for r, y in zip(logits, labels)]
    l_p = [lse(r) - max(r) for r in logits]
    buffers = cleanscore.LossBuffers(3, 8, 'cpu')
    lab = torch.tensor(labels)
    got_y, got_p, pred = cleanscore.sample_losses(torch.tensor(logits), lab)
    assert got_y.tolist() == pytest.approx(l_y, rel=1e-6) and got_p.tolist() == pytest.approx(l_p, rel=1e-6)
    assert pred.tolist() == [0, 1, 2, 1]
    buffers.push(lab, got_y, got_p)
    means = buffers.means()
    mean_y = {0: (l_y[0] + l_y[1]) / 2, 2: (l_y[2] + l_y[3]) / 2}
    mean_p = {0: (l_p[0] + l_p[1]) / 2, 2: (l_p[2] + l_p[3]) / 2}
    expect = {
        'loss': l_y,
        'score': [l_y[i] / mean_y[labels[i]] for i in range(4)],
        'score2': [(l_y[i] - l_p[i]) / mean_y[labels[i]] for i in range(4)],
        'score3': [(l_y[i] - l_p[i]) / (mean_y[labels[i]] - mean_p[labels[i]]) for i in range(4)],
    }
    for kind, values in expect.items():
        got = cleanscore.scores(kind, got_y, got_p, lab, means)
        assert got.tolist() == pytest.approx(values, rel=1e-5, abs=1e-7), kind
    # the predicted-class rows: sample 1 (predicted 1) is alone in row 1, sample 3 too
    by_pred = cleanscore.LossBuffers(3, 8, 'cpu')
    by_pred.push(pred, got_y, got_p)
    got = cleanscore.scores('score', got_y, got_p, pred, by_pred.means())
    assert got.tolist() == pytest.approx([1.0, l_y[1] / ((l_y[1] + l_y[3]) / 2), 1.0,
                                          l_y[3] / ((l_y[1] + l_y[3]) / 2)], rel=1e-5)


def test_buffers_roll_over_at_buffer_size():
    buffers = cleanscore.LossBuffers(2, 3, 'cpu')
    rows = torch.tensor([0, 0, 1, 0, 0, 0])
    vals = torch.tensor([1.0, 2.0, 10.0, 3.0, 4.0, 5.0])
    buffers.push(rows, vals, vals * 0)
    assert buffers.means()[:, 0].tolist() == pytest.approx([(3 + 4 + 5) / 3, 10.0])
    buffers.push(torch.tensor([0, 0]), torch.tensor([6.0, 7.0]), torch.zeros(2))
    assert buffers.means()[:, 0].tolist() == pytest.approx([(5 + 6 + 7) / 3, 10.0])
    assert buffers.means()[:, 1].tolist() == [0.0, 0.0]
    empty = cleanscore.LossBuffers(2, 3, 'cpu').means()
    assert empty.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_zero_guard_keeps_ordinary_rankings_and_makes_zero_denominators_finite():
    l_y = torch.tensor([0.3, 1.2, 0.05, 2.0])
    l_p = torch.tensor([0.1, 0.2, 0.05, 0.5])
    rows = torch.zeros(4, dtype=torch.long)
    means = torch.tensor([[0.8875, 0.2125]])
    # the guard leaves ordinary denominators exactly as they are: the same float32 division without it
    assert torch.equal(cleanscore.scores('score', l_y, l_p, rows, means), l_y / means[0, 0])
    assert torch.equal(cleanscore.scores('score3', l_y, l_p, rows, means), (l_y - l_p) / (means[0, 0] - means[0, 1]))
    assert cleanscore.scores('score3', l_y, l_p, rows, means).argsort().tolist() == [2, 0, 1, 3]
    zero = torch.tensor([[0.4, 0.4]])  # every buffered sample predicted as its label: l_label == l_pred
    got = cleanscore.scores('score3', l_y, l_p, rows, zero)
    assert torch.isfinite(got).all() and got.argsort().tolist() == [2, 0, 1, 3]


# ---------------------------------------------------------------------------------------------
# Selection and the pure rate
# ---------------------------------------------------------------------------------------------

def test_an_oracle_that_sees_the_true_labels_keeps_only_clean_samples():
    true = class_sorted_labels([20] * 4)
    given = labelnoise.noisy_labels(true, 4, 0.4, 'symmetric', 'X', (0,))
    truth = labelnoise.NoiseTruth(true, given)
    oracle = (given != true).double()  # test only: the truth as a score
    from data import class_indices
    kept = cleanscore.select_per_class(oracle, class_indices(given, 4), 0.5)
    assert float(truth.pure_rate(kept)) == 1.0
    assert float(truth.pure_rate()) == pytest.approx(0.6)


def test_offline_score_filter_is_mostly_clean_at_40_percent_symmetric_noise(fm_path, tmp_path):
    main.main(common(fm_path, tmp_path, '--method', 'random', '--ipc', '2', '--noise_rate', '0.4',
                     '--clean_filter', 'score', '--clean_keep', '0.5', '--score_epochs', '4'))
    pure = read_json(tmp_path)['pure_rate']
    # half of each noisy class (sizes vary around 30 after symmetric noise), rounded per class
    assert pure['training_set'] == pytest.approx(0.6) and 145 <= pure['kept_samples'] <= 155
    assert pure['kept'] > 0.6 + 0.15
    assert os.path.isfile(os.path.join(tmp_path, 'scoring_FashionMNIST_symmetric0.4_seed0_ConvNetW32_4ep_buf512.pt'))


def test_online_selection_matches_batches_of_the_requested_size(fm_path):
    data = load_dataset('FashionMNIST', fm_path)
    selector = cleanscore.OnlineSelector('score2', 0.3, 16, 'label', 10, 'cpu')
    net = utils.get_network('ConvNetW32', 1, 10, (28, 28))
    image_syn = torch.zeros(10, 1, 28, 28)
    pick = selector.bind(net)
    img_real, _ = utils.class_batches(data, image_syn, 3, 3, 1, 8, (0, 0, 0, 0), select=pick)
    assert img_real.shape == (8, 1, 28, 28)
    assert int(selector.buffers.count[3]) == math.ceil(8 / 0.3) == 27
    [picked] = selector.take_picked()
    assert picked.numel() == 8 and bool((data.labels_train[picked] == 3).all())
    assert torch.equal(img_real, data.images_train[picked])


def test_true_labels_are_read_by_no_method(fm_path, tmp_path, monkeypatch):
    """The same sets whether the kept true labels are real or garbage: only the measurement reads them."""
    runs = {}
    for tag in ('true', 'garbage'):
        if tag == 'garbage':
            monkeypatch.setattr(labelnoise, 'keep_truth', lambda labels: torch.randint(
                0, 10, labels.shape, generator=torch.Generator().manual_seed(5)))
        for name, argv in (('online', ['--method', 'DC', '--Iteration', '2', '--batch_real', '6',
                                       '--clean_select', 'score', '--clean_keep', '0.5']),
                           ('offline', ['--method', 'random', '--clean_filter', 'loss', '--score_epochs', '1'])):
            out = tmp_path / tag / name
            main.main(common(fm_path, out, '--ipc', '1', '--noise_rate', '0.4', '--score_cache',
                             str(tmp_path / tag / 'cache'), *argv))
            runs[tag, name] = (base.load_torch_file(next(out.glob('res_*.pt')), 'set')['data'], read_json(out))
    for name in ('online', 'offline'):
        (sets_a, json_a), (sets_b, json_b) = runs['true', name], runs['garbage', name]
        assert all(torch.equal(x, y) for a, b in zip(sets_a, sets_b) for x, y in zip(a, b))
        assert json_a['pure_rate']['used'] != json_b['pure_rate']['used']
    online = runs['true', 'online'][1]
    assert [h['iteration'] for h in online['pure_rate_history']] == [0, 1]
    assert online['pure_rate']['online'] == pytest.approx(
        sum(h['pure_rate'] for h in online['pure_rate_history']) / 2)
    assert online['config']['noise_rate'] == 0.4 and online['config']['clean_select'] == 'score'


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('script, flags, message', [
    (main, ['--noise_rate', '1.2'], '--noise_rate must be in [0, 1)'),
    (main, ['--noise_type', 'uniform'], "unknown noise type 'uniform'"),
    (main, ['--clean_filter', 'score4'], "unknown score of --clean_filter 'score4'"),
    (main, ['--clean_select', 'margin'], "unknown score of --clean_select 'margin'"),
    (main, ['--clean_keep', '0', '--clean_filter', 'loss'], '--clean_keep must be in (0, 1]'),
    (main_DM, ['--clean_select', 'score'], '--clean_select scores the real batches'),
])
def test_bad_input_is_one_line_and_exit_2(script, flags, message, tmp_path, capsys):
    save = tmp_path / 'out'
    with pytest.raises(SystemExit) as stop:
        experiment.cli(lambda: script.main(common(tmp_path / 'nodata', save, *flags)))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not save.exists()


# ---------------------------------------------------------------------------------------------
# noise.py and report.py --table noise
# ---------------------------------------------------------------------------------------------

def test_noise_grid_runs_resumes_and_reports(fm_path, tmp_path):
    save = tmp_path / 'grid'
    cmd = [sys.executable, os.path.join(ROOT, 'noise.py'), '--dataset', 'FashionMNIST', '--data_path', str(fm_path),
           '--save_path', str(save), '--noise_rate', '0.4', '--score', 'none', 'loss', '--method', 'random',
           '--ipc', '2', '--num_eval', '1', '--epoch_eval_train', '2', '--score_epochs', '1', '--model',
           'ConvNetW32', '--device', 'cpu', '--quiet']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert '| random | 2 | offline loss | – |' in first.stdout
    assert (save / 'noise_FashionMNIST_pure_rate.png').is_file()
    assert (save / 'noise_FashionMNIST_accuracy.png').is_file()
    with open(save / 'random_ipc2' / 'symmetric0.4' / 'none_none' / 'res_random_FashionMNIST_ConvNetW32_2ipc.json') as f:
        assert json.load(f)['pure_rate']['kept'] == pytest.approx(0.6)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout == first.stdout  # every cell read back
    report = subprocess.run([sys.executable, os.path.join(ROOT, 'report.py'), str(save), '--table', 'noise'],
                            capture_output=True, text=True, env=env, timeout=120)
    assert report.returncode == 0, report.stderr
    table = first.stdout[first.stdout.index('### Noisy'):first.stdout.index('figure written')].strip()
    assert table in report.stdout
    bad = subprocess.run(cmd[:2] + ['--score', 'best'], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and "unknown score 'best'" in bad.stderr


def test_with_label_rows_score_ranks_like_loss_and_score3_like_score2_within_a_class():
    """Why the predicted-class rows exist: a class's candidates share their label-row denominator."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 5, generator=gen) * 2
    labels = torch.full((40,), 2, dtype=torch.long)
    l_y, l_p, pred = cleanscore.sample_losses(logits, labels)
    buffers = cleanscore.LossBuffers(5, 64, 'cpu')
    buffers.push(labels, l_y, l_p)
    rank = {k: cleanscore.lowest(cleanscore.scores(k, l_y, l_p, labels, buffers.means()), 20).tolist()
            for k in ('loss', 'score', 'score2', 'score3')}
    assert rank['score'] == rank['loss'] and rank['score3'] == rank['score2'] and rank['score2'] != rank['loss']
    by_pred = cleanscore.LossBuffers(5, 64, 'cpu')
    by_pred.push(pred, l_y, l_p)
    assert cleanscore.lowest(cleanscore.scores('score', l_y, l_p, pred, by_pred.means()), 20).tolist() != rank['loss']
