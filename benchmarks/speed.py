"""Phase-by-phase speed benchmark of the condensation scripts (issue 7): median time and peak memory per phase.

    python benchmarks/speed.py --device cpu --quick          # a few minutes on 2 CPU cores
    python benchmarks/speed.py --device cpu --repeats 3      # the full phases (about half an hour on 2 CPU cores)
    python benchmarks/speed.py --device cuda --repeats 5

Phases (ConvNet, FashionMNIST; random data of the same shapes when FashionMNIST is not found):
data preparation (load + normalise + organise by class); one DC iteration at ipc 1; one outer step of DC at ipc 10
with its 50 inner epochs; one DSA iteration at ipc 1; one DM iteration at ipc 1, 10, 50; training one ConvNet on a
10-image set for 300 epochs (DSA augmentation, as when evaluating DSA/DM sets); one test pass over the 10,000 test
images; evaluating 20 networks one by one and together (torch.func). Gradient matching and evaluation are timed on
both paths ("loop": one class / one network at a time; "batched": torch.func over classes / networks), and the
opt-in flags (--channels_last, --bf16, --compile) on the training and test phases. --quick shortens the evaluation
phases (fewer epochs, a test subset), runs the long phases once, and skips the batched DC ipc-10 and DM ipc-50 rows.
A calibration (ConvNet forward+backward of 256 images, 0.65 s on the reference machine) scales the reference timings
of the issue to this machine in the summary.

Time: wall clock (CUDA synchronised), median over --repeats runs after one warm-up of the libraries. Peak memory:
on CUDA torch.cuda.max_memory_allocated above the phase's start; on the CPU the kernel's peak resident set size
(VmHWM, reset through /proc/self/clear_refs) above the phase's start, or, where that reset is not allowed, the largest
resident size seen by a 5 ms sampler (psutil when installed, else /proc/self/status). Prints a table and writes JSON.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main as main_dc  # noqa: E402
import networks  # noqa: E402
import base  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from data import DATASETS, DatasetTensors, FASHION_MNIST_CLASSES, class_indices, load_dataset, normalize_uint8  # noqa: E402
from augment import ParamDiffAug  # noqa: E402
from networks import get_network  # noqa: E402

DSA = 'color_crop_cutout_flip_scale_rotate'

# Medians of the reference implementation on 2 CPU cores (FashionMNIST, ConvNet), from issue 7, in seconds.
REFERENCE_CPU_S = {
    'data_prep': (5.4, 6.6),
    'dc_ipc1': 7.0,
    'dsa_ipc1': 7.5,
    'dm_ipc1': 1.7,
    'test_pass': 13.0,
    'train_10img_epoch': 0.023,  # DSA evaluation training, per epoch on 10 images
}

# -----------------------------------------------------------------------------
# measuring


def _proc_status_kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return None


def _reset_peak_rss():
    """Reset the kernel's peak-RSS counter (VmHWM); False where /proc does not allow it."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _rss_bytes():
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        kb = _proc_status_kb('VmRSS')
        return None if kb is None else kb * 1024


