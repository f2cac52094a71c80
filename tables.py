"""The papers' tables from the JSON summaries our runs write (report.py is its command line): the papers' numbers
(SPEC §9), reading res_*.json / eval_*.json / cl_*.json, one cell per table cell (the newest run with its parts, or
pooled), Table 1, the cross-architecture, ablation and continual-learning tables, markdown and LaTeX rendering, and
the command lines of the cells without a result. It reads JSON only, no tensors."""
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field

import runparts  # the parts of one run (--experiments, stopped runs) and the line that completes a run
from utils import EVAL_POOLS  # the cross-architecture and ablation pools (SPEC §3)

# ---------------------------------------------------------------------------------------------
# The papers' numbers (SPEC §9): ConvNet test accuracy in %, ipc 1 / 10 / 50; None where the papers give none
# ---------------------------------------------------------------------------------------------

DATASETS = ('MNIST', 'FashionMNIST', 'SVHN', 'CIFAR10', 'CIFAR100', 'TinyImageNet')
TABLE1_METHODS = ('random', 'herding', 'kcenter', 'forgetting', 'DC', 'DSA', 'DM', 'whole')
METHOD_TITLES = {'kcenter': 'k-center'}
TABLE1_IPCS = (1, 10, 50)

PAPER_MEANS = {
    'MNIST': {'random': (64.9, 95.1, 97.9), 'herding': (89.2, 93.7, 94.9), 'kcenter': (89.3, 84.4, 97.4),
              'forgetting': (35.5, 68.1, 88.2), 'DC': (91.7, 97.4, 98.8), 'DSA': (88.7, 97.8, 99.2),
              'DM': (89.7, 97.5, 98.6), 'whole': 99.6},
    'FashionMNIST': {'random': (51.4, 73.8, 82.5), 'herding': (67.0, 71.1, 71.9), 'kcenter': (66.9, 54.7, 68.3),
                     'forgetting': (42.0, 53.9, 55.0), 'DC': (70.5, 82.3, 83.6), 'DSA': (70.6, 84.6, 88.7),
                     'DM': (None, None, None), 'whole': 93.5},
    'SVHN': {'random': (14.6, 35.1, 70.9), 'herding': (20.9, 50.5, 72.6), 'kcenter': (21.0, 14.0, 20.1),
             'forgetting': (12.1, 16.8, 27.2), 'DC': (31.2, 76.1, 82.3), 'DSA': (27.5, 79.2, 84.4),
             'DM': (None, None, None), 'whole': 95.4},
    'CIFAR10': {'random': (14.4, 26.0, 43.4), 'herding': (21.5, 31.6, 40.4), 'kcenter': (21.5, 14.7, 27.0),
                'forgetting': (13.5, 23.3, 23.3), 'DC': (28.3, 44.9, 53.9), 'DSA': (28.8, 52.1, 60.6),
                'DM': (26.0, 48.9, 63.0), 'whole': 84.8},
    'CIFAR100': {'random': (4.2, 14.6, 30.0), 'herding': (8.4, 17.3, 33.7), 'kcenter': (None, None, None),
                 'forgetting': (None, None, None), 'DC': (12.8, 25.2, None), 'DSA': (13.9, 32.3, None),
                 'DM': (11.4, 29.7, 43.6), 'whole': 56.2},
    'TinyImageNet': {'random': (1.4, 5.0, 15.0), 'herding': (None, None, None), 'kcenter': (None, None, None),
                     'forgetting': (None, None, None), 'DC': (None, None, None), 'DSA': (None, None, None),
                     'DM': (3.9, 12.9, 24.1), 'whole': 37.6},
}
PAPER_DM_CIFAR10_LARGE = {100: 67.0, 200: 71.2, 500: 76.1, 1000: 79.8, 1250: 80.8}  # DM paper, larger sets
PAPER_STDS = {  # SPEC §9: Table 1 of the DC and DSA papers (and the DM paper's CIFAR10), ipc 1 / 10 / 50
    ('MNIST', 'random'): (3.5, 0.9, 0.2), ('MNIST', 'herding'): (1.6, 0.3, 0.2), ('MNIST', 'kcenter'): (1.5, 1.7, 0.3),
    ('MNIST', 'forgetting'): (5.6, 3.3, 1.2), ('MNIST', 'DC'): (0.5, 0.2, 0.2), ('MNIST', 'DSA'): (0.6, 0.1, 0.1),
    ('FashionMNIST', 'random'): (3.8, 0.7, 0.7), ('FashionMNIST', 'herding'): (1.9, 0.7, 0.8),
    ('FashionMNIST', 'kcenter'): (1.8, 1.5, 0.8), ('FashionMNIST', 'forgetting'): (5.5, 2.0, 1.1),
    ('FashionMNIST', 'DC'): (0.6, 0.4, 0.4), ('FashionMNIST', 'DSA'): (0.6, 0.3, 0.2),
    ('SVHN', 'random'): (1.6, 4.1, 0.9), ('SVHN', 'herding'): (1.3, 3.3, 0.8), ('SVHN', 'kcenter'): (1.5, 1.3, 1.4),
    ('SVHN', 'forgetting'): (1.7, 1.2, 1.5), ('SVHN', 'DC'): (1.4, 0.6, 0.3), ('SVHN', 'DSA'): (1.4, 0.5, 0.4),
    ('CIFAR10', 'random'): (2.0, 1.2, 1.0), ('CIFAR10', 'herding'): (1.2, 0.7, 0.6),
    ('CIFAR10', 'kcenter'): (1.3, 0.9, 1.4), ('CIFAR10', 'forgetting'): (1.2, 1.0, 1.1),
    ('CIFAR10', 'DC'): (0.5, 0.5, 0.5), ('CIFAR10', 'DSA'): (0.7, 0.5, 0.5), ('CIFAR10', 'DM'): (0.8, 0.6, 0.4),
    ('CIFAR100', 'random'): (0.3, 0.5, None), ('CIFAR100', 'herding'): (0.3, 0.3, None),
    ('CIFAR100', 'DC'): (0.3, 0.3, None), ('CIFAR100', 'DSA'): (0.3, 0.3, None),
}
PAPER_WHOLE_STDS = {'MNIST': 0.0, 'FashionMNIST': 0.1, 'SVHN': 0.1, 'CIFAR10': 0.1, 'CIFAR100': 0.3}
# The papers round stds to 0.1, so a printed 0.0 means below 0.05: that is the smallest std a cell is compared with.
MIN_PAPER_STD = 0.05
# Where the paper gives no std, a cell is compared with this one (in accuracy points): runs of 5 x 20 networks
# typically spread by 0.3 to 1 point, so 2 x 1.0 flags real departures and not noise.
DEFAULT_PAPER_STD = 1.0
OFF_PAPER_STDS = 2.0
OFF_MARK = '†'


