import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from augment import (DSA_OPS, AugRandom, DiffAugment, ParamDiffAug, apply_op, augment_dc, brightness, contrast,
                     crop, cutout, flip, parse_strategy, rotate, sample_params, saturation, scale)

GROUPS = list(DSA_OPS)
FULL = 'color_crop_cutout_flip_scale_rotate'


def images(n, c=3, h=32, w=32, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def expected_siamese(x, groups, seed, param):
    """Replays the draws of DiffAugment with public pieces: choice (mode S), then each primitive in order."""
    rng = AugRandom(x.shape[0], x.device, x.dtype, seed=seed)
    if param.aug_mode == 'S':
        groups = [groups[rng.choice(len(groups))]]
    for g in groups:
        for prim in DSA_OPS[g]:
            x = apply_op(prim, x, sample_params(prim, rng, x.shape, param))
    return x


# ----------------------------------------------------------------------------- strategy parsing


def test_parse_strategy():
    for empty in ('', 'none', 'None', None):
        assert parse_strategy(empty) == []
    assert parse_strategy(FULL) == ['color', 'crop', 'cutout', 'flip', 'scale', 'rotate']
    with pytest.raises(ValueError, match='blur') as err:
        parse_strategy('color_blur')
    assert 'rotate' in str(err.value) and 'cutout' in str(err.value)
    with pytest.raises(ValueError, match='blur'):
        DiffAugment(images(2), 'crop_blur', seed=0)


def test_empty_strategy_is_identity():
    x = images(2)
    for s in ('', 'none', 'None', None):
        assert DiffAugment(x, s, seed=1) is x
        assert DiffAugment(x, s) is x


def test_bad_aug_mode():
    with pytest.raises(ValueError, match='aug_mode'):
        DiffAugment(images(2), 'crop_flip', param=ParamDiffAug(aug_mode='X'), seed=0)


# ----------------------------------------------------------------------------- Siamese behaviour


@pytest.mark.parametrize('strategy,mode', [(g, 'S') for g in GROUPS] + [(FULL, 'S'), (FULL, 'M')])
def test_siamese_same_transform_any_batch_size(strategy, mode):
    param = ParamDiffAug(aug_mode=mode)
    img = images(1, seed=1)
    big = torch.cat([images(7, seed=2), img, images(4, seed=3)])  # like a real batch
    small = torch.cat([img, images(2, seed=4)])  # like a synthetic batch
    for seed in range(4):
        out_big = DiffAugment(big, strategy, param=param, seed=seed)
        out_small = DiffAugment(small, strategy, param=param, seed=seed)
        assert out_big.shape == big.shape and out_small.shape == small.shape
        torch.testing.assert_close(out_big[7], out_small[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize('strategy,mode', [(g, 'S') for g in GROUPS] + [(FULL, 'S'), (FULL, 'M')])
def test_siamese_shared_by_every_image(strategy, mode):
    # the same image repeated gets the same output everywhere in the batch
    x = images(1).repeat(5, 1, 1, 1)
    out = DiffAugment(x, strategy, param=ParamDiffAug(aug_mode=mode), seed=3)
    torch.testing.assert_close(out, out[:1].expand_as(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize('strategy', GROUPS + [FULL])
def test_different_seeds_give_different_transforms(strategy):
    x = images(3)
    outs = [DiffAugment(x, strategy, seed=s) for s in range(8)]
    distinct = sum(not torch.equal(outs[0], o) for o in outs[1:])
    assert distinct >= 1 if strategy == 'flip' else distinct >= 6


def test_same_seed_reproducible():
    x = images(4)
    assert torch.equal(DiffAugment(x, FULL, seed=11), DiffAugment(x, FULL, seed=11))


@pytest.mark.parametrize('mode', ['S', 'M'])
def test_siamese_matches_replayed_draws(mode):
    param = ParamDiffAug(aug_mode=mode)
    x = images(3)
    picked = set()
    for seed in range(12):
        torch.testing.assert_close(DiffAugment(x, FULL, param=param, seed=seed),
                                   expected_siamese(x, FULL.split('_'), seed, param), rtol=0, atol=0)
        picked.add(AugRandom(1, 'cpu', seed=seed).choice(6))
    assert len(picked) >= 3  # mode S really picks different groups across seeds


def test_mode_S_applies_exactly_one_group():
    x = images(2)
    for seed in range(6):
        out = DiffAugment(x, 'flip_rotate', param=ParamDiffAug(aug_mode='S'), seed=seed)
        rng = AugRandom(2, 'cpu', seed=seed)
        group = ['flip', 'rotate'][rng.choice(2)]
        (prim,) = DSA_OPS[group]
        torch.testing.assert_close(out, apply_op(prim, x, sample_params(prim, rng, x.shape)), rtol=0, atol=0)


@pytest.mark.parametrize('strategy', GROUPS + [FULL])
def test_siamese_leaves_global_rng_untouched(strategy):
    x = images(2)
    state = torch.get_rng_state()
    DiffAugment(x, strategy, seed=5)
    DiffAugment(x, strategy, param=ParamDiffAug(aug_mode='M'), seed=6)
    assert torch.equal(state, torch.get_rng_state())


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize('strategy,mode', [(g, 'S') for g in GROUPS] + [(FULL, 'M')])
@pytest.mark.parametrize('siamese', [True, False])
def test_gradients_flow_to_input(strategy, mode, siamese):
    x = images(4).requires_grad_(True)
    kwargs = dict(seed=2) if siamese else dict(generator=gen(2))
    out = DiffAugment(x, strategy, param=ParamDiffAug(aug_mode=mode), **kwargs)
    weights = images(4, seed=9)
    (out * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.abs().flatten(1).sum(1) > 0).all()  # every image receives gradient


# ----------------------------------------------------------------------------- independent (per-image) mode


@pytest.mark.parametrize('strategy', ['color', 'scale', 'rotate', 'crop', 'cutout'])
def test_independent_mode_differs_per_image(strategy):
    x = images(1).repeat(16, 1, 1, 1)
    out = DiffAugment(x, strategy, generator=gen(0))
    distinct = {tuple(o.flatten()[::7].tolist()) for o in out}
    # continuous parameters: all distinct; integer ones (crop 81 shifts, cutout positions): most distinct
    assert len(distinct) == 16 if strategy in ('color', 'scale', 'rotate') else len(distinct) >= 10


def test_independent_mode_generator_and_global_rng():
    x = images(6)
    a = DiffAugment(x, FULL, param=ParamDiffAug(aug_mode='M'), generator=gen(4))
    b = DiffAugment(x, FULL, param=ParamDiffAug(aug_mode='M'), generator=gen(4))
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    DiffAugment(x, FULL, generator=gen(4))
    assert torch.equal(state, torch.get_rng_state())  # a given generator replaces the global RNG
    torch.manual_seed(123)
    c = DiffAugment(x, FULL, param=ParamDiffAug(aug_mode='M'))
    torch.manual_seed(123)
    d = DiffAugment(x, FULL, param=ParamDiffAug(aug_mode='M'))
    assert torch.equal(c, d) and not torch.equal(c, a)


# ----------------------------------------------------------------------------- op semantics


def test_flip_is_an_exact_mirror():
    x = images(4)
    mask = torch.tensor([True, False, True, False])
    out = flip(x, mask)
    assert torch.equal(out[mask], x[mask].flip(3)) and torch.equal(out[~mask], x[~mask])
    seen = set()
    for seed in range(10):
        y = DiffAugment(x, 'flip', seed=seed)
        flipped = torch.equal(y, x.flip(3))
        assert flipped or torch.equal(y, x)
        seen.add(flipped)
    assert seen == {True, False}
    y = DiffAugment(x[:1].repeat(400, 1, 1, 1), 'flip', generator=gen(1))
    is_flipped = (y == x[:1].flip(3)).flatten(1).all(1)
    assert ((y == x[:1]).flatten(1).all(1) | is_flipped).all()
    assert 0.4 < is_flipped.float().mean() < 0.6


@pytest.mark.parametrize('size', [32, 28])
def test_crop_shifts_within_ratio(size):
    x = torch.zeros(500, 1, size, size)
    x[:, :, 10, 15] = 1.0
    out = DiffAugment(x, 'crop', generator=gen(3))
    assert torch.equal(out.flatten(1).sum(1), torch.ones(500))  # the pixel stays, moved, nothing else
    pos = out[:, 0].flatten(1).argmax(1)
    dr, dc = pos // size - 10, pos % size - 15
    limit = int(size * 0.125 + 0.5)
    assert dr.abs().max() == limit and dc.abs().max() == limit  # reaches, never exceeds, ±ratio·size
    assert len(set(dr.tolist())) == 2 * limit + 1


def test_crop_brings_in_zeros_and_matches_sampled_shift():
    ones = torch.ones(1, 2, 16, 16)
    out = crop(ones, torch.tensor([3]), torch.tensor([-2]))
    expected = torch.ones(1, 2, 16, 16)
    expected[:, :, 13:] = 0  # content moved up 3 rows
    expected[:, :, :, :2] = 0  # and right 2 columns
    assert torch.equal(out, expected)
    x = images(2, h=16, w=16)
    rng = AugRandom(2, 'cpu', seed=7)
    p = sample_params('crop', rng, x.shape)
    tx, ty = int(p['tx'][0]), int(p['ty'][0])
    y = DiffAugment(x, 'crop', seed=7)
    rows, cols = slice(max(0, -tx), 16 - max(0, tx)), slice(max(0, -ty), 16 - max(0, ty))
    src_rows, src_cols = slice(rows.start + tx, rows.stop + tx), slice(cols.start + ty, cols.stop + ty)
    assert torch.equal(y[:, :, rows, cols], x[:, :, src_rows, src_cols])


def test_cutout_zeroes_a_clipped_square():
    n, size = 300, 32
    out = DiffAugment(torch.ones(n, 3, size, size), 'cutout', generator=gen(5))
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same hole in every channel
    zero = zero[:, 0]
    rows, cols = zero.any(2), zero.any(1)  # (n, H), (n, W)
    assert torch.equal(zero, rows[:, :, None] & cols[:, None, :])  # the hole is a rectangle
    nrows, ncols = rows.sum(1), cols.sum(1)
    assert (nrows <= 16).all() and (ncols <= 16).all() and (nrows >= 8).all()
    inside = ~rows[:, 0] & ~rows[:, -1] & ~cols[:, 0] & ~cols[:, -1]
    assert inside.sum() > 20 and (~inside).sum() > 20  # both whole and clipped squares occur
    assert (zero[inside].flatten(1).sum(1) == 16 * 16).all()
    # rows of the hole are contiguous
    first = rows.float().argmax(1)
    assert torch.equal(rows, (torch.arange(size) >= first[:, None]) & (torch.arange(size) < first[:, None] + nrows[:, None]))


def test_cutout_direct():
    out = cutout(torch.ones(2, 1, 8, 8), torch.tensor([2, -3]), torch.tensor([1, 5]), 4, 4)
    assert out[0, 0].sum() == 64 - 16 and torch.equal(out[0, 0, 2:6, 1:5], torch.zeros(4, 4))
    assert out[1, 0].sum() == 64 - 3 and torch.equal(out[1, 0, 0:1, 5:8], torch.zeros(1, 3))


def test_rotate_align_corners_true_semantics():
    x = images(2, h=9, w=9)
    torch.testing.assert_close(rotate(x, torch.zeros(2)), x, rtol=0, atol=1e-6)
    # with align_corners=True a quarter turn is an exact pixel permutation
    torch.testing.assert_close(rotate(x, torch.full((2,), math.pi / 2)), torch.rot90(x, -1, dims=(2, 3)),
                               rtol=0, atol=1e-5)


def test_rotate_angle_range_and_line_orientation():
    p = sample_params('rotate', AugRandom(2000, 'cpu', generator=gen(0)), (2000, 3, 8, 8))
    deg = p['angle'] * 180 / math.pi
    assert deg.abs().max() <= 15 and deg.min() < -14 and deg.max() > 14
    size = 33
    line = torch.zeros(1, 1, size, size)
    line[:, :, size // 2] = 1.0  # horizontal line through the centre
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    v, u = torch.meshgrid(coords, coords, indexing='ij')  # row, column offsets from the centre
    for seed in range(5):
        out = DiffAugment(line, 'rotate', seed=seed)[0, 0]
        angle = float(sample_params('rotate', AugRandom(1, 'cpu', seed=seed), line.shape)['angle'][0])
        m = out / out.sum()
        cuu, cvv, cuv = (m * u * u).sum(), (m * v * v).sum(), (m * u * v).sum()
        estimate = 0.5 * math.atan2(2 * cuv, cuu - cvv)
        assert abs(math.degrees(estimate)) <= 15.5
        assert abs(math.degrees(estimate - angle)) < 0.5


def test_scale_range_and_semantics():
    p = sample_params('scale', AugRandom(2000, 'cpu', generator=gen(0)), (2000, 3, 8, 8))
    for s in (p['sx'], p['sy']):
        assert s.min() >= 1 / 1.2 and s.max() <= 1.2 and s.min() < 0.85 and s.max() > 1.18
    assert not torch.equal(p['sx'], p['sy'])  # independent factors per axis
    x = images(2, h=5, w=33)
    torch.testing.assert_close(scale(x, torch.ones(2), torch.ones(2)), x, rtol=0, atol=1e-6)
    # output(u) = input(2u), align_corners=True: column 24 (u=0.5) lands on column 20 (u=0.25)
    col = torch.zeros(1, 1, 5, 33)
    col[..., 24] = 1.0
    out = scale(col, torch.tensor([2.0]), torch.tensor([1.0]))
    assert torch.equal(out[0, 0].argmax(1), torch.full((5,), 20))
    torch.testing.assert_close(out[0, 0, :, 20], torch.ones(5), rtol=0, atol=1e-6)


def test_color_ranges_and_invariants():
    n = 2000
    rng = AugRandom(n, 'cpu', generator=gen(0))
    shape = (n, 3, 4, 4)
    b = sample_params('brightness', rng, shape)['shift']
    s = sample_params('saturation', rng, shape)['factor']
    c = sample_params('contrast', rng, shape)['factor']
    assert -0.5 <= b.min() < -0.45 and 0.45 < b.max() <= 0.5
    assert 0 <= s.min() < 0.05 and 1.95 < s.max() <= 2.0
    assert 0.5 <= c.min() < 0.55 and 1.45 < c.max() <= 1.5
    x = images(3)
    torch.testing.assert_close(apply_op('saturation', x, dict(factor=torch.zeros(3))),
                               x.mean(1, keepdim=True).expand_as(x))
    y = apply_op('contrast', x, dict(factor=torch.full((3,), 1.3)))
    torch.testing.assert_close(y.mean(dim=[1, 2, 3]), x.mean(dim=[1, 2, 3]))
    torch.testing.assert_close(y.std(dim=[1, 2, 3]), 1.3 * x.std(dim=[1, 2, 3]))


# ----------------------------------------------------------------------------- DSA op formulas (SPEC §5) by hand
# Each op is called with parameters chosen here, on a small non-square float64 image, and compared with numpy loops
# that follow the formulas directly. Geometric ops: grid_sample with align_corners=True (torch 1.2 semantics), i.e.
# normalised coordinate -1 is the centre of the first pixel and +1 that of the last, bilinear, zeros outside.


def small_images():
    return torch.rand(2, 3, 5, 7, generator=gen(21), dtype=torch.float64)


def bilinear_or_zero(img, r, c):
    """Bilinear read of a 2-D numpy image at pixel coordinates (r, c); neighbours outside the image count as 0."""
    height, width = img.shape
    r0, c0 = math.floor(r), math.floor(c)
    total = 0.0
    for rr, wr in ((r0, 1 - (r - r0)), (r0 + 1, r - r0)):
        for cc, wc in ((c0, 1 - (c - c0)), (c0 + 1, c - c0)):
            if 0 <= rr < height and 0 <= cc < width:
                total += wr * wc * img[rr, cc]
    return total


def affine_by_hand(img, theta):
    """out[i, j] = img read at theta @ (x, y, 1), where x (column) and y (row) of pixel (i, j) run over [-1, 1]."""
    height, width = img.shape
    out = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            x, y = -1 + 2 * j / (width - 1), -1 + 2 * i / (height - 1)
            xs = theta[0][0] * x + theta[0][1] * y + theta[0][2]
            ys = theta[1][0] * x + theta[1][1] * y + theta[1][2]
            out[i, j] = bilinear_or_zero(img, (ys + 1) / 2 * (height - 1), (xs + 1) / 2 * (width - 1))
    return out


def per_plane(x, fn):
    """Apply fn(n, c, plane) to every (image, channel) plane of a tensor, as a numpy array."""
    x = x.numpy()
    return np.stack([np.stack([fn(n, c, x[n, c]) for c in range(x.shape[1])]) for n in range(x.shape[0])])


def assert_by_hand(out, expected):
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_scale_formula_by_hand():
    x = small_images()
    sx, sy = torch.tensor([1.15, 0.9], dtype=torch.float64), torch.tensor([0.85, 1.2], dtype=torch.float64)
    # output(x, y) = input(sx * x, sy * y): sx scales the columns, sy the rows
    expected = per_plane(x, lambda n, c, img: affine_by_hand(img, [[float(sx[n]), 0, 0], [0, float(sy[n]), 0]]))
    assert_by_hand(scale(x, sx, sy), expected)


def test_rotate_formula_by_hand():
    x = small_images()
    angle = torch.tensor([0.2, -0.25], dtype=torch.float64)  # radians, within ±15° = ±0.2618

    def by_hand(n, c, img):
        a = float(angle[n])
        return affine_by_hand(img, [[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0]])
    assert_by_hand(rotate(x, angle), per_plane(x, by_hand))


def test_flip_formula_by_hand():
    x = small_images()
    mask = torch.tensor([True, False])
    assert_by_hand(flip(x, mask), per_plane(x, lambda n, c, img: img[:, ::-1] if mask[n] else img))


def test_color_formulas_by_hand():
    x = small_images()
    xn = x.numpy()
    shift = torch.tensor([0.3, -0.45], dtype=torch.float64)
    assert_by_hand(brightness(x, shift), xn + shift.numpy().reshape(2, 1, 1, 1))
    factor = torch.tensor([0.0, 1.7], dtype=torch.float64)
    expected = np.zeros_like(xn)
    for n in range(2):
        for i in range(5):
            for j in range(7):
                grey = xn[n, :, i, j].sum() / 3  # mean over the channels of this pixel
                expected[n, :, i, j] = (xn[n, :, i, j] - grey) * float(factor[n]) + grey
    assert_by_hand(saturation(x, factor), expected)
    factor = torch.tensor([0.6, 1.4], dtype=torch.float64)
    expected = np.stack([(xn[n] - xn[n].sum() / xn[n].size) * float(factor[n]) + xn[n].sum() / xn[n].size
                         for n in range(2)])  # mean over channels and pixels of the image
    assert_by_hand(contrast(x, factor), expected)


def test_crop_formula_by_hand():
    x = small_images()
    tx, ty = torch.tensor([1, -2]), torch.tensor([-1, 3])

    def by_hand(n, c, img):
        # out[i, j] = x[i + tx, j + ty], zero where that is outside the image (the one pixel of zero padding)
        out = np.zeros_like(img)
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                si, sj = i + int(tx[n]), j + int(ty[n])
                if 0 <= si < img.shape[0] and 0 <= sj < img.shape[1]:
                    out[i, j] = img[si, sj]
        return out
    assert_by_hand(crop(x, tx, ty), per_plane(x, by_hand))


def test_cutout_formula_by_hand():
    x = small_images()
    top, left = torch.tensor([1, -2]), torch.tensor([2, 5])  # image 1's 3 x 4 hole sticks out at the top and right

    def by_hand(n, c, img):
        out = img.copy()
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                if int(top[n]) <= i < int(top[n]) + 3 and int(left[n]) <= j < int(left[n]) + 4:
                    out[i, j] = 0.0
        return out
    expected = per_plane(x, by_hand)
    assert (expected[1] == 0).sum() == 3 * 1 * 2  # clipped to row 0, columns 5 and 6
    assert_by_hand(cutout(x, top, left, 3, 4), expected)


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    x = images(5)
    xc = x.cuda().requires_grad_(True)
    for mode in ('S', 'M'):
        out = DiffAugment(xc, FULL, param=ParamDiffAug(aug_mode=mode), seed=3)
        assert out.device == xc.device
        torch.testing.assert_close(out.cpu(), DiffAugment(x, FULL, param=ParamDiffAug(aug_mode=mode), seed=3),
                                   rtol=0, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(xc.grad).all() and xc.grad.abs().sum() > 0
    for g in (gen(0), torch.Generator('cuda').manual_seed(0), None):
        assert DiffAugment(xc, FULL, param=ParamDiffAug(aug_mode='M'), generator=g).device == xc.device
        assert augment_dc(xc, 'crop_scale_rotate_noise', generator=g).device == xc.device
