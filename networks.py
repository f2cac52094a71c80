"""
Networks used by dataset condensation (DC / DSA / DM), written from SPEC §3 and §10.

Every model takes (channel, num_classes, im_size) and exposes
    embed(x)   -> flattened penultimate features, shape (N, D)
    forward(x) == classifier(embed(x))
Module and parameter names follow the reference implementation so that state dicts are
interchangeable. Flattened feature sizes are derived analytically from im_size (no dummy
forward), so construction consumes the global RNG only for the PyTorch default init, in the
same module-creation order as the reference.
"""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# building blocks


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def make_activation(act):
    if act == 'relu':
        return nn.ReLU(inplace=True)
    if act == 'sigmoid':
        return nn.Sigmoid()
    if act == 'leakyrelu':
        return nn.LeakyReLU(negative_slope=0.01)
    if act == 'swish':
        return Swish()
    raise ValueError(f"unknown activation {act!r}; valid: relu, sigmoid, leakyrelu, swish")


def make_norm(norm, c, h, w):
    # instancenorm is a GroupNorm with one channel per group: unlike nn.InstanceNorm2d it has
    # affine parameters and behaves identically in train and eval mode
    if norm == 'instancenorm':
        return nn.GroupNorm(c, c, affine=True)
    if norm == 'groupnorm':
        return nn.GroupNorm(4, c, affine=True)
    if norm == 'batchnorm':
        return nn.BatchNorm2d(c)
    if norm == 'layernorm':
        return nn.LayerNorm([c, h, w], elementwise_affine=True)
    raise ValueError(f"unknown norm {norm!r}; valid: none, instancenorm, groupnorm, batchnorm, layernorm")


class _AvgPool2x2(torch.autograd.Function):
    """2x2 average pooling, stride 2, of (..., H, W) with H and W even, as whole-tensor adds of strided views.

    On the CPU, PyTorch's NCHW avg_pool2d kernel and its backward run 3-5x slower than this (docs/PERFORMANCE.md);
    the values differ from it only in float rounding (the order of the four additions). The backward spreads each
    gradient over its 2x2 window with differentiable ops, so double backward (DC/DSA) and torch.func transforms
    (vmap, grad) work through it."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        rows = x[..., 0::2, :] + x[..., 1::2, :]
        return (rows[..., 0::2] + rows[..., 1::2]) * 0.25

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Nothing to save: the backward needs only the incoming gradient (required for torch.func support)."""

    @staticmethod
    def backward(ctx, grad):
        return (grad * 0.25).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