def table1_model(dataset):
    """The training (and evaluation) network of Table 1; the DM paper used ConvNetD4 for 64x64 TinyImageNet."""
    return 'ConvNetD4' if dataset == 'TinyImageNet' else 'ConvNet'


def paper_value(method, dataset, ipc):
    """(mean, std or None) reported by the papers for a Table 1 cell, or None."""
    means = PAPER_MEANS.get(dataset, {}).get(method)
    if method == 'whole':
        return (means, PAPER_WHOLE_STDS.get(dataset)) if means is not None else None
    if method == 'DM' and dataset == 'CIFAR10' and ipc in PAPER_DM_CIFAR10_LARGE:
        return PAPER_DM_CIFAR10_LARGE[ipc], None
    if means is None or ipc not in TABLE1_IPCS or means[TABLE1_IPCS.index(ipc)] is None:
        return None
    stds = PAPER_STDS.get((dataset, method))
    k = TABLE1_IPCS.index(ipc)
    return means[k], (stds[k] if stds else None)


ABLATION_TITLES = {'W': 'network width', 'D': 'network depth', 'A': 'activation', 'P': 'pooling',
                   'N': 'normalisation'}
TABLE_NAMES = ('table1', 'cross_arch', *[f'ablation_{m}' for m in ABLATION_TITLES], 'continual', 'runs')


class ReportError(Exception):
    """Bad input that ends the report with one 'error: ...' line (exit status 2)."""


