"""One prepared check of every GPU path (issue 23), sized for one call of at most 8 minutes on one GPU.

    bash benchmarks/gpu_check.sh          # or: make gpu_check; writes into $OUT when set, else result/gpu_check/

Parts, each under its own time limit (they add up to under 8 minutes):
  1. cuda_tests: the tests that skip without CUDA (tests/test_gpu.py, the CUDA DSA test, datasets moved to CUDA);
  2. speed: every phase of benchmarks/speed.py on CUDA (evaluation epoch, test pass, DC ipc 1 and ipc 10, DM, 20
     networks one by one and batched), with and without --compile and --bf16 (its JSON is kept);
  3. batched_vs_loop: 10 ConvNets evaluated together (torch.func) and one by one on the real 10-image set,
     both timed, and their accuracies compared;
  4. torchrun: a 1-process torchrun of main.py, DC ipc 1 for 2 iterations, evaluated once (NCCL on a GPU, gloo on
     a CPU).
Writes gpu_check.json and gpu_check.md (a table) and prints the table. On a machine without CUDA it runs parts 3
(shortened: 20 epochs, 1,000 test images) and 4 on the CPU and records parts 1 and 2 as skipped, with the reason.
Needs only torch and the repository: FashionMNIST is taken from .carry/fashion-mnist (the four IDX .gz files,
carried in an ignored folder) or /usr/share/datasets/fashion-mnist; nothing is downloaded.
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the project's requirements a check needs; on a machine that lacks one nothing below can run, so say which at once
NEEDED = ('torch', 'numpy', 'tqdm')
MISSING = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if MISSING:
    sys.exit(f"error: gpu_check needs {', '.join(MISSING)} (requirements.txt), not installed for {sys.executable}; "
             f"install them or run with PYTHON=<a python that has them>")

import torch  # noqa: E402

sys.path.insert(0, ROOT)
import base  # noqa: E402
import training  # noqa: E402
from augment import ParamDiffAug  # noqa: E402
from data import load_dataset  # noqa: E402

DATA_DIRS = (os.path.join(ROOT, '.carry', 'fashion-mnist'), '/usr/share/datasets/fashion-mnist')
IDX_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
             't10k-labels-idx1-ubyte.gz')
CUDA_TESTS = ['tests/test_gpu.py', 'tests/test_augment.py::test_cuda_matches_cpu',
              'tests/test_datasets.py::test_dataset_to_device_and_name_lookup']
LIMITS_S = {'cuda_tests': 120, 'speed': 240, 'torchrun': 75}  # part 3 is bounded by its size (~30 s on a GPU)
CPU_TORCHRUN_LIMIT_S = 300  # a loaded CPU needs minutes for the run's one test pass over 10,000 images
DSA = 'color_crop_cutout_flip_scale_rotate'


def out_dir():
    folder = os.environ.get('OUT') or os.path.join(ROOT, 'result', 'gpu_check')
    os.makedirs(folder, exist_ok=True)
    return folder


def data_path(scratch):
    """A --data_path holding FashionMNIST/raw: links to the carried files, or None when the Debian copy (found by
    the loader itself) is the only one."""
    for folder in DATA_DIRS:
        if all(os.path.isfile(os.path.join(folder, f)) for f in IDX_FILES):
            raw = os.path.join(scratch, 'FashionMNIST', 'raw')
            os.makedirs(raw, exist_ok=True)
            for f in IDX_FILES:
                os.symlink(os.path.join(folder, f), os.path.join(raw, f))
            return scratch, folder
    return None, None


def run(cmd, limit_s, **kw):
    """(return code, seconds, last lines of output) of a subprocess under a time limit (124 when it ran over)."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s, **kw)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, text = 124, f'{e.stdout or ""}{e.stderr or ""}\n(ran over its {limit_s} s limit)'
        text = text if isinstance(text, str) else text.decode(errors='replace')
    return code, round(time.time() - t0, 1), '\n'.join(text.strip().splitlines()[-15:])


def cuda_tests():
    code, seconds, tail = run([sys.executable, '-m', 'pytest', '-q', '-rs', *CUDA_TESTS], LIMITS_S['cuda_tests'])
    return {'ok': code == 0, 'seconds': seconds, 'summary': tail.splitlines()[-1] if tail else '', 'tail': tail}


def speed(out, data):
    path = os.path.join(out, 'speed_cuda.json')
    cmd = [sys.executable, 'benchmarks/speed.py', '--device', 'cuda', '--repeats', '2', '--out', path]
    if data:
        cmd += ['--data_path', data]
    code, seconds, tail = run(cmd, LIMITS_S['speed'])
    result = {'ok': code == 0, 'seconds': seconds, 'json': path, 'tail': tail}
    if os.path.isfile(path):
        with open(path) as f:
            speed_json = json.load(f)
        result['phases'] = {r['phase']: round(r['median_s'], 4) for r in speed_json['phases']}
    return result


