"""report.py (tables, --commands, --plots, bad input) and export.py (ImageFolder export, grids)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import export
import report
import tables
from conftest import write_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--dataset', 'MNIST', '--num_exp', '1', '--num_eval', '2', '--epoch_eval_train', '1', '--batch_real', '8',
        '--device', 'cpu', '--quiet', '--no_vis', '--ipc', '1']


def run_report(*args):
    """report.py in this process: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, 'report.py', *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def report_in_process(capsys, *args):
    """report.cli without a subprocess (fast): (exit code, stdout, stderr)."""
    code = 0
    try:
        report.cli([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def table_row(out, *first_cells):
    """The cells of the markdown row whose first cells are `first_cells`."""
    prefix = '| ' + ' | '.join(first_cells) + ' |'
    rows = [line for line in out.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, out)
    return [c.strip() for c in rows[0].strip('|').split(' | ')]


TABLE1_COLUMN = {m: 2 + k for k, m in enumerate(tables.TABLE1_METHODS)}


# ---------------------------------------------------------------------------------------------
# Tiny real runs of main.py and main_DM.py
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_runs(tmp_path_factory):
    """DC and DM (2 iterations, evaluated before and after) and random on tiny MNIST, and a --load_syn evaluation on
    pool A of a set saved in the published structure: the scripts themselves, side by side (one thread each, as the
    machine may be shared)."""
    base = tmp_path_factory.mktemp('tiny_runs')
    data = write_mnist(base / 'data', train_per_class=10, test_per_class=3)
    published = base / 'res_DC_MNIST_ConvNet_1ipc.pt'
    torch.save({'data': [[torch.randn(10, 1, 28, 28), torch.arange(10)]], 'accs_all_exps': {}}, published)
    out = base / 'result'
    common = [*TINY, '--data_path', str(data), '--save_path', str(out)]
    jobs = [['main.py', '--method', 'DC', '--Iteration', '2', '--eval_every', '2', *common],
            ['main.py', '--method', 'random', *common],
            ['main_DM.py', '--Iteration', '2', '--eval_every', '2', *common],
            ['main.py', '--load_syn', str(published), '--eval_mode', 'A', *common]]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, *job], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for job in jobs]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    return out


def expected_cell(json_path, paper_mean, paper_std=None):
    """The Table 1 cell text computed from the run's own JSON and the paper's number (no paper std: 1 point)."""
    result = json.loads(json_path.read_text())['results']['ConvNet']
    mean, std = round(result['mean'], 1), round(result['std'], 1)
    mark = ' †' if abs(result['mean'] - paper_mean) > 2 * (paper_std or 1.0) else ''
    paper = f'{paper_mean:.1f}' + ('' if paper_std is None else f' ± {paper_std:.1f}')
    return f'{mean:.1f} ± {std:.1f} (1×2){mark} [{paper}]'


def test_tiny_real_runs_give_table1_cells(tiny_runs, capsys):
    code, out, err = report_in_process(capsys, tiny_runs, '--table', 'table1')
    assert code == 0 and err == ''
    row = table_row(out, 'MNIST', '1')
    assert row[TABLE1_COLUMN['DC']] == expected_cell(tiny_runs / 'res_DC_MNIST_ConvNet_1ipc.json', 91.7, 0.5)
    assert row[TABLE1_COLUMN['random']] == expected_cell(tiny_runs / 'res_random_MNIST_ConvNet_1ipc.json', 64.9, 3.5)
    assert row[TABLE1_COLUMN['DM']] == expected_cell(tiny_runs / 'res_DM_MNIST_ConvNet_1ipc.json', 89.7)
    assert row[TABLE1_COLUMN['herding']] == '– [89.2 ± 1.6]' and row[TABLE1_COLUMN['whole']] == '– [99.6 ± 0.0]'
    assert 'newest run per cell' in out


def test_tiny_real_evaluation_fills_ablation_and_runs_tables(tiny_runs, capsys):
    code, out, err = report_in_process(capsys, tiny_runs)
    assert code == 0
    evaluation = json.loads((tiny_runs / 'eval_res_DC_MNIST_ConvNet_1ipc_A.json').read_text())['results']
    row = table_row(out, 'DC', 'MNIST', '1', 'ConvNet')
    assert 'Ablation A: activation' in out
    for k, model in enumerate(tables.EVAL_POOLS['A']):
        n = evaluation[model]['n']
        assert n == 2  # the one stored set, num_eval 2 networks: counted as 1 experiment x 2 networks
        assert row[4 + k] == f"{evaluation[model]['mean']:.1f} ± {evaluation[model]['std']:.1f} (1×2)"
    runs = [line for line in out.splitlines() if line.startswith('| res_') or line.startswith('| eval_')]
    assert len(runs) == 3 + 4  # three runs with one eval model each, the evaluation with four