def warn(message):
    print(f'warning: {message}', file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Reading result files
# ---------------------------------------------------------------------------------------------

@dataclass
class Record:
    """One result file: a learning/baseline run ('run'), a --load_syn evaluation ('eval') or a CL_DM.py run ('cl')."""
    path: str
    rel: str  # path relative to the folder it was found in, for display
    kind: str
    config: dict
    mtime: float
    results: dict = field(default_factory=dict)  # eval model -> {'n', 'mean' %, 'std' %}
    history: list = field(default_factory=list)
    loss_history: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    wall_seconds: float = None

    @property
    def method(self):
        return self.config['method']

    @property
    def dataset(self):
        return self.config['dataset']

    @property
    def model(self):
        return self.config['model']

    @property
    def ipc(self):
        return self.config['ipc']

    @property
    def eval_mode(self):
        return self.config.get('eval_mode', 'S')

    @property
    def stem(self):
        """File name without folder, extension and the res_ prefix: 'DC_MNIST_ConvNet_1ipc'."""
        name = os.path.splitext(os.path.basename(self.path))[0]
        return name[4:] if name.startswith('res_') else name


class SkipFile(Exception):
    """A JSON file that is not one of our result files (or is broken); the reason goes into the warning."""


def find_json_files(folders, missing_ok=False):
    """(path, folder) of every *.json under the folders, sorted for a stable order; a file may be named directly."""
    found = []
    for folder in folders:
        if os.path.isfile(folder):
            found.append((folder, os.path.dirname(folder) or '.'))
            continue
        if not os.path.isdir(folder):
            if missing_ok:
                warn(f'folder {folder} does not exist; no results read from it')
                continue
            raise ReportError(f'no such folder: {folder}')
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            found += [(os.path.join(root, f), folder) for f in sorted(files) if f.endswith('.json')]
    return found


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_seconds(obj):
    """A result file's wall time: its process's (wall_seconds), or, when its experiments' times summed over the
    sessions that ran them (experiment_seconds) add up to more, as for a run resumed from checkpoints, that sum."""
    wall = obj.get('wall_seconds') if is_number(obj.get('wall_seconds')) else None
    per_experiment = obj.get('experiment_seconds')
    if isinstance(per_experiment, list) and per_experiment and all(is_number(s) for s in per_experiment):
        return max(wall or 0.0, float(sum(per_experiment)))
    return wall


def check_config(obj, keys):
    config = obj.get('config')
    if not isinstance(config, dict):
        raise SkipFile("no 'config' object")
    for key in keys:
        if key not in config:
            raise SkipFile(f"config has no '{key}'")
    for key in ('method', 'dataset', 'model'):
        if not isinstance(config[key], str):
            raise SkipFile(f"config '{key}' is not a string")
    if not isinstance(config['ipc'], int) or isinstance(config['ipc'], bool):
        raise SkipFile("config 'ipc' is not an integer")
    return config


def check_summary(entry, where):
    """A {'n', 'mean', 'std'} summary with numbers in it (means and stds in %)."""
    if not isinstance(entry, dict) or not all(is_number(entry.get(k)) for k in ('n', 'mean', 'std')):
        raise SkipFile(f"{where} lacks numeric 'n', 'mean' and 'std'")
    return {'n': int(entry['n']), 'mean': float(entry['mean']), 'std': float(entry['std'])}


def read_results(obj):
    """Eval model -> summary; models without accuracies (n = 0, or a NaN mean) are left out."""
    results = obj['results']
    if not isinstance(results, dict):
        raise SkipFile("'results' is not an object")
    out = {}
    for model, entry in results.items():
        summary = check_summary(entry, f"results['{model}']")
        if summary['n'] > 0 and math.isfinite(summary['mean']):
            out[model] = summary
    return out


def read_list_of_dicts(obj, key, needed):
    """Entries of obj[key] that are dicts holding the `needed` keys; other entries are dropped (older formats)."""
    value = obj.get(key)
    if not isinstance(value, list):
        return []
    return [e for e in value if isinstance(e, dict) and all(k in e for k in needed)]


def read_record(path, folder):
    """The Record of one JSON file; raises SkipFile when it is not one of our result files."""
    try:
        with open(path, encoding='utf-8') as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SkipFile(f'unreadable JSON ({type(e).__name__}: {" ".join(str(e).split())[:120]})')
    if not isinstance(obj, dict):
        raise SkipFile('not a JSON object')
    common = dict(path=path, rel=os.path.relpath(path, folder), mtime=os.path.getmtime(path),
                  wall_seconds=run_seconds(obj))
    if isinstance(obj.get('steps'), list):
        config = check_config(obj, ('method', 'dataset', 'model', 'ipc'))
        steps = [dict(check_summary(s, f'step {k + 1}'), classes_seen=s.get('classes_seen'))
                 for k, s in enumerate(obj['steps'])]
        if not steps:
            raise SkipFile("'steps' is empty")
        config.setdefault('steps', len(steps))
        return Record(kind='cl', config=config, steps=steps, **common)
    if 'results' in obj:
        config = check_config(obj, ('method', 'dataset', 'model', 'ipc'))
        if is_number(obj.get('experiments_done')):  # a run's progress summary (results.write_progress_summary)
            config['experiments_done'] = int(obj['experiments_done'])
        if isinstance(obj.get('experiments_run'), list):  # the experiments it holds (runparts.experiments_held)
            config['experiments_run'] = obj['experiments_run']
        kind = 'eval' if 'file' in obj else 'run'
        return Record(kind=kind, config=config, results=read_results(obj),
                      history=read_list_of_dicts(obj, 'history', ('iteration', 'model', 'accs')),
                      loss_history=read_list_of_dicts(obj, 'loss_history', ('iteration', 'loss')), **common)
    raise SkipFile("neither 'results' nor 'steps': not a result file of this project")


def load_records(folders, missing_ok=False):
    """Every readable result file under the folders; the others are reported in one warning line each."""
    records = []
    for path, folder in find_json_files(folders, missing_ok):
        try:
            records.append(read_record(path, folder))
        except SkipFile as e:
            warn(f'skipping {path}: {e}')
    return records


# ---------------------------------------------------------------------------------------------
# Cells: one summary per table cell, from one run (newest) or several (pooled)
# ---------------------------------------------------------------------------------------------

@dataclass
class Cell:
    mean: float
    std: float
    n: int
    runs: int
    count: str  # '5×20' (experiments × networks), 'n=7', or 'n=200, 2 runs'


def count_label(summary, config):
    """'E×K' when the accuracies are num_exp experiments of num_eval networks ('k×K of E×K' for a run that holds k
    of them: stopped, or a part run with --experiments), else 'n=N'."""
    num_exp, num_eval = config.get('num_exp'), config.get('num_eval')
    held = len(runparts.experiments_held(config))
    if is_number(num_exp) and is_number(num_eval) and num_exp * num_eval == summary['n']:
        return f'{num_exp}×{num_eval}'
    if held and is_number(num_eval) and held * num_eval == summary['n']:
        return f'{held}×{num_eval} of {num_exp}×{num_eval}'
    return f"n={summary['n']}"


def combine(summaries):
    """Mean and (population) std of the union of several summaries' accuracies, from their n, mean and std:
    exact, so a pooled cell equals the mean ± std of all the accuracies behind it."""
    total = sum(s['n'] for s in summaries)
    mean = sum(s['n'] * s['mean'] for s in summaries) / total
    second_moment = sum(s['n'] * (s['std'] ** 2 + s['mean'] ** 2) for s in summaries) / total
    return mean, math.sqrt(max(second_moment - mean ** 2, 0.0)), total


def make_cell(pairs):
    """Cell of [(summary, config), ...] (one pair: a single run; several parts of one run are labelled as that run)."""
    if not pairs:
        return None
    if len(pairs) == 1:
        summary, config = pairs[0]
        return Cell(summary['mean'], summary['std'], summary['n'], 1, count_label(summary, config))
    mean, std, n = combine([s for s, _ in pairs])
    configs = [c for _, c in pairs]
    if runparts.is_one_run(configs):
        return Cell(mean, std, n, len(pairs), count_label({'n': n}, runparts.joined_config(configs)))
    return Cell(mean, std, n, len(pairs), f'n={n}, {len(pairs)} runs')


def choose_records(records, pool):
    """The records behind one table cell or row: all of them (--pool), or the newest with the other parts of its run
    (runparts.newest_run: files of the same run that hold other experiments)."""
    return list(records) if pool else runparts.newest_run(records)


def group_by(records, key_fn):
    groups = {}
    for record in records:
        key = key_fn(record)
        if key is not None:
            groups.setdefault(key, []).append(record)
    return groups


def own_result(record):
    """The accuracies of the training model itself: eval_mode S evaluates a BN model with instance norm
    (ConvNetBN -> ConvNet), so that name counts as its own too."""
    model = record.model
    for name in (model, model[:model.index('BN')] if 'BN' in model else model):
        if name in record.results:
            return record.results[name]
    return None


def format_cell(cell):
    if cell is None:
        return '–'
    return f'{cell.mean:.1f} ± {cell.std:.1f} ({cell.count})'


def is_off_paper(cell, paper):
    """More than OFF_PAPER_STDS paper-stds from the paper (DEFAULT_PAPER_STD where the paper gives none)."""
    if cell is None or paper is None:
        return False
    paper_mean, paper_std = paper
    scale = DEFAULT_PAPER_STD if paper_std is None else max(paper_std, MIN_PAPER_STD)
    return abs(cell.mean - paper_mean) > OFF_PAPER_STDS * scale + 1e-9  # 85.0 vs 84.8 ± 0.1 is on the limit, not off


def format_paper(paper):
    if paper is None:
        return '[–]'
    mean, std = paper
    return f'[{mean:.1f} ± {std:.1f}]' if std is not None else f'[{mean:.1f}]'


def format_cell_with_paper(cell, paper):
    if cell is None and paper is None:
        return '–'
    mark = f' {OFF_MARK}' if is_off_paper(cell, paper) else ''
    return f'{format_cell(cell)}{mark} {format_paper(paper)}'


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

@dataclass
class Table:
    name: str
    title: str
    header: list
    rows: list
    notes: list = field(default_factory=list)


def choice_note(groups, pool, what):
    """The line that says how several runs of one cell (or row) were combined, and how many that concerned."""
    several = sum(1 for records in groups.values() if len(records) > 1)
    if pool:
        return f'{several} {what}(s) had several runs: pooled, mean ± std over all their accuracies.'
    if several:
        return (f'{several} {what}(s) had several result files: the newest of each is shown, joined with the parts '
                f'of its run that hold other experiments (--pool pools them all).')
    return f'One run per {what} (with several, the newest file would be shown; --pool pools them).'


def dataset_rank(dataset):
    """The papers' order (MNIST ... TinyImageNet), any other name after them."""
    return (DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS), dataset)


