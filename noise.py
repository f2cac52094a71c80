"""Condensing data with wrong labels, as one command: a grid of noise rates x noise types x scores x methods, each
cell one run of main.py or main_DM.py, then the table (pure rate and test accuracy per cell) and two figures.

    python noise.py --dataset FashionMNIST --noise_rate 0.2 0.4 --score none score score2 --method random DM --ipc 10
    python noise.py --dataset FashionMNIST --method random DM DC --ipc 10 10 1 --mode offline online \\
                    --noise_rate 0.2 0.4 0.6 --noise_type symmetric --score none loss score score2 score3
    torchrun --nproc_per_node 4 noise.py ...            # the cells spread over the processes

Cells: for every method (at its --ipc: one value for all methods or one per method), noise setting and score, one
run with --noise_rate/--noise_type and, for a score other than none, --clean_filter SCORE (offline: every method)
and/or --clean_select SCORE (online: DC and DSA only), as --mode says. Every method also gets its clean-data run
(noise rate 0, no filtering) as the reference row; score none is the no-filtering row. The runner's flags
(--ipc, --num_exp, --num_eval, --epoch_eval_train, --Iteration, --batch_real, --score_epochs, ...) go to every cell;
--runner_args passes any other flag through.

Each cell writes into save_path/{method}_ipc{ipc}/{noise}/{score}_{mode}/ (its res_*.json, res_*.pt and run.log);
a cell whose JSON exists is read back, not rerun, so an interrupted grid continues where it stopped. The scoring
runs of --clean_filter are cached in save_path/scoring (one per noise setting, shared by every cell on that noisy
data). The table is printed and written to save_path/noise_{dataset}.md with the figures noise_{dataset}_pure_rate.png
and noise_{dataset}_accuracy.png; report.py --table noise rebuilds the table from the JSON files.
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

import base
import labelnoise
import noisetables
import parallel
from cleanscore import SCORES
from data import DATASETS
from experiment import cli
from tables import render_markdown

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN_METHODS = ('DC', 'DSA', 'random', 'herding', 'kcenter', 'forgetting')
METHODS = MAIN_METHODS + ('DM',)
ONLINE_METHODS = ('DC', 'DSA')
MODES = ('offline', 'online')
# Flags handed to every cell as they are, when given (None: the runner's default).
PASSED = ('model', 'num_exp', 'num_eval', 'epoch_eval_train', 'Iteration', 'batch_real', 'lr_img', 'eval_every',
          'clean_keep', 'score_epochs', 'score_model', 'buffer_size', 'buffer_rows', 'seed', 'data_path', 'device')


def parse_args(argv=None):
    p = base.OneLineParser(script='noise.py', description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--dataset', type=str, default='FashionMNIST', help=', '.join(DATASETS))
    a('--noise_rate', type=float, nargs='+', default=[0.2, 0.4], help='noise rates of the grid (0 <= r < 1)')
    a('--noise_type', type=str, nargs='+', default=['symmetric'], help=', '.join(labelnoise.NOISE_TYPES))
    a('--score', type=str, nargs='+', default=['none', 'score'], help=', '.join(SCORES))
    a('--method', type=str, nargs='+', default=['random'], help=', '.join(METHODS))
    a('--mode', type=str, nargs='+', default=['offline'], help='offline (--clean_filter) and/or online '
                                                               '(--clean_select, DC/DSA only)')
    a('--ipc', type=int, nargs='+', default=[10], help='images per class: one for all methods, or one per method')
    a('--model', type=str, default=None)
    a('--num_exp', type=int, default=1)
    a('--num_eval', type=int, default=3)
    a('--epoch_eval_train', type=int, default=300)
    a('--Iteration', type=int, default=None, help='learning iterations of DC/DSA/DM cells (default: the runner\'s)')
    a('--batch_real', type=int, default=None)
    a('--lr_img', type=float, default=None)
    a('--eval_every', type=int, default=0, help='evaluations during learning (0: the final set only)')
    a('--clean_keep', type=float, default=None)
    a('--score_epochs', type=int, default=None)
    a('--score_model', type=str, default=None)
    a('--buffer_size', type=int, default=None)
    a('--buffer_rows', type=str, default=None)
    a('--seed', type=int, default=0)
    a('--data_path', type=str, default='data')
    a('--save_path', type=str, default='result/noise')
    a('--device', type=str, default=None)
    a('--runner_args', type=str, default='', help='more flags for every cell, as one quoted string')
    a('--quiet', action='store_true', help='no progress line per cell (the table is still printed)')
    a('--report_only', action='store_true',
      help='run nothing: the table and figures of every finished cell under save_path (e.g. of several grids)')
    return p.parse_args(argv)


def check_args(args):
    """Every value checked before any cell runs; each cell validates the rest of its flags itself."""
    base.check_choice(args.dataset, list(DATASETS), 'dataset')
    for rate in args.noise_rate:
        if not 0 <= rate < 1:
            raise base.UserError(f'--noise_rate must be in [0, 1), got {rate}')
    for kind in args.noise_type:
        base.check_choice(kind, labelnoise.NOISE_TYPES, 'noise type')
    for score in args.score:
        base.check_choice(score, SCORES, 'score')
    for method in args.method:
        base.check_choice(method, METHODS, 'method')
    for mode in args.mode:
        base.check_choice(mode, MODES, 'mode')
    if len(args.ipc) not in (1, len(args.method)):
        raise base.UserError(f'--ipc takes one value or one per method ({len(args.method)}), got {len(args.ipc)}')
    if min(args.ipc) < 1:
        raise base.UserError(f'--ipc must be at least 1, got {min(args.ipc)}')
    if args.clean_keep is not None and not 0 < args.clean_keep <= 1:
        raise base.UserError(f'--clean_keep must be in (0, 1], got {args.clean_keep}')
    try:
        args.extra = shlex.split(args.runner_args)
    except ValueError as e:
        raise base.UserError(f'--runner_args cannot be split into flags ({e})') from e
    args.device = parallel.setup(args.device)  # last: under torchrun only valid flags reach the other processes
    if parallel.rank() != 0:
        args.quiet = True


def grid(args):
    """The cells: dicts of method, ipc, noise type, rate, score, mode; the clean reference first per method."""
    ipcs = args.ipc * len(args.method) if len(args.ipc) == 1 else args.ipc
    clean_scores = ['none'] + ([s for s in args.score if s != 'none'] if 0 in args.noise_rate else [])
    noisy = sorted({(t, r) for t in args.noise_type for r in args.noise_rate if r > 0},
                   key=lambda x: (args.noise_type.index(x[0]), x[1]))
    settings = [('clean', 0.0, clean_scores)] + [(t, r, args.score) for t, r in noisy]
    cells = []
    for method, ipc in zip(args.method, ipcs):
        for noise, rate, scores in settings:
            for score in dict.fromkeys(scores):
                modes = ['none'] if score == 'none' else [m for m in dict.fromkeys(args.mode)
                                                          if m == 'offline' or method in ONLINE_METHODS]
                cells += [dict(method=method, ipc=ipc, noise=noise, rate=rate, score=score, mode=mode)
                          for mode in modes]
    return cells


def cell_dir(args, cell):
    noise = 'clean' if cell['rate'] == 0 else f"{cell['noise']}{cell['rate']:g}"
    return os.path.join(args.save_path, f"{cell['method']}_ipc{cell['ipc']}", noise, f"{cell['score']}_{cell['mode']}")


def cell_json(args, cell):
    model = args.model or 'ConvNet'
    return os.path.join(cell_dir(args, cell), f"res_{cell['method']}_{args.dataset}_{model}_{cell['ipc']}ipc.json")


def cell_command(args, cell):
    script = 'main_DM.py' if cell['method'] == 'DM' else 'main.py'
    cmd = [sys.executable, os.path.join(HERE, script), '--dataset', args.dataset, '--ipc', str(cell['ipc']),
           '--save_path', cell_dir(args, cell), '--score_cache', os.path.join(args.save_path, 'scoring'),
           '--no_vis']
    if cell['method'] != 'DM':
        cmd += ['--method', cell['method']]
    if cell['rate'] > 0:
        cmd += ['--noise_rate', f"{cell['rate']:g}", '--noise_type', cell['noise']]
    if cell['mode'] == 'offline':
        cmd += ['--clean_filter', cell['score']]
    elif cell['mode'] == 'online':
        cmd += ['--clean_select', cell['score']]
    for flag in PASSED:
        value = getattr(args, flag)
        if value is not None:
            cmd += [f'--{flag}', str(value)]
    return cmd + ['--quiet'] + args.extra  # the cell's output goes to its run.log: no progress bars there


def child_env():
    """The environment of a cell: without torchrun's variables, so that each cell is a single process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'ROLE_RANK',
                        'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID')}
    return env


