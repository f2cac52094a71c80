"""Result files (SPEC §8): res_*.pt in the published structure, the vis png grids, the JSON summaries and the final
report lines of a run, and reading a synthetic-set file made by us or by the original code."""
import time

import numpy as np
import torch

import parallel
from base import UserError, atomic_write, load_torch_file, log, save_torch_file_atomic, write_json_atomic
from labelnoise import pure_rate_line

def result_stem(method, dataset, model, ipc):
    return f'{method}_{dataset}_{model}_{ipc}ipc'


def checkpoint_name(stem, exp):
    """The file name of one experiment's checkpoint (exp may be a glob such as '*')."""
    return f'ckpt_{stem}_exp{exp}.pt'


def save_vis(path, images, mean, std, nrow):
    """De-normalised, clipped grid, one row per class; written atomically."""
    from PIL import Image
    images = images.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (images * std_t + mean_t).clamp(0, 1)
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)
    rows = (n + nrow - 1) // nrow
    pad = 2
    grid = torch.zeros(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):  # one copy per image into the grid: a few hundred at most, not a hot path
        r, col = divmod(k, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[k]
    array = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format='PNG'))


def summarize(accs_all_exps):
    """{model: {'accs': [...], 'mean': %, 'std': %, 'n': K}} in percent."""
    out = {}
    for key, accs in accs_all_exps.items():
        a = np.asarray(accs, dtype=np.float64)
        out[key] = {'n': int(a.size), 'mean': float(a.mean() * 100) if a.size else float('nan'),
                    'std': float(a.std() * 100) if a.size else float('nan'), 'accs': [float(x) for x in a]}
    return out


def summary_lines(num_exp, model, summary):
    return [f'Run {num_exp} experiments, train on {model}, evaluate {s["n"]} random {key}, '
            f'mean = {s["mean"]:.2f}% std = {s["std"]:.2f}%' for key, s in summary.items()]


def config_dict(args):
    """The run's flags as plain JSON-able values (stored in res_*.pt under 'config' and in the JSON summary)."""
    keep = (str, int, float, bool, type(None))
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(vars(args).items())
            if isinstance(v, keep) or (isinstance(v, (list, tuple)) and all(isinstance(x, keep) for x in v))}


def save_results(path, data_save, accs_all_exps, args, timings):
    save_torch_file_atomic({'data': data_save, 'accs_all_exps': accs_all_exps, 'config': config_dict(args),
                            'timings': timings}, path)


def load_synthetic_sets(path, channel=None, im_size=None, num_classes=None, unsafe=False):
    """The list of (images, labels) of a res_*.pt (ours, or one written by the original code), checked for the
    published structure and, when given, against the dataset's image shape and number of classes."""
    return synthetic_sets(load_torch_file(path, 'synthetic set', unsafe=unsafe), path, channel, im_size, num_classes)


def stored_accuracies(obj):
    """{model: [accuracy, ...]} of a result file's 'accs_all_exps' as Python floats (the original code stores
    numpy.float64 values); {} when the file has none."""
    accs = obj.get('accs_all_exps') if isinstance(obj, dict) else None
    if not isinstance(accs, dict):
        return {}
    return {str(m): [float(a) for a in values] for m, values in accs.items() if isinstance(values, (list, tuple))}


def synthetic_sets(obj, path, channel=None, im_size=None, num_classes=None):
    """load_synthetic_sets of an already loaded file object."""
    where = f"'{path}' is not a synthetic-set file in the published structure"
    if not isinstance(obj, dict) or not isinstance(obj.get('data'), (list, tuple)) or len(obj['data']) == 0:
        raise UserError(f"{where} (expected a dict whose 'data' is a non-empty list of [images, labels])")
    sets = []
    for k, entry in enumerate(obj['data']):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not all(torch.is_tensor(t) for t in entry[:2]):
            raise UserError(f"{where} (entry {k} of 'data' is not [images, labels])")
        images, labels = entry[0], entry[1]
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"{where} (entry {k}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                            f"do not form N x C x H x W and N)")
        if channel is not None and (images.shape[1] != channel or tuple(images.shape[2:]) != tuple(im_size)):
            raise UserError(f"'{path}' holds {tuple(images.shape[1:])} images but the dataset has "
                            f"{(channel, *im_size)}; check --dataset")
        if num_classes is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(f"'{path}' has labels outside 0..{num_classes - 1}; check --dataset")
        sets.append((images.float(), labels.long()))
    return sets


def report_results(args, accs_all_exps, num_exp, json_path, t_start, **extra):
    """The end of every run: the final lines (SPEC §8 wording), peak memory, and the JSON summary. Returns the
    summary dict."""
    summary = summarize(accs_all_exps)
    if parallel.rank() != 0:  # under torchrun rank 0 alone reports and writes
        return summary
    print('\n==================== Final Results ====================\n')
    for line in summary_lines(num_exp, args.model, summary):
        print(line)
    if extra.get('pure_rate'):
        print(pure_rate_line(extra['pure_rate']))
    memory = peak_memory_mb(args.device)
    log(args, f'peak memory: host {memory["host_mb"]:.0f} MB' +
        (f', {args.device} {memory["device_mb"]:.0f} MB' if 'device_mb' in memory else ''))
    write_summary_json(json_path, args, summary, t_start, **extra, peak_memory=memory)
    return summary


def write_summary_json(json_path, args, summary, t_start, **fields):
    """The res_*.json layout: config, per-model results, the given fields, wall time since t_start."""
    write_json_atomic(json_path, {'config': config_dict(args), 'results': summary, **fields,
                                  'wall_seconds': round(time.time() - t_start, 3)})


def write_progress_summary(args, accs_all_exps, experiments, json_path, t_start):
    """The JSON summary of a run still going: written after each finished experiment (`experiments`: the indices
    finished so far), so that a run stopped before its end (a session's end, a kill) still shows in report.py, as
    'k×K of E×K'. The run's end overwrites it."""
    if parallel.rank() != 0:
        return
    write_summary_json(json_path, args, summarize(accs_all_exps), t_start, experiments_done=len(experiments),
                       experiments_run=sorted(experiments))


def peak_memory_mb(device='cpu'):
    """Peak resident host memory of this process (and peak allocated CUDA memory), in MB."""
    import resource
    out = {'host_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if str(device).startswith('cuda') and torch.cuda.is_available():
        out['device_mb'] = torch.cuda.max_memory_allocated() / 2**20
    return out
