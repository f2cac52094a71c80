"""report.py --plots: accuracy and loss vs iteration per run, accuracy vs ipc per dataset, as PNG files (matplotlib,
Agg backend, written atomically)."""
import math
import os

from base import atomic_write
from tables import (METHOD_TITLES, TABLE1_IPCS, TABLE1_METHODS, ReportError, dataset_order, is_number, paper_value,
                    table1_cells, table1_model)

def pyplot():
    """matplotlib with the Agg backend (files only, no display needed), imported only for --plots."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ReportError(f'--plots needs matplotlib ({e}); pip install "matplotlib>=3.5"')
    return plt


def save_figure_atomic(fig, path):
    """savefig through base.atomic_write: an interruption leaves no truncated PNG."""
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))


def finish_plot(plt, fig, ax, xlabel, ylabel, title, path, legend_size=8):
    """What every plot ends with: labelled axes, title, grid, legend, then written atomically and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def accuracy_curves(record):
    """Eval model -> (iterations, mean %, std %) over every network of every experiment at each iteration."""
    per_model = {}
    for entry in record.history:
        accs = entry['accs'] if isinstance(entry['accs'], list) else []
        values = [100.0 * a for a in accs if is_number(a)]
        if values:
            per_model.setdefault(entry['model'], {}).setdefault(entry['iteration'], []).extend(values)
    curves = {}
    for model, by_iteration in per_model.items():
        iterations = sorted(by_iteration)
        means = [sum(by_iteration[i]) / len(by_iteration[i]) for i in iterations]
        stds = [math.sqrt(max(sum(v * v for v in by_iteration[i]) / len(by_iteration[i]) - m * m, 0.0))
                for i, m in zip(iterations, means)]
        curves[model] = (iterations, means, stds)
    return curves


def run_title(record):
    return f'{record.method} on {record.dataset}, {record.model}, ipc {record.ipc}'


def plot_accuracy_vs_iteration(plt, record, path):
    curves = accuracy_curves(record)
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, (iterations, means, stds) in curves.items():
        line, = ax.plot(iterations, means, marker='o', label=f'{model}')
        low = [m - s for m, s in zip(means, stds)]
        high = [m + s for m, s in zip(means, stds)]
        ax.fill_between(iterations, low, high, color=line.get_color(), alpha=0.2)
    paper = paper_value(record.method, record.dataset, record.ipc)
    if paper is not None and record.model == table1_model(record.dataset):
        ax.axhline(paper[0], color='gray', linestyle='--', label=f'paper {paper[0]:.1f}%')
    finish_plot(plt, fig, ax, 'iteration', 'test accuracy (%)', f'{run_title(record)}: accuracy (mean ± std over networks)', path, legend_size=8)


def plot_loss_vs_iteration(plt, record, path):
    per_exp = {}
    for entry in record.loss_history:
        if is_number(entry['loss']) and is_number(entry['iteration']):
            per_exp.setdefault(entry.get('exp', 0), []).append((entry['iteration'], float(entry['loss'])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for exp, points in sorted(per_exp.items(), key=lambda item: str(item[0])):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f'experiment {exp}')
    if all(p[1] > 0 for points in per_exp.values() for p in points):
        ax.set_yscale('log')  # matching losses fall over orders of magnitude
    what = 'distribution matching loss' if record.method == 'DM' else 'gradient matching loss'
    finish_plot(plt, fig, ax, 'iteration', what, f'{run_title(record)}: {what}', path, legend_size=8)


def plot_accuracy_vs_ipc(plt, dataset, cells, path):
    """One line per method (ours, solid, with std bars), the papers' values dashed in the same colour."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ipcs_seen = set()
    for method in TABLE1_METHODS:
        if method == 'whole':
            continue
        points = sorted((ipc, cell) for (d, ipc, m), cell in cells.items()
                        if d == dataset and m == method and ipc is not None)
        if not points:
            continue
        ipcs = [ipc for ipc, _ in points]
        ipcs_seen.update(ipcs)
        bars = ax.errorbar(ipcs, [c.mean for _, c in points], yerr=[c.std for _, c in points], marker='o',
                           capsize=3, label=METHOD_TITLES.get(method, method))
        paper = [(ipc, paper_value(method, dataset, ipc)) for ipc in sorted(set(TABLE1_IPCS) | set(ipcs))]
        paper = [(ipc, p[0]) for ipc, p in paper if p is not None]
        if paper:
            ax.plot([p[0] for p in paper], [p[1] for p in paper], linestyle='--', marker='x',
                    color=bars.lines[0].get_color(), alpha=0.6, label=f'{METHOD_TITLES.get(method, method)} (paper)')
            ipcs_seen.update(p[0] for p in paper)
    whole = cells.get((dataset, None, 'whole'))
    if whole is not None:
        ax.axhline(whole.mean, color='black', linestyle=':', label=f'whole dataset {whole.mean:.1f}%')
    ax.set_xscale('log')
    ax.set_xticks(sorted(ipcs_seen))
    ax.set_xticklabels([str(i) for i in sorted(ipcs_seen)])
    finish_plot(plt, fig, ax, 'images per class (ipc)', 'test accuracy (%)', f'{dataset}: accuracy vs images per class ({table1_model(dataset)})', path, legend_size=7)


def unique_path(directory, name, used):
    """directory/name.png, or name_2.png, ... when two files (e.g. in two folders) share a stem."""
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f'{name}_{k}'
    used.add(candidate)
    return os.path.join(directory, f'{candidate}.png')


def write_plots(records, out_dir, pool):
    """Every plot the records allow; returns the written paths."""
    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written, used = [], set()
    for record in sorted((r for r in records if r.kind == 'run'), key=lambda r: r.path):
        curves = accuracy_curves(record)
        if any(len(iterations) >= 2 for iterations, _, _ in curves.values()):  # one point is no curve
            path = unique_path(out_dir, f'acc_{record.stem}', used)
            plot_accuracy_vs_iteration(plt, record, path)
            written.append(path)
        if len(record.loss_history) >= 2:
            path = unique_path(out_dir, f'loss_{record.stem}', used)
            plot_loss_vs_iteration(plt, record, path)
            written.append(path)
    cells, _ = table1_cells(records, pool)
    for dataset in dataset_order(d for d, ipc, _ in cells if ipc is not None):
        path = unique_path(out_dir, f'acc_vs_ipc_{dataset}', used)
        plot_accuracy_vs_ipc(plt, dataset, cells, path)
        written.append(path)
    return written