def run_cell(args, cell):
    """The cell's entry, run now unless its JSON is there from before."""
    path = cell_json(args, cell)
    if not os.path.isfile(path):
        os.makedirs(cell_dir(args, cell), exist_ok=True)
        log_path = os.path.join(cell_dir(args, cell), 'run.log')
        cmd = cell_command(args, cell)
        with open(log_path, 'w') as log_file:
            log_file.write(shlex.join(cmd) + '\n')
            log_file.flush()
            code = subprocess.call(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(), cwd=os.getcwd())
        if code != 0 or not os.path.isfile(path):
            with open(log_path) as f:
                last = (f.read().strip().splitlines() or [''])[-1]
            raise base.UserError(f'cell {describe(cell)} failed (exit {code}): {last} (log: {log_path})')
    entry = noisetables.read_entry(path)
    if entry is None:
        raise base.UserError(f'{path} is not a result of a noisy-label cell; delete it to rerun the cell')
    return entry


def describe(cell):
    noise = 'clean' if cell['rate'] == 0 else f"{cell['noise']} {cell['rate']:g}"
    return f"{cell['method']} ipc {cell['ipc']}, {noise}, {cell['score']} {cell['mode']}"


def run_grid(args, cells):
    mine = parallel.Team(shared=True).share(cells)
    entries = []
    for k, cell in enumerate(mine):
        start = time.time()
        done_before = os.path.isfile(cell_json(args, cell))
        entry = run_cell(args, cell)
        entries.append(entry)
        pure = '–' if entry['pure'] is None else f"{entry['pure'] * 100:.1f}%"
        base.log(args, f"[{k + 1}/{len(mine)}] {describe(cell)}: accuracy {entry['acc']:.2f} ± {entry['std']:.2f}%, "
                       f"pure rate {pure} " + ('(read back)' if done_before else f'({time.time() - start:.0f} s)'))
    for part in parallel.gather_to_all(entries if parallel.rank() != 0 else []):
        entries += part
    return entries


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    if args.report_only:
        entries = [e for e in noisetables.load_entries([args.save_path]) if e['dataset'] == args.dataset]
    else:
        cells = grid(args)
        base.log(args, f'{len(cells)} cells on {args.dataset}; results in {args.save_path}')
        entries = run_grid(args, cells)
    if parallel.rank() != 0:
        return None
    tables = noisetables.build_noise_tables(entries)
    text = '\n'.join(render_markdown(t) for t in tables)
    print(text)
    stem = os.path.join(args.save_path, f'noise_{args.dataset}')
    base.write_text_atomic(stem + '.md', text)
    for path in noisetables.write_noise_figures(entries, stem):
        print(f'figure written to {path}')
    return entries


if __name__ == '__main__':
    cli(main)
