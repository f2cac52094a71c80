"""A whole-dataset-bound network takes 2-3 hours on a 2-core CPU: a run stopped inside one keeps where the network
stood at its last epoch, and --resume goes on from there to the bits of a run never stopped."""
import pytest
import torch

import base
import coreset
import main
import training
from augment import ParamDiffAug
from conftest import make_split, write_mnist
from networks import get_network

STEM = 'whole_MNIST_MLP_1ipc'


def train(epochs, stop_after=None, resume=None, dsa='color_crop_flip'):
    """One ConvNetW32 on 30 tiny images with DSA (both random streams in use); on_epoch keeps every state, and
    stop_after=e raises after epoch e's state was kept. Returns (accuracy or None, kept states, network)."""
    torch.manual_seed(0)
    (x, y), (xt, yt) = make_split(3, 10, 4, 1, 28)
    x, xt = (torch.as_tensor(v).float() / 255 for v in (x, xt))
    y, yt = (torch.as_tensor(v).long() for v in (y, yt))
    torch.manual_seed(1)
    net = get_network('ConvNetW32', 1, 3, (28, 28), device='cpu')
    rand = training.NetRandom(5, 6, 'cpu')
    kept = []

    def on_epoch(state):
        kept.append(state())
        if stop_after is not None and kept[-1]['epoch'] == stop_after + 1:
            raise KeyboardInterrupt

    try:
        acc = training.train_and_test(net, x, y, xt, yt, epochs, 0.01, 8, dsa_strategy=dsa, dsa_param=ParamDiffAug(),
                                      rand=rand, resume=resume, on_epoch=on_epoch)
    except KeyboardInterrupt:
        acc = None
    return acc, kept, net


@pytest.mark.parametrize('stop_after', [0, 2, 3])  # before the lr decay (after epoch 3 of 0-5), at it, after it
def test_training_resumed_between_epochs_ends_in_the_same_bits(tmp_path, stop_after):
    acc, kept, net = train(5)
    assert [s['epoch'] for s in kept] == [1, 2, 3, 4, 5] and all(s['epochs'] == 5 for s in kept)
    assert [s['lr'] for s in kept] == [0.01] * 3 + [pytest.approx(0.001)] * 2  # x0.1 after epoch 5 // 2 + 1 = 3
    _, cut, _ = train(5, stop_after=stop_after)
    assert len(cut) == stop_after + 1
    for a, b in zip(cut, kept):  # what a stopped run kept is what the unstopped one had at that epoch
        assert all(torch.equal(a['net'][k], b['net'][k]) for k in b['net'])
        assert torch.equal(a['rand']['generator'], b['rand']['generator'])
    # the state goes through the disk as a checkpoint does (written atomically, read back weights-only)
    base.save_torch_file_atomic({'state': cut[-1]}, tmp_path / 'ckpt.pt')
    state = base.load_torch_file(tmp_path / 'ckpt.pt', 'checkpoint')['state']
    acc2, rest, net2 = train(5, resume=state)
    assert acc2 == acc and [s['epoch'] for s in rest] == [s['epoch'] for s in kept[stop_after + 1:]]
    for k, v in net.state_dict().items():
        assert torch.equal(net2.state_dict()[k], v), k


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('mnist')
    write_mnist(path, train_per_class=12, test_per_class=3)
    return path


def run_whole(data_path, save_path, *flags, quiet=True):
    return main.main(['--dataset', 'MNIST', '--data_path', str(data_path), '--save_path', str(save_path),
                      '--method', 'whole', '--model', 'MLP', '--num_exp', '2', '--num_eval', '2',
                      '--epoch_eval_train', '4', '--device', 'cpu', *(['--quiet'] if quiet else []), *flags])


def accs_of(folder):
    return [float(a) for a in base.load_torch_file(folder / f'res_{STEM}.pt', 'result')['accs_all_exps']['MLP']]


def stop_in_epoch(data_path, save_path, monkeypatch, stop_in):
    """A whole-bound run (every epoch kept: a minute apart in real runs) stopped inside its stop_in-th epoch in all;
    returns the counter of epochs that the next runs add to."""
    monkeypatch.setattr(coreset, 'WHOLE_PARTIAL_SECONDS', 0.0)
    real_epoch = training.train_epoch
    calls = {'n': 0, 'stop': True}

    def counted(*a, **k):
        calls['n'] += 1
        if calls['n'] == stop_in and calls['stop']:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)
    monkeypatch.setattr(training, 'train_epoch', counted)
    with pytest.raises(KeyboardInterrupt):
        run_whole(data_path, save_path)
    calls.update(n=0, stop=False)
    return calls


@pytest.mark.parametrize('stop_in', [8, 10])  # network 1 of experiment 0 in its epoch 2 (before the decay), 4 (after)
def test_whole_bound_stopped_inside_a_network_resumes_from_its_last_epoch(mnist_dir, tmp_path, monkeypatch,
                                                                          capsys, stop_in):
    run_whole(mnist_dir, tmp_path / 'full')
    full = accs_of(tmp_path / 'full')
    calls = stop_in_epoch(mnist_dir, tmp_path / 'cut', monkeypatch, stop_in)  # network 0 took epochs 1-5
    ckpt = base.load_torch_file(tmp_path / 'cut' / f'ckpt_{STEM}_exp0.pt', 'checkpoint')
    assert ckpt['networks'] == {'MLP': {0: full[0]}}
    partial = ckpt['partial']
    assert (partial['model'], partial['index'], partial['device']) == ('MLP', 1, 'cpu')
    assert partial['state']['epoch'] == stop_in - 6 and partial['state']['epochs'] == 4

    capsys.readouterr()
    run_whole(mnist_dir, tmp_path / 'cut', '--resume')
    # network 1 of experiment 0 trains only its remaining epochs, experiment 1 its 2 x 5
    assert calls['n'] == (5 - (stop_in - 6)) + 10
    assert accs_of(tmp_path / 'cut') == full
    assert not list((tmp_path / 'cut').glob('ckpt_*'))


def test_a_network_stopped_on_another_kind_of_device_starts_again(mnist_dir, tmp_path, monkeypatch, capsys):
    # a CUDA generator's state cannot seed a CPU one: that network is trained from its start (the same network)
    run_whole(mnist_dir, tmp_path / 'full')
    calls = stop_in_epoch(mnist_dir, tmp_path / 'cut', monkeypatch, 8)
    path = tmp_path / 'cut' / f'ckpt_{STEM}_exp0.pt'
    ckpt = base.load_torch_file(path, 'checkpoint')
    ckpt['partial']['device'] = 'cuda'
    torch.save(ckpt, path)
    run_whole(mnist_dir, tmp_path / 'cut', '--resume', quiet=False)
    assert 'network 1 of MLP was stopped in training on cuda: on cpu it starts again' in capsys.readouterr().out
    assert calls['n'] == 5 + 10
    assert accs_of(tmp_path / 'cut') == accs_of(tmp_path / 'full')