def dataset_order(names):
    return sorted(set(names), key=dataset_rank)


def table1_key(record):
    """(dataset, ipc, method) of a record that belongs in Table 1 (ipc None for whole), else None."""
    if record.kind == 'cl' or record.method not in TABLE1_METHODS or record.model != table1_model(record.dataset):
        return None
    if own_result(record) is None:
        return None
    return record.dataset, (None if record.method == 'whole' else record.ipc), record.method


def table1_cells(records, pool):
    """(dataset, ipc, method) -> Cell, and the groups behind them."""
    groups = group_by(records, table1_key)
    cells = {key: make_cell([(own_result(r), r.config) for r in choose_records(rs, pool)])
             for key, rs in groups.items()}
    return cells, groups


def table1_rows_keys(cells):
    """(dataset, ipc) rows: every ipc with a result; a dataset with only a whole result gets one row (ipc None)."""
    rows = []
    for dataset in dataset_order(d for d, _, _ in cells):
        ipcs = sorted({ipc for d, ipc, _ in cells if d == dataset and ipc is not None})
        rows += [(dataset, ipc) for ipc in (ipcs or [None])]
    return rows


def build_table1(records, pool):
    cells, groups = table1_cells(records, pool)
    rows = []
    for dataset, ipc in table1_rows_keys(cells):
        row = [dataset, '–' if ipc is None else str(ipc)]
        for method in TABLE1_METHODS:
            key = (dataset, None if method == 'whole' else ipc, method)
            paper = paper_value(method, dataset, ipc)
            row.append(format_cell_with_paper(cells.get(key), paper))
        rows.append(row)
    notes = [
        'Test accuracy (%) of the training model itself (ConvNet; ConvNetD4 on TinyImageNet): ours as mean ± std '
        '(experiments×networks, or n accuracies), the papers\' value (SPEC §9) in brackets. whole ignores ipc.',
        f'{OFF_MARK} more than {OFF_PAPER_STDS:g} paper-std from the paper (its std of the cell, SPEC §9; at least '
        f'{MIN_PAPER_STD:g}); where the paper gives no std, {DEFAULT_PAPER_STD:g} point is assumed.',
        choice_note(groups, pool, 'cell'),
    ]
    header = ['dataset', 'ipc'] + [METHOD_TITLES.get(m, m) for m in TABLE1_METHODS]
    title = 'Table 1: condensed sets and coresets' + (' (pooled runs)' if pool else ' (newest run per cell)')
    return [Table('table1', title, header, rows, notes)] if rows else []


