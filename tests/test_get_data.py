"""get_data.sh (issue 20), the one script `make demo` and CI use to get FashionMNIST: every branch of its decision,
run against fake apt-get / sudo / python commands and a fake package folder, so no root and no network are needed."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDX = ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']


def fake_command(path, body):
    with open(path, 'w') as f:
        f.write('#!/usr/bin/env bash\n' + body + '\n')
    os.chmod(path, 0o755)
    return str(path)


def touch_idx(folder, gz=True):
    os.makedirs(folder, exist_ok=True)
    for name in IDX:
        open(os.path.join(folder, name + ('.gz' if gz else '')), 'wb').close()


@pytest.fixture
def setup(tmp_path):
    """Paths and fake commands: apt-get that 'installs' the package into the fake system folder (and logs each
    call), sudo that runs its command, python that 'downloads' into DATA/FashionMNIST/raw."""
    system = tmp_path / 'usr-share'
    log = tmp_path / 'calls.log'
    apt = fake_command(tmp_path / 'apt-get', f'echo "apt-get $*" >> {log}\n'
                       f'if [ "$1" = install ]; then mkdir -p {system}; '
                       + ' '.join(f'touch {system}/{n}.gz;' for n in IDX) + ' fi')
    sudo = fake_command(tmp_path / 'sudo', f'echo "sudo $*" >> {log}\n[ "$1" = -n ] && shift\n"$@"')
    python = fake_command(tmp_path / 'python', f'echo "python $*" >> {log}\nmkdir -p "$3/FashionMNIST/raw"\n'
                          + ' '.join(f'touch "$3/FashionMNIST/raw/{n}.gz";' for n in IDX))
    env = dict(os.environ, DC_SYSTEM_DIR=str(system), DC_APT_GET=apt, DC_SUDO=sudo, DC_PYTHON=python)
    return dict(tmp=tmp_path, system=str(system), log=str(log), env=env, data=str(tmp_path / 'data'))


def get_data(s, **env):
    proc = subprocess.run([os.path.join(ROOT, 'get_data.sh'), s['data']], env=dict(s['env'], **env),
                          capture_output=True, text=True, timeout=60)
    calls = open(s['log']).read() if os.path.exists(s['log']) else ''
    return proc, calls


def test_present_data_is_used_and_nothing_is_installed(setup):
    touch_idx(setup['system'])
    proc, calls = get_data(setup)
    assert proc.returncode == 0 and 'found in' in proc.stdout and calls == ''
    os.rename(setup['system'], setup['system'] + '-gone')
    touch_idx(os.path.join(setup['data'], 'FashionMNIST', 'raw'), gz=False)  # plain files in data/ count too
    proc, calls = get_data(setup)
    assert proc.returncode == 0 and 'found in' in proc.stdout and calls == ''


@pytest.mark.parametrize('uid', ['0', '1000'])
def test_the_debian_package_is_installed_where_apt_get_is_usable(setup, uid):
    proc, calls = get_data(setup, DC_UID=uid)
    assert proc.returncode == 0 and 'installed in' in proc.stdout
    assert 'apt-get install -y -q dataset-fashion-mnist' in calls and 'python' not in calls
    assert ('sudo -n' in calls) == (uid != '0')  # sudo only when not root, and never one that asks a password


def test_a_failing_install_falls_back_to_the_download(setup):
    failing_apt = fake_command(setup['tmp'] / 'apt-broken', f'echo "apt-get $*" >> {setup["log"]}\nexit 100')
    proc, calls = get_data(setup, DC_APT_GET=failing_apt)
    assert proc.returncode == 0 and 'downloaded to' in proc.stdout
    assert calls.splitlines()[:2] == ['apt-get install -y -q dataset-fashion-mnist', 'apt-get update -q']
    assert os.path.isfile(os.path.join(setup['data'], 'FashionMNIST', 'raw', IDX[0] + '.gz'))


def test_without_root_or_sudo_apt_is_not_tried(setup):
    asks_password = fake_command(setup['tmp'] / 'sudo-password', 'exit 1')  # what sudo -n does then
    for sudo in (str(setup['tmp'] / 'no-sudo'), asks_password):
        proc, calls = get_data(setup, DC_UID='1000', DC_SUDO=sudo)
        assert proc.returncode == 0 and 'apt-get' not in calls and 'downloaded to' in proc.stdout
        os.remove(setup['log'])
        shutil.rmtree(setup['data'])
    assert proc.returncode == 0 and 'apt-get' not in calls and 'downloaded to' in proc.stdout


def test_no_apt_and_no_network_ends_in_the_one_line_error(setup):
    offline = fake_command(setup['tmp'] / 'python-offline', 'exit 1')
    proc, _ = get_data(setup, DC_APT_GET=str(setup['tmp'] / 'no-apt'), DC_PYTHON=offline)
    assert proc.returncode == 1 and proc.stderr.count('\n') == 1
    raw = os.path.join(setup['data'], 'FashionMNIST', 'raw')
    assert proc.stderr.startswith('error: FashionMNIST data not found: no apt-get;')
    assert all(name in proc.stderr for name in IDX) and raw in proc.stderr and 'dataset-fashion-mnist' in proc.stderr


def test_the_makefile_and_ci_share_the_script():
    makefile = open(os.path.join(ROOT, 'Makefile')).read()
    ci = open(os.path.join(ROOT, '.ci', 'run')).read()
    demo = makefile.split('\ndemo:')[1].split('\n\n')[0]
    assert './get_data.sh data' in demo and demo.index('get_data.sh') < demo.index('main.py')
    assert './get_data.sh data' in ci and 'apt-get' not in ci