def test_tiny_real_runs_plots(tiny_runs, tmp_path, capsys):
    code, out, err = report_in_process(capsys, tiny_runs, '--table', 'table1', '--plots', tmp_path)
    assert code == 0
    names = sorted(os.listdir(tmp_path))
    expected = ['acc_DC_MNIST_ConvNet_1ipc.png', 'acc_DM_MNIST_ConvNet_1ipc.png', 'acc_vs_ipc_MNIST.png',
                'loss_DC_MNIST_ConvNet_1ipc.png', 'loss_DM_MNIST_ConvNet_1ipc.png']  # the runs record 2 losses each
    for method in ('DC', 'DM'):
        losses = json.loads((tiny_runs / f'res_{method}_MNIST_ConvNet_1ipc.json').read_text())['loss_history']
        assert [h['iteration'] for h in losses] == [0, 1] and all(h['loss'] > 0 for h in losses)
    assert names == sorted(expected)
    for name in names:
        check_png(tmp_path / name)


# ---------------------------------------------------------------------------------------------
# A hand-written set of result files
# ---------------------------------------------------------------------------------------------

def summary_of(accs):
    """Like utils.summarize: mean and population std in %."""
    a = np.asarray(accs, dtype=np.float64)
    return {'n': int(a.size), 'mean': float(a.mean() * 100), 'std': float(a.std() * 100), 'accs': list(accs)}