def model_columns(groups, preferred):
    """Eval models in the pools' order first, then any other model in order of appearance."""
    seen = []
    for records in groups.values():
        for record in records:
            seen += [m for m in record.results if m not in seen]
    return [m for m in preferred if m in seen] + [m for m in seen if m not in preferred]


def train_eval_table(name, title, groups, pool, preferred, note):
    """Rows (method, dataset, ipc, train model), one column per evaluation model."""
    columns = model_columns(groups, preferred)
    rows = []
    for key in sorted(groups, key=lambda k: (dataset_rank(k[1]), k)):
        chosen = choose_records(groups[key], pool)
        method, dataset, ipc, model = key[:4]
        row = [method, dataset, str(ipc), model]
        for column in columns:
            row.append(format_cell(make_cell([(r.results[column], r.config) for r in chosen if column in r.results])))
        rows.append(row)
    header = ['method', 'dataset', 'ipc', 'train model'] + columns
    notes = [note, choice_note(groups, pool, 'row')]
    return [Table(name, title + (' (pooled runs)' if pool else ' (newest run per row)'), header, rows, notes)] \
        if rows else []


ABLATION_MODES = tuple(ABLATION_TITLES)


def cross_arch_key(record):
    if record.kind == 'cl' or record.eval_mode in ABLATION_MODES:
        return None
    if record.eval_mode not in ('M', 'B') and len(record.results) < 2:
        return None
    return record.method, record.dataset, record.ipc, record.model, record.eval_mode


