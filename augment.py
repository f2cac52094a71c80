"""
Augmentations of Dataset Condensation.

DSA (differentiable Siamese augmentation, SPEC §5): DiffAugment(x, strategy, seed=...) applies one randomly
drawn transform to a batch, differentiably w.r.t. x. With a seed, the SAME transform is applied to every image,
so a real batch and a synthetic batch augmented with the same seed are transformed identically whatever their
sizes. Without a seed, parameters are drawn per image (network training / evaluation).

DC augmentation (SPEC §7): augment_dc(images, strategy) applies one of crop / scale / rotate / noise to each
image exactly as the reference does (mean-padded crop, nearest resize on a zero canvas, scipy's cubic-spline rotation).
Used only on training batches, so it runs without gradients.

Everything is vectorised over the batch and runs on the device of the input.
"""

import functools
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
        self.crop = crop  # pixels of mean padding on each side; shifts -crop ... crop - 1
        self.scale = scale  # target sizes int(u * H), u uniform in [1 - scale, 1 + scale)
        self.rotate = rotate  # integer degrees in -rotate ... rotate - 1
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


def _take(x, rows, cols):
    """out[i, :, a, b] = x[i, :, rows[i, a], cols[i, b]] for per-image index tensors rows (n, h) and cols (n, w)."""
    n, c, _, width = x.shape
    h, w = rows.shape[1], cols.shape[1]
    out = x.gather(2, rows[:, None, :, None].expand(n, c, h, width))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _window(x_pad, top, left, h, w):
    """Per-image h x w window of x_pad whose corner is (top, left), (n,) long tensors. Indices are clamped into
    x_pad, so reads past its edge repeat its border (a zero / mean border makes them zero / mean)."""
    hp, wp = x_pad.shape[2:]
    rows = (top.reshape(-1, 1) + torch.arange(h, device=x_pad.device)).clamp(0, hp - 1)  # (n, h)
    cols = (left.reshape(-1, 1) + torch.arange(w, device=x_pad.device)).clamp(0, wp - 1)  # (n, w)
    return _take(x_pad, rows, cols)


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
# DC augmentation (SPEC §7): the reference loops over the images and gives each one op; here every op is computed
# for the whole batch with per-image parameters, and torch.where keeps each image's own result.


def dc_crop(x, fill, top, left, pad):
    """Pad `pad` pixels of the per-channel `fill` (1, C, 1, 1) on each side, then keep the H x W window whose corner
    is (top, left), (n,) long tensors in [0, 2 * pad]."""
    n, c, h, w = x.shape
    # copied into a canvas of fill (not padding x - fill with zeros and adding fill back), so pixels stay exact
    canvas = fill.expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    canvas[:, :, pad:pad + h, pad:pad + w] = x
    return _window(canvas, top, left, h, w)


def nearest_source_index(dst, in_size, out_size):
    """Source index that F.interpolate(mode='nearest') reads for destination index dst when resizing in_size ->
    out_size (dst and out_size long tensors that broadcast). PyTorch computes floor(dst * scale) in float32 with
    scale = in_size / out_size rounded to float32, so the same float32 arithmetic is needed to pick the same pixels
    (the exact rational dst * in_size / out_size sometimes rounds the other way)."""
    out_size = out_size.to(torch.float32)
    scale = torch.full_like(out_size, float(in_size)) / out_size  # a true division, as PyTorch does (not 1/x * in)
    return (dst.to(torch.float32) * scale).floor().long().clamp(max=in_size - 1)