def write_json(path, obj, age=0):
    """Write obj as JSON and set its modification time `age` seconds in the past (older = larger age)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)
    stamp = time.time() - 1000 - age
    os.utime(path, (stamp, stamp))


def write_run(folder, method, dataset, ipc, results, model='ConvNet', eval_mode='S', num_exp=1, num_eval=2, age=0,
              name=None, **extra):
    config = {'method': method, 'dataset': dataset, 'model': model, 'ipc': ipc, 'eval_mode': eval_mode,
              'num_exp': num_exp, 'num_eval': num_eval, 'Iteration': 1000, 'seed': 0}
    obj = {'config': config, 'results': {m: summary_of(a) for m, a in results.items()}, **extra}
    write_json(os.path.join(folder, name or f'res_{method}_{dataset}_{model}_{ipc}ipc.json'), obj, age)


@pytest.fixture
def hand_set(tmp_path):
    root = tmp_path / 'hand'
    # DM CIFAR10 ipc 10 (paper 48.9 ± 0.6, limit 1.2): old 50.0 ± 1.0 (in), new 46.0 ± 1.0 (off), pooled 48.0 ± 2.2
    history = [{'exp': 0, 'iteration': it, 'model': 'ConvNet', 'accs': [0.3 + it / 4000, 0.32 + it / 4000]}
               for it in (0, 500, 1000)]
    losses = [{'exp': 0, 'iteration': it, 'loss': 10.0 / (it + 1)} for it in range(20)]
    write_run(root / 'a', 'DM', 'CIFAR10', 10, {'ConvNet': [0.49, 0.51]}, age=100)
    write_run(root / 'b', 'DM', 'CIFAR10', 10, {'ConvNet': [0.45, 0.47]}, age=10, history=history,
              loss_history=losses)
    # random ipc 10, paper 26.0 ± 1.2: 23.9 is 2.1 off (in); DC ipc 1, paper 28.3 ± 0.5: 26.5 is 1.8 off (off)
    write_run(root / 'a', 'random', 'CIFAR10', 10, {'ConvNet': [0.238, 0.240]})
    write_run(root / 'a', 'DC', 'CIFAR10', 1, {'ConvNet': [0.265, 0.265]}, num_exp=2, num_eval=1)
    write_run(root / 'a', 'whole', 'CIFAR10', 1, {'ConvNet': [0.85]}, num_eval=1)
    # a --load_syn evaluation of a DSA set on pool M (two of its models): cross-architecture, and Table 1's DSA cell
    write_run(root / 'a', 'DSA', 'CIFAR10', 10, {'MLP': [0.30, 0.32], 'ConvNet': [0.52, 0.52]}, eval_mode='M',
              name='eval_res_DSA_CIFAR10_ConvNet_10ipc_M.json', file='/x/res_DSA_CIFAR10_ConvNet_10ipc.pt')
    # an ablation: learned with ConvNetW32, evaluated on every width
    write_run(root / 'a', 'DC', 'CIFAR10', 1, {m: [0.20, 0.22] for m in tables.EVAL_POOLS['W']}, model='ConvNetW32',
              eval_mode='W')
    # continual learning, 2 steps
    write_json(root / 'a' / 'cl_DM_CIFAR100_ConvNet_20ipc_2steps.json', {
        'config': {'method': 'DM', 'dataset': 'CIFAR100', 'model': 'ConvNet', 'ipc': 20, 'steps': 2},
        'steps': [{'step': 1, 'classes_seen': 50, 'mean': 60.0, 'std': 1.0, 'n': 15, 'accs': []},
                  {'step': 2, 'classes_seen': 100, 'mean': 45.04, 'std': 0.96, 'n': 15, 'accs': []}],
        'latex_row': '& 60.0$\\pm$1.0 & 45.0$\\pm$1.0'})
    return root


def test_newest_run_per_cell_and_off_paper_marks(hand_set, capsys):
    code, out, err = report_in_process(capsys, hand_set, '--table', 'table1')
    assert code == 0 and err == ''
    row1 = table_row(out, 'CIFAR10', '1')
    row10 = table_row(out, 'CIFAR10', '10')
    assert row10[TABLE1_COLUMN['DM']] == '46.0 ± 1.0 (1×2) † [48.9 ± 0.6]'
    assert row10[TABLE1_COLUMN['random']] == '23.9 ± 0.1 (1×2) [26.0 ± 1.2]'
    assert row1[TABLE1_COLUMN['DC']] == '26.5 ± 0.0 (2×1) † [28.3 ± 0.5]'
    assert row10[TABLE1_COLUMN['DSA']] == '52.0 ± 0.0 (1×2) [52.1 ± 0.5]'
    assert row1[TABLE1_COLUMN['whole']] == row10[TABLE1_COLUMN['whole']] == '85.0 ± 0.0 (1×1) [84.8 ± 0.1]'
    assert row1[TABLE1_COLUMN['herding']] == '– [21.5 ± 1.2]'
    assert '(newest run per cell)' in out and '1 cell(s) had several result files: the newest of each' in out
    assert '1 point is assumed' in out


def test_pooled_runs(hand_set, capsys):
    code, out, err = report_in_process(capsys, hand_set, '--table', 'table1', '--pool')
    assert code == 0
    # accuracies 49, 51, 45, 47: mean 48.0, population std sqrt(5) = 2.24, 0.9 from the paper (limit 1.2): no mark
    assert table_row(out, 'CIFAR10', '10')[TABLE1_COLUMN['DM']] == '48.0 ± 2.2 (n=4, 2 runs) [48.9 ± 0.6]'
    assert '(pooled runs)' in out


def test_parts_of_one_run_are_joined_and_the_missing_part_gets_its_line(tmp_path, capsys):
    # DM CIFAR10 ipc 1, a 3 x 2 run in parts: experiment 0 from a stopped run (a progress summary of an older
    # version, without 'experiments_run'), experiment 2 from an --experiments part, both in one folder; a newer run
    # with other flags is a different run and must not be joined with them
    root = tmp_path / 'runs'
    config = {'num_exp': 3, 'num_eval': 2, 'lr_img': 1.0, 'init': 'real'}
    write_run(root, 'DM', 'CIFAR10', 1, {'ConvNet': [0.24, 0.26]}, age=30, experiments_done=1, **config)
    part = dict(config, experiments='2')
    write_run(root, 'DM', 'CIFAR10', 1, {'ConvNet': [0.27, 0.29]}, age=20, experiments_done=1,
              experiments_run=[2], name='res_DM_CIFAR10_ConvNet_1ipc_exp2.json', **part)
    cell = lambda out: table_row(out, 'CIFAR10', '1')[TABLE1_COLUMN['DM']]
    code, out, err = report_in_process(capsys, root, '--table', 'table1')
    # 24, 26, 27, 29: mean 26.5, population std sqrt(3.25) = 1.80
    assert code == 0 and cell(out).startswith('26.5 ± 1.8 (2×2 of 3×2)')
    # the line that completes the cell runs experiment 1 alone, beside the parts, with the run's own flags
    code, out, err = report_in_process(capsys, root, '--commands', 'table1', '--dataset', 'CIFAR10')
    lines = [ln for ln in out.splitlines() if ln.startswith('python main_DM.py') and ' --ipc 1 ' in ln]
    assert len(lines) == 1 and ' --experiments 1 ' in lines[0] and lines[0].endswith(f'--save_path {root} --resume')
    assert ' --Iteration 1000 ' in lines[0] and ' --num_exp 3 ' in lines[0] and ' --method ' not in lines[0]
    # experiment 1 arrives from another machine, in another folder: the cell is the whole run
    write_run(tmp_path / 'other', 'DM', 'CIFAR10', 1, {'ConvNet': [0.25, 0.25]}, age=10, experiments_run=[1],
              name='res_DM_CIFAR10_ConvNet_1ipc_exp1.json', **dict(config, experiments='1'))
    code, out, err = report_in_process(capsys, root, tmp_path / 'other', '--table', 'table1')
    # 24, 26, 27, 29, 25, 25: mean 26.0, population std sqrt(16 / 6) = 1.63
    assert cell(out).startswith('26.0 ± 1.6 (3×2)')
    code, out, err = report_in_process(capsys, root, tmp_path / 'other', '--commands', 'table1', '--dataset', 'CIFAR10')
    assert not [ln for ln in out.splitlines() if ln.startswith('python main_DM.py') and ' --ipc 1 ' in ln]
    # a newer run of other flags (--num_exp 1) is the cell now, alone
    write_run(tmp_path / 'new', 'DM', 'CIFAR10', 1, {'ConvNet': [0.40, 0.40]}, age=0, **dict(config, num_exp=1))
    code, out, err = report_in_process(capsys, root, tmp_path / 'other', tmp_path / 'new', '--table', 'table1')
    assert cell(out).startswith('40.0 ± 0.0 (1×2)')
    # an experiment is counted once: a newer copy of experiment 2 takes the place of the older one
    write_run(tmp_path / 'copy', 'DM', 'CIFAR10', 1, {'ConvNet': [0.50, 0.50]}, age=5, experiments_run=[2],
              name='res_DM_CIFAR10_ConvNet_1ipc_exp2.json', **part)
    code, out, err = report_in_process(capsys, root, tmp_path / 'copy', '--table', 'table1')
    # 50, 50, 24, 26: mean 37.5, population std sqrt(627 / 4) = 12.52
    assert cell(out).startswith('37.5 ± 12.5 (2×2 of 3×2)')
    # a cell without a paper number (DM on FashionMNIST) still gets the line that completes its run
    write_run(tmp_path / 'fmnist', 'DM', 'FashionMNIST', 1, {'ConvNet': [0.7, 0.7]}, experiments_done=1,
              experiments_run=[0], **config)
    code, out, err = report_in_process(capsys, tmp_path / 'fmnist', '--commands', 'table1', '--dataset', 'FashionMNIST')
    lines = [ln for ln in out.splitlines() if ln.startswith('python main_DM.py')]
    assert len(lines) == 1 and ' --experiments 1-2 ' in lines[0]
    assert not [ln for ln in out.splitlines() if 'main_DM.py' in ln and ' --ipc 10 ' in ln]  # no paper value, no run


def test_a_stopped_whole_bound_continues_with_resume(tmp_path, capsys):
    # the whole-dataset bound stopped after experiment 0 of 2, its folder holding experiment 1's checkpoint (the
    # networks it finished): the line that completes the cell is the same command with --resume, into the same files
    root = tmp_path / 'runs'
    write_run(root, 'whole', 'CIFAR10', 1, {'ConvNet': [0.84, 0.86]}, num_exp=2, experiments_done=1)
    whole_lines = lambda: [ln for ln in report_in_process(capsys, root, '--commands', 'table1', '--dataset',
                                                          'CIFAR10')[1].splitlines() if ' --method whole ' in ln]
    lines = whole_lines()  # no checkpoint: experiment 1 runs as a part beside experiment 0
    assert len(lines) == 1 and ' --experiments 1 ' in lines[0] and lines[0].endswith(f'--save_path {root} --resume')
    (root / 'ckpt_whole_CIFAR10_ConvNet_1ipc_exp1.pt').write_bytes(b'')
    lines = whole_lines()
    assert len(lines) == 1 and ' --experiments ' not in lines[0] and ' --num_exp 2 --num_eval 2 ' in lines[0]
    assert lines[0].endswith(f'--save_path {root} --resume')


def write_stopped_checkpoint(path, argv, **normalised):
    """A checkpoint as a run of main.py with argv leaves it when stopped inside its first experiment: its config is
    the parsed flags (plus what main() fills in), with the networks it finished."""
    import main
    import results
    args = main.parse_args(argv)
    vars(args).update(normalised)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'config': results.config_dict(args), 'exp': 0, 'networks': {'ConvNet': {0: 0.9354}}}, path)
    return args


def test_a_cell_with_only_a_checkpoint_continues_it_rather_than_starting_afresh(tmp_path, capsys):
    # the whole bound stopped inside network 1 of its first part (--experiments 0 of 5 x 4), before any result file:
    # the paper's line (--num_exp 1 --num_eval 5, no --resume) would start afresh and overwrite the checkpoint's hours
    import coreset
    import experiment
    root = tmp_path / 'runs'
    whole = root / 'fmnist' / 'ckpt_whole_FashionMNIST_ConvNet_1ipc_exp0.pt'  # found in a subfolder, like the JSON
    write_stopped_checkpoint(whole, ['--dataset', 'FashionMNIST', '--method', 'whole', '--num_exp', '5',
                                     '--num_eval', '4', '--experiments', '0', '--save_path', 'elsewhere'],
                             epoch_eval_train=30)
    dc = root / 'ckpt_DC_FashionMNIST_ConvNet_10ipc_exp0.pt'  # a plain run (no --experiments), stopped at iteration k
    write_stopped_checkpoint(dc, ['--dataset', 'FashionMNIST', '--ipc', '10', '--lr_img', '0.05'])
    (root / 'ckpt_random_FashionMNIST_ConvNet_1ipc_exp0.pt').write_bytes(b'not a torch file')
    code, out, err = report_in_process(capsys, root, '--commands', 'table1', '--dataset', 'FashionMNIST')
    assert code == 0
    lines = out.splitlines()[1:]
    whole_lines = [ln for ln in lines if ' --method whole ' in ln]
    assert len(whole_lines) == 1 and ' --num_exp 5 ' in whole_lines[0] and ' --num_eval 4 ' in whole_lines[0]
    assert whole_lines[0].endswith(f"--experiments 0 --save_path {root / 'fmnist'} --resume")
    dc_lines = [ln for ln in lines if ' --ipc 10 ' in ln and ' --method DC ' in ln]
    assert len(dc_lines) == 1 and ' --lr_img 0.05 ' in dc_lines[0] and ' --experiments ' not in dc_lines[0]
    assert dc_lines[0].endswith(f'--save_path {root} --resume')
    # the broken checkpoint is named in one warning; its cell gets the paper's line
    assert err.count('warning: skipping') == 1 and 'ckpt_random_FashionMNIST_ConvNet_1ipc_exp0.pt' in err
    assert f'python main.py --dataset FashionMNIST --model ConvNet --ipc 1 --method random --save_path {root}' in lines
    # each printed line, parsed as main.py parses it, is one that --resume accepts for its checkpoint
    import main
    for line, path, keys in ((whole_lines[0], whole, coreset.WHOLE_RESUME_KEYS), (dc_lines[0], dc, None)):
        words = line.split()
        assert words[:2] == ['python', 'main.py']
        args = main.parse_args(words[2:])
        if args.method == 'whole':
            assert args.epoch_eval_train == 30
        ckpt = experiment.load_checkpoint(str(path), args, keys or experiment.RESUME_KEYS)
        assert ckpt['networks'] == {'ConvNet': {0: 0.9354}} and args.resume


def test_runs_table_counts_the_sessions_before_a_resume(tmp_path, capsys):
    # a part resumed in a second session: its process ran 1,804 s, its experiment 5,460 s before and 1,800 s after
    write_run(tmp_path, 'DSA', 'FashionMNIST', 1, {'ConvNet': [0.70, 0.71]}, wall_seconds=1804.3,
              experiment_seconds=[7260.0], name='res_DSA_FashionMNIST_ConvNet_1ipc_exp3.json')
    # uninterrupted: the process's time (data loading, final report) exceeds its experiments'
    write_run(tmp_path, 'DM', 'FashionMNIST', 1, {'ConvNet': [0.70, 0.71]}, wall_seconds=100.0,
              experiment_seconds=[40.0, 50.0])
    # resumed from a checkpoint older than experiment_seconds: the time before is unknown, the process's is shown
    write_run(tmp_path, 'DM', 'FashionMNIST', 10, {'ConvNet': [0.80, 0.81]}, wall_seconds=600.0,
              experiment_seconds=[None])
    code, out, err = report_in_process(capsys, tmp_path, '--table', 'runs')
    assert code == 0
    column = table_row(out, 'file').index('wall s')
    files = [line.split(' | ')[0].strip('| ') for line in out.splitlines() if line.startswith('| res_')]
    wall = {name: table_row(out, name)[column] for name in files}
    assert wall == {'res_DSA_FashionMNIST_ConvNet_1ipc_exp3.json': '7260', 'res_DM_FashionMNIST_ConvNet_1ipc.json': '100',
                    'res_DM_FashionMNIST_ConvNet_10ipc.json': '600'}


def test_other_tables(hand_set, capsys):
    code, out, err = report_in_process(capsys, hand_set)
    assert code == 0
    assert table_row(out, 'DSA', 'CIFAR10', '10', 'ConvNet')[4:] == ['31.0 ± 1.0 (1×2)', '52.0 ± 0.0 (1×2)']
    assert out.index('| method | dataset | ipc | train model | MLP | ConvNet |') > 0  # pool M's column order
    assert table_row(out, 'DC', 'CIFAR10', '1', 'ConvNetW32')[4:] == ['21.0 ± 1.0 (1×2)'] * 4
    assert table_row(out, 'DM', 'CIFAR100', 'ConvNet', '20')[4:] == ['60.0 ± 1.0 (n=15)', '45.0 ± 1.0 (n=15)']
    assert '| step 1 (50 cl.) | step 2 (100 cl.) |' in out
    for title in ('Table 1', 'Cross-architecture', 'Ablation W', 'Continual learning, 2 steps', 'All runs'):
        assert title in out
    assert 'Ablation D' not in out  # empty tables are left out


def test_latex(hand_set, capsys):
    code, out, err = report_in_process(capsys, hand_set, '--table', 'table1', '--latex')
    assert code == 0
    assert '\\begin{tabular}' in out and '\\end{tabular}' in out
    assert '46.0 $\\pm$ 1.0 (1$\\times$2) $^\\dagger$ [48.9 $\\pm$ 0.6]' in out
    assert '±' not in out and '|' not in out


def test_commands_for_cells_without_results(hand_set, capsys):
    folder = str(hand_set)
    code, out, err = report_in_process(capsys, folder, '--commands', 'table1', '--dataset', 'CIFAR10')
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith('# table1 on CIFAR10: 17 cell(s)')  # 7 methods x 3 ipc + whole, minus 5 done
    commands = lines[1:]
    assert len(commands) == 17
    tail = f' --save_path {folder}'
    assert f'python main.py --dataset CIFAR10 --model ConvNet --ipc 10{tail}' in commands
    assert (f'python main.py --dataset CIFAR10 --model ConvNet --ipc 50 --init real --method DSA '
            f'--dsa_strategy color_crop_cutout_flip_scale_rotate{tail}') in commands
    assert (f'python main_DM.py --dataset CIFAR10 --model ConvNet --ipc 1 --dsa_strategy '
            f'color_crop_cutout_flip_scale_rotate --init real --lr_img 1 --num_exp 5 --num_eval 5{tail}') in commands
    # the coresets' networks train as long as for the RESULTS cells (10 epochs), not main.py's CPU defaults
    cell = 'python main.py --dataset CIFAR10 --model ConvNet --ipc'
    assert f'{cell} 1 --method kcenter --feat_epochs 10{tail}' in commands
    assert f'{cell} 50 --method herding --feat_epochs 10{tail}' in commands
    assert f'{cell} 1 --method forgetting --forget_epochs 10{tail}' in commands
    assert f'{cell} 50 --method random{tail}' in commands
    done = [f'python main.py --dataset CIFAR10 --model ConvNet --ipc 1{tail}',
            f'python main.py --dataset CIFAR10 --model ConvNet --ipc 10 --method random{tail}',
            f'python main.py --dataset CIFAR10 --model ConvNet --method whole --num_exp 1 --num_eval 5{tail}',
            f'python main.py --dataset CIFAR10 --model ConvNet --ipc 10 --init real --method DSA '
            f'--dsa_strategy color_crop_cutout_flip_scale_rotate{tail}',
            f'python main_DM.py --dataset CIFAR10 --model ConvNet --ipc 10 --dsa_strategy '
            f'color_crop_cutout_flip_scale_rotate --init real --lr_img 1 --num_exp 5 --num_eval 5{tail}']
    assert not set(done) & set(commands)


def test_commands_other_tables(hand_set, tmp_path, capsys):
    code, out, err = report_in_process(capsys, hand_set, '--commands', 'ablation_W', '--dataset', 'CIFAR10')
    assert code == 0
    assert [c.split(' --save_path')[0] for c in out.strip().splitlines()[1:]] == [
        f'python main.py --dataset CIFAR10 --model {m} --eval_mode W --ipc 1' for m in ('ConvNetW64', 'ConvNetW128',
                                                                                        'ConvNetW256')]
    # nothing run yet: a folder that does not exist is fine for --commands (with a warning); digits get no flip
    code, out, err = report_in_process(capsys, tmp_path / 'none', '--commands', 'table1', '--dataset', 'MNIST')
    assert code == 0 and 'does not exist' in err
    assert len(out.strip().splitlines()) == 1 + 22
    assert 'color_crop_cutout_scale_rotate' in out and 'flip' not in out
    code, out, err = report_in_process(capsys, hand_set, '--commands', 'continual', '--dataset', 'CIFAR100')
    assert code == 0 and len(out.strip().splitlines()) == 1 + 8  # 4 methods x (5, 10) steps; the 2-step run is no cell


def test_hand_set_plots(hand_set, tmp_path, capsys):
    code, out, err = report_in_process(capsys, hand_set, '--table', 'table1', '--plots', tmp_path / 'plots')
    assert code == 0
    names = sorted(os.listdir(tmp_path / 'plots'))
    assert names == ['acc_DM_CIFAR10_ConvNet_10ipc.png', 'acc_vs_ipc_CIFAR10.png', 'loss_DM_CIFAR10_ConvNet_10ipc.png']
    for name in names:
        check_png(tmp_path / 'plots' / name)


def check_png(path):
    """A readable PNG of a sensible size that is not one flat colour."""
    with Image.open(path) as image:
        assert image.format == 'PNG'
        assert image.size[0] >= 300 and image.size[1] >= 200
        pixels = np.asarray(image.convert('L'), dtype=np.float64)
    assert pixels.var() > 0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_foreign_and_broken_json_are_skipped_with_one_warning_each(hand_set, capsys):
    (hand_set / 'a' / 'broken.json').write_text('{"config": ')
    (hand_set / 'a' / 'list.json').write_text('[1, 2]')
    (hand_set / 'a' / 'package.json').write_text('{"name": "x", "version": "1"}')
    (hand_set / 'a' / 'res_bad.json').write_text('{"config": {"method": "DC"}, "results": {}}')
    code, out, err = report_in_process(capsys, hand_set, '--table', 'table1')
    assert code == 0 and 'Table 1' in out
    warnings = err.strip().splitlines()
    assert len(warnings) == 4 and all(w.startswith('warning: skipping ') for w in warnings)
    for name in ('broken.json', 'list.json', 'package.json', 'res_bad.json'):
        assert sum(name in w for w in warnings) == 1


def test_no_results_is_one_line_error(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'x.json').write_text('{"a": 1}')
    for folder, lines in ((tmp_path / 'empty', 1), (tmp_path / 'missing', 1), (tmp_path / 'foreign', 2)):
        code, out, err = run_report(folder)
        assert code == 2 and out == '' and 'Traceback' not in err
        assert len(err.strip().splitlines()) == lines and err.strip().splitlines()[-1].startswith('error: ')


def test_unknown_table_lists_valid_ones(hand_set, capsys):
    for flags in (['--table', 'table9'], ['--commands', 'table9', '--dataset', 'MNIST']):
        code, out, err = report_in_process(capsys, hand_set, *flags)
        assert code == 2 and out == ''
        assert err.count('\n') == 1 and "unknown table 'table9'" in err
        assert all(name in err for name in tables.TABLE_NAMES)
    code, out, err = report_in_process(capsys, hand_set, '--commands', 'table1')
    assert code == 2 and 'needs --dataset' in err
    code, out, err = report_in_process(capsys, hand_set, '--commands', 'table1', '--dataset', 'Imagenette')
    assert code == 2 and "unknown dataset 'Imagenette'" in err and 'FashionMNIST' in err


def test_unexpected_failure_is_one_line(hand_set, capsys, monkeypatch):
    monkeypatch.setattr(report, 'print_tables', lambda *a: 1 / 0)
    code, out, err = report_in_process(capsys, hand_set)
    assert code == 2 and err.strip() == 'error: ZeroDivisionError: division by zero'


# ---------------------------------------------------------------------------------------------
# export.py
# ---------------------------------------------------------------------------------------------

def pixel_set(num_classes, per_class, channel, size=8, seed=0):
    """Images in [0, 1] (including both ends) and their labels, shuffled across classes."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(num_classes * per_class, channel, size, size, generator=g)
    pixels[0, 0, 0, 0], pixels[0, 0, 0, 1] = 0.0, 1.0
    labels = torch.arange(num_classes).repeat(per_class)
    return pixels, labels


