"""report.py's DSA-paper tables 2-5 and the ranking columns of the runs table (dsa_tables.py), from hand-written
JSON summaries in the format main.py writes (issue 22)."""
import json
import os
import time

import pytest

from test_report import report_in_process

COMBO = 'color_crop_cutout_flip_scale_rotate'


def summary(accs):
    n = len(accs)
    mean = sum(accs) / n
    std = (sum((a - mean) ** 2 for a in accs) / n) ** 0.5
    return {'n': n, 'mean': 100 * mean, 'std': 100 * std, 'accs': accs}


def write(folder, name, results, age=0, **config):
    """A res_*.json of main.py: config as the flags would give it, results {model: accuracies in [0, 1]}."""
    full = {'method': 'DSA', 'dataset': 'CIFAR10', 'model': 'ConvNet', 'ipc': 10, 'eval_mode': 'S', 'num_exp': 1,
            'num_eval': len(next(iter(results.values()))), 'init': 'real', 'dsa_strategy': COMBO,
            'dsa_condense': 'siamese', 'dsa_eval': 1, 'epoch_eval_train': None, 'default_epoch_eval': 300}
    full.update(config)
    path = os.path.join(folder, name, f"res_{full['method']}_{full['dataset']}_{full['model']}_{full['ipc']}ipc.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump({'config': full, 'results': {m: summary(a) for m, a in results.items()}}, f)
    stamp = time.time() - 1000 - age
    os.utime(path, (stamp, stamp))


def report_out(capsys, *args):
    return report_in_process(capsys, *args)


def row_of(out, title, *first):
    """Cells of the row starting with `first` in the table whose title contains `title`."""
    block = out[out.index(title):]
    block = block[:block.index('\n- ')]
    prefix = '| ' + ' | '.join(first) + ' |'
    rows = [line for line in block.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, block)
    return [c.strip() for c in rows[0].strip('|').split(' | ')]


@pytest.fixture
def table4_runs(tmp_path):
    root = tmp_path / 'runs'
    write(root, 'ours_crop', {'ConvNet': [0.49, 0.49]}, dsa_strategy='crop')
    write(root, 'ours_crop_noise', {'ConvNet': [0.10, 0.10]}, dsa_strategy='crop', init='noise')  # not real init
    write(root, 'A', {'ConvNet': [0.455, 0.455]}, method='DC', dsa_strategy='None')  # DC, real init: row (A)
    write(root, 'C_crop', {'ConvNet': [0.43, 0.43]}, dsa_strategy='crop', dsa_condense='real')
    write(root, 'E_crop_old', {'ConvNet': [0.44, 0.44]}, age=50, dsa_strategy='crop', dsa_eval=0)
    write(root, 'E_crop', {'ConvNet': [0.40, 0.40]}, dsa_strategy='crop', dsa_eval=0)  # newest: shown, 3.4 off
    write(root, 'F_flip', {'ConvNet': [0.47, 0.47]}, dsa_strategy='flip', dsa_condense='independent')
    write(root, 'combo', {'ConvNet': [0.52, 0.52]})
    write(root, 'fmnist_crop', {'ConvNet': [0.70, 0.70]}, dataset='FashionMNIST', ipc=1, dsa_strategy='crop')
    return root


def test_table4_cells_by_setting_with_the_papers_letters(table4_runs, capsys):
    code, out, err = report_out(capsys, table4_runs, '--table', 'table4')
    assert code == 0, err
    title = 'Table 4 (DSA paper): ablation, CIFAR10 ipc 10'
    ours = row_of(out, title, 'Ours')
    assert ours[1:6] == ['A_w', 'A_w', 'A', 'siamese', '1']
    assert ours[6] == '49.0 ± 0.0 (1×2) [49.1 ± 0.6]'  # the noise-init run is not a Table 4 run
    assert ours[7] == '– [47.9 ± 0.7]'
    assert row_of(out, title, '(A)')[6:] == ['45.5 ± 0.0 (1×2) [45.5 ± 0.6]'] * 4  # one run, every column
    assert row_of(out, title, '(C)')[1:7] == ['A', '–', 'A', 'real', '1', '43.0 ± 0.0 (1×2) [42.8 ± 0.7]']
    assert row_of(out, title, '(E)')[1:7] == ['A_w', 'A_w', '–', 'siamese', '0', '40.0 ± 0.0 (1×2) † [43.4 ± 0.5]']
    assert row_of(out, title, '(F)')[7] == '47.0 ± 0.0 (1×2) [46.9 ± 0.6]'
    assert row_of(out, title, '(F)')[6] == '– [44.5 ± 0.5]'
    # another setting: the paper's numbers for reference, never marked
    other = row_of(out, 'Table 4 (DSA paper): ablation, FashionMNIST ipc 1', 'Ours')
    assert other[6] == '70.0 ± 0.0 (1×2) [49.1 ± 0.6]'
    assert 'for reference only' in out


def test_table4_pooled_and_commands(table4_runs, capsys):
    code, out, err = report_out(capsys, table4_runs, '--table', 'table4', '--pool')
    assert row_of(out, 'CIFAR10 ipc 10', '(E)')[6].startswith('42.0 ± 2.0 (n=4, 2 runs)')
    code, out, err = report_out(capsys, table4_runs, '--commands', 'table4', '--dataset', 'CIFAR10')
    assert code == 0, err
    lines = out.strip().splitlines()
    # 6 rows x 4 ops + (A) once = 25 cells; done: Ours crop, (A), (C) crop, (E) crop, (F) flip
    assert lines[0].startswith('# table4 on CIFAR10: 20 cell(s)')
    assert (f'python main.py --dataset CIFAR10 --model ConvNet --ipc 10 --init real --method DSA --dsa_strategy rotate '
            f'--dsa_condense independent --dsa_eval 1 --num_exp 5 --num_eval 5 --save_path '
            f'{os.path.join(table4_runs, "table4", "F_rotate")}') in lines
    assert not any('--dsa_condense none --dsa_eval 0' in line for line in lines)  # (A) is done
    code, out, err = report_out(capsys, table4_runs, '--commands', 'table4', '--dataset', 'MNIST')
    lines = out.strip().splitlines()[1:]
    assert len(lines) == 25 and sum('--dsa_condense none --dsa_eval 0' in line for line in lines) == 1


def test_table5_columns_per_dataset(table4_runs, capsys):
    write(table4_runs, 'fm_combo', {'ConvNet': [0.846, 0.846]}, dataset='FashionMNIST')
    write(table4_runs, 'fm_cutout', {'ConvNet': [0.80, 0.80]}, dataset='FashionMNIST', dsa_strategy='cutout')
    write(table4_runs, 'fm_cutout_eval0', {'ConvNet': [0.5, 0.5]}, dataset='FashionMNIST', dsa_strategy='cutout',
          dsa_eval=0)  # an ablation row, not Table 5
    write(table4_runs, 'mnist_dc', {'ConvNet': [0.97, 0.97]}, dataset='MNIST', method='DC', dsa_strategy='None')
    code, out, err = report_out(capsys, table4_runs, '--table', 'table5')
    assert code == 0, err
    title = 'Table 5 (DSA paper)'
    cifar = row_of(out, title, 'CIFAR10', '10')
    assert cifar[2] == '45.5 ± 0.0 (1×2) [45.5 ± 0.6]'  # none: the (A) run
    assert cifar[4] == '49.0 ± 0.0 (1×2) [49.1 ± 0.6]'  # crop: the Table 4 'Ours' run
    assert cifar[9] == '52.0 ± 0.0 (1×2) [52.1 ± 0.5]'  # combination
    fm = row_of(out, title, 'FashionMNIST', '10')
    assert fm[5] == '80.0 ± 0.0 (1×2) † [84.0 ± 0.3]' and fm[9] == '84.6 ± 0.0 (1×2) [84.6 ± 0.3]'
    assert row_of(out, title, 'FashionMNIST', '1')[4] == '70.0 ± 0.0 (1×2) [83.3 ± 0.3]'  # other ipc: no mark
    assert 'MNIST | 10' not in out.replace('FashionMNIST | 10', '')  # DC on MNIST augments in evaluation: no 'none'
    code, out, err = report_out(capsys, table4_runs, '--commands', 'table5', '--dataset', 'MNIST')
    lines = out.strip().splitlines()[1:]
    assert len(lines) == 7 and not any('flip' in line for line in lines)  # no flip for digits
    assert any('--dsa_strategy color_crop_cutout_scale_rotate --num_exp 5' in line for line in lines)


def test_table3_cross_architecture_matrix(tmp_path, capsys):
    pool = ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18']
    mnist = dict(dataset='MNIST', ipc=1, dsa_strategy='color_crop_cutout_scale_rotate', eval_mode='M')
    write(tmp_path, 'conv', {m: [0.80 + 0.01 * k] * 2 for k, m in enumerate(pool)}, **mnist)
    write(tmp_path, 'mlp', {'MLP': [0.765, 0.765], 'ConvNet': [0.60, 0.60]}, model='MLP', **mnist)
    write(tmp_path, 'crop_only', {'MLP': [0.1, 0.1]}, model='LeNet', **{**mnist, 'dsa_strategy': 'crop'})
    code, out, err = report_out(capsys, tmp_path, '--table', 'table3')
    assert code == 0, err
    title = 'Table 3 (DSA paper): cross-architecture, MNIST ipc 1'
    conv = row_of(out, title, 'ConvNet')
    assert conv[1] == '80.0 ± 0.0 (1×2) † [75.6 ± 1.1]' and conv[2] == '81.0 ± 0.0 (1×2) † [88.8 ± 0.8]'
    mlp = row_of(out, title, 'MLP')
    assert mlp[1] == '76.5 ± 0.0 (1×2) [76.5 ± 1.2]' and mlp[3] == '– [80.4 ± 2.9]'
    assert row_of(out, title, 'LeNet')[1] == '– [76.5 ± 0.9]'  # a crop-only set is no Table 3 run
    code, out, err = report_out(capsys, tmp_path, '--commands', 'table3', '--dataset', 'MNIST')
    lines = out.strip().splitlines()[1:]
    assert [line.split('--model ')[1].split()[0] for line in lines] == ['LeNet', 'AlexNet', 'VGG11', 'ResNet18']
    assert all('--eval_mode M' in line and 'color_crop_cutout_scale_rotate' in line for line in lines)


def test_table2_cifar100(tmp_path, capsys):
    write(tmp_path, 'dsa', {'ConvNet': [0.32, 0.32]}, dataset='CIFAR100')
    write(tmp_path, 'random', {'ConvNet': [0.03, 0.03]}, dataset='CIFAR100', method='random', ipc=1)
    write(tmp_path, 'whole', {'ConvNet': [0.56]}, dataset='CIFAR100', method='whole', ipc=1)
    code, out, err = report_out(capsys, tmp_path, '--table', 'table2')
    assert code == 0, err
    title = 'Table 2 (DSA paper): CIFAR100'
    assert row_of(out, title, 'DSA') == ['DSA', '– [13.9 ± 0.3]', '32.0 ± 0.0 (1×2) [32.3 ± 0.3]']
    assert row_of(out, title, 'LD') == ['LD', '– [11.5]', '–']
    assert row_of(out, title, 'random')[1].startswith('3.0 ± 0.0 (1×2)')
    assert row_of(out, title, 'whole')[1:] == ['56.0 ± 0.0 (1×1) [56.2 ± 0.3]'] * 2
    code, out, err = report_out(capsys, tmp_path, '--commands', 'table2', '--dataset', 'CIFAR100')
    lines = out.strip().splitlines()[1:]
    # random, herding, DC, DSA at ipc 1 and 10, and whole: 9 cells, minus random 1, DSA 10 and whole; no LD
    assert len(lines) == 6 and not any('LD' in line for line in lines)
    code, out, err = report_out(capsys, tmp_path, '--commands', 'table2', '--dataset', 'CIFAR10')
    assert code == 2 and 'CIFAR100' in err


def test_runs_table_gain_over_random_and_gap_to_whole(tmp_path, capsys):
    fm = dict(dataset='FashionMNIST', ipc=1, epoch_eval_train=300)
    write(tmp_path, 'dsa', {'ConvNet': [0.70, 0.70]}, **fm)
    write(tmp_path, 'dc', {'ConvNet': [0.66, 0.66]}, method='DC', dsa_strategy='None', **fm)
    write(tmp_path, 'random_dsa', {'ConvNet': [0.50, 0.50]}, method='random', **fm)  # DSA eval, 300 epochs
    write(tmp_path, 'random_dc', {'ConvNet': [0.45, 0.45]}, method='random', dsa_strategy='None', **fm)
    write(tmp_path, 'random_1000', {'ConvNet': [0.10, 0.10]}, method='random',
          **{**fm, 'epoch_eval_train': None})  # DSA eval at its 1000 default epochs: another protocol
    write(tmp_path, 'whole', {'ConvNet': [0.93]}, method='whole', **fm)
    code, out, err = report_out(capsys, tmp_path, '--table', 'runs')
    assert code == 0, err
    rows = {line.split(' | ')[0].strip('| ').split(os.sep)[0]: [c.strip() for c in line.strip('|').split(' | ')]
            for line in out.splitlines() if line.startswith('| ') and '.json' in line}
    assert rows['dsa'][-2:] == ['+20.0', '+23.0']
    assert rows['dc'][-2:] == ['+21.0', '+27.0']
    assert rows['random_dc'][-2:] == ['–', '–']
    assert 'gain over random' in out and 'gap to whole' in out