def avg_pool_2x2(x):
    """F.avg_pool2d(x, 2, 2), through _AvgPool2x2 where that is faster: contiguous CPU tensors with even sides."""
    if x.device.type == 'cpu' and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0 and x.is_contiguous():
        return _AvgPool2x2.apply(x)
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class AvgPool2x2(nn.AvgPool2d):
    """nn.AvgPool2d(2, 2) computed by avg_pool_2x2 (same module type and state dict for saved models)."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x):
        return avg_pool_2x2(x)


def make_pool(pooling):
    if pooling == 'avgpooling':
        return AvgPool2x2()
    if pooling == 'maxpooling':
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f"unknown pooling {pooling!r}; valid: none, avgpooling, maxpooling")


def conv_out(size, kernel, padding, stride=1):
    return (size + 2 * padding - kernel) // stride + 1

# -----------------------------------------------------------------------------
# ConvNet family


def convnet_block_sizes(channel, im_size, depth, pooling):
    """Per ConvNet block: (conv padding, (H, W) after the conv, (H, W) after the pooling)."""
    h, w = im_size
    for d in range(depth):
        # padding 3 on a 1-channel input turns 28x28 into 32x32, so MNIST gets CIFAR's feature shape
        pad = 3 if channel == 1 and d == 0 else 1
        h, w = conv_out(h, 3, pad), conv_out(w, 3, pad)
        conv_size = (h, w)
        if pooling != 'none':
            h, w = h // 2, w // 2
        yield pad, conv_size, (h, w)


class ConvNet(nn.Module):
    def __init__(self, channel, num_classes, net_width=128, net_depth=3, net_act='relu',
                 net_norm='instancenorm', net_pooling='avgpooling', im_size=(32, 32)):
        super().__init__()
        layers = []
        c, (h, w) = channel, im_size
        for pad, (conv_h, conv_w), (h, w) in convnet_block_sizes(channel, im_size, net_depth, net_pooling):
            layers.append(nn.Conv2d(c, net_width, kernel_size=3, padding=pad))
            c = net_width
            if net_norm != 'none':
                layers.append(make_norm(net_norm, c, conv_h, conv_w))
            layers.append(make_activation(net_act))
            if net_pooling != 'none':
                layers.append(make_pool(net_pooling))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))

# -----------------------------------------------------------------------------
# MLP, LeNet, AlexNet, VGG


class MLP(nn.Module):
    def __init__(self, channel, num_classes, im_size=(32, 32)):
        super().__init__()
        self.fc_1 = nn.Linear(channel * im_size[0] * im_size[1], 128)
        self.fc_2 = nn.Linear(128, 128)
        self.fc_3 = nn.Linear(128, num_classes)

    def embed(self, x):
        x = F.relu(self.fc_1(x.flatten(1)))
        return F.relu(self.fc_2(x))

    def forward(self, x):
        return self.fc_3(self.embed(x))


class LeNet(nn.Module):
    def __init__(self, channel, num_classes, im_size=(32, 32)):
        super().__init__()
        pad = 2 if channel == 1 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channel, 6, kernel_size=5, padding=pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        h, w = (conv_out(conv_out(s, 5, pad) // 2, 5, 0) // 2 for s in im_size)
        self.fc_1 = nn.Linear(16 * h * w, 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, num_classes)

    def embed(self, x):
        x = self.features(x).flatten(1)
        x = F.relu(self.fc_1(x))
        return F.relu(self.fc_2(x))

    def forward(self, x):
        return self.fc_3(self.embed(x))


class AlexNet(nn.Module):
    def __init__(self, channel, num_classes, im_size=(32, 32), batchnorm=False):
        super().__init__()
        # (out_channels, kernel, padding, pool_after); padding 4 on 1-channel input maps 28x28 to 32x32
        spec = [(128, 5, 4 if channel == 1 else 2, True), (192, 5, 2, True),
                (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True)]
        layers = []
        c, (h, w) = channel, im_size
        for out_c, k, pad, pool in spec:
            layers.append(nn.Conv2d(c, out_c, kernel_size=k, padding=pad))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_c))
            layers.append(nn.ReLU(inplace=True))
            c, h, w = out_c, conv_out(h, k, pad), conv_out(w, k, pad)
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * h * w, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.fc(self.embed(x))


VGG11_CFG = [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M']


class VGG(nn.Module):
    def __init__(self, channel, num_classes, cfg=VGG11_CFG, norm='instancenorm', im_size=(32, 32)):
        super().__init__()
        layers = []
        c, (h, w) = channel, im_size
        for i, v in enumerate(cfg):
            if v == 'M':
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = h // 2, w // 2
                continue
            pad = 3 if channel == 1 and i == 0 else 1
            layers.append(nn.Conv2d(c, v, kernel_size=3, padding=pad))
            c, h, w = v, conv_out(h, 3, pad), conv_out(w, 3, pad)
            layers.append(make_norm(norm, c, h, w))
            layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))

# -----------------------------------------------------------------------------
# ResNet18 family (CIFAR-style: 3x3 stem, no stem pooling)


def resnet_norm(norm, c):
    if norm == 'instancenorm':
        return nn.GroupNorm(c, c, affine=True)
    if norm == 'batchnorm':
        return nn.BatchNorm2d(c)
    raise ValueError(f"unknown ResNet norm {norm!r}; valid: instancenorm, batchnorm")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; avgpool_downsample replaces every strided conv by a
    stride-1 conv followed by 2x2 average pooling (the ResNet18BN_AP variant)."""

    def __init__(self, in_planes, planes, stride, norm, avgpool_downsample=False):
        super().__init__()
        self.downsample = stride != 1 and avgpool_downsample
        conv_stride = 1 if avgpool_downsample else stride
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = resnet_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = resnet_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if avgpool_downsample:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, bias=False),
                    AvgPool2x2(),
                    resnet_norm(norm, planes))
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    resnet_norm(norm, planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.downsample:
            out = avg_pool_2x2(out)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, channel, num_classes, num_blocks=(2, 2, 2, 2), norm='instancenorm',
                 avgpool_downsample=False, im_size=(32, 32)):
        super().__init__()
        self.avgpool_downsample = avgpool_downsample
        self.conv1 = nn.Conv2d(channel, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = resnet_norm(norm, 64)
        in_planes, (h, w) = 64, im_size
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            stride = 1 if i == 0 else 2
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s, norm, avgpool_downsample))
                in_planes = planes
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
            if stride != 1:
                if avgpool_downsample:
                    h, w = h // 2, w // 2
                else:
                    h, w = conv_out(h, 3, 1, stride), conv_out(w, 3, 1, stride)
        # the reference's avg_pool2d(out, 4) is a global pool on 32x32 and 28x28 inputs; the
        # adaptive pool is identical there and also handles 64x64. The AP variant keeps the map.
        num_feat = in_planes * h * w if avgpool_downsample else in_planes
        self.classifier = nn.Linear(num_feat, num_classes)

    def embed(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if not self.avgpool_downsample:
            out = F.adaptive_avg_pool2d(out, 1)
        return out.flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))

