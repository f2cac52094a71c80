"""
Augmentations of Dataset Condensation.

DSA (differentiable Siamese augmentation, SPEC §5): DiffAugment(x, strategy, seed=...) applies one randomly
drawn transform to a batch, differentiably w.r.t. x. With a seed, the SAME transform is applied to every image,
so a real batch and a synthetic batch augmented with the same seed are transformed identically whatever their
sizes. Without a seed, parameters are drawn per image (network training / evaluation).

DC augmentation (SPEC §7): augment_dc(images, strategy) applies one of crop / scale / rotate / noise to each
image, filling with the per-channel batch mean. Used only on training batches, so it runs without gradients.

Everything is vectorised over the batch and runs on the device of the input.
"""

import math

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# hyper-parameters


class ParamDiffAug:
    """DSA hyper-parameters (SPEC §5 defaults)."""

    def __init__(self, aug_mode='S', prob_flip=0.5, ratio_scale=1.2, ratio_rotate=15.0, ratio_crop_pad=0.125,
                 ratio_cutout=0.5, brightness=1.0, saturation=2.0, contrast=0.5):
        self.aug_mode = aug_mode  # 'S': one random op group per call, 'M': every group of the strategy in turn
        self.prob_flip = prob_flip
        self.ratio_scale = ratio_scale
        self.ratio_rotate = ratio_rotate  # degrees
        self.ratio_crop_pad = ratio_crop_pad
        self.ratio_cutout = ratio_cutout
        self.brightness = brightness
        self.saturation = saturation
        self.contrast = contrast
        # set by the original's callers; kept so their scripts run (the seed argument of DiffAugment does this work)
        self.latestseed = -1
        self.batchmode = False


class ParamDCAug:
    """DC augmentation hyper-parameters (SPEC §7 defaults)."""

    def __init__(self, crop=4, scale=0.2, rotate=45, noise=0.001):
        self.crop = crop  # pixels of mean padding on each side
        self.scale = scale  # resize factor in [1 - scale, 1 + scale]
        self.rotate = rotate  # degrees
        self.noise = noise  # std of additive gaussian noise


# -----------------------------------------------------------------------------
# randomness


class AugRandom:
    """Source of augmentation parameters for a batch of n images; every draw returns one value per image.

    Siamese (seed given): each draw is ONE value from a private CPU generator seeded with `seed`, broadcast to
    all n images. Same seed -> same transform for any batch size; the global RNG is never touched.
    Independent (seed None): each draw is n values, one per image. With `generator` they are drawn on the
    generator's own device (CPU or CUDA) and moved to the images' device; without one, from the global RNG of
    the images' device.
    """

    def __init__(self, n, device, dtype=torch.float32, seed=None, generator=None):
        self.n = n
        self.device = torch.device(device)
        self.dtype = dtype if dtype.is_floating_point else torch.float32
        self.siamese = seed is not None
        self.generator = torch.Generator('cpu').manual_seed(int(seed)) if self.siamese else generator
        self.draw_device = self.generator.device if self.generator is not None else self.device

    def _spread(self, values):
        # a Siamese draw is a single value shared by the whole batch
        return values.to(self.device).expand(self.n, *values.shape[1:])

    def rand(self):
        """U[0, 1), shape (n,)."""
        count = 1 if self.siamese else self.n
        u = torch.rand(count, generator=self.generator, device=self.draw_device)
        return self._spread(u.to(self.dtype))

    def randint(self, low, high):
        """Integers in [low, high), shape (n,), long."""
        count = 1 if self.siamese else self.n
        return self._spread(torch.randint(low, high, (count,), generator=self.generator, device=self.draw_device))

    def randn(self, *shape):
        """Standard normal, shape (n, *shape)."""
        count = 1 if self.siamese else self.n
        z = torch.randn(count, *shape, generator=self.generator, device=self.draw_device)
        return self._spread(z.to(self.dtype))

    def choice(self, k):
        """One index in [0, k) for the whole batch (a Python int)."""
        if k == 1:
            return 0  # nothing to choose: leave the RNG stream untouched
        # without a generator, draw on the CPU global RNG so that .item() never syncs a GPU
        device = self.draw_device if self.generator is not None else 'cpu'
        return int(torch.randint(0, k, (1,), generator=self.generator, device=device).item())


# -----------------------------------------------------------------------------
# geometric helpers shared by DSA and DC


def _affine(rows):
    """Batch of 2x3 affine matrices from two rows of three (n,) tensors each."""
    return torch.stack([torch.stack(rows[0], dim=1), torch.stack(rows[1], dim=1)], dim=1)


