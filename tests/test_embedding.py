"""embedding.py (report.py --embed): PCA, LDA and the relative distances on hand-made points, and the whole
command on a tiny MNIST in its on-disk format (issue 22)."""
import numpy as np
import pytest
import torch
from PIL import Image

import report
from conftest import write_mnist
from data import load_dataset
from embedding import lda_fit, pca_fit, relative_distances


def test_pca_matches_numpy_svd_and_hand_computed_variances():
    # centred points on the axes: variances 18, 2 and 0.5 (sums of squares) along x, y, z
    x = np.array([[3, 0, 0], [-3, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 0.5], [0, 0, -0.5]], dtype=float)
    x = x @ np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0] + 7.0  # rotated, shifted
    mean, components, explained = pca_fit(x, k=2)
    assert np.allclose(mean, 7.0)  # the points were centred before the shift
    assert np.allclose(explained, [18 / 20.5, 2 / 20.5])
    u, s, vt = np.linalg.svd(x - x.mean(0))
    projected = (x - mean) @ components.T
    for k in range(2):  # the same axes up to sign, and projections equal to U * S
        sign = np.sign(components[k] @ vt[k])
        assert np.allclose(components[k], sign * vt[k])
        assert np.allclose(projected[:, k], sign * u[:, k] * s[k])
    assert np.allclose(np.abs(projected[:2, 0]), 3.0) and np.allclose(np.abs(projected[2:4, 1]), 1.0)


def test_lda_separates_two_gaussian_classes_that_pca_does_not():
    rng = np.random.default_rng(1)
    n = 400
    a = rng.normal(size=(n, 2)) * [0.3, 5.0]
    b = rng.normal(size=(n, 2)) * [0.3, 5.0] + [1.5, 0.0]  # the classes differ along x; y holds most variance
    x = np.concatenate([a, b])
    y = np.repeat([0, 1], n)
    directions, shares = lda_fit(x, y, k=1)
    assert abs(directions[0] @ [1.0, 0.0]) > 0.99 and shares[0] == pytest.approx(1.0)
    z = x @ directions[0]
    threshold = (z[y == 0].mean() + z[y == 1].mean()) / 2
    predicted = (z > threshold) == (z[y == 1].mean() > threshold)
    assert (predicted == (y == 1)).mean() > 0.98
    _, components, _ = pca_fit(x, k=1)
    assert abs(components[0] @ [0.0, 1.0]) > 0.99  # PCA follows the variance, not the classes


def test_relative_distances_by_hand():
    real = np.array([[1, 0], [-1, 0], [11, 0], [9, 0]], dtype=float)  # means (0, 0) and (10, 0), spread 1 each
    labels = np.array([0, 0, 1, 1])
    points = np.array([[2, 0], [9, 0], [8, 0]], dtype=float)
    ratio, nearest = relative_distances(real, labels, points, np.array([0, 1, 0]))
    assert np.allclose(ratio, [2.0, 1.0, 8.0]) and nearest.tolist() == [True, True, False]


def test_embed_command_writes_both_projections(tmp_path, capsys):
    path = write_mnist(tmp_path / 'data', train_per_class=12, test_per_class=2)
    data = load_dataset('MNIST', path)
    picks = torch.stack([idx[0] for idx in data.indices_class])
    res = tmp_path / 'runs' / 'res_random_MNIST_ConvNet_1ipc.pt'
    res.parent.mkdir()
    torch.save({'data': [[data.images_train[picks].clone(), torch.arange(10)]], 'accs_all_exps': {}}, res)
    out = tmp_path / 'pictures'
    args = ['--embed', res, '--dataset', 'MNIST', '--data_path', path, '--out', out, '--embed_cache', tmp_path / 'c',
            '--embed_epochs', '1', '--embed_per_class', '6', '--device', 'cpu']
    try:
        report.cli([str(a) for a in args])
    except SystemExit as e:
        assert e.code in (0, None)
    text = capsys.readouterr().out
    assert 'PCA explained variance' in text and text.count('  class ') == 10
    for what in ('pca', 'lda'):
        png = out / f'embed_runs-random_MNIST_ConvNet_1ipc_exp0_{what}.png'
        assert Image.open(png).size[0] > 100
    assert len(list((tmp_path / 'c').glob('featnet_MNIST_ConvNet_1ep_seed0.pt'))) == 1  # cached for the next call


def test_embed_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.cli(['--embed', str(tmp_path / 'absent.pt'), '--dataset', 'MNIST', '--out', str(tmp_path)])
    assert e.value.code == 2 and 'does not exist' in capsys.readouterr().err
