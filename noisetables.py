"""The noisy-label table and figures (noise.py prints them for its grid; report.py --table noise for any folder):
pure rate and test accuracy per (method, selection, score) and noise setting, with the no-filtering and the
clean-data runs as reference rows. They read the runs' JSON summaries only."""
import json
import math
import os

from plots import pyplot, save_figure_atomic
from tables import Table, find_json_files, is_number, warn

SCORE_ORDER = ('none', 'loss', 'score', 'score2', 'score3')
NOISE_TYPE_ORDER = ('symmetric', 'pairflip', 'asymmetric')


def selection_of(config):
    """(mode, score) of a run: ('none', 'none') without clean selection."""
    if config.get('clean_select') not in (None, 'none'):
        return 'online', config['clean_select']
    if config.get('clean_filter') not in (None, 'none'):
        return 'offline', config['clean_filter']
    return 'none', 'none'


def entry_of(obj, path):
    """One run as a flat dict, or None when the JSON is no learning/baseline run with noise settings."""
    config = obj.get('config') if isinstance(obj, dict) else None
    results = obj.get('results') if isinstance(obj, dict) else None
    if not isinstance(config, dict) or not isinstance(results, dict) or 'noise_rate' not in config:
        return None
    if 'file' in obj or not all(k in config for k in ('method', 'dataset', 'model', 'ipc')):
        return None
    accs = [v for v in results.values() if isinstance(v, dict) and is_number(v.get('mean'))]
    if not accs:
        return None
    mode, score = selection_of(config)
    rate = float(config['noise_rate'])
    pure = obj.get('pure_rate') if isinstance(obj.get('pure_rate'), dict) else {}
    return {'path': path, 'dataset': config['dataset'], 'method': config['method'], 'ipc': config['ipc'],
            'model': config['model'], 'mode': mode, 'score': score, 'rate': rate,
            'noise': 'clean' if rate == 0 else config.get('noise_type', 'symmetric'),
            'acc': float(accs[0]['mean']), 'std': float(accs[0]['std']), 'n': int(accs[0].get('n', 0)),
            'pure': pure.get('used') if is_number(pure.get('used')) else (1.0 if rate == 0 else None),
            'config': config}


def read_entry(path):
    try:
        with open(path, encoding='utf-8') as f:
            return entry_of(json.load(f), path)
    except (OSError, ValueError) as e:
        warn(f'skipping {path}: {type(e).__name__}')
        return None


def load_entries(folders):
    """The runs with noise settings under the folders (res_*.json)."""
    entries = []
    for path, _ in find_json_files(folders, missing_ok=True):
        if os.path.basename(path).startswith('res_'):
            entry = read_entry(path)
            if entry is not None:
                entries.append(entry)
    return entries


def relevant(entries):
    """The noisy or filtered runs, and the clean unfiltered runs of the same (dataset, method, ipc) as references."""
    noisy = [e for e in entries if e['rate'] > 0 or e['mode'] != 'none']
    groups = {(e['dataset'], e['method'], e['ipc']) for e in noisy}
    return noisy + [e for e in entries if e['rate'] == 0 and e['mode'] == 'none'
                    and (e['dataset'], e['method'], e['ipc']) in groups]


def noise_key(entry):
    return entry['noise'], entry['rate']


def noise_label(noise, rate):
    return 'clean' if noise == 'clean' else f'{noise} {rate * 100:g}%'


def column_order(key):
    noise, rate = key
    return (-1 if noise == 'clean' else NOISE_TYPE_ORDER.index(noise) if noise in NOISE_TYPE_ORDER else 9, rate)


def row_order(key):
    method, ipc, mode, score = key
    return (method, ipc, ('none', 'offline', 'online').index(mode),
            SCORE_ORDER.index(score) if score in SCORE_ORDER else 9)


def newest(entries):
    return max(entries, key=lambda e: (os.path.getmtime(e['path']) if os.path.exists(e['path']) else 0, e['path']))


def cell_text(entry):
    pure = '–' if entry['pure'] is None else f"{entry['pure'] * 100:.1f}"
    return f"{pure} / {entry['acc']:.1f} ± {entry['std']:.1f}"