def _warp(x, theta, align_corners):
    """Resample x through theta (output coords -> input coords), zeros outside."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=align_corners)


def _window(x_pad, top, left, h, w):
    """Per-image h x w window of x_pad whose corner is (top, left), (n,) long tensors. Indices are clamped into
    x_pad, so reads past its edge repeat its border (a zero / mean border makes them zero / mean)."""
    n, c, hp, wp = x_pad.shape
    rows = (top.reshape(-1, 1) + torch.arange(h, device=x_pad.device)).clamp(0, hp - 1)  # (n, h)
    cols = (left.reshape(-1, 1) + torch.arange(w, device=x_pad.device)).clamp(0, wp - 1)  # (n, w)
    out = x_pad.gather(2, rows[:, None, :, None].expand(n, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _per_image(v):
    return v.reshape(-1, 1, 1, 1)


# -----------------------------------------------------------------------------
# DSA ops: each is a pure function of x and explicit per-image parameters, plus a sampler drawing them


def scale(x, sx, sy):
    """Zoom about the centre: output(u, v) = input(sx * u, sy * v) in normalised coords (align_corners=True)."""
    zero = torch.zeros_like(sx)
    return _warp(x, _affine([[sx, zero, zero], [zero, sy, zero]]), align_corners=True)


def rotate(x, angle):
    """Rotate about the centre by `angle` radians (theta = [[cos, sin, 0], [-sin, cos, 0]], align_corners=True)."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return _warp(x, _affine([[cos, sin, zero], [-sin, cos, zero]]), align_corners=True)


def flip(x, mask):
    """Mirror horizontally the images where mask (n,) bool is true."""
    return torch.where(_per_image(mask), x.flip(3), x)


def brightness(x, shift):
    return x + _per_image(shift)


def saturation(x, factor):
    # scale each pixel's deviation from its own channel mean (0 gives grey)
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _per_image(factor) + mean


def contrast(x, factor):
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * _per_image(factor) + mean


def crop(x, tx, ty):
    """Translate: out[i, j] = x[i + tx, j + ty] for integer (n,) shifts tx (rows) and ty (columns); zero where
    that falls outside. One pixel of zero padding plus index clamping gives the zeros."""
    h, w = x.shape[2:]
    return _window(F.pad(x, [1, 1, 1, 1]), tx + 1, ty + 1, h, w)


def cutout(x, top, left, size_h, size_w):
    """Zero the size_h x size_w rectangle whose corner is (top, left) (may stick out of the image: clipped)."""
    h, w = x.shape[2:]
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top.reshape(-1, 1)) & (rows < top.reshape(-1, 1) + size_h)  # (n, h)
    in_cols = (cols >= left.reshape(-1, 1)) & (cols < left.reshape(-1, 1) + size_w)  # (n, w)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    # multiply rather than assign, so the kept pixels still get their gradient
    return x * keep[:, None].to(x.dtype)


def _sample_scale(rng, shape, p):
    r = p.ratio_scale
    sx = rng.rand() * (r - 1.0 / r) + 1.0 / r
    sy = rng.rand() * (r - 1.0 / r) + 1.0 / r
    return dict(sx=sx, sy=sy)


def _sample_rotate(rng, shape, p):
    return dict(angle=(rng.rand() - 0.5) * 2 * p.ratio_rotate / 180 * math.pi)


def _sample_flip(rng, shape, p):
    return dict(mask=rng.rand() < p.prob_flip)


def _sample_brightness(rng, shape, p):
    return dict(shift=(rng.rand() - 0.5) * p.brightness)


def _sample_saturation(rng, shape, p):
    return dict(factor=rng.rand() * p.saturation)


def _sample_contrast(rng, shape, p):
    return dict(factor=rng.rand() + p.contrast)


def _sample_crop(rng, shape, p):
    h, w = shape[2], shape[3]
    max_h, max_w = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    return dict(tx=rng.randint(-max_h, max_h + 1), ty=rng.randint(-max_w, max_w + 1))