class PeakMemory:
    """Peak memory above the start of a `with` block: CUDA allocator peak, or CPU peak RSS (see the module doc)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'
        self.peak = None
        self.method = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            self.method = 'cuda max_memory_allocated'
            return self
        self.start = _rss_bytes() or 0
        self.hwm = _reset_peak_rss() and _proc_status_kb('VmHWM') is not None
        self.method = 'VmHWM (clear_refs)' if self.hwm else 'RSS sampler'
        self.sampled = self.start
        if not self.hwm:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.sampled = max(self.sampled, _rss_bytes() or 0)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        elif self.hwm:
            self.peak = _proc_status_kb('VmHWM') * 1024 - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.sampled, _rss_bytes() or 0) - self.start
        self.peak = max(0, self.peak)
        return False


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def measure(name, run, device, repeats, setup=None, per=None, note=''):
    """Median seconds and largest peak memory of `repeats` calls of run(setup()); setup is not timed."""
    repeats = max(1, repeats)
    times, peaks, method = [], [], None
    for _ in range(repeats):
        state = setup() if setup else None
        sync(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            run(state)
            sync(device)
            times.append(time.perf_counter() - t0)
        peaks.append(mem.peak)
        method = mem.method
    row = {'phase': name, 'median_s': statistics.median(times), 'runs_s': [round(t, 4) for t in times],
           'peak_mb': round(max(peaks) / 2**20, 1), 'memory_method': method, 'note': note}
    if per:
        row['per'] = {'unit': per[0], 'median_s': statistics.median(times) / per[1]}
    print(f"  {name:<34} {row['median_s']:9.3f} s  {row['peak_mb']:9.1f} MB  {note}", flush=True)
    return row

# -----------------------------------------------------------------------------
# data


def random_fashion_like(seed=0):
    """uint8 data of FashionMNIST's shapes, 10 balanced classes, through the same preparation as the real files."""
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for split, n in (('train', 60000), ('test', 10000)):
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
        labels = torch.arange(10).repeat_interleave(n // 10)[torch.randperm(n, generator=g)]
        splits[split] = (images, labels)
    return splits


def prepare_random(splits):
    info = DATASETS['FashionMNIST']
    tensors = {s: (normalize_uint8(x, info['mean'], info['std']), y) for s, (x, y) in splits.items()}
    return DatasetTensors(
        name='FashionMNIST', channel=1, im_size=(28, 28), num_classes=10, class_names=list(FASHION_MNIST_CLASSES),
        mean=list(info['mean']), std=list(info['std']),
        images_train=tensors['train'][0], labels_train=tensors['train'][1],
        images_test=tensors['test'][0], labels_test=tensors['test'][1],
        indices_class=class_indices(tensors['train'][1], 10))


def load_data(data_path, device):
    """(prepare function, whether it is the real data); the function loads and organises the set on the device."""
    try:
        load_dataset('FashionMNIST', data_path, download=False)
    except base.UserError as e:
        print(f'FashionMNIST not found ({e}); using random data of the same shapes', file=sys.stderr)
        splits = random_fashion_like()
        return (lambda: prepare_random(splits).to(device)), False
    return (lambda: load_dataset('FashionMNIST', data_path, download=False).to(device)), True

# -----------------------------------------------------------------------------
# phases


def condense_args(method, device, batched_classes, dsa=None):
    return argparse.Namespace(method=method, model='ConvNet', dsa_strategy=dsa or 'None', dsa_param=ParamDiffAug(),
                              lr_net=0.01, batch_real=256, batch_train=256, dis_metric='ours',
                              batched_classes=batched_classes, device=device)


def synthetic_set(data, ipc, device, lr):
    base.set_seed(0)
    image_syn, label_syn = utils.init_synthetic_set(data, ipc, 'real', device, (0, 0))
    return image_syn, label_syn, torch.optim.SGD([image_syn], lr=lr, momentum=0.5)


def dc_outer_step(data, args, image_syn, label_syn, optimizer_img, inner_loop):
    """One outer step of gradient matching on a fresh network (the loss over all classes and one update of the
    synthetic set) followed by its inner_loop epochs of network training, as in utils.dc_iteration."""
    classes = list(range(data.num_classes))
    dsa = utils.condense_dsa(args)
    net = utils.fresh_network(args, data, image_syn.device, (0, 0, 0))
    net.train()
    utils.matching_step(net, image_syn, optimizer_img, data, args, classes, dsa, (0, 0, 0, 0))
    optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
    utils.train_on_synthetic(net, optimizer_net, image_syn, label_syn, args, dsa, inner_loop, (0, 0, 0, 0))


def ten_images(data):
    idx = torch.stack([i[0] for i in data.indices_class])
    return data.images_train[idx], data.labels_train[idx]


def eval_args(device, epochs, batched, **flags):
    return argparse.Namespace(method='DSA', dsa_strategy=DSA, dsa_param=ParamDiffAug(), epoch_eval_train=epochs,
                              default_epoch_eval=1000, lr_net=0.01, batch_train=256, device=device, quiet=True,
                              eval_batched=batched, **flags)


def train_network(data, device, images, labels, epochs, **flags):
    net, rand = training.evaluation_network('ConvNet', data, device, (0, 0, 0, 'ConvNet', 0))
    empty = data.images_test[:0], data.labels_test[:0]  # training only
    training.train_and_test(net, images, labels, *empty, epochs, 0.01, 256, DSA, None, ParamDiffAug(), rand=rand, **flags)


@contextlib.contextmanager
def stock_ops():
    """How the code ran before the CPU fast paths: PyTorch's avg_pool2d kernel and whole batches (no cache-sized
    chunks). Used for the [stock] rows and for the calibration."""
    saved = training.CPU_CHUNK_FLOATS, networks.avg_pool_2x2
    training.CPU_CHUNK_FLOATS = 2**62
    networks.avg_pool_2x2 = lambda x: torch.nn.functional.avg_pool2d(x, kernel_size=2, stride=2)
    try:
        yield
    finally:
        training.CPU_CHUNK_FLOATS, networks.avg_pool_2x2 = saved


def calibrate(device, repeats=5):
    """Seconds of one ConvNet forward+backward on 256 FashionMNIST-sized images with stock PyTorch ops (the
    operation the issue times: about 0.65 s on its reference machine), so (this / 0.65) scales the reference's CPU
    timings to this machine. Median of the runs, like the phases and the reference's timings."""
    torch.manual_seed(0)
    net = get_network('ConvNet', 1, 10, (28, 28), device=device)
    x = torch.randn(256, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    times = []
    with stock_ops():
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def warm_up(data, device):
    """First calls pay one-off costs (oneDNN primitives, CUDA context and kernels): keep them out of the phases."""
    images, labels = ten_images(data)
    train_network(data, device, images, labels, 2)
    net = get_network('ConvNet', data.channel, data.num_classes, data.im_size, device=device)
    training.test_accuracy(net, data.images_test[:512], data.labels_test[:512])


def run_phases(a):
    device = a.device
    rows = []
    prepare, real = load_data(a.data_path, device)
    print(f'device {device}, {torch.get_num_threads()} threads, {"real" if real else "random"} FashionMNIST, '
          f'{"quick" if a.quick else "full"} run, {a.repeats} repeat(s)', flush=True)
    data = prepare()
    warm_up(data, device)
    calibration = calibrate(device)
    print(f'calibration: ConvNet forward+backward of 256 images {calibration:.3f} s (reference machine: 0.65 s)')
    classes = list(range(data.num_classes))
    heavy = 1 if a.quick else a.repeats  # the long phases run once in a quick run

    rows.append(measure('data_prep', lambda _: prepare(), device, a.repeats,
                        note='load + normalise + organise by class' + ('' if real else ' (random data)')))

    for variant in ('0', '1'):
        tag = 'loop' if variant == '0' else 'batched'
        args = condense_args('DC', device, variant)
        rows.append(measure(f'dc_ipc1 [{tag}]', lambda s: utils.dc_iteration(*s, data, args, classes, 1, 1, (0, 0, 0)), device,
                            heavy, setup=lambda: synthetic_set(data, 1, device, 0.1),
                            note='one DC iteration: outer 1, inner 1, batch_real 256'))
        args_dsa = condense_args('DSA', device, variant, DSA)
        rows.append(measure(f'dsa_ipc1 [{tag}]', lambda s: utils.dc_iteration(*s, data, args_dsa, classes, 1, 1, (0, 0, 0)),
                            device, heavy, setup=lambda: synthetic_set(data, 1, device, 0.1),
                            note='one DSA iteration: outer 1, inner 1'))
        if tag == 'loop':
            with stock_ops():
                rows.append(measure('dsa_ipc1 [stock]', lambda s: utils.dc_iteration(*s, data, args_dsa, classes, 1, 1, (0, 0, 0)),
                                    device, heavy, setup=lambda: synthetic_set(data, 1, device, 0.1),
                                    note='the same, PyTorch avg_pool2d and whole batches (no CPU fast paths)'))
        if tag == 'batched' and a.quick:
            continue
        rows.append(measure(f'dc_ipc10_outer_step [{tag}]', lambda s: dc_outer_step(data, args, *s, 50), device,
                            heavy, setup=lambda: synthetic_set(data, 10, device, 0.1),
                            note='one of the 10 outer steps of a DC ipc-10 iteration + its 50 inner epochs'))

    dm_args = condense_args('DM', device, 'auto', DSA)
    for ipc in (1, 10, 50):
        if ipc == 50 and a.quick:
            continue
        rows.append(measure(f'dm_ipc{ipc}', lambda s: utils.dm_iteration(*s, data, dm_args, classes, (0, 0, 0)), device,
                            a.repeats, setup=lambda ipc=ipc: synthetic_set(data, ipc, device, 1.0),
                            note='one DM iteration, all classes in one forward'))
    with stock_ops():
        rows.append(measure('dm_ipc1 [stock]', lambda s: utils.dm_iteration(*s, data, dm_args, classes, (0, 0, 0)), device,
                            a.repeats, setup=lambda: synthetic_set(data, 1, device, 1.0),
                            note='the same, PyTorch avg_pool2d and whole batches'))

    images, labels = ten_images(data)
    epochs = 30 if a.quick else 300
    flag_sets = [('', {}, False), (' [stock]', {}, True), (' --channels_last', {'channels_last': True}, False),
                 (' --bf16', {'bf16': True}, False)]
    for name, flags, stock in flag_sets:
        with stock_ops() if stock else contextlib.nullcontext():
            rows.append(measure(f'train_10img{name}',
                                lambda _: train_network(data, device, images, labels, epochs, **flags), device,
                                a.repeats, per=('epoch', epochs + 1),
                                note=f'{epochs + 1} epochs, DSA augmentation, one ConvNet'))

    net = get_network('ConvNet', data.channel, data.num_classes, data.im_size, device=device)
    # [stock]: batches of 1024 through PyTorch's avg_pool2d
    for name, flags, stock in [('', {}, False), (' [stock]', {}, True), (' --channels_last', {'channels_last': True},
                                                                         False), (' --bf16', {'bf16': True}, False)]:
        if flags.get('channels_last'):
            net = net.to(memory_format=torch.channels_last)
        with stock_ops() if stock else contextlib.nullcontext():
            rows.append(measure(f'test_pass{name}', lambda _: training.test_accuracy(net, data.images_test,
                                                                                data.labels_test, **flags),
                                device, a.repeats, note=f'{len(data.labels_test)} test images'))
        net = net.to(memory_format=torch.contiguous_format)

    if not a.skip_compile:
        rows += compile_rows(data, device, images, labels, epochs)
    if a.e2e:
        if real:
            rows += end_to_end_rows(a, a.e2e == 'both')
        else:
            print('end to end: skipped, it needs the real FashionMNIST', flush=True)

    eval_epochs = 10 if a.quick else 300
    eval_data = dataclasses.replace(data, images_test=data.images_test[:1000], labels_test=data.labels_test[:1000]) \
        if a.quick else data
    for variant in ('0', '1'):
        tag = 'one by one' if variant == '0' else 'together (batched)'
        args = eval_args(device, eval_epochs, variant)
        rows.append(measure(f'eval_20nets [{tag}]',
                            lambda _: training.evaluate_models(images, labels, eval_data, args, 'ConvNet', range(20), (0, 0, 0)), device,
                            heavy, setup=lambda: base.set_seed(0), per=('network', 20),
                            note=f'{eval_epochs + 1} epochs + test pass on {len(eval_data.labels_test)} images each'))
    return rows, real, calibration


E2E_ARGV = ['--dataset', 'FashionMNIST', '--method', 'DSA', '--init', 'real', '--ipc', '1', '--Iteration', '20',
            '--num_exp', '1', '--num_eval', '5']


def end_to_end_rows(a, stock):
    """The issue's end-to-end command (E2E_ARGV), run in this process on the real FashionMNIST: wall time and the
    final accuracy; with stock=True also with stock_ops, for the equal-accuracy comparison."""
    rows = []
    for tag in ('', ' [stock]') if stock else ('',):
        calibration = calibrate(a.device)  # this machine's speed just before the run (shared machines drift)
        with tempfile.TemporaryDirectory() as out, stock_ops() if tag else contextlib.nullcontext():
            argv = E2E_ARGV + ['--data_path', a.data_path, '--save_path', out, '--device', a.device, '--quiet',
                               '--no_vis']
            row = measure(f'end_to_end{tag}', lambda _: main_dc.main(argv), a.device, 1,
                          note='main.py ' + ' '.join(E2E_ARGV))
            with open(os.path.join(out, 'res_DSA_FashionMNIST_ConvNet_1ipc.json')) as f:
                row['results'] = json.load(f)['results']
            row['calibration_s'] = round(calibration, 4)
            print(f"    accuracy {row['results']}", flush=True)
        rows.append(row)
    return rows


def compile_rows(data, device, images, labels, epochs):
    """--compile: first network (compiles), second network (reuses the compiled code), and a compiled test pass."""
    rows = []
    training.COMPILE_ERROR = None
    for which in ('first network, compiles', 'next network'):
        rows.append(measure('train_10img --compile', lambda _: train_network(data, device, images, labels, epochs,
                                                                             compile=True),
                            device, 1, per=('epoch', epochs + 1), note=f'{epochs + 1} epochs; {which}'))
    net = training.SoftCompiled(get_network('ConvNet', data.channel, data.num_classes, data.im_size, device=device))
    training.test_accuracy(net, data.images_test[:1024], data.labels_test[:1024])  # compile the inference graph
    rows.append(measure('test_pass --compile', lambda _: training.test_accuracy(net, data.images_test, data.labels_test),
                        device, 1, note='after compiling'))
    if training.COMPILE_ERROR:
        for row in rows[-3:]:
            row['note'] += f' (compile failed, ran eagerly: {training.COMPILE_ERROR})'
    return rows


def summary(rows, machine_factor):
    """Ratios against the reference (CPU) and between the loop and batched paths; an end-to-end estimate.
    'calibrated' ratios scale the reference timings by machine_factor (this machine's speed relative to the
    reference machine's, from the forward+backward calibration)."""
    by = {r['phase']: r for r in rows}
    out = {}
    ref_prep = sum(REFERENCE_CPU_S['data_prep']) / 2
    pairs = [('data_prep', 'data_prep', ref_prep), ('dc_ipc1 [loop]', 'dc_ipc1', None),
             ('dsa_ipc1 [loop]', 'dsa_ipc1', None), ('dm_ipc1', 'dm_ipc1', None), ('test_pass', 'test_pass', None)]
    for phase, key, ref in pairs:
        if phase in by:
            ref = ref or REFERENCE_CPU_S[key]
            out[f'speedup_vs_reference_cpu {phase}'] = round(ref / by[phase]['median_s'], 2)
            out[f'speedup_vs_reference_cpu_calibrated {phase}'] = round(ref * machine_factor / by[phase]['median_s'], 2)
    if 'train_10img' in by:
        ref = REFERENCE_CPU_S['train_10img_epoch']
        out['speedup_vs_reference_cpu train_10img per epoch'] = round(ref / by['train_10img']['per']['median_s'], 2)
        out['speedup_vs_reference_cpu_calibrated train_10img per epoch'] = round(
            ref * machine_factor / by['train_10img']['per']['median_s'], 2)
    for phase in ('dc_ipc1', 'dsa_ipc1', 'dc_ipc10_outer_step'):
        if f'{phase} [loop]' in by and f'{phase} [batched]' in by:
            out[f'batched_speedup {phase}'] = round(by[f'{phase} [loop]']['median_s'] /
                                                    by[f'{phase} [batched]']['median_s'], 2)
    one, together = by.get('eval_20nets [one by one]'), by.get('eval_20nets [together (batched)]')
    if one and together:
        out['batched_speedup eval_20nets'] = round(one['median_s'] / together['median_s'], 2)
    # main.py --dataset FashionMNIST --method DSA --init real --ipc 1 --Iteration 20 --num_exp 1 --num_eval 5:
    # 20 DSA iterations + evaluations at iterations 0 and 20, each 5 networks x (1001 epochs + a test pass)
    reference_e2e = 20 * REFERENCE_CPU_S['dsa_ipc1'] + 2 * 5 * (1001 * REFERENCE_CPU_S['train_10img_epoch'] +
                                                               REFERENCE_CPU_S['test_pass'])
    if all(k in by for k in ('dsa_ipc1 [loop]', 'train_10img', 'test_pass')):
        out['e2e_estimate_s reference cpu'] = round(reference_e2e, 1)
        for tag, dsa, train, test in (('one-by-one paths', 'dsa_ipc1 [loop]', 'train_10img', 'test_pass'),
                                      ('stock ops', 'dsa_ipc1 [stock]', 'train_10img [stock]', 'test_pass [stock]')):
            if all(k in by for k in (dsa, train, test)):
                estimate = 20 * by[dsa]['median_s'] + 2 * 5 * (1001 * by[train]['per']['median_s'] +
                                                               by[test]['median_s'])
                out[f'e2e_estimate_s {tag}'] = round(estimate, 1)
                out[f'e2e_estimate_speedup_vs_reference_cpu_calibrated {tag}'] = round(
                    reference_e2e * machine_factor / estimate, 2)
        evaluation = 2 * 5 * (1001 * by['train_10img']['per']['median_s'] + by['test_pass']['median_s'])
        if 'dsa_ipc1 [batched]' in by and one and together:
            # the evaluation part sped up by the measured eval_20nets ratio (approximate: 5, not 20, networks)
            out['e2e_estimate_s batched paths (approx.)'] = round(
                20 * by['dsa_ipc1 [batched]']['median_s'] + evaluation * together['median_s'] / one['median_s'], 1)
    for tag in ('', ' [stock]'):
        if f'end_to_end{tag}' in by:
            row = by[f'end_to_end{tag}']
            factor = row['calibration_s'] / 0.65  # calibrated just before this run
            out[f'e2e_measured_s{tag}'] = round(row['median_s'], 1)
            out[f'e2e_measured_speedup_vs_reference_cpu{tag}'] = round(reference_e2e / row['median_s'], 2)
            out[f'e2e_measured_speedup_vs_reference_cpu_calibrated{tag}'] = round(
                reference_e2e * factor / row['median_s'], 2)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', help='cpu or cuda')
    p.add_argument('--repeats', type=int, default=3, help='runs per phase (median); --quick runs the long phases once')
    p.add_argument('--quick', action='store_true', help='short evaluation phases, fewer rows: a few minutes on CPU')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--skip_compile', action='store_true', help='leave out the --compile rows')
    p.add_argument('--e2e', choices=('ours', 'both'), default=None,
                   help='also time the issue\'s end-to-end main.py command (about 6 minutes on 2 CPU cores); both: '
                        'also with stock PyTorch ops, to compare accuracy and time')
    p.add_argument('--data_path', default='data', help='FashionMNIST folder (the Debian copy is found automatically)')
    p.add_argument('--out', default=None, help='JSON path (default benchmarks/out/speed_<device>[_quick].json)')
    a = p.parse_args()
    a.device = base.get_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    device_type = torch.device(a.device).type
    a.out = a.out or os.path.join('benchmarks', 'out', f'speed_{device_type}{"_quick" if a.quick else ""}.json')
    t0 = time.time()
    rows, real, calibration = run_phases(a)
    result = {
        'device': a.device, 'device_name': torch.cuda.get_device_name(a.device) if device_type == 'cuda'
        else platform.processor() or platform.machine(), 'threads': torch.get_num_threads(),
        'cpu_count': os.cpu_count(), 'load_average_at_end': os.getloadavg(), 'torch': torch.__version__,
        'quick': a.quick, 'repeats': a.repeats, 'real_data': real, 'wall_s': round(time.time() - t0, 1),
        'calibration_fwd_bwd_256_s': round(calibration, 4), 'machine_factor': round(calibration / 0.65, 3),
        'phases': rows, 'summary': summary(rows, calibration / 0.65), 'reference_cpu_s': REFERENCE_CPU_S}
    print('\nsummary:')
    for k, v in result['summary'].items():
        print(f'  {k:<50} {v}')
    os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
    base.write_text_atomic(a.out, json.dumps(result, indent=2) + '\n')
    print(f'written {a.out} ({result["wall_s"]} s)')


if __name__ == '__main__':
    main()
