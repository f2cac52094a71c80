"""Folder datasets (issue 20): --dataset ImageFolder on a torchvision ImageFolder tree and the ImageNet subsets on an
ImageNet-layout tree, both written here as real PNG/JPEG files; the uint8 cache; the bad folders; the scripts."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png, write_file

import data
import folders
from base import UserError
from conftest import make_class_images, workers_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_png(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file(path, encode_png(torch.as_tensor(image)))


def write_jpeg(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file(path, encode_jpeg(torch.as_tensor(image), quality=95))


def write_image_folder(root, classes=('cat', 'ant', 'bee'), train_per_class=6, test_per_class=3, channel=3, size=12,
                       test_name='test'):
    """An ImageFolder tree of lossless PNGs of learnable images; returns {split: (uint8 images, labels)} in the
    loader's order (classes sorted, files sorted within a class)."""
    order = sorted(classes)
    written = {}
    for split, per_class, seed in (('train', train_per_class, 1), (test_name, test_per_class, 2)):
        images, labels = make_class_images(len(classes), per_class, channel, size, seed=seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            write_png(os.path.join(root, split, order[label], f'{i:03d}.png'), image)
        written['train' if split == 'train' else 'test'] = (images, labels)
    return written


def expected_normalised(images_train, images):
    """(x / 255 - mean) / std with mean and std of the training pixels, computed here in float64 and rounded as the
    loader states them."""
    x = images_train.astype(np.float64) / 255
    mean = np.round(x.mean(axis=(0, 2, 3)), 4)
    std = np.round(x.std(axis=(0, 2, 3)), 4)
    out = (images.astype(np.float32) / 255 - mean[None, :, None, None].astype(np.float32)) \
        / std[None, :, None, None].astype(np.float32)
    return out, mean, std


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / 'photos'
    return str(root), write_image_folder(str(root))


def test_image_folder_loads_the_written_pixels_with_the_training_mean_and_std(folder):
    root, written = folder
    d = data.load_dataset('ImageFolder', root, quiet=True)
    assert d.class_names == ['ant', 'bee', 'cat'] and d.num_classes == 3 and d.channel == 3 and d.im_size == (12, 12)
    want, mean, std = expected_normalised(written['train'][0], written['train'][0])
    assert d.mean == pytest.approx(mean.tolist(), abs=1e-9) and d.std == pytest.approx(std.tolist(), abs=1e-9)
    assert torch.allclose(d.images_train, torch.from_numpy(want), atol=1e-5)
    assert torch.equal(d.labels_train, torch.from_numpy(written['train'][1]))
    want_test, _, _ = expected_normalised(written['train'][0], written['test'][0])
    assert torch.allclose(d.images_test, torch.from_numpy(want_test), atol=1e-5)
    assert [idx.tolist() for idx in d.indices_class] == [list(range(6 * c, 6 * c + 6)) for c in range(3)]


def test_the_cache_is_used_and_rebuilt_when_the_files_change(folder, monkeypatch):
    root, written = folder
    first = data.load_dataset('ImageFolder', root, quiet=True)
    cache = os.path.join(root, 'dc_cache_ImageFolder_native_3ch.pt')
    assert os.path.isfile(cache)
    calls = []
    real_decode = folders.decode_files
    monkeypatch.setattr(folders, 'decode_files', lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    again = data.load_dataset('ImageFolder', root, quiet=True)
    assert calls == [] and torch.equal(again.images_train, first.images_train)
    # a new file: rebuilt, and the new image is in it
    write_png(os.path.join(root, 'train', 'bee', 'zzz.png'), written['train'][0][0])
    grown = data.load_dataset('ImageFolder', root, quiet=True)
    assert calls and len(grown.labels_train) == 19 and int(grown.labels_train[-7]) == 1
    # the same names with other contents (another size in bytes): rebuilt again
    calls.clear()
    write_png(os.path.join(root, 'train', 'bee', 'zzz.png'), np.zeros((3, 12, 12), np.uint8))
    data.load_dataset('ImageFolder', root, quiet=True)
    assert calls
    # a truncated cache is rebuilt, not an error
    calls.clear()
    with open(cache, 'wb') as f:
        f.write(b'PK\x03')
    data.load_dataset('ImageFolder', root, quiet=True)
    assert calls and os.path.getsize(cache) > 1000


def test_channels_and_im_size_and_val_folder(tmp_path):
    root = str(tmp_path / 'scans')
    written = write_image_folder(root, classes=('a', 'b'), channel=1, size=10, test_name='val')
    gray = data.load_dataset('ImageFolder', root, channels=1, quiet=True)
    assert gray.images_train.shape == (12, 1, 10, 10) and gray.images_test.shape == (6, 1, 10, 10)
    rgb = data.load_dataset('ImageFolder', root, quiet=True)  # gray files as RGB: three equal planes
    assert rgb.images_train.shape == (12, 3, 10, 10) and rgb.mean[0] == rgb.mean[1] == rgb.mean[2]
    small = data.load_dataset('ImageFolder', root, im_size=(5, 5), channels=1, quiet=True)
    assert small.images_train.shape == (12, 1, 5, 5) and small.im_size == (5, 5)
    assert written['train'][0].shape == (12, 1, 10, 10)


def test_fit_scales_to_cover_then_crops_the_centre():
    img = torch.zeros(1, 8, 16, dtype=torch.uint8)
    img[:, :, 6:10] = 200  # a bright band in the middle columns
    out = folders.fit(img, (8, 8))  # scale 1 covers 8x8: columns 4..11 are kept
    assert out.shape == (1, 8, 8) and torch.equal(out, img[:, :, 4:12])
    half = folders.fit(img, (4, 4)).int()  # scale 1/2 -> 4x8 (the band at columns 3, 4), then columns 2..5
    assert half.shape == (1, 4, 4) and half[0, 0, 1] == half[0, 0, 2] > half[0, 0, 0] == half[0, 0, 3]


@pytest.mark.parametrize('breakage, message', [
    ('one_class', 'at least two classes'),
    ('empty_class', 'holds no image files'),
    ('unreadable', 'cannot decode the image'),
    ('mixed_sizes', 'pass --im_size'),
    ('test_class_unknown', 'the training set lacks'),
    ('no_test', 'no test/ or val/ folder'),
])
def test_bad_folders_fail_in_one_line(tmp_path, breakage, message):
    root = str(tmp_path / 'bad')
    write_image_folder(root, classes=('a', 'b'), train_per_class=2, test_per_class=1, size=8)
    if breakage == 'one_class':
        import shutil
        shutil.rmtree(os.path.join(root, 'train', 'b'))
        shutil.rmtree(os.path.join(root, 'test', 'b'))
    elif breakage == 'empty_class':
        os.makedirs(os.path.join(root, 'train', 'c'))
    elif breakage == 'unreadable':
        with open(os.path.join(root, 'train', 'a', 'broken.png'), 'wb') as f:
            f.write(b'\x89PNG not really')
    elif breakage == 'mixed_sizes':
        write_png(os.path.join(root, 'train', 'a', 'big.png'), np.zeros((3, 9, 8), np.uint8))
    elif breakage == 'test_class_unknown':
        write_png(os.path.join(root, 'test', 'zebra', '0.png'), np.zeros((3, 8, 8), np.uint8))
    elif breakage == 'no_test':
        import shutil
        shutil.rmtree(os.path.join(root, 'test'))
    with pytest.raises(UserError) as err:
        data.load_dataset('ImageFolder', root, quiet=True)
    assert message in str(err.value) and '\n' not in str(err.value)


def test_bad_folder_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    root = str(tmp_path / 'bad')
    write_image_folder(root, classes=('a',), train_per_class=2, test_per_class=1, size=8)
    proc = subprocess.run([sys.executable, 'main_DM.py', '--dataset', 'ImageFolder', '--data_path', root, '--quiet',
                           '--device', 'cpu'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'at least two classes' in proc.stderr
    proc = subprocess.run([sys.executable, 'main.py', '--dataset', 'CIFAR10', '--im_size', '8', '8'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'fixed image shape' in proc.stderr


# ---------------------------------------------------------------------------------------------
# ImageNet subsets
# ---------------------------------------------------------------------------------------------

def write_imagenet(root, wnids, train_per_class=3, val_per_class=2):
    """ImageNet's layout, train/<wnid>/<wnid>_<k>.JPEG and val/<wnid>/..., JPEGs of differing sizes like photos."""
    rng = np.random.default_rng(0)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c, wnid in enumerate(wnids):
            for k in range(n):
                h, w = 30 + 7 * k, 40 - 5 * k
                image = np.full((3, h, w), 20 * c, np.uint8) + rng.integers(0, 30, (3, h, w), dtype=np.uint8)
                write_jpeg(os.path.join(root, split, wnid, f'{wnid}_{k}.JPEG'), image)
    return root


def test_subset_class_lists_are_ten_distinct_imagenet_wnids():
    for name, classes in folders.IMAGENET_SUBSETS.items():
        indices, wnids, names = zip(*classes)
        assert len(set(wnids)) == len(set(indices)) == len(set(names)) == 10, name
        assert all(len(w) == 9 and w[0] == 'n' and w[1:].isdigit() for w in wnids) and max(indices) < 1000
    # ImageNet's wnids sort in class-index order, so the pairs must agree in order across all subsets
    pairs = sorted({(i, w) for classes in folders.IMAGENET_SUBSETS.values() for i, w, _ in classes})
    assert [w for _, w in pairs] == sorted(w for _, w in pairs)
    assert folders.IMAGENET_SUBSETS['ImageNette'][0][:2] == (0, 'n01440764')  # tench, class 0 of ImageNet


def test_imagenette_reads_its_ten_wnids_at_128_from_an_imagenet_folder(tmp_path):
    wnids = [w for _, w, _ in folders.IMAGENET_SUBSETS['ImageNette']]
    root = write_imagenet(str(tmp_path / 'imagenet'), wnids + ['n09999999'])  # one class outside the subset
    d = data.load_dataset('ImageNette', root, quiet=True)
    assert d.num_classes == 10 and d.class_names[0] == 'tench' and d.class_names[-1] == 'parachute'
    assert d.images_train.shape == (30, 3, 128, 128) and d.images_test.shape == (20, 3, 128, 128)
    assert d.labels_train.tolist() == [c for c in range(10) for _ in range(3)]
    # the class order is the published one, not the sorted wnids: class c is the JPEGs of wnids[c] (grey 20 * c)
    raw = d.images_train * torch.tensor(d.std).view(1, 3, 1, 1) + torch.tensor(d.mean).view(1, 3, 1, 1)
    means = raw.mean(dim=(1, 2, 3)).view(10, 3).mean(dim=1) * 255
    assert torch.all(means[1:] > means[:-1])
    small = data.load_dataset('imagenette', root, im_size=(16, 16), quiet=True)
    assert small.images_train.shape == (30, 3, 16, 16)
    os.rename(os.path.join(root, 'val', wnids[3]), os.path.join(root, 'val', 'elsewhere'))
    with pytest.raises(UserError, match=wnids[3]):
        data.load_dataset('ImageNette', root, quiet=True)
    with pytest.raises(UserError, match='n02096294'):  # ImageWoof's classes are not in this folder
        data.load_dataset('ImageWoof', root, quiet=True)


# ---------------------------------------------------------------------------------------------
# The scripts and the original API on a folder dataset
# ---------------------------------------------------------------------------------------------

FAST = ['--num_eval', '1', '--epoch_eval_train', '2', '--batch_real', '4', '--device', 'cpu', '--quiet', '--no_vis',
        '--num_exp', '1']


def test_main_dm_and_main_run_on_an_image_folder_and_report_reads_them(folder, tmp_path):
    import main
    import main_DM
    import tables
    root, _ = folder
    out = str(tmp_path / 'res')
    main_DM.main(['--dataset', 'ImageFolder', '--data_path', root, '--ipc', '2', '--Iteration', '2',
                  '--save_path', out, '--im_size', '8', '8', *FAST])
    main.main(['--dataset', 'ImageFolder', '--data_path', root, '--ipc', '1', '--Iteration', '1', '--method', 'DSA',
               '--save_path', out, '--im_size', '8', '8', '--dsa_strategy', 'color_crop', *FAST])
    main.main(['--dataset', 'ImageFolder', '--data_path', root, '--ipc', '2', '--method', 'herding',
               '--save_path', out, '--im_size', '8', '8', *FAST])
    with open(os.path.join(out, 'res_DM_ImageFolder_ConvNet_2ipc.json')) as f:
        config = json.load(f)['config']
    d = data.load_dataset('ImageFolder', root, im_size=(8, 8), quiet=True)
    assert config['data_mean'] == d.mean and config['data_std'] == d.std and config['data_im_size'] == [8, 8]
    assert config['im_size'] == [8, 8] and config['dataset'] == 'ImageFolder'
    res = torch.load(os.path.join(out, 'res_DM_ImageFolder_ConvNet_2ipc.pt'), weights_only=True)
    assert res['data'][0][0].shape == (6, 3, 8, 8)
    records = tables.load_records([out])
    assert {(r.method, r.dataset) for r in records} >= {('DM', 'ImageFolder'), ('DSA', 'ImageFolder'),
                                                        ('herding', 'ImageFolder')}
    rendered = '\n'.join(tables.render_markdown(t) for t in tables.build_tables('table1', records, False))
    assert 'ImageFolder' in rendered


def test_nas_and_cl_dm_take_a_folder_dataset(folder, tmp_path):
    import CL_DM
    import NAS
    root, _ = folder
    out = str(tmp_path / 'res')
    report = NAS.main(['--dataset', 'ImageFolder', '--data_path', root, '--im_size', '8', '8', '--proxy', 'random',
                       '--ipc', '2', '--epochs', '1', '--depth', '1', '--width', '8', '--act', 'relu', '--norm',
                       'instancenorm', '--pool', 'avgpooling', 'maxpooling', '--save_path', out, '--device', 'cpu',
                       '--quiet'])
    assert report is not None
    summary = CL_DM.main(['--dataset', 'ImageFolder', '--data_path', root, '--im_size', '8', '8', '--method',
                          'random', '--ipc', '2', '--steps', '3', '--num_eval', '1', '--num_orders', '1',
                          '--epoch_eval_train', '1', '--save_path', out, '--device', 'cpu', '--quiet'])
    assert summary is not None
    with pytest.raises(UserError, match='does not divide the 3 classes'):
        CL_DM.check_args(CL_DM.parse_args(['--dataset', 'ImageFolder', '--data_path', root, '--steps', '2']))


def test_torchrun_processes_share_one_cache_and_match_one_process(folder, tmp_path):
    """Two processes start on a folder without a cache: the first builds it, the other waits and reads it; the
    experiments they split are the single-process run's, bit for bit."""
    root, _ = folder
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONPATH=ROOT, PYTHONFAULTHANDLER='1')
    flags = ['--dataset', 'ImageFolder', '--data_path', root, '--ipc', '1', '--Iteration', '2', '--im_size', '8', '8',
             *FAST[:-1], '2']
    runs = {}
    for procs in (2, 1):
        launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'] \
            if procs > 1 else [sys.executable]
        out = str(tmp_path / f'p{procs}')
        proc = subprocess.run(launcher + ['main_DM.py', *flags, '--save_path', out], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, workers_output(proc.stderr)
        runs[procs] = torch.load(os.path.join(out, 'res_DM_ImageFolder_ConvNet_1ipc.pt'), weights_only=True)
        assert os.path.isfile(os.path.join(root, 'dc_cache_ImageFolder_8x8_3ch.pt'))
    assert len(runs[2]['data']) == 2
    for (a, _), (b, _) in zip(runs[2]['data'], runs[1]['data']):
        assert torch.equal(a, b)


def test_original_get_dataset_on_an_image_folder(folder):
    import utils
    root, written = folder
    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = utils.get_dataset(
        dataset='ImageFolder', data_path=root)
    assert (channel, im_size, num_classes, class_names) == (3, (12, 12), 3, ['ant', 'bee', 'cat'])
    assert len(dst_train) == 18 and dst_train[7][1] == 1 and dst_test[0][0].shape == (3, 12, 12)
    assert len(testloader.dataset) == 9


# ---------------------------------------------------------------------------------------------
# Models for 128x128 and 256x256 images
# ---------------------------------------------------------------------------------------------

def convnet_params(channel, num_classes, size, depth, width=128):
    """By hand: per block a 3x3 conv (weights + bias) and an instancenorm (affine: 2 * width), then one Linear on
    width * (size / 2^depth)^2 features."""
    convs = (channel * width * 9 + width) + (depth - 1) * (width * width * 9 + width)
    norms = depth * 2 * width
    feat = width * (size // 2 ** depth) ** 2
    return convs + norms + feat * num_classes + num_classes


def test_convnet_d5_d6_for_large_images():
    from networks import MODEL_NAMES, get_network
    assert convnet_params(3, 10, 128, 5) == 615_690 and convnet_params(3, 10, 256, 6) == 763_530
    assert convnet_params(3, 200, 64, 4) == 857_160  # the formula reproduces SPEC §10's ConvNetD4 on TinyImageNet
    d5 = get_network('ConvNetD5', 3, 10, (128, 128), device='cpu')
    d6 = get_network(model='ConvNetD6', channel=3, num_classes=10, im_size=(256, 256), device='cpu')
    assert sum(p.numel() for p in d5.parameters()) == 615_690
    assert sum(p.numel() for p in d6.parameters()) == 763_530
    assert d5.embed(torch.zeros(2, 3, 128, 128)).shape == (2, 128 * 4 * 4)
    assert d6(torch.zeros(1, 3, 256, 256)).shape == (1, 10)
    assert 'ConvNetD5' not in MODEL_NAMES  # the reference's list stays as it was
    with pytest.raises(ValueError, match='cannot be built'):
        get_network('ConvNetD6', 3, 10, (32, 32), device='cpu')


# ---------------------------------------------------------------------------------------------
# The original API by keyword (SPEC §11)
# ---------------------------------------------------------------------------------------------

def test_every_original_name_by_keyword(folder):
    import utils
    root, _ = folder
    channel, im_size, num_classes, _, _, _, dst_train, dst_test, testloader = utils.get_dataset(
        dataset='ImageFolder', data_path=root)
    assert utils.get_default_convnet_setting() == (128, 3, 'relu', 'instancenorm', 'avgpooling')
    assert utils.get_time().startswith('[')
    assert utils.get_loops(ipc=1) == (1, 1)
    assert utils.get_eval_pool(eval_mode='S', model='ConvNetBN', model_eval='ConvNet') == ['ConvNet']
    net = utils.get_network(model='ConvNet', channel=channel, num_classes=num_classes, im_size=im_size)
    g_syn, g_real = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    args = types.SimpleNamespace(dis_metric='ours', device='cpu')
    assert float(utils.match_loss(gw_syn=[g_syn], gw_real=[g_real], args=args)) == pytest.approx(1.0, abs=1e-5)
    assert float(utils.distance_wb(gwr=g_real, gws=g_syn)) == pytest.approx(1.0, abs=1e-5)
    param = utils.ParamDiffAug()
    x = torch.stack([dst_train[i][0] for i in range(4)])
    assert torch.equal(utils.DiffAugment(x=x, strategy='None', seed=-1, param=param), x)
    dc_aug_param = utils.get_daparam(dataset='ImageFolder', model='ConvNet', model_eval='ConvNet', ipc=1)
    assert torch.equal(utils.augment(images=x, dc_aug_param=dc_aug_param, device='cpu'), x)  # strategy none
    ds = utils.TensorDataset(images=x, labels=torch.tensor([0, 0, 1, 1]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    eargs = types.SimpleNamespace(device='cpu', dsa=False, dc_aug_param=None, lr_net=0.01, epoch_eval_train=1,
                                  batch_train=4, dsa_strategy='None', dsa_param=param)
    loss, acc = utils.epoch(mode='test', dataloader=loader, net=net, optimizer=None,
                            criterion=torch.nn.CrossEntropyLoss(), args=eargs, aug=False)
    assert 0 <= acc <= 1
    _, acc_train, acc_test = utils.evaluate_synset(it_eval=0, net=net, images_train=x,
                                                   labels_train=torch.tensor([0, 0, 1, 1]), testloader=testloader,
                                                   args=eargs)
    assert 0 <= acc_test <= 1


def test_suggested_commands_carry_the_folder_shape():
    import CL_DM
    import NAS
    shape = ['--dataset', 'ImageFolder', '--data_path', 'imgs', '--im_size', '8', '6', '--channels', '1']
    cl = CL_DM.parse_args(shape + ['--method', 'herding'])
    assert '--im_size 8 6 --channels 1' in CL_DM.build_command(cl)
    nas = NAS.parse_args(shape + ['--ground_truth'])
    nas.space = {'depth': [3]}
    assert '--im_size 8 6 --channels 1' in NAS.fill_command(nas)
    plain = NAS.parse_args(['--dataset', 'FashionMNIST', '--ground_truth'])
    plain.space = {'depth': [3]}
    assert '--im_size' not in NAS.fill_command(plain) and '--channels' not in NAS.fill_command(plain)
