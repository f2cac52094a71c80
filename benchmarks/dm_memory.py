"""Peak memory of DM at TinyImageNet scale: ipc 50 (10,000 synthetic 64x64 images), ConvNetD4.

Without the real data, a random uint8 stand-in of the real shapes (100,000 train and 10,000 val images, 200 classes)
is written to a scratch folder; memory depends on shapes, not pixel values.

    python benchmarks/dm_memory.py --class_chunk 0 --Iteration 1
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_DM  # noqa: E402
import base  # noqa: E402


def write_standin(data_path, num_classes=200, train_per_class=500, val_per_class=50):
    g = torch.Generator().manual_seed(0)
    torch.save({
        'classes': [f'class{i}' for i in range(num_classes)],
        'images_train': torch.randint(0, 256, (num_classes * train_per_class, 3, 64, 64), dtype=torch.uint8, generator=g),
        'labels_train': torch.arange(num_classes).repeat_interleave(train_per_class),
        'images_val': torch.randint(0, 256, (num_classes * val_per_class, 3, 64, 64), dtype=torch.uint8, generator=g),
        'labels_val': torch.arange(num_classes).repeat_interleave(val_per_class),
    }, os.path.join(data_path, 'tinyimagenet.pt'))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_path', default=None, help='folder with tinyimagenet.pt (default: a random stand-in)')
    p.add_argument('--class_chunk', type=int, default=0)
    p.add_argument('--Iteration', type=int, default=1)
    p.add_argument('--device', default=None)
    p.add_argument('--out', default='benchmarks/out/dm_memory.json')
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_path = a.data_path
        if data_path is None:
            data_path = scratch
            write_standin(scratch)
        t0 = time.time()
        main_DM.main(['--dataset', 'TinyImageNet', '--model', 'ConvNetD4', '--ipc', '50', '--Iteration', str(a.Iteration),
                      '--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '0', '--data_path', data_path,
                      '--save_path', scratch, '--class_chunk', str(a.class_chunk), '--no_vis', '--checkpoint_every', '0']
                     + (['--device', a.device] if a.device else []))
        report = json.load(open(os.path.join(scratch, 'res_DM_TinyImageNet_ConvNetD4_50ipc.json')))
    result = {'class_chunk': a.class_chunk, 'Iteration': a.Iteration, 'seconds': round(time.time() - t0, 1),
              'peak_memory': report['peak_memory'], 'standin_data': a.data_path is None}
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
    base.write_text_atomic(a.out, json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()