def build_cross_arch(records, pool):
    groups = group_by(records, cross_arch_key)
    note = ('Test accuracy (%) of each evaluation model (columns) trained on the set learned with the train model '
            '(rows): mean ± std (experiments×networks, or n accuracies). The papers\' numbers for this table are '
            'not in SPEC §9.')
    return train_eval_table('cross_arch', 'Cross-architecture generalisation', groups, pool,
                            EVAL_POOLS['M'] + EVAL_POOLS['B'], note)


def build_ablation(mode, records, pool):
    groups = group_by(records, lambda r: (r.method, r.dataset, r.ipc, r.model)
                      if r.kind != 'cl' and r.eval_mode == mode else None)
    note = (f'eval_mode {mode}: sets learned with the train model (rows), evaluated on every {ABLATION_TITLES[mode]} '
            f'variant (columns); mean ± std (experiments×networks, or n accuracies).')
    return train_eval_table(f'ablation_{mode}', f'Ablation {mode}: {ABLATION_TITLES[mode]}', groups, pool,
                            EVAL_POOLS[mode], note)


def build_continual(records, pool):
    """One table per number of steps: rows (method, dataset, model, ipc), one column per step."""
    groups = group_by(records, lambda r: (r.config.get('steps'), r.dataset, r.method, r.model, r.ipc)
                      if r.kind == 'cl' else None)
    tables = []
    for steps in sorted({k[0] for k in groups}, key=str):
        keys = sorted(k for k in groups if k[0] == steps)
        first = groups[keys[0]][0]
        header = ['method', 'dataset', 'model', 'ipc'] + [
            f"step {k + 1} ({s['classes_seen']} cl.)" if s.get('classes_seen') else f'step {k + 1}'
            for k, s in enumerate(first.steps)]
        rows = []
        for key in keys:
            chosen = choose_records(groups[key], pool)
            row = [key[2], key[1], key[3], str(key[4])]
            for k in range(len(first.steps)):
                pairs = [(r.steps[k], {}) for r in chosen if k < len(r.steps)]
                cell = make_cell(pairs)
                row.append('–' if cell is None else f'{cell.mean:.1f} ± {cell.std:.1f} (n={cell.n})')
            rows.append(row)
        notes = ['Class-incremental learning (CL_DM.py): test accuracy (%) on all classes seen so far, mean ± std '
                 'over class orders × networks.', choice_note({k: groups[k] for k in keys}, pool, 'row')]
        title = f'Continual learning, {steps} steps' + (' (pooled runs)' if pool else ' (newest run per row)')
        tables.append(Table('continual', title, header, rows, notes))
    return tables