# -----------------------------------------------------------------------------
# registry: name -> factory(channel, num_classes, im_size)

MODEL_FACTORIES = {}


def register(name, factory):
    assert name not in MODEL_FACTORIES, name
    MODEL_FACTORIES[name] = factory


def convnet_factory(**overrides):
    def factory(channel, num_classes, im_size):
        return ConvNet(channel, num_classes, im_size=im_size, **overrides)
    return factory


CONVNET_VARIANTS = {
    'ConvNet': {},
    'ConvNetD1': dict(net_depth=1),
    'ConvNetD2': dict(net_depth=2),
    'ConvNetD3': dict(net_depth=3),
    'ConvNetD4': dict(net_depth=4),
    'ConvNetW32': dict(net_width=32),
    'ConvNetW64': dict(net_width=64),
    'ConvNetW128': dict(net_width=128),
    'ConvNetW256': dict(net_width=256),
    'ConvNetAS': dict(net_act='sigmoid'),
    'ConvNetAR': dict(net_act='relu'),
    'ConvNetAL': dict(net_act='leakyrelu'),
    'ConvNetASwish': dict(net_act='swish'),
    'ConvNetASwishBN': dict(net_act='swish', net_norm='batchnorm'),
    'ConvNetNN': dict(net_norm='none'),
    'ConvNetBN': dict(net_norm='batchnorm'),
    'ConvNetLN': dict(net_norm='layernorm'),
    'ConvNetIN': dict(net_norm='instancenorm'),
    'ConvNetGN': dict(net_norm='groupnorm'),
    'ConvNetNP': dict(net_pooling='none'),
    'ConvNetMP': dict(net_pooling='maxpooling'),
    'ConvNetAP': dict(net_pooling='avgpooling'),
}
for _name, _overrides in CONVNET_VARIANTS.items():
    register(_name, convnet_factory(**_overrides))

register('MLP', lambda channel, num_classes, im_size: MLP(channel, num_classes, im_size=im_size))
register('LeNet', lambda channel, num_classes, im_size: LeNet(channel, num_classes, im_size=im_size))
register('AlexNet', lambda channel, num_classes, im_size: AlexNet(channel, num_classes, im_size=im_size))
register('AlexNetBN', lambda channel, num_classes, im_size:
         AlexNet(channel, num_classes, im_size=im_size, batchnorm=True))
register('VGG11', lambda channel, num_classes, im_size:
         VGG(channel, num_classes, VGG11_CFG, norm='instancenorm', im_size=im_size))
register('VGG11BN', lambda channel, num_classes, im_size:
         VGG(channel, num_classes, VGG11_CFG, norm='batchnorm', im_size=im_size))
register('ResNet18', lambda channel, num_classes, im_size:
         ResNet(channel, num_classes, norm='instancenorm', im_size=im_size))
register('ResNet18BN', lambda channel, num_classes, im_size:
         ResNet(channel, num_classes, norm='batchnorm', im_size=im_size))
register('ResNet18BN_AP', lambda channel, num_classes, im_size:
         ResNet(channel, num_classes, norm='batchnorm', avgpool_downsample=True, im_size=im_size))

MODEL_NAMES = list(MODEL_FACTORIES)

# -----------------------------------------------------------------------------
# parametrised ConvNet names: 'ConvNet_D{depth}_W{width}_{act}_{norm}_{pool}', e.g.
# 'ConvNet_D3_W128_relu_instancenorm_avgpooling' is the default ConvNet (the NAS search space of the DSA paper).
# They are parsed on demand rather than registered, so MODEL_NAMES keeps the reference's names only.

CONVNET_ACTS = ('sigmoid', 'relu', 'leakyrelu', 'swish')
CONVNET_NORMS = ('none', 'batchnorm', 'layernorm', 'instancenorm', 'groupnorm')
CONVNET_POOLS = ('none', 'maxpooling', 'avgpooling')
CONVNET_NAME_FORMAT = 'ConvNet_D{depth}_W{width}_{act}_{norm}_{pool}'
# positive integers without leading zeros, so that every ConvNet has exactly one name
CONVNET_NAME_PATTERN = re.compile(r'ConvNet_D(?P<depth>[1-9][0-9]*)_W(?P<width>[1-9][0-9]*)'
                                  r'_(?P<act>[a-z]+)_(?P<norm>[a-z]+)_(?P<pool>[a-z]+)')
