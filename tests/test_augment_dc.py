"""DC augmentation (SPEC §7) against expectations built independently of augment.py: numpy padding for crop,
F.interpolate on a zero canvas for scale (the reference's own recipe), scipy.ndimage.rotate for rotate. Random
outputs are identified by matching them against every allowed candidate, never by replaying our sampler."""
import os
import sys

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from augment import (DC_OPS, ParamDCAug, augment_dc, dc_crop, dc_rotate, dc_scale, nearest_source_index,  # noqa: E402
                     rotated_size)

# max |ours - scipy| over every angle -45..44: 4.6e-6 on float32 images in [0, 1), 1.5e-5 on normalised FashionMNIST
# (range 2.8; benchmarks/augment_dc.py scipy), from grid_sample's float32 coordinates; in float64 they agree to rounding
ROTATE_ATOL_FLOAT32 = 1e-5
ROTATE_ATOL_FLOAT64 = 1e-9


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n, c=3, h=16, w=16, seed=0, dtype=torch.float32):
    return torch.rand(n, c, h, w, generator=gen(seed), dtype=dtype)


def ramp(c, h, w):
    """One image whose pixels are all different: value = row * w + column + 1000 * channel."""
    return (torch.arange(h * w, dtype=torch.float32).reshape(1, h, w) + 1000 * torch.arange(c).reshape(c, 1, 1))


# ----------------------------------------------------------------------------- independent expectations


def numpy_crop(image, means, dr, dc, pad=4):
    """The image padded with its channel means, window shifted by (dr, dc) in -pad ... pad - 1."""
    c, h, w = image.shape
    padded = np.empty((c, h + 2 * pad, w + 2 * pad), dtype=np.float64)
    padded[:] = np.asarray(means, dtype=np.float64).reshape(c, 1, 1)
    padded[:, pad:pad + h, pad:pad + w] = image
    return padded[:, pad + dr:pad + dr + h, pad + dc:pad + dc + w]


def reference_scale(image, h, w):
    """SPEC §7 scale, built like the reference: F.interpolate (nearest) to h x w, pasted centred on a zero canvas of
    side max(h, w, H, W), centred H x W window kept."""
    c, height, width = image.shape
    resized = F.interpolate(image[None], [h, w])[0]
    m = max(h, w, height, width)
    canvas = torch.zeros(c, m, m, dtype=image.dtype)
    r, s = int((m - h) / 2), int((m - w) / 2)
    canvas[:, r:r + h, s:s + w] = resized
    r, s = int((m - height) / 2), int((m - width) / 2)
    return canvas[:, r:r + height, s:s + width]


def scipy_rotate(image, angle, cval):
    """scipy.ndimage.rotate (cubic spline, enlarged canvas) of a (C, H, W) array, centred H x W window kept."""
    big = scipy.ndimage.rotate(image, angle, axes=(-2, -1), reshape=True, order=3, cval=cval)
    height, width = image.shape[-2:]
    r, c = int((big.shape[-2] - height) / 2), int((big.shape[-1] - width) / 2)
    return big[:, r:r + height, c:c + width]


def nearest_candidates(out, candidates):
    """For each output (N, ...): the index of the closest candidate (K, ...), its max-abs distance, the runner-up's."""
    dist = (out.flatten(1)[:, None, :] - candidates.flatten(1)[None]).abs().amax(2)  # (N, K)
    best = dist.topk(2, dim=1, largest=False)
    return best.indices[:, 0], best.values[:, 0], best.values[:, 1]


# ----------------------------------------------------------------------------- crop