def build_runs(records, pool):
    """Every run and evaluation file, one row per evaluation model: the inventory behind the other tables."""
    rows = []
    for record in sorted((r for r in records if r.kind != 'cl'), key=lambda r: r.path):
        learns = record.kind == 'run' and record.method in ('DC', 'DSA', 'DM')
        iterations = str(record.config.get('Iteration', '–')) if learns else '–'
        wall = f'{record.wall_seconds:.0f}' if record.wall_seconds is not None else '–'
        for model, summary in record.results.items():
            rows.append([record.rel, record.kind, record.method, record.dataset, record.model, str(record.ipc),
                         record.eval_mode, iterations, model,
                         format_cell(make_cell([(summary, record.config)])), wall])
    header = ['file', 'kind', 'method', 'dataset', 'train model', 'ipc', 'eval_mode', 'iterations', 'eval model',
              'accuracy (%)', 'wall s']
    notes = ['Every result file read (run: learning or baseline run; eval: --load_syn evaluation), not combined. '
             'wall s: the run\'s wall time, summed over the sessions of a run resumed from its checkpoints.']
    return [Table('runs', 'All runs and evaluations', header, rows, notes)] if rows else []


def build_tables(name, records, pool):
    if name == 'table1':
        return build_table1(records, pool)
    if name == 'cross_arch':
        return build_cross_arch(records, pool)
    if name.startswith('ablation_'):
        return build_ablation(name[len('ablation_'):], records, pool)
    if name == 'continual':
        return build_continual(records, pool)
    return build_runs(records, pool)


# ---------------------------------------------------------------------------------------------
# Rendering: one cell text (with ±, ×, †, –), two formats
# ---------------------------------------------------------------------------------------------

def render_markdown(table):
    lines = [f'### {table.title}', '', '| ' + ' | '.join(table.header) + ' |',
             '|' + '---|' * len(table.header)]
    lines += ['| ' + ' | '.join(cell.replace('|', '\\|') for cell in row) + ' |' for row in table.rows]
    lines += [''] + [f'- {note}' for note in table.notes]
    return '\n'.join(lines) + '\n'


LATEX_SPECIALS = {'\\': r'\textbackslash{}', '&': r'\&', '%': r'\%', '$': r'\$', '#': r'\#', '_': r'\_',
                  '{': r'\{', '}': r'\}', '~': r'\textasciitilde{}', '^': r'\textasciicircum{}',
                  '±': r'$\pm$', '×': r'$\times$', '†': r'$^\dagger$', '–': '--', '§': r'\S{}'}


def latex_escape(text):
    return ''.join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def render_latex(table):
    lines = [f'% {latex_escape(table.title)}', r'\begin{tabular}{' + 'l' * len(table.header) + '}', r'\hline',
             ' & '.join(latex_escape(h) for h in table.header) + r' \\', r'\hline']
    lines += [' & '.join(latex_escape(cell) for cell in row) + r' \\' for row in table.rows]
    lines += [r'\hline', r'\end{tabular}'] + [f'% {latex_escape(note)}' for note in table.notes]
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------
# --commands: the papers' command lines of the cells without a result
# ---------------------------------------------------------------------------------------------

def dsa_strategy_for(dataset):
    """Digits must not be mirrored (SPEC §5)."""
    return 'color_crop_cutout_scale_rotate' if dataset in ('MNIST', 'SVHN') else 'color_crop_cutout_flip_scale_rotate'


# How long the coresets' networks train for Table 1: SPEC and the paper give no length; 10 epochs bring the feature
# network near the whole-set bound (92.6 % on FashionMNIST), where main.py's CPU defaults (2, 3) stop short; the
# Table 1 cells of docs/RESULTS.md use these.
CORESET_LENGTH_FLAGS = {'herding': ' --feat_epochs 10', 'kcenter': ' --feat_epochs 10',
                        'forgetting': ' --forget_epochs 10'}


def table1_command(method, dataset, ipc):
    """SPEC §1 / README command line of one Table 1 cell (the coresets with CORESET_LENGTH_FLAGS)."""
    model = table1_model(dataset)
    base = f'--dataset {dataset} --model {model}'
    if method == 'whole':
        return f'python main.py {base} --method whole --num_exp 1 --num_eval 5'
    if method == 'DC':
        return f'python main.py {base} --ipc {ipc}'
    if method == 'DSA':
        return f'python main.py {base} --ipc {ipc} --init real --method DSA --dsa_strategy {dsa_strategy_for(dataset)}'
    if method == 'DM':
        return (f'python main_DM.py {base} --ipc {ipc} --dsa_strategy {dsa_strategy_for(dataset)} --init real '
                f'--lr_img 1 --num_exp 5 --num_eval 5')
    return f'python main.py {base} --ipc {ipc} --method {method}{CORESET_LENGTH_FLAGS.get(method, "")}'