def read_back(root, mean, std, grey):
    from torchvision import datasets, transforms
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = (lambda p: Image.open(p).convert('L')) if grey else None
    kwargs = {'loader': loader} if loader else {}
    dataset = datasets.ImageFolder(str(root), transform=transform, **kwargs)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    return dataset, images, labels


@pytest.mark.parametrize('channel,mean,std,names', [
    (3, [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010], ['zebra', 'ant/bee', 'cat: big', 'T-shirt/top']),
    (1, [0.2861], [0.3530], ['T-shirt/top', 'Trouser', 'Pullover']),
])
def test_export_reads_back_with_imagefolder(tmp_path, channel, mean, std, names):
    pixels, labels = pixel_set(len(names), 3, channel)
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    images = (pixels - mean_t) / std_t
    export.save_image_folder(images, labels, names, mean, std, tmp_path / 'set')
    dataset, back, back_labels = read_back(tmp_path / 'set', mean, std, grey=channel == 1)
    assert dataset.classes == export.class_folder_names(names)
    assert [dataset.class_to_idx[c] for c in dataset.classes] == list(range(len(names)))
    order = torch.argsort(labels, stable=True)  # ImageFolder lists class by class, files in our writing order
    assert torch.equal(back_labels, labels[order])
    assert ((back - images[order]).abs() * std_t).max() <= 1 / 255 + 1e-6
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith('.tmp')]