def test_crop_offsets_take_exactly_the_8_values_and_border_is_the_channel_mean():
    c, h, w = 3, 12, 12
    image = ramp(c, h, w)
    out = augment_dc(image.repeat(400, 1, 1, 1), 'crop', generator=gen(0))
    # pixel (6, 6) always comes from inside the image (|shift| <= 4): its value names the shift
    v = out[:, 0, 6, 6].long()
    dr, dc = v // w - 6, v % w - 6
    assert set(dr.tolist()) == set(range(-4, 4)) and set(dc.tolist()) == set(range(-4, 4))
    means = [float(image[k].double().mean()) for k in range(c)]
    for k in range(len(out)):
        r, s = int(dr[k]), int(dc[k])
        np.testing.assert_allclose(out[k].numpy(), numpy_crop(image.numpy(), means, r, s), rtol=0, atol=1e-4)
        # image pixels are copied, not recomputed: the part of the window inside the image is exact
        rows, cols = slice(max(0, -r), h - max(0, r)), slice(max(0, -s), w - max(0, s))
        assert torch.equal(out[k, :, rows, cols], image[:, rows.start + r:rows.stop + r, cols.start + s:cols.stop + s])


def test_dc_crop_with_chosen_corners():
    x = ramp(2, 10, 10)[None].repeat(2, 1, 1, 1)
    fill = torch.tensor([-1.0, -2.0]).reshape(1, 2, 1, 1)
    out = dc_crop(x, fill, torch.tensor([0, 7]), torch.tensor([7, 0]), 4)
    # image 0: corner (0, 7) = shift rows -4, columns +3
    assert torch.equal(out[0, :, 4:, :7], x[0, :, :6, 3:])
    assert (out[0, 0, :4] == -1).all() and (out[0, 1, :, 7:] == -2).all()
    # image 1: corner (7, 0) = shift rows +3, columns -4
    assert torch.equal(out[1, :, :7, 4:], x[1, :, 3:, :6])
    assert (out[1, 0, 7:] == -1).all() and (out[1, 1, :, :4] == -2).all()


