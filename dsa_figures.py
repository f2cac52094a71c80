"""report.py's pictures of what learning did, beyond accuracy: Figure 5 of the DSA paper (the distributions of the
real and synthetic batches' gradient norms, from --grad_stats runs), Figure 6 (chosen classes across iterations, from
--snapshot_every files) and --embed (embedding.py: the synthetic images among the real ones, PCA and LDA)."""
import json
import math
import os

from base import UserError
from plots import pyplot, save_figure_atomic
from tables import ReportError


def add_figure_args(parser):
    """--fig5, --fig6 and --embed with their options (called once from report.py)."""
    a = parser.add_argument
    a('--fig5', nargs='+', default=None, metavar='JSON',
      help='Figure 5: gradient-norm distributions of one or two res_*.json written with --grad_stats (e.g. a DSA and '
           'a DC run, overlaid); PNG into --out')
    a('--fig5_iters', type=int, nargs='+', default=None, metavar='IT',
      help='the recorded iterations --fig5 pools (default: all recorded)')
    a('--fig6', nargs='+', default=None, metavar='SNAP',
      help='Figure 6: chosen classes across iterations from one or two snap_*.pt of --snapshot_every (e.g. noise and '
           'real initialisation, side by side); PNG into --out')
    a('--fig6_classes', type=int, nargs='+', default=[0, 1], metavar='C', help='classes of --fig6 (rows)')
    a('--embed', type=str, default=None, metavar='RES.pt',
      help='embed a synthetic set among real images of --dataset (network trained on the real training set, cached '
           'in --out), project with PCA and LDA, write DIR/embed_*_pca.png and _lda.png and print the distances')
    a('--embed_exp', type=int, default=0, help='--embed: which experiment of the file')
    a('--embed_per_class', type=int, default=200, help='--embed: real images per class')
    a('--embed_model', type=str, default='ConvNet', help='--embed: the embedding network')
    a('--embed_epochs', type=int, default=2, help='--embed: epochs of training on the real training set')
    a('--embed_cache', type=str, default='result', metavar='DIR',
      help='--embed: folder of the cached embedding network (featnet_*.pt, shared with herding/k-center)')
    a('--data_path', type=str, default='data', help='--embed: dataset folder')
    a('--device', type=str, default=None, help='--embed: cpu, cuda, ... (default: cuda when available)')
    a('--out', type=str, default=None, metavar='DIR', help='folder of the --fig5, --fig6 and --embed pictures')


def draw_figures(args):
    """Draw what the figure flags ask for; False when none is given (report.py then prints tables)."""
    if not (args.fig5 or args.fig6 or args.embed):
        return False
    if not args.out:
        raise ReportError('--fig5, --fig6 and --embed need --out DIR (the folder of the pictures)')
    for flag in ('fig5', 'fig6'):
        if getattr(args, flag) and len(getattr(args, flag)) > 2:
            raise ReportError(f'--{flag} takes one or two files, got {len(getattr(args, flag))}')
    os.makedirs(args.out, exist_ok=True)
    if args.fig5:
        print(f'written {figure5(args.fig5, args.out, args.fig5_iters)}')
    if args.fig6:
        print(f'written {figure6(args.fig6, args.out, args.fig6_classes)}')
    if args.embed:
        from embedding import embed_report  # torch and the data loaders only when embedding
        try:
            embed_report(args)
        except UserError as e:
            raise ReportError(str(e)) from e
    return True


# ---------------------------------------------------------------------------------------------
# Figure 5: gradient norms
# ---------------------------------------------------------------------------------------------

def run_label(config):
    """'DSA (crop)' when augmentation was on while matching, else 'DC' / 'DSA, no augmentation'."""
    strategy = config.get('dsa_strategy')
    if config.get('method') == 'DSA' and strategy not in (None, '', 'none', 'None') \
            and config.get('dsa_condense', 'siamese') != 'none':
        return f'DSA ({strategy})'
    return 'DC' if config.get('method') == 'DC' else 'DSA, no augmentation'


