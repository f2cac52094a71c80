"""Files written by the original code load and evaluate (issue 14).

The original stores its accuracies as numpy.float64 (np.sum(...) / n), so every published res_*.pt and every
continual-learning memory file holds numpy globals inside its pickle; some were written by torch < 1.6 in the legacy
(non-zip) format, and by numpy 1, whose scalars pickle under numpy.core.multiarray (numpy 2: numpy._core). The
fixtures below are written that way, not with our own writer."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import CL_DM
import base
import main
from conftest import write_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMPY2_SCALAR = b'numpy._core.multiarray\nscalar'
NUMPY1_SCALAR = b'numpy.core.multiarray\nscalar'


class Marker:
    """Stands for any Python object a file might pickle that is not plain data."""


def as_numpy1(path):
    """Rewrite a torch file as numpy 1 would have written it: the scalar global under numpy.core.multiarray. torch
    pickles with protocol 2, whose GLOBAL opcode spells 'module\\nname' without a length, so the bytes can be
    replaced; a zip file is rebuilt around its patched data.pkl."""
    if not zipfile.is_zipfile(path):
        raw = open(path, 'rb').read()
        assert NUMPY2_SCALAR in raw or NUMPY1_SCALAR in raw
        open(path, 'wb').write(raw.replace(NUMPY2_SCALAR, NUMPY1_SCALAR))
        return
    with zipfile.ZipFile(path) as z:
        entries = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        for name, payload in entries:
            if name.endswith('data.pkl'):
                assert NUMPY2_SCALAR in payload or NUMPY1_SCALAR in payload
                payload = payload.replace(NUMPY2_SCALAR, NUMPY1_SCALAR)
            z.writestr(name, payload)


def original_accuracies(n, seed):
    """Accuracies as the original computes them: a numpy integer sum divided by the test-set size."""
    rng = np.random.default_rng(seed)
    return [np.sum(rng.integers(0, 2, size=200)) / 200 for _ in range(n)]


def write_original_res(path, num_sets=5, ipc=1, legacy=False, numpy1=False, extra=None):
    """A res_*.pt the way the original main.py writes it: 'data' = [[images float32 N x 1 x 28 x 28, labels int64]]
    per experiment, 'accs_all_exps' = {model: [numpy.float64] x 100}."""
    gen = torch.Generator().manual_seed(0)
    data = [[torch.randn(10 * ipc, 1, 28, 28, generator=gen), torch.arange(10).repeat_interleave(ipc)]
            for _ in range(num_sets)]
    obj = {'data': data, 'accs_all_exps': {'ConvNet': original_accuracies(100, 1), 'MLP': original_accuracies(100, 2)}}
    obj.update(extra or {})
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    if numpy1:
        as_numpy1(path)
    return obj


@pytest.fixture(scope='module')
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp('mnist'), train_per_class=6, test_per_class=4)


def load_syn(data_path, res, save_path, *extra):
    return main.main(['--dataset', 'MNIST', '--data_path', str(data_path), '--method', 'DC', '--ipc', '1',
                      '--load_syn', str(res), '--save_path', str(save_path), '--num_eval', '1',
                      '--epoch_eval_train', '1', '--device', 'cpu', '--quiet', *extra])


def test_the_fixture_really_needs_numpy_globals(tmp_path):
    path = tmp_path / 'res.pt'
    write_original_res(path)
    with pytest.raises(Exception, match='numpy'):
        torch.load(path, weights_only=True)  # plain weights-only loading refuses it: the bug of issue 14


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
@pytest.mark.parametrize('numpy1', [False, True], ids=['numpy2', 'numpy1'])
def test_original_res_file_loads_with_numpy_values_as_floats(tmp_path, legacy, numpy1):
    path = tmp_path / 'res_DC_MNIST_ConvNet_1ipc.pt'
    written = write_original_res(path, legacy=legacy, numpy1=numpy1)
    assert zipfile.is_zipfile(path) == (not legacy)
    loaded = base.load_torch_file(path, 'synthetic set')
    assert len(loaded['data']) == 5 and torch.equal(loaded['data'][3][0], written['data'][3][0])
    assert loaded['accs_all_exps']['ConvNet'] == pytest.approx([float(a) for a in written['accs_all_exps']['ConvNet']])


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_load_syn_evaluates_an_original_file(mnist, tmp_path, legacy):
    res = tmp_path / 'res_DC_MNIST_ConvNet_1ipc.pt'
    written = write_original_res(res, legacy=legacy, numpy1=True)
    summary = load_syn(mnist, res, tmp_path / 'out')
    assert summary['ConvNet']['n'] == 5  # 5 stored sets x 1 network
    import json
    report = json.load(open(tmp_path / 'out' / 'eval_res_DC_MNIST_ConvNet_1ipc_S.json'))
    stored = report['stored_results']['ConvNet']
    expected = np.array([float(a) for a in written['accs_all_exps']['ConvNet']])
    assert stored['n'] == 100 and isinstance(stored['accs'][0], float)
    assert stored['mean'] == pytest.approx(expected.mean() * 100) and stored['std'] == pytest.approx(expected.std() * 100)


def test_a_foreign_global_is_named_and_loads_only_with_unsafe_load(mnist, tmp_path):
    res = tmp_path / 'res_DC_MNIST_ConvNet_1ipc.pt'
    write_original_res(res, num_sets=1, extra={'note': Marker()})
    with pytest.raises(base.UserError) as err:
        load_syn(mnist, res, tmp_path / 'out')
    message = str(err.value)
    assert 'test_published_files.Marker' in message and '--unsafe_load' in message and 'corrupt' not in message
    summary = load_syn(mnist, res, tmp_path / 'out', '--unsafe_load')
    assert summary['ConvNet']['n'] == 1


def test_cli_error_lines(mnist, tmp_path):
    """Through the real command line: one line on stderr, exit 2, no traceback; each failure says what it is."""
    def run(res, *extra):
        proc = subprocess.run([sys.executable, 'main.py', '--dataset', 'MNIST', '--data_path', str(mnist),
                               '--load_syn', str(res), '--save_path', str(tmp_path / 'out'), '--device', 'cpu',
                               '--quiet', *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        return lines[0]

    good = tmp_path / 'res_good.pt'
    write_original_res(good, num_sets=1)
    truncated = tmp_path / 'res_truncated.pt'
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    assert 'truncated or corrupt' in run(truncated)

    wrong = tmp_path / 'res_wrong.pt'
    torch.save({'images': torch.zeros(1), 'accs_all_exps': {'ConvNet': original_accuracies(3, 0)}}, wrong)
    line = run(wrong)
    assert "'data'" in line and 'corrupt' not in line

    pickled_class = tmp_path / 'res_class.pt'
    torch.save({'data': [], 'opaque': Marker()}, pickled_class)
    line = run(pickled_class)
    assert 'Marker' in line and '--unsafe_load' in line and 'corrupt' not in line


def test_cl_memory_files_with_numpy_values_load(tmp_path, mnist):
    """A continual-learning memory file of the original code (numpy values beside the steps) is evaluated."""
    steps, ipc = 5, 1
    order = CL_DM.class_order(0, 10)
    gen = torch.Generator().manual_seed(1)
    memory = []
    for s in range(steps):
        classes = CL_DM.step_classes(order, steps, s)
        memory.append([torch.randn(len(classes) * ipc, 1, 28, 28, generator=gen),
                       torch.as_tensor(classes).repeat_interleave(ipc)])
    path = CL_DM.memory_path(str(mnist), 'DM', 'MNIST', 'ConvNet', ipc, steps, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'data': memory, 'accs': original_accuracies(steps, 3)}, path, _use_new_zipfile_serialization=False)
    as_numpy1(path)
    out = CL_DM.main(['--dataset', 'MNIST', '--data_path', str(mnist), '--method', 'DM', '--ipc', str(ipc),
                      '--steps', str(steps), '--num_orders', '1', '--num_eval', '1', '--epoch_eval_train', '1',
                      '--device', 'cpu', '--quiet', '--save_path', str(tmp_path / 'cl')])
    assert len(out['steps']) == steps
