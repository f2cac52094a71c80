"""Issue 23: result files get the mode a plain open would give (0666 & ~umask), and output folders that cannot be
written or non-finite / non-positive learning rates fail in one line before any data is loaded."""
import os
import stat

import pytest
import torch

import CL_DM
import NAS
import base
import experiment
import main
import main_DM
import report
from conftest import write_mnist

TINY = ['--device', 'cpu', '--quiet', '--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '2']


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('mnist')
    write_mnist(path, train_per_class=6, test_per_class=2)
    return path


@pytest.fixture
def umask():
    """Sets the umask of the test's parameter and restores the old one afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def file_modes(folder):
    return {os.path.relpath(os.path.join(d, f), folder): stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode)
            for d, _, files in os.walk(folder) for f in files}


# ----------------------------------------------------------------------------- file modes

def test_current_umask_reads_the_process_umask(umask):
    for value in (0o022, 0o027, 0o077, 0o002):
        umask(value)
        assert base.current_umask() == value


@pytest.mark.parametrize('mask', [0o022, 0o027])
def test_every_kind_of_file_a_run_writes_has_the_umask_mode(mnist_dir, tmp_path, umask, mask, capsys):
    umask(mask)
    expected = 0o666 & ~mask  # what open(path, 'w') gives: 0644 for 022, 0640 for 027
    out = tmp_path / 'res'
    # a coreset run: res_*.pt, res_*.json, vis png, --export_png pngs, the cached feature network
    main.main(['--dataset', 'MNIST', '--data_path', str(mnist_dir), '--save_path', str(out), '--method', 'herding',
               '--model', 'ConvNet', '--feat_epochs', '1', '--export_png', str(out / 'png'), *TINY])
    # a checkpoint, written by the runner's own writer
    args = main.parse_args(['--save_path', str(out)])
    experiment.save_checkpoint(str(out / 'ckpt_x_exp0.pt'), args, {'it': 1, 'image_syn': torch.zeros(1)})
    # report plots and a NAS report (JSON, scatter plot, ground-truth cache)
    report.main([str(out), '--plots', str(out / 'plots')])
    NAS.main(['--dataset', 'MNIST', '--data_path', str(mnist_dir), '--save_path', str(out / 'nas'), '--device', 'cpu',
              '--quiet', '--epochs', '1', '--whole_epochs', '1', '--ipc', '1', '--ground_truth', '--proxy', 'random',
              '--depth', '1', '--width', '4', '--act', 'relu', '--norm', 'none', 'instancenorm',
              '--pool', 'avgpooling'])
    capsys.readouterr()
    modes = file_modes(out)
    kinds = {'res_herding_MNIST_ConvNet_1ipc.pt', 'res_herding_MNIST_ConvNet_1ipc.json',
             'vis_herding_MNIST_ConvNet_1ipc_exp0_iter0.png', 'ckpt_x_exp0.pt',
             'featnet_MNIST_ConvNet_1ep_seed0.pt', os.path.join('nas', 'nas_gt_MNIST.json'),
             os.path.join('nas', 'nas_MNIST_random_1ipc.json'), os.path.join('nas', 'nas_MNIST_random_1ipc.png')}
    assert kinds <= set(modes), sorted(modes)
    assert any(p.startswith('png' + os.sep) and p.endswith('.png') for p in modes)
    assert any(p.startswith('plots' + os.sep) and p.endswith('.png') for p in modes)
    assert {p: oct(m) for p, m in modes.items() if m != expected} == {}


def test_cl_memory_and_summary_have_the_umask_mode(tmp_path, umask):
    umask(0o027)
    base.write_json_atomic(tmp_path / 'cl_x.json', {'a': 1})
    base.save_torch_file_atomic({'data': []}, tmp_path / 'cl' / 'memory.pt')
    assert set(file_modes(tmp_path).values()) == {0o640}


# ----------------------------------------------------------------------------- unwritable folders

def through_a_file(tmp_path):
    (tmp_path / 'plain').write_text('a regular file')
    return str(tmp_path / 'plain' / 'res')


def refuse_data_loading(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError('data was loaded before the flags were checked')
    for module in (main, main_DM, CL_DM, NAS):
        monkeypatch.setattr(module, 'load_dataset', loaded, raising=False)


def one_line_exit_2(capsys, run):
    with pytest.raises(SystemExit) as e:
        experiment.cli(run)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    return err


@pytest.mark.parametrize('script,extra', [
    (main, []), (main, ['--method', 'herding']), (main_DM, []), (CL_DM, ['--dataset', 'MNIST']),
    (NAS, ['--ground_truth']),
])
def test_save_path_through_a_regular_file_fails_before_loading(tmp_path, monkeypatch, capsys, script, extra):
    refuse_data_loading(monkeypatch)
    bad = through_a_file(tmp_path)
    err = one_line_exit_2(capsys, lambda: script.main(['--data_path', str(tmp_path / 'nodata'), '--save_path', bad,
                                                        '--device', 'cpu', *extra]))
    assert '--save_path' in err and bad in err


def test_export_png_through_a_regular_file_fails_before_loading(tmp_path, monkeypatch, capsys):
    refuse_data_loading(monkeypatch)
    bad = through_a_file(tmp_path)
    err = one_line_exit_2(capsys, lambda: main.main(['--save_path', str(tmp_path / 'ok'), '--export_png', bad,
                                                      '--device', 'cpu']))
    assert '--export_png' in err and bad in err


def test_cl_memory_folder_through_a_regular_file_fails_with_build(tmp_path, monkeypatch, capsys):
    refuse_data_loading(monkeypatch)
    (tmp_path / 'metasets').write_text('not a folder')
    err = one_line_exit_2(capsys, lambda: CL_DM.main(['--data_path', str(tmp_path), '--save_path', str(tmp_path / 'r'),
                                                       '--method', 'herding', '--build', '--device', 'cpu']))
    assert 'metasets' in err


def test_report_plots_folder_through_a_regular_file_is_one_line(tmp_path, capsys):
    bad = through_a_file(tmp_path)
    with pytest.raises(SystemExit) as e:
        report.cli([str(tmp_path), '--plots', bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and '--plots' in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders: only a path through a file '
                                               'fails for root (tested above)')
def test_read_only_save_path_fails_before_loading(tmp_path, monkeypatch, capsys):
    refuse_data_loading(monkeypatch)
    folder = tmp_path / 'ro'
    folder.mkdir()
    folder.chmod(0o555)
    try:
        err = one_line_exit_2(capsys, lambda: main.main(['--save_path', str(folder), '--device', 'cpu']))
    finally:
        folder.chmod(0o755)
    assert '--save_path' in err


def test_good_save_path_is_created_and_left_empty(tmp_path):
    base.check_writable_folder(str(tmp_path / 'a' / 'b'), '--save_path')
    assert os.listdir(tmp_path / 'a' / 'b') == []


# ----------------------------------------------------------------------------- learning rates

@pytest.mark.parametrize('flag', ['--lr_img', '--lr_net'])
@pytest.mark.parametrize('value', ['nan', 'inf', '-inf', '-0.1', '0'])
def test_bad_learning_rates_fail_at_parse_time(tmp_path, monkeypatch, capsys, flag, value):
    refuse_data_loading(monkeypatch)
    for script in (main, main_DM):
        err = one_line_exit_2(capsys, lambda: script.main(['--save_path', str(tmp_path), '--device', 'cpu',
                                                            f'{flag}={value}']))
        assert flag in err and 'finite positive' in err


@pytest.mark.parametrize('script,flag', [(CL_DM, '--lr_net'), (CL_DM, '--lr_img'), (NAS, '--lr_net')])
def test_bad_learning_rates_of_the_other_scripts(tmp_path, monkeypatch, capsys, script, flag):
    refuse_data_loading(monkeypatch)
    extra = ['--ground_truth'] if script is NAS else ['--dataset', 'MNIST']
    err = one_line_exit_2(capsys, lambda: script.main(['--save_path', str(tmp_path), '--device', 'cpu', flag, 'nan',
                                                        *extra]))
    assert flag in err


def test_good_learning_rates_pass():
    for value in (1e-6, 0.01, 1.0, 10.0):
        base.check_learning_rate(value, '--lr_img')
