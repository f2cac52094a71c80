import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import networks  # noqa: E402
from networks import MODEL_NAMES, get_network, has_batchnorm  # noqa: E402

torch.set_num_threads(2)

EXPECTED_NAMES = [
    'ConvNet', 'ConvNetD1', 'ConvNetD2', 'ConvNetD3', 'ConvNetD4',
    'ConvNetW32', 'ConvNetW64', 'ConvNetW128', 'ConvNetW256',
    'ConvNetAS', 'ConvNetAR', 'ConvNetAL', 'ConvNetASwish', 'ConvNetASwishBN',
    'ConvNetNN', 'ConvNetBN', 'ConvNetLN', 'ConvNetIN', 'ConvNetGN',
    'ConvNetNP', 'ConvNetMP', 'ConvNetAP',
    'MLP', 'LeNet', 'AlexNet', 'AlexNetBN', 'VGG11', 'VGG11BN',
    'ResNet18', 'ResNet18BN', 'ResNet18BN_AP',
]

# (channel, num_classes, im_size)
CIFAR10 = (3, 10, (32, 32))
MNIST = (1, 10, (28, 28))
TINY = (3, 200, (64, 64))
SHAPES = {'cifar10': CIFAR10, 'mnist': MNIST, 'tiny': TINY}

# SPEC §10: name -> (CIFAR10, MNIST, TinyImageNet or None where the reference fails)
PARAM_COUNTS = {
    'MLP': (411_146, 118_282, None),
    'ConvNet': (320_010, 317_706, 1_938_120),
    'LeNet': (62_006, 61_706, None),
    'AlexNet': (1_872_202, 1_865_802, None),
    'AlexNetBN': (1_874_122, 1_867_722, None),
    'VGG11': (9_231_114, 9_229_962, None),
    'VGG11BN': (9_231_114, 9_229_962, None),
    'ResNet18': (11_173_962, 11_172_810, None),
    'ResNet18BN': (11_173_962, 11_172_810, None),
    'ResNet18BN_AP': (11_250_762, 11_213_770, None),
    'ConvNetD1': (331_530, 329_226, 26_218_440),
    'ConvNetD2': (233_610, 231_306, 6_705_480),
    'ConvNetD3': (320_010, 317_706, 1_938_120),
    'ConvNetD4': (452_490, 450_186, 857_160),
    'ConvNetW32': (24_714, 24_138, 429_384),
    'ConvNetW64': (86_282, 85_130, 895_432),
    'ConvNetW128': (320_010, 317_706, 1_938_120),
    'ConvNetW256': (1_229_834, 1_225_226, 4_465_864),
    'ConvNetAS': (320_010, 317_706, 1_938_120),
    'ConvNetAR': (320_010, 317_706, 1_938_120),
    'ConvNetAL': (320_010, 317_706, 1_938_120),
    'ConvNetASwish': (320_010, 317_706, 1_938_120),
    'ConvNetASwishBN': (320_010, 317_706, 1_938_120),
    'ConvNetNN': (319_242, 316_938, 1_937_352),
    'ConvNetBN': (320_010, 317_706, 1_938_120),
    'ConvNetLN': (663_306, 661_002, 3_313_608),
    'ConvNetIN': (320_010, 317_706, 1_938_120),
    'ConvNetGN': (320_010, 317_706, 1_938_120),
    'ConvNetNP': (1_610_250, 1_607_946, 105_157_320),
    'ConvNetMP': (320_010, 317_706, 1_938_120),
    'ConvNetAP': (320_010, 317_706, 1_938_120),
}
CIFAR100_COUNTS = {'ConvNet': 504_420, 'MLP': 422_756, 'ResNet18': 11_220_132}

BN_MODELS = {'ConvNetBN', 'ConvNetASwishBN', 'AlexNetBN', 'VGG11BN', 'ResNet18BN', 'ResNet18BN_AP'}


def classifier_of(model):
    # the final linear layer keeps the reference's attribute name for each family
    for attr in ('classifier', 'fc_3', 'fc'):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise AssertionError(f'{type(model).__name__} has no classifier layer')


def meta_network(name, channel, num_classes, im_size):
    # parameters on the meta device have shapes but no storage: counting the 105M-parameter
    # ConvNetNP on 64x64 costs nothing
    with torch.device('meta'):
        return get_network(name, channel, num_classes, im_size, device='meta')


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def make_input(channel, im_size, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channel, *im_size, generator=g)

# -----------------------------------------------------------------------------
# registry