def table1_commands(dataset, records, folders=()):
    """Cells of the paper's Table 1 (those with a paper value) for this dataset that have no result yet, and the
    lines that complete every cell whose newest run lacks experiments (stopped, or parts; runparts.continue_command),
    with a paper value or not (DM on FashionMNIST has none). A cell with no result file but a stopped run's
    checkpoint under the folders gets that run's line with --resume (runparts.stopped_run_commands), never the
    paper's line, which would start afresh and overwrite the checkpoint."""
    groups = group_by(records, table1_key)
    commands = []
    for ipc in TABLE1_IPCS:
        for method in TABLE1_METHODS:
            if method == 'whole' and ipc != TABLE1_IPCS[0]:
                continue
            key = (dataset, None if method == 'whole' else ipc, method)
            if key in groups:
                line = runparts.continue_command(runparts.newest_run(groups[key]))
                commands += [line] if line else []
                continue
            checkpoints = runparts.cell_checkpoints(folders, method, dataset, table1_model(dataset), ipc)
            stopped = runparts.stopped_run_commands(checkpoints, warn)
            if stopped:
                commands += stopped
            elif paper_value(method, dataset, ipc) is not None:
                commands.append(table1_command(method, dataset, ipc))
    return commands


def cross_arch_commands(dataset, records):
    """DC (SPEC §1: ipc 1, eval_mode M) learned with every network of pool M, as in the DC paper's cross-architecture
    table, and DM with ConvNetBN at ipc 50 evaluated on pool B (SPEC §1)."""
    done = set(group_by(records, cross_arch_key))
    commands = []
    for model in EVAL_POOLS['M']:
        if ('DC', dataset, 1, model, 'M') not in done:
            commands.append(f'python main.py --dataset {dataset} --model {model} --ipc 1 --eval_mode M')
    if ('DM', dataset, 50, 'ConvNetBN', 'B') not in done:
        commands.append(f'python main_DM.py --dataset {dataset} --model ConvNetBN --ipc 50 --init real --lr_img 1 '
                        f'--eval_mode B')
    return commands


def ablation_commands(mode, dataset, records):
    """DC at ipc 1, learned with every variant of the pool and evaluated on all of them (SPEC §1)."""
    done = {(r.method, r.dataset, r.ipc, r.model) for r in records if r.kind != 'cl' and r.eval_mode == mode}
    return [f'python main.py --dataset {dataset} --model {model} --eval_mode {mode} --ipc 1'
            for model in EVAL_POOLS[mode] if ('DC', dataset, 1, model) not in done]


def continual_commands(dataset, records):
    """CL_DM.py at its defaults (ConvNet, ipc 20) for 5 and 10 steps; --build makes missing memory files."""
    done = {(r.config.get('steps'), r.method, r.model, r.ipc) for r in records
            if r.kind == 'cl' and r.dataset == dataset}
    commands = []
    for steps in (5, 10):
        for method in ('random', 'herding', 'DSA', 'DM'):
            if (steps, method, 'ConvNet', 20) not in done:
                build = '' if method == 'random' else ' --build'
                commands.append(f'python CL_DM.py --dataset {dataset} --model ConvNet --steps {steps} '
                                f'--method {method}{build}')
    return commands


def missing_commands(name, dataset, records, folders=()):
    if name == 'table1':
        return table1_commands(dataset, records, folders)
    if name == 'cross_arch':
        return cross_arch_commands(dataset, records)
    if name.startswith('ablation_'):
        return ablation_commands(name[len('ablation_'):], dataset, records)
    if name == 'continual':
        return continual_commands(dataset, records)
    raise ReportError(f"table {name} has no command lines (it lists the runs there are); choose one of "
                      f"{', '.join(n for n in TABLE_NAMES if n != 'runs')}")


def with_save_path(command, folder):
    """Results must land where report.py will look for them; 'result' is every script's default."""
    if os.path.normpath(folder) == 'result' or ' --save_path ' in command:
        return command
    return f'{command} --save_path {shlex.quote(folder)}'
