"""Scaling table for torchrun (issue 11): the same command as 1 process with all threads and as N processes with
threads divided, for the experiments split and the classes split.

    python benchmarks/scaling.py                       # this machine: 1 x 2 threads vs 2 x 1 thread (CPU, gloo)
    python benchmarks/scaling.py --procs 8 --device cuda --iterations 100    # a GPU node (NCCL)

Prints a markdown table and writes benchmarks/out/scaling_<device>.json. Real FashionMNIST when it is installed
(Debian package dataset-fashion-mnist), else tiny random data in the MNIST format."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))


def run(procs, threads, args, save_path, device):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(procs)]
    cmd = (launcher if procs > 1 else [sys.executable]) + ['main.py', *args, '--save_path', save_path]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f'error: {" ".join(cmd)} failed:\n{proc.stderr[-2000:]}')
    return time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--procs', type=int, default=2)
    p.add_argument('--threads', type=int, default=os.cpu_count() or 2, help='threads of the single process')
    p.add_argument('--device', default='cpu')
    p.add_argument('--iterations', type=int, default=10)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix='scaling_')
    if os.path.isdir('/usr/share/datasets/fashion-mnist'):
        dataset, data_path = 'FashionMNIST', os.path.join(work, 'data')
    else:
        from conftest import write_mnist
        dataset, data_path = 'MNIST', write_mnist(os.path.join(work, 'data'), train_per_class=300, test_per_class=100)
    common = ['--dataset', dataset, '--data_path', data_path, '--method', 'DC', '--ipc', '1', '--Iteration',
              str(a.iterations), '--batch_real', '64', '--num_eval', str(a.procs), '--epoch_eval_train', '50',
              '--device', a.device, '--quiet', '--no_vis', '--eval_mode', 'SS']
    rows = []
    for split, num_exp, extra in (('experiments', a.procs, []), ('classes', 1, ['--dist_classes'])):
        args = common + ['--num_exp', str(num_exp)]
        one = run(1, a.threads, args, os.path.join(work, f'{split}_1'), a.device)
        many = run(a.procs, max(1, a.threads // a.procs), args + extra, os.path.join(work, f'{split}_n'), a.device)
        rows.append({'split': split, 'num_exp': num_exp, 'single_s': round(one, 1), 'distributed_s': round(many, 1),
                     'speedup': round(one / many, 2)})
    print(f'| split | experiments | 1 process x {a.threads} threads | {a.procs} processes x '
          f'{max(1, a.threads // a.procs)} threads | speed-up |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['split']} | {r['num_exp']} | {r['single_s']} s | {r['distributed_s']} s | {r['speedup']}x |")
    os.makedirs(os.path.join(ROOT, 'benchmarks', 'out'), exist_ok=True)
    with open(os.path.join(ROOT, 'benchmarks', 'out', f'scaling_{a.device}.json'), 'w') as f:
        json.dump({'command': common, 'dataset': dataset, 'procs': a.procs, 'threads': a.threads, 'rows': rows}, f,
                  indent=2)


if __name__ == '__main__':
    main()