def test_export_clips_and_rewrites_without_stale_files(tmp_path):
    names = ['a', 'b']
    images = torch.tensor([-10.0, 10.0, 0.0, 0.0]).view(4, 1, 1, 1).expand(4, 1, 4, 4).contiguous()
    labels = torch.tensor([0, 0, 1, 1])
    export.save_image_folder(images, labels, names, [0.5], [0.25], tmp_path)
    assert np.asarray(Image.open(tmp_path / '00_a' / '000.png')).max() == 0
    assert np.asarray(Image.open(tmp_path / '00_a' / '001.png')).min() == 255
    assert np.asarray(Image.open(tmp_path / '01_b' / '000.png')).max() == 128
    (tmp_path / '00_a' / 'notes.txt').write_text('kept')
    export.save_image_folder(images[2:], torch.tensor([0, 1]), names, [0.5], [0.25], tmp_path)
    assert sorted(os.listdir(tmp_path / '00_a')) == ['000.png', 'notes.txt']
    assert sorted(os.listdir(tmp_path / '01_b')) == ['000.png']


def test_export_interrupted_write_leaves_no_png(tmp_path, monkeypatch):
    def broken_save(self, fp, format=None, **params):
        fp.write(b'\x89PNG partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, 'save', broken_save)
    with pytest.raises(KeyboardInterrupt):
        export.save_image_folder(torch.zeros(1, 1, 4, 4), torch.tensor([0]), ['a'], [0.5], [0.5], tmp_path)
    assert os.listdir(tmp_path / '00_a') == []


def test_export_bad_labels(tmp_path):
    with pytest.raises(ValueError, match='labels outside'):
        export.save_image_folder(torch.zeros(1, 1, 4, 4), torch.tensor([3]), ['a'], [0.5], [0.5], tmp_path)


def test_synthetic_sets_and_class_grid(tmp_path):
    pixels, labels = pixel_set(3, 2, 3, size=5)
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    images = (pixels - 0.5) / 0.5
    folders = export.save_synthetic_sets([(images, labels), (images[:3], labels[:3])], ['x', 'y', 'z'], mean, std,
                                         tmp_path / 'sets')
    assert [os.path.basename(f) for f in folders] == ['exp0', 'exp1']
    assert len(os.listdir(tmp_path / 'sets' / 'exp1' / '02_z')) == 1
    path = export.save_class_grid(images, labels, mean, std, str(tmp_path / 'grid.png'))
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * (5 + 2) + 2, 2 * (5 + 2) + 2, 3)  # one row per class, ipc 2 per row
    first_of_class_1 = pixels[1].permute(1, 2, 0).numpy()  # labels cycle 0, 1, 2: image 1 opens row 1
    assert np.abs(grid[2 + 7:2 + 7 + 5, 2:7] / 255.0 - first_of_class_1).max() <= 0.5 / 255 + 1e-6