def batched_vs_loop(data, device):
    """10 ConvNets on the real 10-image set (DSA evaluation), together and one by one: times and accuracies."""
    cuda = device.startswith('cuda')
    epochs = 300 if cuda else 20
    fm = load_dataset('FashionMNIST', data or 'data').to(device)
    if not cuda:  # the CPU run is a smoke check of the same code: a test subset
        fm = dataclasses.replace(fm, images_test=fm.images_test[:1000], labels_test=fm.labels_test[:1000])
    idx = torch.stack([i[0] for i in fm.indices_class])
    images, labels = fm.images_train[idx], fm.labels_train[idx]
    result = {'epochs': epochs + 1, 'test_images': int(fm.labels_test.numel()), 'networks': 10}
    for flag, name in (('1', 'batched'), ('0', 'one_by_one')):
        args = types.SimpleNamespace(method='DSA', dsa_strategy=DSA, dsa_param=ParamDiffAug(), epoch_eval_train=epochs,
                                     default_epoch_eval=300, lr_net=0.01, batch_train=256, device=device, quiet=True,
                                     eval_batched=flag, bf16=False, channels_last=False, compile=False)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        accs = training.evaluate_models(images, labels, fm, args, 'ConvNet', range(10), (0, 0, 0))
        if cuda:
            torch.cuda.synchronize()
        result[name] = {'seconds': round(time.perf_counter() - t0, 2), 'accs': [round(100 * a, 2) for a in accs]}
    diffs = [abs(a - b) for a, b in zip(result['batched']['accs'], result['one_by_one']['accs'])]
    result['max_abs_diff_points'] = round(max(diffs), 2)
    # the two paths draw the same random numbers; float rounding may flip a few test predictions, not more
    result['ok'] = max(diffs) <= 100 * 20 / result['test_images'] + 1.0
    return result


def torchrun(out, data, device):
    save = os.path.join(out, 'torchrun')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', 'main.py',
           '--dataset', 'FashionMNIST', '--method', 'DC', '--ipc', '1', '--Iteration', '2', '--eval_every', '0',
           '--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '10', '--save_path', save, '--device', device,
           '--quiet', '--no_vis']
    if data:
        cmd += ['--data_path', data]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    code, seconds, tail = run(cmd, LIMITS_S['torchrun'] if device.startswith('cuda') else CPU_TORCHRUN_LIMIT_S, env=env)
    written = os.path.isfile(os.path.join(save, 'res_DC_FashionMNIST_ConvNet_1ipc.json'))
    return {'ok': code == 0 and written, 'backend': 'nccl' if device.startswith('cuda') else 'gloo',
            'seconds': seconds, 'result_written': written, 'tail': tail}


def table(report):
    lines = [f"GPU check on {report['device_name']} (torch {report['torch']}), {report['wall_s']} s", '',
             '| part | result | seconds | detail |', '|---|---|---|---|']
    for part in ('cuda_tests', 'speed', 'batched_vs_loop', 'torchrun'):
        r = report['parts'][part]
        if 'skipped' in r:
            lines.append(f"| {part} | skipped | – | {r['skipped']} |")
            continue
        if part == 'cuda_tests':
            detail = r['summary']
        elif part == 'speed':
            detail = f"{len(r.get('phases', {}))} phases timed, {os.path.basename(r['json'])}"
        elif part == 'batched_vs_loop':
            detail = (f"10 nets x {r['epochs']} epochs, {r['test_images']} test images: batched "
                      f"{r['batched']['seconds']} s, one by one {r['one_by_one']['seconds']} s, max diff "
                      f"{r['max_abs_diff_points']} points")
            r = dict(r, seconds=round(r['batched']['seconds'] + r['one_by_one']['seconds'], 1))
        else:
            detail = f"1 process, {r['backend']}, result file written: {r['result_written']}"
        lines.append(f"| {part} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']} | {detail} |")
    phases = report['parts']['speed'].get('phases')
    if phases:
        lines += ['', '| phase (speed.py on CUDA) | median s |', '|---|---|']
        lines += [f'| {name} | {seconds} |' for name, seconds in phases.items()]
    return '\n'.join(lines) + '\n'


def main():
    t0 = time.time()
    out = out_dir()
    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    no_cuda = 'no CUDA device on this machine'
    with tempfile.TemporaryDirectory() as scratch:
        data, source = data_path(scratch)
        no_pytest = importlib.util.find_spec('pytest') is None
        parts = {'cuda_tests': {'skipped': no_cuda} if not cuda else
                 {'skipped': 'pytest is not installed'} if no_pytest else cuda_tests(),
                 'speed': speed(out, data) if cuda else {'skipped': no_cuda + ' (CPU numbers: docs/PERFORMANCE.md)'},
                 'batched_vs_loop': batched_vs_loop(data, device),
                 'torchrun': torchrun(out, data, device)}
    report = {'device': device, 'device_name': torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA)',
              'torch': torch.__version__, 'data': source or '/usr/share/datasets/fashion-mnist (loader default)',
              'wall_s': round(time.time() - t0, 1), 'parts': parts,
              'ok': all(p.get('ok', True) for p in parts.values())}
    base.write_json_atomic(os.path.join(out, 'gpu_check.json'), report)
    text = table(report)
    base.write_text_atomic(os.path.join(out, 'gpu_check.md'), text)
    print(text + f"\nwritten {os.path.join(out, 'gpu_check.json')} and gpu_check.md")
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