def test_registry_names_and_order():
    assert MODEL_NAMES == EXPECTED_NAMES
    assert set(PARAM_COUNTS) == set(MODEL_NAMES)


def test_unknown_name_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError) as exc:
        get_network('ConvNetXYZ', 3, 10, (32, 32), device='cpu')
    msg = str(exc.value)
    assert 'ConvNetXYZ' in msg
    for name in MODEL_NAMES:
        assert name in msg


def test_device_argument_and_default():
    net = get_network('ConvNetW32', 3, 10, (32, 32), device='cpu')
    assert all(p.device.type == 'cpu' for p in net.parameters())
    assert not isinstance(net, nn.DataParallel)
    expected = 'cuda' if torch.cuda.is_available() else 'cpu'
    net = get_network('LeNet', 3, 10)
    assert next(net.parameters()).device.type == expected


def test_construction_is_reproducible_and_uses_only_init_randomness():
    torch.manual_seed(123)
    a = get_network('ConvNet', 3, 10, (32, 32), device='cpu')
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = get_network('ConvNet', 3, 10, (32, 32), device='cpu')
    after_b = torch.rand(1)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(after_a, after_b)
    # a different seed gives a different initialisation
    torch.manual_seed(124)
    c = get_network('ConvNet', 3, 10, (32, 32), device='cpu')
    assert not torch.equal(a.classifier.weight, c.classifier.weight)

# -----------------------------------------------------------------------------
# parameter counts (SPEC §10)


@pytest.mark.parametrize('name', EXPECTED_NAMES)
def test_param_counts(name):
    cifar, mnist, tiny = PARAM_COUNTS[name]
    assert num_params(meta_network(name, *CIFAR10)) == cifar
    assert num_params(meta_network(name, *MNIST)) == mnist
    if tiny is not None:
        assert num_params(meta_network(name, *TINY)) == tiny


@pytest.mark.parametrize('name', sorted(CIFAR100_COUNTS))
def test_param_counts_cifar100(name):
    assert num_params(meta_network(name, 3, 100, (32, 32))) == CIFAR100_COUNTS[name]

# -----------------------------------------------------------------------------
# forward / embed / backward