def _dc_scale_sources(size, new_size, side):
    """For one axis of dc_scale: the source index (n, size) of each kept output pixel, and whether it falls on the
    resized image (True) or on the zero canvas around it (False). new_size, side: (n,) long."""
    out = torch.arange(size, device=new_size.device)
    # output pixel -> canvas pixel (centred window of the canvas) -> pixel of the resized image (centred on it)
    resized = out + ((side - size) // 2 - (side - new_size) // 2)[:, None]
    inside = (resized >= 0) & (resized < new_size[:, None])
    source = nearest_source_index(resized.clamp(min=0), size, new_size[:, None])
    return source, inside


def dc_scale(x, h, w):
    """Nearest-neighbour resize of each image to h x w ((n,) long tensors), pasted centred on a square canvas of
    ZEROS of side max(h, w, H, W), of which the centred H x W window is kept. Equals, per image,
    F.interpolate(image, [h, w]) pasted at int((m - h) / 2), int((m - w) / 2) then cropped at int((m - H) / 2),
    int((m - W) / 2), without building the canvases."""
    height, width = x.shape[2:]
    side = torch.maximum(torch.maximum(h, w), torch.full_like(h, max(height, width)))
    rows, row_inside = _dc_scale_sources(height, h, side)
    cols, col_inside = _dc_scale_sources(width, w, side)
    inside = row_inside[:, None, :, None] & col_inside[:, None, None, :]
    return torch.where(inside, _take(x, rows, cols), torch.zeros((), dtype=x.dtype, device=x.device))


def rotated_size(degrees, height, width):
    """Output height and width of scipy.ndimage.rotate(..., reshape=True) for (n,) integer degrees: the extent of the
    rotated corners, rounded (int(extent + 0.5))."""
    radians = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = radians.cos().abs(), radians.sin().abs()
    return (cos * height + sin * width + 0.5).long(), (sin * height + cos * width + 0.5).long()


def _dc_rotate_sources(degrees, height, width):
    """Input coordinates (n, H, W) float64 (row, column) that scipy.ndimage.rotate reads for the kept centred window
    of its enlarged output. scipy maps output point o to R (o - out_centre) + in_centre, R = [[cos, sin], [-sin,
    cos]]. float64 like scipy, so points on the image border fall on the same side of it."""
    out_h, out_w = rotated_size(degrees, height, width)
    device = degrees.device
    # offsets of the kept rows / columns from the enlarged output's centre; int() truncates toward zero
    top = torch.div(out_h - height, 2, rounding_mode='trunc')
    left = torch.div(out_w - width, 2, rounding_mode='trunc')
    dr = torch.arange(height, device=device, dtype=torch.float64) + (top - (out_h - 1) / 2)[:, None]  # (n, H)
    dc = torch.arange(width, device=device, dtype=torch.float64) + (left - (out_w - 1) / 2)[:, None]  # (n, W)
    radians = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = radians.cos()[:, None, None], radians.sin()[:, None, None]
    rows = cos * dr[:, :, None] + sin * dc[:, None, :] + (height - 1) / 2
    cols = -sin * dr[:, :, None] + cos * dc[:, None, :] + (width - 1) / 2
    return rows, cols


@functools.lru_cache(maxsize=32)
def _bspline_prefilter_matrix(size, device, dtype):
    """(size, size) matrix turning samples into cubic B-spline coefficients with mirrored borders, as scipy's
    spline_filter does for mode 'constant' (and 'mirror'): the inverse of the B-spline's sampled kernel (1, 4, 1) / 6
    where the coefficient before the first sample is the second one (and likewise at the end)."""
    kernel = torch.zeros(size, size, dtype=torch.float64)
    index = torch.arange(size)
    kernel[index, index] = 4 / 6
    kernel[index[1:], index[:-1]] = 1 / 6
    kernel[index[:-1], index[1:]] = 1 / 6
    if size > 1:
        kernel[0, 1] = kernel[-1, -2] = 2 / 6
    return torch.linalg.inv(kernel).to(device=device, dtype=dtype)


def _bspline_weights(t):
    """Cubic B-spline weights (..., 4) of the taps floor(x) - 1 ... floor(x) + 2 for t = x - floor(x)."""
    s = 1 - t
    return torch.stack([s ** 3, 4 - 6 * t ** 2 + 3 * t ** 3, 4 - 6 * s ** 2 + 3 * s ** 3, t ** 3], dim=-1) / 6


def _bspline_as_linear(coord, size):
    """Along one axis, cubic B-spline interpolation at coord (float64, in [0, size - 1]) as two linear
    interpolations: the weights of taps (p - 1, p) and (p + 1, p + 2), p = floor(coord), are all positive, so each
    pair is a linear read at the point between them that splits its weight, times the pair's total weight.
    Returns the two read positions in grid_sample's normalised coordinates (of the coefficients padded by 1 before and
    2 after) and the two gains."""
    base = coord.floor()
    w = _bspline_weights(coord - base)
    gains = (w[..., 0] + w[..., 1], w[..., 2] + w[..., 3])
    # padded index = index + 1
    positions = (base + w[..., 1] / gains[0], base + 2 + w[..., 3] / gains[1])
    padded = size + 3
    return [p * (2 / (padded - 1)) - 1 for p in positions], gains


@functools.lru_cache(maxsize=16)
def _rotation_table(height, width, limit, device, dtype):
    """What dc_rotate needs that depends only on the angle, for each integer angle -limit ... limit - 1 (row k is
    angle k - limit): the grid_sample grid of the 4 bilinear reads per kept pixel (2 * limit, 4H, W, 2), their gains
    (2 * limit, 4, H, W), and whether the pixel's source lies inside the image (2 * limit, H, W). Built once per
    size and device, in float64 like scipy; a batch then only indexes it."""
    degrees = torch.arange(-limit, limit)
    rows, cols = _dc_rotate_sources(degrees, height, width)
    inside = (rows >= 0) & (rows <= height - 1) & (cols >= 0) & (cols <= width - 1)
    # outside points get the fill: clamping only keeps their reads inside the coefficients
    (row_a, row_b), (gain_row_a, gain_row_b) = _bspline_as_linear(rows.clamp(0, height - 1), height)
    (col_a, col_b), (gain_col_a, gain_col_b) = _bspline_as_linear(cols.clamp(0, width - 1), width)
    pairs = [(row_a, col_a), (row_a, col_b), (row_b, col_a), (row_b, col_b)]
    grid = torch.cat([torch.stack([col, row], dim=-1) for row, col in pairs], dim=1)  # grid_sample wants (x, y)
    gains = torch.stack([gain_row_a * gain_col_a, gain_row_a * gain_col_b, gain_row_b * gain_col_a,
                         gain_row_b * gain_col_b], dim=1)
    return grid.to(device=device, dtype=dtype), gains.to(device=device, dtype=dtype), inside.to(device)


def dc_rotate(x, fill, degrees, limit=45):
    """scipy.ndimage.rotate(image, angle, axes=(-2, -1), reshape=True, order=3, cval=fill) of each image by its own
    integer angle (degrees, (n,) long, in -limit ... limit - 1), keeping the centred H x W window of the enlarged
    result. fill: a scalar.

    Cubic spline interpolation as scipy does it: B-spline coefficients with mirrored borders (one matrix product
    per axis), then 4 x 4 taps, mirrored at the borders, read as 4 bilinear reads (grid_sample) of the coefficients;
    pixels whose source falls outside the image get fill (scipy's mode 'constant')."""
    n, c, height, width = x.shape
    grid, gains, inside = _rotation_table(height, width, int(limit), x.device, x.dtype)
    k = degrees + int(limit)
    prefilter_h = _bspline_prefilter_matrix(height, x.device, x.dtype)
    prefilter_w = _bspline_prefilter_matrix(width, x.device, x.dtype)
    coef = prefilter_h @ x @ prefilter_w.T
    # taps reach one coefficient before the first and two after the last: scipy mirrors them (reflect pad)
    coef = F.pad(coef, [1, 2, 1, 2], mode='reflect')
    reads = F.grid_sample(coef, grid[k], mode='bilinear', padding_mode='border', align_corners=True)
    rotated = (reads.view(n, c, 4, height, width) * gains[k][:, None]).sum(2)
    return torch.where(inside[k][:, None], rotated, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def _dc_crop(x, means, rng, p):
    pad = int(p.crop)
    # the reference draws the window corner from {0, ..., 2 * pad - 1}: shifts -pad ... pad - 1, not symmetric
    return dc_crop(x, means, rng.randint(0, 2 * pad), rng.randint(0, 2 * pad), pad)


def _dc_scale(x, means, rng, p):
    height = x.shape[2]
    # both target sizes scale the HEIGHT, as in the reference; .long() truncates like int()
    h = ((1 - p.scale + 2 * p.scale * rng.rand()) * height).long()
    w = ((1 - p.scale + 2 * p.scale * rng.rand()) * height).long()
    return dc_scale(x, h, w)


def _dc_rotate(x, means, rng, p):
    # integer angles in {-rotate, ..., rotate - 1}; the fill is ONE value, the mean of the channel means
    limit = int(p.rotate)
    return dc_rotate(x, means.mean(), rng.randint(-limit, limit), limit)


def _dc_noise(x, means, rng, p):
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
    """DC augmentation of a batch (N, C, H, W) as SPEC §7: each image gets ONE op drawn uniformly among the
    strategy's ('crop', 'scale', 'rotate', 'noise'). Randomness from `generator` (any device) or the global RNG."""
    ops = parse_strategy(strategy, valid=DC_OPS)
    if not ops:
        return images
    param = _as_dc_param(param)
    x = images.detach()
    means = x.mean(dim=(0, 2, 3), keepdim=True)  # per channel, over the whole batch, taken once
    choice = AugRandom(x.shape[0], x.device, generator=generator).randint(0, len(ops))
    out = x
    for k, op in enumerate(ops):
        # every op runs on the whole batch and each image keeps the result of the op it drew: selecting the images
        # of an op first (nonzero) would wait for the GPU on every call; the ops are cheap next to the network
        rng = AugRandom(x.shape[0], x.device, x.dtype, generator=generator)
        out = torch.where(_per_image(choice == k), DC_OPS[op](x, means, rng, param), out)
    return out