def test_reference_style_param_dict_sets_the_crop():
    image = ramp(1, 12, 12)
    out = augment_dc(image.repeat(200, 1, 1, 1), 'crop', {'crop': 2, 'strategy': 'crop'}, generator=gen(1))
    v = out[:, 0, 6, 6].long()
    assert set((v // 12 - 6).tolist()) == set(range(-2, 2)) and set((v % 12 - 6).tolist()) == set(range(-2, 2))


# ----------------------------------------------------------------------------- scale


@pytest.mark.parametrize('size', [12, 20, 28, 30, 32])
def test_nearest_source_index_is_interpolates_rule(size):
    image = torch.arange(size, dtype=torch.float32).reshape(1, 1, size, 1)
    for new in range(int(0.8 * size) - 1, int(1.2 * size) + 2):
        expected = F.interpolate(image, [new, 1])[0, 0, :, 0].long()
        assert torch.equal(nearest_source_index(torch.arange(new), size, torch.tensor(new)), expected)
        assert torch.equal(expected, torch.arange(new) * size // new)  # floor(dst * in / out) on these sizes


def test_scale_shrink_leaves_zero_borders_and_is_a_nearest_resize():
    x = images(2, h=28, w=28) + 1.0  # strictly positive: zeros can only come from the canvas
    out = dc_scale(x, torch.tensor([22, 22]), torch.tensor([25, 25]))
    # canvas side 28: resized image pasted at row int(6 / 2) = 3, column int(3 / 2) = 1
    assert (out[:, :, :3] == 0).all() and (out[:, :, 25:] == 0).all()
    assert (out[:, :, :, :1] == 0).all() and (out[:, :, :, 26:] == 0).all()
    for i in range(22):
        for j in range(25):
            assert torch.equal(out[:, :, 3 + i, 1 + j], x[:, :, i * 28 // 22, j * 28 // 25])


@pytest.mark.parametrize('height,width', [(28, 28), (20, 30), (30, 20)])
def test_scale_matches_the_reference_recipe(height, width):
    x = images(1, c=2, h=height, w=width)
    for h in range(int(0.8 * height), int(1.2 * height) + 1, 3):
        for w in range(int(0.8 * height), int(1.2 * height) + 1, 2):
            out = dc_scale(x, torch.tensor([h]), torch.tensor([w]))
            assert torch.equal(out[0], reference_scale(x[0], h, w)), (h, w)


def test_augment_dc_scale_draws_both_sizes_from_the_height():
    height, width = 20, 30
    image = images(1, c=1, h=height, w=width)[0] + 1.0
    # int(u * H), u in [0.8, 1.2): 16 ... 23 for BOTH sizes (a width drawn from the width would be 24 ... 35)
    allowed = torch.stack([reference_scale(image, h, w) for h in range(16, 24) for w in range(16, 24)])
    out = augment_dc(image.repeat(1000, 1, 1, 1), 'scale', generator=gen(2))
    assert (nearest_candidates(out, allowed)[1] == 0).all()  # every output is exactly one of these resizes
    assert (nearest_candidates(allowed, out)[1] == 0).all()  # and every one of them is drawn


# ----------------------------------------------------------------------------- rotate


@pytest.mark.parametrize('height,width', [(28, 28), (32, 32), (64, 64), (20, 30)])
def test_rotated_size_is_scipys(height, width):
    degrees = torch.arange(-45, 45)
    out_h, out_w = rotated_size(degrees, height, width)
    for d, oh, ow in zip(degrees.tolist(), out_h.tolist(), out_w.tolist()):
        shape = scipy.ndimage.rotate(np.zeros((height, width), np.float32), d, reshape=True, order=0).shape
        assert shape == (oh, ow), d


@pytest.mark.parametrize('dtype,atol', [(torch.float64, ROTATE_ATOL_FLOAT64), (torch.float32, ROTATE_ATOL_FLOAT32)])
@pytest.mark.parametrize('height,width', [(16, 16), (15, 15), (20, 30)])
def test_rotate_agrees_with_scipy_at_every_angle(dtype, atol, height, width):
    image = images(1, c=2, h=height, w=width, seed=3, dtype=dtype)[0]
    fill = 0.3
    out = dc_rotate(image.repeat(90, 1, 1, 1), fill, torch.arange(-45, 45))  # image k turned by k - 45 degrees
    for k, d in enumerate(range(-45, 45)):
        np.testing.assert_allclose(out[k].numpy(), scipy_rotate(image.numpy(), d, fill), rtol=0, atol=atol,
                                   err_msg=f'angle {d}')


def test_augment_dc_rotate_is_scipy_at_an_integer_angle_with_the_mean_of_channel_means():
    # float64, so a match within 1e-9 is the scipy rotation at that angle and no other
    image = images(1, c=3, h=12, w=12, seed=4, dtype=torch.float64)[0] + torch.tensor([0.0, 2.0, 5.0]).reshape(3, 1, 1)
    cval = float(np.mean([image[k].numpy().mean() for k in range(3)]))  # ONE value for every channel
    candidates = torch.from_numpy(np.stack([scipy_rotate(image.numpy(), d, cval) for d in range(-45, 45)]))
    out = augment_dc(image.repeat(2000, 1, 1, 1), 'rotate', generator=gen(5))
    best, dist, runner_up = nearest_candidates(out, candidates)
    assert (dist < ROTATE_ATOL_FLOAT64).all() and (runner_up > 1e-3).all()
    assert set((best - 45).tolist()) == set(range(-45, 45))  # integer angles -45 ... 44, all of them


# ----------------------------------------------------------------------------- one op per image, noise, randomness


def test_crop_noise_gives_each_image_a_shift_or_noise_never_both():
    x = images(64, h=12, w=12, seed=6)
    out = augment_dc(x, 'crop_noise', generator=gen(7))
    means = x.double().mean(dim=(0, 2, 3)).tolist()
    shifted, noised = [], []
    for k in range(len(x)):
        windows = [numpy_crop(x[k].numpy(), means, dr, dc) for dr in range(-4, 4) for dc in range(-4, 4)]
        shifted.append(min(np.abs(out[k].numpy() - wnd).max() for wnd in windows) < 1e-6)
        diff = (out[k] - x[k]).abs()
        noised.append(bool(diff.max() < 0.01) and bool((diff > 0).float().mean() > 0.9))
    shifted, noised = torch.tensor(shifted), torch.tensor(noised)
    assert (shifted ^ noised).all()
    assert shifted.sum() >= 16 and noised.sum() >= 16


def test_crop_scale_rotate_gives_each_image_exactly_one_op():
    image = images(1, c=1, h=12, w=12, seed=8, dtype=torch.float64)[0] + 1.0
    mean = [float(image.mean())]
    families = {
        'crop': [torch.from_numpy(numpy_crop(image.numpy(), mean, dr, dc))
                 for dr in range(-4, 4) for dc in range(-4, 4)],
        'scale': [reference_scale(image, h, w) for h in range(9, 15) for w in range(9, 15)],
        'rotate': [torch.from_numpy(scipy_rotate(image.numpy(), d, mean[0])) for d in range(-45, 45)],
    }
    n = 600
    out = augment_dc(image.repeat(n, 1, 1, 1), 'crop_scale_rotate', generator=gen(9))
    matched = {name: nearest_candidates(out, torch.stack(c))[1] < 1e-9 for name, c in families.items()}
    assert (matched['crop'] | matched['scale'] | matched['rotate']).all()
    only = {name: m & ~sum(o.int() for k, o in matched.items() if k != name).bool() for name, m in matched.items()}
    for name in families:
        assert 0.2 * n < only[name].sum() < 0.47 * n, name  # each op drawn about a third of the time


def test_noise_is_tiny_and_per_pixel():
    x = images(8)
    diff = (augment_dc(x, 'noise', generator=gen(0)) - x)
    assert (diff.abs().amax(dim=(1, 2, 3)) < 0.01).all()
    assert 0.0007 < diff.std() < 0.0013  # 0.001 * N(0, 1)
    assert (diff != 0).float().mean() > 0.99


def test_same_generator_seed_same_output():
    x = images(16)
    strategy = 'crop_scale_rotate_noise'
    a = augment_dc(x, strategy, generator=gen(11))
    assert torch.equal(a, augment_dc(x, strategy, generator=gen(11)))
    assert not torch.equal(a, augment_dc(x, strategy, generator=gen(12)))
    state = torch.get_rng_state()
    augment_dc(x, strategy, generator=gen(11))
    assert torch.equal(state, torch.get_rng_state())  # a given generator replaces the global RNG
    torch.manual_seed(3)
    b = augment_dc(x, strategy)
    torch.manual_seed(3)
    assert torch.equal(b, augment_dc(x, strategy))


def test_shape_dtype_no_grad():
    x = images(12).requires_grad_(True)
    out = augment_dc(x, 'crop_scale_rotate_noise', generator=gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and not out.requires_grad


def test_no_host_sync(monkeypatch):
    # on a GPU, nonzero()/item() would wait for the device on every training batch
    def forbidden(*args, **kwargs):
        raise AssertionError('host sync in augment_dc')
    x = images(12, h=13, w=13)  # a size no other test used: the cached tables are built under the patch too
    for name in ('nonzero', 'item', 'tolist', 'cpu'):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = augment_dc(x, 'crop_scale_rotate_noise', generator=gen(0))
    assert out.shape == x.shape and not torch.equal(out, x)


def test_strategy_validation():
    x = images(4)
    with pytest.raises(ValueError, match='flip') as err:
        augment_dc(x, 'crop_flip')
    assert all(op in str(err.value) for op in DC_OPS)
    for s in ('', 'none', 'None', None):
        assert augment_dc(x, s) is x
    assert torch.equal(augment_dc(x, 'crop', ParamDCAug(), gen(7)), augment_dc(x, 'crop', None, gen(7)))