def _sample_cutout(rng, shape, p):
    h, w = shape[2], shape[3]
    size_h, size_w = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    # centre drawn so that an even-sized square can reach both borders equally
    centre_h = rng.randint(0, h + (1 - size_h % 2))
    centre_w = rng.randint(0, w + (1 - size_w % 2))
    return dict(top=centre_h - size_h // 2, left=centre_w - size_w // 2, size_h=size_h, size_w=size_w)


_DSA_PRIMITIVES = {  # name -> (sampler, op)
    'scale': (_sample_scale, scale),
    'rotate': (_sample_rotate, rotate),
    'flip': (_sample_flip, flip),
    'brightness': (_sample_brightness, brightness),
    'saturation': (_sample_saturation, saturation),
    'contrast': (_sample_contrast, contrast),
    'crop': (_sample_crop, crop),
    'cutout': (_sample_cutout, cutout),
}

DSA_OPS = {  # op group of a strategy string -> primitives applied in this order
    'color': ('brightness', 'saturation', 'contrast'),
    'crop': ('crop',),
    'cutout': ('cutout',),
    'flip': ('flip',),
    'scale': ('scale',),
    'rotate': ('rotate',),
}


def sample_params(primitive, rng, shape, param=None):
    """Draw the per-image parameters of one DSA primitive (a key of the op tables) from an AugRandom."""
    return _DSA_PRIMITIVES[primitive][0](rng, shape, param or ParamDiffAug())


def apply_op(primitive, x, params):
    return _DSA_PRIMITIVES[primitive][1](x, **params)


# -----------------------------------------------------------------------------
# DSA entry point


def parse_strategy(strategy, valid=DSA_OPS):
    """'color_crop' -> ['color', 'crop']; '', 'none', 'None', None -> []; unknown op -> ValueError."""
    if strategy is None or strategy in ('', 'none', 'None'):
        return []
    ops = strategy.split('_')
    for op in ops:
        if op not in valid:
            raise ValueError(f"unknown augmentation op {op!r} in strategy {strategy!r}; valid ops: {', '.join(valid)}")
    return ops


def DiffAugment(x, strategy='', seed=-1, param=None, generator=None):
    """Differentiable augmentation of a batch x (N, C, H, W), with the original's signature.

    seed (int other than -1): Siamese use, one transform shared by all images, drawn from a private CPU generator
    seeded with it (the same seed gives the same transform). seed -1 or None: independent per-image parameters from
    `generator` (any device) or the global RNG. In aug_mode 'S' one op group of the strategy is picked per call (for
    the whole batch); in 'M' all are applied. strategy '', 'none' or 'None' returns x.
    """
    if seed == -1:
        seed = None
    groups = parse_strategy(strategy)
    if not groups:
        return x
    param = param or ParamDiffAug()
    rng = AugRandom(x.shape[0], x.device, x.dtype, seed=seed, generator=generator)
    if param.aug_mode == 'S':
        groups = [groups[rng.choice(len(groups))]]
    elif param.aug_mode != 'M':
        raise ValueError(f"unknown aug_mode {param.aug_mode!r}; valid: 'S', 'M'")
    for group in groups:
        for primitive in DSA_OPS[group]:
            x = apply_op(primitive, x, sample_params(primitive, rng, x.shape, param))
    return x.contiguous()


# -----------------------------------------------------------------------------
# DC augmentation: each op fills what comes in from outside the image with the per-channel batch mean


def dc_crop(x, fill, top, left, pad):
    """Pad `pad` pixels of `fill` on each side, then take the HxW window whose corner is (top, left) in [0, 2*pad]."""
    h, w = x.shape[2:]
    x_pad = F.pad(x - fill, [pad, pad, pad, pad]) + fill
    return _window(x_pad, top, left, h, w)


def dc_scale(x, fill, fh, fw):
    """Resize by factors fh (height) and fw (width) about the centre, keeping the size; `fill` outside."""
    zero = torch.zeros_like(fh)
    # warping x - fill pads with zeros, i.e. with fill once it is added back
    theta = _affine([[1.0 / fw, zero, zero], [zero, 1.0 / fh, zero]])
    return _warp(x - fill, theta, align_corners=False) + fill


def dc_rotate(x, fill, degrees):
    """Rotate by `degrees` about the centre; `fill` outside."""
    angle = degrees * (math.pi / 180)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = _affine([[cos, sin, zero], [-sin, cos, zero]])
    return _warp(x - fill, theta, align_corners=False) + fill


def _dc_crop(x, fill, rng, p):
    pad = int(p.crop)
    return dc_crop(x, fill, rng.randint(0, 2 * pad + 1), rng.randint(0, 2 * pad + 1), pad)


def _dc_scale(x, fill, rng, p):
    fh = 1 - p.scale + 2 * p.scale * rng.rand()
    fw = 1 - p.scale + 2 * p.scale * rng.rand()
    return dc_scale(x, fill, fh, fw)


def _dc_rotate(x, fill, rng, p):
    return dc_rotate(x, fill, (2 * rng.rand() - 1) * p.rotate)


def _dc_noise(x, fill, rng, p):
    return x + p.noise * rng.randn(*x.shape[1:])


DC_OPS = {'crop': _dc_crop, 'scale': _dc_scale, 'rotate': _dc_rotate, 'noise': _dc_noise}


def _as_dc_param(param):
    if param is None:
        return ParamDCAug()
    if isinstance(param, dict):  # the reference passes a dict that may also hold 'strategy'
        return ParamDCAug(**{k: param[k] for k in ('crop', 'scale', 'rotate', 'noise') if k in param})
    return param


@torch.no_grad()
def augment_dc(images, strategy, param=None, generator=None):
    """DC augmentation of a batch (N, C, H, W): each image gets ONE op drawn among the strategy's
    ('crop', 'scale', 'rotate', 'noise'). Randomness from `generator` (any device) or the global RNG."""
    ops = parse_strategy(strategy, valid=DC_OPS)
    if not ops:
        return images
    param = _as_dc_param(param)
    x = images.detach()
    fill = x.mean(dim=(0, 2, 3), keepdim=True)
    choice = AugRandom(x.shape[0], x.device, generator=generator).randint(0, len(ops))
    out = x
    for k, op in enumerate(ops):
        # every op runs on the whole batch and each image keeps the result of the op it drew: selecting the images
        # of an op first (nonzero) would wait for the GPU on every call; the ops are cheap next to the network
        rng = AugRandom(x.shape[0], x.device, x.dtype, generator=generator)
        out = torch.where(_per_image(choice == k), DC_OPS[op](x, fill, rng, param), out)
    return out