GROUPNORM_GROUPS = 4  # make_norm's groupnorm: the width must be a multiple of it


def convnet_name(depth, width, act, norm, pool):
    """The parametrised name of a ConvNet (CONVNET_NAME_FORMAT)."""
    return CONVNET_NAME_FORMAT.format(depth=depth, width=width, act=act, norm=norm, pool=pool)


def parse_convnet_name(name):
    """ConvNet keyword arguments (net_depth, net_width, net_act, net_norm, net_pooling) of a parametrised name.

    Raises ValueError naming `name` when it is malformed or asks for something the ConvNet cannot have."""
    match = CONVNET_NAME_PATTERN.fullmatch(name)
    if not match or match['act'] not in CONVNET_ACTS or match['norm'] not in CONVNET_NORMS \
            or match['pool'] not in CONVNET_POOLS:
        raise ValueError(f"invalid ConvNet name {name!r}: expected {CONVNET_NAME_FORMAT} with depth and width "
                         f"positive integers, act one of {', '.join(CONVNET_ACTS)}, norm one of "
                         f"{', '.join(CONVNET_NORMS)}, pool one of {', '.join(CONVNET_POOLS)}")
    width = int(match['width'])
    if match['norm'] == 'groupnorm' and width % GROUPNORM_GROUPS:
        raise ValueError(f"invalid ConvNet name {name!r}: groupnorm needs a width divisible by {GROUPNORM_GROUPS}")
    return dict(net_depth=int(match['depth']), net_width=width, net_act=match['act'], net_norm=match['norm'],
                net_pooling=match['pool'])


def parametrised_convnet(name, channel, num_classes, im_size):
    """The ConvNet a parametrised name describes; ValueError naming it when it cannot be built for im_size."""
    kwargs = parse_convnet_name(name)
    blocks = list(convnet_block_sizes(channel, im_size, kwargs['net_depth'], kwargs['net_pooling']))
    h, w = blocks[-1][2]
    if h < 1 or w < 1:
        raise ValueError(f"{name} cannot be built for {im_size[0]}x{im_size[1]} images: {kwargs['net_depth']} "
                         f"poolings shrink the feature map to {h}x{w}; use a smaller depth or pooling none")
    return ConvNet(channel, num_classes, im_size=im_size, **kwargs)

# -----------------------------------------------------------------------------
# public helpers


# Deeper ConvNets for the larger images of the ImageNet subsets (128x128: depth 5, 256x256: depth 6, as the
# trajectory-matching work uses them): names that stand for parametrised ConvNets, so MODEL_NAMES stays the
# reference's list.
LARGE_IMAGE_CONVNETS = {'ConvNetD5': convnet_name(5, 128, 'relu', 'instancenorm', 'avgpooling'),
                        'ConvNetD6': convnet_name(6, 128, 'relu', 'instancenorm', 'avgpooling')}


def is_parametrised_name(name):
    return isinstance(name, str) and (name.startswith('ConvNet_') or name in LARGE_IMAGE_CONVNETS)


def check_model_name(name):
    """name itself when get_network can build it (a MODEL_NAMES entry or a well-formed parametrised ConvNet name);
    otherwise ValueError listing the valid names."""
    if is_parametrised_name(name):
        parse_convnet_name(LARGE_IMAGE_CONVNETS.get(name, name))
    elif name not in MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES + list(LARGE_IMAGE_CONVNETS))}, "
                         f"or {CONVNET_NAME_FORMAT}")
    return name


def get_network(model, channel, num_classes, im_size=(32, 32), device=None):
    """Build a freshly (PyTorch-default) initialised network by name and move it to device.

    model: the name, one of MODEL_NAMES, LARGE_IMAGE_CONVNETS or a parametrised ConvNet name (CONVNET_NAME_FORMAT)
    (the original's parameter names, so keyword callers work)."""
    name = model
    is_parametrised = is_parametrised_name(check_model_name(name))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    im_size = (int(im_size[0]), int(im_size[1]))
    if is_parametrised:
        net = parametrised_convnet(LARGE_IMAGE_CONVNETS.get(name, name), channel, num_classes, im_size)
    else:
        net = MODEL_FACTORIES[name](channel, num_classes, im_size)
    return net.to(device)


def has_batchnorm(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