@pytest.mark.parametrize('shape', list(SHAPES))
@pytest.mark.parametrize('name', EXPECTED_NAMES)
def test_forward_shape_finite_and_embed(name, shape):
    channel, num_classes, im_size = SHAPES[shape]
    x = make_input(channel, im_size)
    if name == 'ConvNetNP' and shape == 'tiny':
        # 105M parameters: check the shapes on the meta device only
        net = meta_network(name, channel, num_classes, im_size)
        x = x.to('meta')
    else:
        torch.manual_seed(0)
        net = get_network(name, channel, num_classes, im_size, device='cpu')
    net.eval()
    with torch.no_grad():
        out = net(x)
        emb = net.embed(x)
        out_from_embed = classifier_of(net)(emb)
    assert out.shape == (2, num_classes)
    assert emb.dim() == 2 and emb.shape[0] == 2
    assert emb.shape[1] == classifier_of(net).in_features
    if x.device.type != 'meta':
        assert torch.isfinite(out).all()
        assert torch.allclose(out, out_from_embed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('shape', ['cifar10', 'mnist'])
@pytest.mark.parametrize('name', EXPECTED_NAMES)
def test_every_parameter_gets_a_gradient(name, shape):
    channel, num_classes, im_size = SHAPES[shape]
    torch.manual_seed(0)
    net = get_network(name, channel, num_classes, im_size, device='cpu')
    net.train()
    x = make_input(channel, im_size, batch=2, seed=1)
    y = torch.tensor([0, 1])
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert sum(p.grad.abs().sum() for p in net.parameters()) > 0


def test_embed_gradient_flows_to_input():
    # distribution matching backpropagates a feature-mean loss into the synthetic images
    net = get_network('ConvNet', 3, 10, (32, 32), device='cpu')
    x = make_input(3, (32, 32)).requires_grad_(True)
    net.embed(x).mean(0).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_mnist_convnet_features_match_cifar():
    # padding 3 on the first conv makes a 28x28 input produce the 32x32 feature shape
    net = get_network('ConvNet', 1, 10, (28, 28), device='cpu')
    with torch.no_grad():
        assert net.embed(make_input(1, (28, 28))).shape == (2, 128 * 4 * 4)


def test_resnet18_pool_matches_reference_avg_pool_4():
    net = get_network('ResNet18', 3, 10, (32, 32), device='cpu').eval()
    x = make_input(3, (32, 32))
    with torch.no_grad():
        out = nn.functional.relu(net.bn1(net.conv1(x)))
        out = net.layer4(net.layer3(net.layer2(net.layer1(out))))
        ref = nn.functional.avg_pool2d(out, 4).flatten(1)
        assert torch.allclose(net.embed(x), ref, atol=1e-6)

# -----------------------------------------------------------------------------
# structure, names, normalisation layers


@pytest.mark.parametrize('name', EXPECTED_NAMES)
def test_has_batchnorm(name):
    assert has_batchnorm(meta_network(name, *CIFAR10)) == (name in BN_MODELS)


PARAM_NAMES = {
    'ConvNet': ['features.0.weight', 'features.1.weight', 'features.4.weight', 'features.8.bias',
                'classifier.weight', 'classifier.bias'],
    'ConvNetNN': ['features.0.weight', 'features.3.weight', 'features.6.weight', 'classifier.weight'],
    'ConvNetNP': ['features.0.weight', 'features.1.weight', 'features.3.weight', 'features.6.weight',
                  'classifier.weight'],
    'ConvNetBN': ['features.1.running_mean', 'features.5.running_var', 'classifier.weight'],
    'MLP': ['fc_1.weight', 'fc_2.weight', 'fc_3.weight', 'fc_3.bias'],
    'LeNet': ['features.0.weight', 'features.3.weight', 'fc_1.weight', 'fc_2.weight', 'fc_3.weight'],
    'AlexNet': ['features.0.weight', 'features.3.weight', 'features.6.weight', 'features.8.weight',
                'features.10.weight', 'fc.weight', 'fc.bias'],
    'AlexNetBN': ['features.0.weight', 'features.1.running_mean', 'features.4.weight', 'features.8.weight',
                  'features.11.weight', 'features.14.weight', 'features.15.weight', 'fc.weight'],
    'VGG11': ['features.0.weight', 'features.1.weight', 'features.4.weight', 'features.8.weight',
              'features.11.weight', 'features.26.weight', 'classifier.weight'],
    'VGG11BN': ['features.1.running_mean', 'features.26.running_var', 'classifier.weight'],
    'ResNet18': ['conv1.weight', 'bn1.weight', 'layer1.0.conv1.weight', 'layer2.0.shortcut.0.weight',
                 'layer2.0.shortcut.1.weight', 'layer4.1.bn2.weight', 'classifier.weight'],
    'ResNet18BN': ['bn1.running_mean', 'layer3.0.shortcut.1.running_var', 'layer4.1.bn2.weight',
                   'classifier.weight'],
    'ResNet18BN_AP': ['layer2.0.shortcut.0.weight', 'layer2.0.shortcut.2.running_mean',
                      'layer4.1.bn2.weight', 'classifier.weight'],
}


@pytest.mark.parametrize('name', sorted(PARAM_NAMES))
def test_state_dict_names(name):
    keys = set(meta_network(name, *CIFAR10).state_dict())
    missing = [k for k in PARAM_NAMES[name] if k not in keys]
    assert not missing, missing
    assert not any(k.startswith('module.') for k in keys)


def test_resnet_blocks_without_shape_change_have_empty_shortcut():
    keys = set(meta_network('ResNet18', *CIFAR10).state_dict())
    assert not any(k.startswith('layer1.') and '.shortcut.' in k for k in keys)
    assert not any(k.startswith('layer2.1.shortcut') for k in keys)


def test_convnet_layer_types():
    def layer_types(name):
        return [type(m) for m in meta_network(name, *CIFAR10).features]
    conv, gn, relu, avg = nn.Conv2d, nn.GroupNorm, nn.ReLU, networks.AvgPool2x2
    assert layer_types('ConvNet') == [conv, gn, relu, avg] * 3
    assert layer_types('ConvNetNN') == [conv, relu, avg] * 3
    assert layer_types('ConvNetNP') == [conv, gn, relu] * 3
    assert layer_types('ConvNetMP') == [conv, gn, relu, nn.MaxPool2d] * 3
    assert layer_types('ConvNetBN') == [conv, nn.BatchNorm2d, relu, avg] * 3
    assert layer_types('ConvNetAS')[2] is nn.Sigmoid
    assert layer_types('ConvNetASwishBN')[1:3] == [nn.BatchNorm2d, networks.Swish]
    assert len(layer_types('ConvNetD4')) == 16


def test_convnet_norm_and_activation_details():
    net = meta_network('ConvNet', *CIFAR10)
    assert net.features[1].num_groups == 128 and net.features[1].affine
    assert net.features[0].padding == (1, 1)
    gn = meta_network('ConvNetGN', *CIFAR10).features[1]
    assert gn.num_groups == 4 and gn.num_channels == 128
    ln = meta_network('ConvNetLN', *CIFAR10).features
    assert ln[1].normalized_shape == (128, 32, 32) and ln[5].normalized_shape == (128, 16, 16)
    assert ln[1].elementwise_affine
    assert meta_network('ConvNetAL', *CIFAR10).features[2].negative_slope == 0.01
    assert meta_network('ConvNet', *MNIST).features[0].padding == (3, 3)
    x = torch.linspace(-4, 4, 9)
    assert torch.allclose(networks.Swish()(x), x * torch.sigmoid(x))


def test_resnet_norms_and_ap_downsampling():
    net = meta_network('ResNet18', *CIFAR10)
    assert isinstance(net.bn1, nn.GroupNorm) and net.bn1.num_groups == 64 and net.bn1.affine
    assert isinstance(net.layer4[1].bn2, nn.GroupNorm) and net.layer4[1].bn2.num_groups == 512
    assert net.layer2[0].conv1.stride == (2, 2) and net.conv1.stride == (1, 1)
    assert net.conv1.bias is None
    ap = meta_network('ResNet18BN_AP', *CIFAR10)
    assert isinstance(ap.layer2[0].bn1, nn.BatchNorm2d)
    assert all(m.stride == (1, 1) for m in ap.modules() if isinstance(m, nn.Conv2d))
    assert [type(m) for m in ap.layer3[0].shortcut] == [nn.Conv2d, networks.AvgPool2x2, nn.BatchNorm2d]
    assert ap.classifier.in_features == 512 * 4 * 4
    assert meta_network('ResNet18BN_AP', *MNIST).classifier.in_features == 512 * 3 * 3


def test_vgg_first_conv_padding_and_norm():
    vgg = meta_network('VGG11', *MNIST)
    assert vgg.features[0].padding == (3, 3)
    assert isinstance(vgg.features[1], nn.GroupNorm) and vgg.features[1].num_groups == 64
    assert meta_network('VGG11', *CIFAR10).features[0].padding == (1, 1)
    assert isinstance(meta_network('VGG11BN', *CIFAR10).features[1], nn.BatchNorm2d)


def test_fast_avg_pool_equals_avg_pool2d():
    pool = networks.AvgPool2x2()
    assert isinstance(pool, nn.AvgPool2d) and pool.state_dict() == {}
    x = torch.randn(3, 5, 8, 6, requires_grad=True)
    g = torch.randn(3, 5, 4, 3)
    ours, = torch.autograd.grad(pool(x), x, g)
    ref, = torch.autograd.grad(nn.functional.avg_pool2d(x, 2, 2), x, g)
    assert torch.allclose(pool(x), nn.functional.avg_pool2d(x, 2, 2), atol=1e-6)
    assert torch.equal(ours, ref)  # the backward spreads g / 4 over each window, as the kernel does
    # first and second derivatives (double backward is what DC/DSA matching needs)
    x64 = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(networks._AvgPool2x2.apply, (x64,))
    assert torch.autograd.gradgradcheck(networks._AvgPool2x2.apply, (x64,))
    # torch.func transforms (batched evaluation and batched class gradients run the network under vmap)
    xs = torch.randn(4, 3, 5, 8, 6)
    assert torch.allclose(torch.func.vmap(pool)(xs), nn.functional.avg_pool2d(xs.flatten(0, 1), 2, 2).view(4, 3, 5, 4, 3),
                          atol=1e-6)
    sq = lambda f: (lambda t: f(t).pow(2).sum())
    assert torch.allclose(torch.func.vmap(torch.func.grad(sq(pool)))(xs),
                          torch.func.vmap(torch.func.grad(sq(lambda t: nn.functional.avg_pool2d(t, 2, 2))))(xs),
                          atol=1e-6)
    # odd sides (floor mode drops the last row/column) and channels_last inputs take PyTorch's kernel
    odd = torch.randn(2, 3, 7, 5)
    assert torch.equal(pool(odd), nn.functional.avg_pool2d(odd, 2, 2))
    cl = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert torch.equal(pool(cl), nn.functional.avg_pool2d(cl, 2, 2))

# -----------------------------------------------------------------------------
# parametrised ConvNet names (the NAS search space)

DEFAULT_CONVNET = dict(depth=3, width=128, act='relu', norm='instancenorm', pool='avgpooling')


def parametrised_name_of(variant):
    """The parametrised name of a named ConvNet variant, from its CONVNET_VARIANTS overrides."""
    overrides = networks.CONVNET_VARIANTS[variant]
    fields = dict(DEFAULT_CONVNET)
    for key, field in (('net_depth', 'depth'), ('net_width', 'width'), ('net_act', 'act'), ('net_norm', 'norm'),
                       ('net_pooling', 'pool')):
        if key in overrides:
            fields[field] = overrides[key]
    return networks.convnet_name(**fields)


@pytest.mark.parametrize('variant', sorted(networks.CONVNET_VARIANTS))
def test_parametrised_name_equals_named_variant(variant):
    # same layers, same parameter names and shapes, and the same initialisation from the same seed
    name = parametrised_name_of(variant)
    for channel, num_classes, im_size in (CIFAR10, MNIST):
        torch.manual_seed(7)
        named = get_network(variant, channel, num_classes, im_size, device='cpu')
        torch.manual_seed(7)
        ours = get_network(name, channel, num_classes, im_size, device='cpu')
        assert [type(m) for m in ours.modules()] == [type(m) for m in named.modules()]
        assert repr(ours) == repr(named)
        a, b = named.state_dict(), ours.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    cifar, mnist, tiny = PARAM_COUNTS[variant]
    assert num_params(meta_network(name, *CIFAR10)) == cifar
    assert num_params(meta_network(name, *MNIST)) == mnist
    assert num_params(meta_network(name, *TINY)) == tiny


def test_default_convnet_has_the_expected_parametrised_name():
    assert parametrised_name_of('ConvNet') == 'ConvNet_D3_W128_relu_instancenorm_avgpooling'
    assert parametrised_name_of('ConvNetMP') == 'ConvNet_D3_W128_relu_instancenorm_maxpooling'
    assert networks.parse_convnet_name('ConvNet_D1_W32_sigmoid_groupnorm_none') == dict(
        net_depth=1, net_width=32, net_act='sigmoid', net_norm='groupnorm', net_pooling='none')


def test_parametrised_names_are_not_registered():
    # the registry keeps the reference's names (scripts list them); parametrised names are parsed on demand
    assert MODEL_NAMES == EXPECTED_NAMES
    assert not any(name.startswith('ConvNet_') for name in MODEL_NAMES)


@pytest.mark.parametrize('name', [
    'ConvNet_D3_W128_relu_instancenorm', 'ConvNet_D0_W128_relu_instancenorm_avgpooling',
    'ConvNet_D3_W0_relu_instancenorm_avgpooling', 'ConvNet_D03_W128_relu_instancenorm_avgpooling',
    'ConvNet_D3_W128_tanh_instancenorm_avgpooling', 'ConvNet_D3_W128_relu_weirdnorm_avgpooling',
    'ConvNet_D3_W128_relu_instancenorm_sumpooling', 'ConvNet_Dx_W128_relu_instancenorm_avgpooling',
    'ConvNet_D3_W30_relu_groupnorm_avgpooling', 'ConvNet_D3_W128_relu_instancenorm_avgpooling_extra',
])
def test_invalid_parametrised_name_raises_value_error_naming_it(name):
    with pytest.raises(ValueError) as exc:
        get_network(name, 3, 10, (32, 32), device='cpu')
    assert name in str(exc.value)


def test_unknown_name_message_mentions_the_parametrised_form():
    with pytest.raises(ValueError, match='ConvNet_D'):
        get_network('ConvNetXYZ', 3, 10, (32, 32), device='cpu')


def test_too_much_pooling_is_named():
    # 28x28 (padded to 32x32) survives 5 poolings (1x1) but not 6; without pooling any depth builds
    assert meta_network('ConvNet_D5_W8_relu_none_avgpooling', *MNIST).classifier.in_features == 8
    with pytest.raises(ValueError, match='ConvNet_D6_W8_relu_none_maxpooling cannot be built for 28x28'):
        get_network('ConvNet_D6_W8_relu_none_maxpooling', 1, 10, (28, 28), device='cpu')
    assert meta_network('ConvNet_D6_W8_relu_none_none', *MNIST).classifier.in_features == 8 * 32 * 32


def test_parametrised_convnet_trains():
    torch.manual_seed(0)
    net = get_network('ConvNet_D2_W16_leakyrelu_layernorm_maxpooling', 1, 10, (28, 28), device='cpu')
    x, y = make_input(1, (28, 28), batch=4), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(net(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
