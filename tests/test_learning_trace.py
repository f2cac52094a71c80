"""--grad_stats (Figure 5 of the DSA paper: gradient norms of the real and synthetic batches) and --snapshot_every
(Figure 6: the synthetic set across iterations), issue 22."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import base
import main
import utils
from conftest import write_mnist
from data import load_dataset
from learning_trace import load_snapshots

STRATEGY = 'crop'
STEM = 'DSA_MNIST_ConvNet_1ipc'


@pytest.fixture(scope='module')
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp('mnist'), train_per_class=8, test_per_class=2)


def run(mnist, folder, *extra):
    main.main(['--dataset', 'MNIST', '--data_path', mnist, '--ipc', '1', '--Iteration', '2', '--num_exp', '1',
               '--num_eval', '1', '--epoch_eval_train', '1', '--batch_real', '4', '--init', 'real', '--device', 'cpu',
               '--method', 'DSA', '--dsa_strategy', STRATEGY, '--quiet', '--no_vis', '--save_path', str(folder),
               *extra])
    with open(folder / f'res_{STEM}.json') as f:
        return json.load(f)


def norm_of_loss_gradient(net, images, c):
    """||grad_theta CE(net(images), c)||, computed here from scratch."""
    params = [p for p in net.parameters() if p.requires_grad]
    labels = torch.full((images.shape[0],), c, dtype=torch.long)
    grads = torch.autograd.grad(F.cross_entropy(net(images), labels), params)
    return torch.sqrt(sum((g ** 2).sum() for g in grads)).item()


@pytest.fixture(scope='module')
def traced(mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp('trace')
    summary = run(mnist, folder, '--grad_stats', '0', '1', '--snapshot_every', '1', '--batched_classes', '0')
    return folder, summary


def test_recorded_norms_equal_norms_of_the_same_network_and_batches(mnist, traced):
    folder, summary = traced
    rows = summary['grad_stats']
    assert len(rows) == 2 * 10  # iterations 0 and 1, one outer step each at ipc 1, ten classes
    data = load_dataset('MNIST', mnist)
    snaps = load_snapshots(folder / f'snap_{STEM}_exp0.pt')
    for row in rows:
        it, c = row['iteration'], row['class']
        key = (0, 0, it)
        net = utils.fresh_network(SimpleNamespace(model='ConvNet'), data, 'cpu', key)
        image_syn = snaps['images'][snaps['iterations'].index(it)]  # the set before iteration it's step
        real, syn = utils.class_batches(data, image_syn, c, c, 1, 4, key + (0,), STRATEGY, utils.ParamDiffAug())
        assert row['real'] == pytest.approx(norm_of_loss_gradient(net, real, c), rel=1e-4)
        assert row['syn'] == pytest.approx(norm_of_loss_gradient(net, syn, c), rel=1e-4)
        assert row['real'] > 0 and row['syn'] > 0


def test_snapshots_hold_every_iteration_and_end_with_the_saved_set(traced):
    folder, _ = traced
    snaps = load_snapshots(folder / f'snap_{STEM}_exp0.pt')
    assert snaps['iterations'] == [0, 1, 2]
    final = base.load_torch_file(folder / f'res_{STEM}.pt', 'r')['data'][0]
    assert torch.equal(snaps['images'][-1], final[0]) and torch.equal(snaps['labels'], final[1])
    assert not torch.equal(snaps['images'][0], snaps['images'][1])  # the set moved


def test_batched_class_gradients_record_the_same_norms(mnist, traced, tmp_path):
    _, loop = traced
    batched = run(mnist, tmp_path, '--grad_stats', '0', '1', '--batched_classes', '1')
    assert [(r['iteration'], r['class']) for r in batched['grad_stats']] == \
        [(r['iteration'], r['class']) for r in loop['grad_stats']]
    for a, b in zip(batched['grad_stats'], loop['grad_stats']):
        assert a['real'] == pytest.approx(b['real'], rel=1e-4) and a['syn'] == pytest.approx(b['syn'], rel=1e-4)


@pytest.mark.parametrize('extra,message', [
    (['--grad_stats', '2'], 'must lie in 0..1'),
    (['--grad_stats', '0', '--method', 'random'], 'needs gradient matching'),
    (['--grad_stats', '0', '--resume'], 'cannot be combined with --resume'),
    (['--snapshot_every', '-1'], '>= 0'),
    (['--snapshot_every', '5', '--method', 'herding'], 'needs a learning run'),
])
def test_bad_trace_flags_fail_before_loading_data(tmp_path, extra, message):
    with pytest.raises(base.UserError, match=message):
        main.main(['--dataset', 'MNIST', '--data_path', str(tmp_path / 'absent'), '--Iteration', '2', '--method', 'DSA',
                   '--device', 'cpu', '--save_path', str(tmp_path), *extra])


def test_figures_5_and_6_from_the_recorded_runs(mnist, traced, tmp_path, capsys):
    import report
    from PIL import Image
    folder, _ = traced
    dc = tmp_path / 'dc'
    main.main(['--dataset', 'MNIST', '--data_path', mnist, '--ipc', '1', '--Iteration', '2', '--num_exp', '1',
               '--num_eval', '1', '--epoch_eval_train', '1', '--batch_real', '4', '--init', 'noise', '--device', 'cpu',
               '--quiet', '--no_vis', '--save_path', str(dc), '--grad_stats', '1', '--snapshot_every', '2'])
    capsys.readouterr()
    report.main(['--fig5', str(folder / f'res_{STEM}.json'), str(dc / 'res_DC_MNIST_ConvNet_1ipc.json'),
                 '--fig6', str(dc / 'snap_DC_MNIST_ConvNet_1ipc_exp0.pt'), str(folder / f'snap_{STEM}_exp0.pt'),
                 '--fig6_classes', '3', '7', '--out', str(tmp_path / 'fig')])
    out = capsys.readouterr().out
    assert 'DSA (crop), MNIST ipc 1: iterations 0..1 (2), 20 (class, step) pairs' in out
    assert 'DC, MNIST ipc 1: iterations 1..1 (1), 10 (class, step) pairs' in out
    pngs = sorted(p.name for p in (tmp_path / 'fig').iterdir())
    assert [p[:5] for p in pngs] == ['fig5_', 'fig6_'] and all(Image.open(tmp_path / 'fig' / p).size[0] > 200
                                                                 for p in pngs)
    with pytest.raises(report.ReportError, match=r'recorded none of the iterations \[0\]'):
        report.main(['--fig5', str(dc / 'res_DC_MNIST_ConvNet_1ipc.json'), '--fig5_iters', '0',
                     '--out', str(tmp_path / 'fig')])
    (tmp_path / 'plain.json').write_text(json.dumps({'config': {'method': 'DC'}, 'results': {}}))
    with pytest.raises(report.ReportError, match='has no gradient norms; learn with --grad_stats'):
        report.main(['--fig5', str(tmp_path / 'plain.json'), '--out', str(tmp_path / 'fig')])