def build_noise_tables(entries):
    """One markdown-ready Table per dataset (tables.Table); the newest run of a cell when there are several."""
    entries = relevant(entries)
    out = []
    for dataset in sorted({e['dataset'] for e in entries}):
        cells = {}
        for e in entries:
            if e['dataset'] == dataset:
                cells.setdefault((e['method'], e['ipc'], e['mode'], e['score']), {}).setdefault(
                    noise_key(e), []).append(e)
        columns = sorted({k for row in cells.values() for k in row}, key=column_order)
        rows = []
        for key in sorted(cells, key=row_order):
            method, ipc, mode, score = key
            chosen = {k: newest(v) for k, v in cells[key].items()}
            what = 'no filtering (clean column: clean data)' if mode == 'none' else f'{mode} {score}'
            rows.append([method, str(ipc), what] + [cell_text(chosen[c]) if c in chosen else '–' for c in columns])
        counts = sorted({f"{e['n']}" for e in entries if e['dataset'] == dataset})
        notes = ['Each cell: pure rate (%) of the samples the method used / test accuracy (%) mean ± std over '
                 f"{' or '.join(counts)} evaluation networks.",
                 'Pure rate: online, the matched real batches (mean over iterations); coresets, the selected images; '
                 'DC/DSA/DM offline or unfiltered, the training set they drew from (the kept set).']
        out.append(Table('noise', f'Noisy labels on {dataset}: pure rate / test accuracy', ['method', 'ipc',
                                                                                               'selection'] +
                         [noise_label(*c) for c in columns], rows, notes))
    return out


def panels(entries):
    """{(method, ipc, mode): {score: {noise type: [(rate, entry)]}}}; the no-filtering runs (and the clean run at
    rate 0) appear in every panel of their method as the 'none' line."""
    out = {}
    for e in entries:
        if e['mode'] != 'none':
            out.setdefault((e['method'], e['ipc'], e['mode']), {})
    for e in entries:
        targets = [k for k in out if k[:2] == (e['method'], e['ipc']) and (e['mode'] == 'none' or k[2] == e['mode'])]
        for k in targets:
            score = e['score']
            out[k].setdefault(score, {}).setdefault(e['noise'], []).append((e['rate'], e))
    return out


def plot_noise(plt, entries, value, ylabel, path, title):
    grid = panels(relevant(entries))
    if not grid:
        return None
    keys = sorted(grid, key=lambda k: (k[0], k[1], k[2]))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    markers = {'pairflip': 's', 'asymmetric': '^'}
    for ax, key in zip(axes[0], keys):
        for score in sorted(grid[key], key=lambda s: SCORE_ORDER.index(s) if s in SCORE_ORDER else 9):
            by_type = grid[key][score]
            line = sorted({r: e for r, e in by_type.get('symmetric', []) + by_type.get('clean', [])}.items())
            points = [(r, value(e)) for r, e in line if value(e) is not None]
            color = None
            if points:
                drawn, = ax.plot([p[0] * 100 for p in points], [p[1] for p in points], marker='o', label=score)
                color = drawn.get_color()
            for noise, marker in markers.items():
                extra = [(r, value(e)) for r, e in by_type.get(noise, []) if value(e) is not None]
                if extra:
                    ax.scatter([p[0] * 100 for p in extra], [p[1] for p in extra], marker=marker, color=color,
                               label=f'{score} ({noise})' if color is None or not points else None)
        ax.set_xlabel('noise rate (%): lines symmetric, ■ pairflip, ▲ asymmetric', fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f'{key[0]} ipc {key[1]}, {key[2]} selection', fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
    return path


def write_noise_figures(entries, stem):
    """stem_pure_rate.png and stem_accuracy.png; returns the written paths."""
    plt = pyplot()
    written = []
    for suffix, value, ylabel in (('pure_rate', lambda e: None if e['pure'] is None else e['pure'] * 100,
                                   'pure rate (%)'), ('accuracy', lambda e: e['acc'], 'test accuracy (%)')):
        path = plot_noise(plt, entries, value, ylabel, f'{stem}_{suffix}.png', ylabel)
        if path:
            written.append(path)
    return written