def read_grad_stats(path, iterations=None):
    """(config, rows) of a res_*.json with --grad_stats rows, restricted to the given iterations."""
    try:
        with open(path, encoding='utf-8') as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f'cannot read {path}: {type(e).__name__}: {" ".join(str(e).split())[:120]}') from e
    rows = obj.get('grad_stats') if isinstance(obj, dict) else None
    if not rows:
        raise ReportError(f'{path} has no gradient norms; learn with --grad_stats IT ... to record them')
    if iterations is not None:
        rows = [r for r in rows if r['iteration'] in set(iterations)]
        if not rows:
            raise ReportError(f'{path} recorded none of the iterations {iterations}')
    return obj.get('config', {}), rows


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def figure5(paths, out_dir, iterations=None):
    """Two panels, real batch and synthetic batch: histograms of log10 ||grad_theta L||, one per run."""
    plt = pyplot()
    runs = [read_grad_stats(p, iterations) for p in paths]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    values = [math.log10(max(r[k], 1e-12)) for _, rows in runs for r in rows for k in ('real', 'syn')]
    bins = [min(values) + (max(values) - min(values) + 1e-9) * k / 30 for k in range(31)]
    for config, rows in runs:
        its = sorted({r['iteration'] for r in rows})
        label = f'{run_label(config)}, {config.get("dataset")} ipc {config.get("ipc")}'
        for ax, key in zip(axes, ('real', 'syn')):
            norms = [r[key] for r in rows]
            ax.hist([math.log10(max(v, 1e-12)) for v in norms], bins=bins, histtype='step', linewidth=1.5,
                    label=f'{label} (median {median(norms):.3g}, n={len(norms)})')
        print(f'{label}: iterations {its[0]}..{its[-1]} ({len(its)}), {len(rows)} (class, step) pairs; median '
              f'||grad L(real)|| = {median([r["real"] for r in rows]):.4g}, '
              f'||grad L(syn)|| = {median([r["syn"] for r in rows]):.4g}')
    for ax, what in zip(axes, ('real batch: ||∇θ L(T)||', 'synthetic batch: ||∇θ L(S)||')):
        ax.set_xlabel(f'log10 {what.split(": ")[1]}')
        ax.set_ylabel('count (class × outer step × iteration)')
        ax.set_title(what, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle('Gradient magnitudes while matching (DSA paper, Figure 5)', fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, 'fig5_' + '_vs_'.join(stem_of(p) for p in paths) + '.png')
    save_figure_atomic(fig, path)
    plt.close(fig)
    return path


def stem_of(path):
    name = os.path.splitext(os.path.basename(path))[0]
    for prefix in ('res_', 'snap_'):
        name = name[len(prefix):] if name.startswith(prefix) else name
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f'{parent}-{name}'


# ---------------------------------------------------------------------------------------------
# Figure 6: the rendering process
# ---------------------------------------------------------------------------------------------

def class_image(snapshot, labels, c, mean, std):
    """The first synthetic image of class c, de-normalised to [0, 1], as an H x W (x 3) array."""
    import torch
    index = (labels == c).nonzero()
    if index.numel() == 0:
        raise ReportError(f'class {c} is not in the snapshot file (labels 0..{int(labels.max())})')
    img = snapshot[index[0, 0]].float()
    img = img * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = img.clamp(0, 1).permute(1, 2, 0).numpy()
    return img[:, :, 0] if img.shape[2] == 1 else img


def figure6(paths, out_dir, classes):
    """One block per run (side by side): a row per class, a column per snapshot."""
    from learning_trace import load_snapshots
    plt = pyplot()
    try:
        runs = [(p, load_snapshots(p)) for p in paths]
    except UserError as e:
        raise ReportError(str(e)) from e
    width = sum(len(s['iterations']) for _, s in runs) + len(runs) - 1
    fig = plt.figure(figsize=(1.1 * width + 0.5, 1.2 * len(classes) + 0.8))
    sub = fig.subfigures(1, len(runs), width_ratios=[len(s['iterations']) for _, s in runs]) if len(runs) > 1 \
        else [fig]
    for panel, (path, snaps) in zip(sub, runs):
        config = snaps.get('config', {})
        axes = panel.subplots(len(classes), len(snaps['iterations']), squeeze=False)
        for row, c in enumerate(classes):
            for col, (it, images) in enumerate(zip(snaps['iterations'], snaps['images'])):
                ax = axes[row][col]
                ax.imshow(class_image(images, snaps['labels'], c, snaps['mean'], snaps['std']), cmap='gray',
                          vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f'it {it}', fontsize=7)
                if col == 0:
                    ax.set_ylabel(f'class {c}', fontsize=7)
        panel.suptitle(f'{run_label(config)}, init {config.get("init", "?")}', fontsize=8)
    path = os.path.join(out_dir, 'fig6_' + '_vs_'.join(stem_of(p) for p in paths) + '.png')
    save_figure_atomic(fig, path)
    plt.close(fig)
    return path
