"""pytest checks of every component: shapes, parameter counts, gradients, loss values, behaviour.

Run: python -m pytest -q test_components.py   (CPU only, tiny widths; GPU tests skip without CUDA)
"""
import math

import pytest
import torch
import torch.nn as nn

from layers import BlurDownsample, BlurUpsample, init_weights
from losses import GANLoss, PatchNCELoss
from networks import (DEFAULT_TAPS, PatchDiscriminator, PatchSampleMLP, ResnetGenerator, UnetGenerator,
                      load_official_state_dict)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------- networks

@pytest.mark.parametrize("n_blocks, antialias, expected",
                         [(9, False, 11_378_179), (6, False, 7_837_699), (9, True, 11_378_179)])
def test_resnet_generator_has_official_parameter_count(n_blocks, antialias, expected):
    assert n_params(ResnetGenerator(n_blocks=n_blocks, antialias=antialias)) == expected


@pytest.mark.parametrize("antialias", [False, True])
def test_patch_discriminator_has_official_parameter_count(antialias):
    assert n_params(PatchDiscriminator(ndf=64, n_layers=3, antialias=antialias)) == 2_764_737


@pytest.mark.parametrize("num_downs, expected", [(8, 54_409_603), (7, 41_825_667)])
def test_unet_generator_has_official_parameter_count(num_downs, expected):
    assert n_params(UnetGenerator(num_downs=num_downs)) == expected


SIZES = [(64, 64), (128, 128), (256, 256), (64, 96)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("antialias", [False, True])
def test_resnet_generator_keeps_input_size(size, antialias):
    G = ResnetGenerator(ngf=4, n_blocks=2, antialias=antialias)
    y = G(torch.randn(2, 3, *size))
    assert y.shape == (2, 3, *size)
    assert y.abs().max() <= 1  # tanh output


@pytest.mark.parametrize("size", SIZES)
def test_unet_generator_keeps_input_size(size):
    assert UnetGenerator(num_downs=5, ngf=4)(torch.randn(1, 3, *size)).shape == (1, 3, *size)


def test_unet_generator_rejects_sides_not_divisible_by_its_depth():
    with pytest.raises(ValueError, match="multiples of 32"):
        UnetGenerator(num_downs=5, ngf=4)(torch.randn(1, 3, 64, 80))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("antialias", [False, True])
def test_patch_discriminator_gives_one_logit_per_70px_patch(size, antialias):
    D = PatchDiscriminator(ndf=4, antialias=antialias)
    h, w = size
    assert D(torch.randn(2, 3, h, w)).shape == (2, 1, h // 8 - 2, w // 8 - 2)


def test_generators_accept_one_channel_images():
    assert ResnetGenerator(1, 1, ngf=4, n_blocks=1)(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    assert PatchDiscriminator(1, ndf=4)(torch.randn(1, 1, 64, 64)).shape == (1, 1, 6, 6)


def test_encode_taps_have_official_shapes_at_256():
    G = ResnetGenerator(antialias=True)
    shapes = [tuple(f.shape) for f in G.encode(torch.randn(1, 3, 256, 256))]
    assert shapes == [(1, 3, 262, 262), (1, 128, 256, 256), (1, 256, 128, 128), (1, 256, 64, 64), (1, 256, 64, 64)]
    assert [G.tap(t)[0] for t in DEFAULT_TAPS] == [0, 4, 8, 12, 16]  # the official nce_layers
    assert G.tap_channels() == [3, 128, 256, 256, 256]


def test_encode_taps_are_conv_outputs_before_norm():
    G = ResnetGenerator(ngf=4, n_blocks=2, antialias=True)
    x = torch.randn(1, 3, 32, 32)
    down1 = G.encode(x, ["down1"])[0]
    assert isinstance(G.model[4], nn.Conv2d)
    assert torch.allclose(down1, G.model[4](G.model[:4](x)))
    assert down1.mean(dim=(2, 3)).abs().max() > 1e-4  # not instance-normalised


def test_encode_runs_only_as_deep_as_the_deepest_tap():
    G = ResnetGenerator(ngf=4, n_blocks=6, antialias=True)
    ran = []
    for i, layer in enumerate(G.model):
        layer.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    G.encode(torch.randn(1, 3, 32, 32), ["input", "res1"])
    assert max(ran) == G.tap("res1")[0]


def test_forward_with_taps_matches_forward_and_encode():
    G = ResnetGenerator(ngf=4, n_blocks=5, antialias=True)
    x = torch.randn(2, 3, 32, 32)
    y, feats = G(x, DEFAULT_TAPS)
    assert torch.allclose(y, G(x))
    for a, b in zip(feats, G.encode(x)):
        assert torch.allclose(a, b)


def test_unknown_tap_names_the_valid_ones():
    with pytest.raises(ValueError, match="res1 \\(12\\)"):
        ResnetGenerator(ngf=4, n_blocks=5, antialias=True).encode(torch.randn(1, 3, 16, 16), ["res7"])


def test_blur_sampling_halves_and_doubles_and_keeps_constants():
    x = torch.full((1, 2, 8, 8), 3.0)
    assert torch.allclose(BlurDownsample(2)(x), torch.full((1, 2, 4, 4), 3.0))
    assert torch.allclose(BlurUpsample(2)(x), torch.full((1, 2, 16, 16), 3.0))


def test_patch_sample_mlp_reuses_ids_and_normalises():
    H = PatchSampleMLP([3, 8], nc=16)
    feats = [torch.randn(2, 3, 6, 6), torch.randn(2, 8, 4, 4)]
    out, ids = H(feats, num_patches=20)
    assert [tuple(f.shape) for f in out] == [(2, 20, 16), (2, 16, 16)]  # capped at H*W = 16
    assert all(torch.allclose(f.norm(dim=-1), torch.ones(f.shape[:2]), atol=1e-5) for f in out)
    assert len(set(ids[0].tolist())) == 20  # no location drawn twice
    again, ids2 = H(feats, num_patches=20, patch_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2))
    assert all(torch.allclose(a, b) for a, b in zip(out, again))


def test_patch_sample_mlp_samples_the_given_locations():
    H = PatchSampleMLP([2], nc=4)
    feat = torch.randn(1, 2, 3, 3)
    ids = [torch.tensor([0, 4, 8])]  # the diagonal of a 3x3 map
    out, _ = H([feat], patch_ids=ids)
    picked = torch.stack([feat[0, :, 0, 0], feat[0, :, 1, 1], feat[0, :, 2, 2]])
    expected = H.mlps[0](picked)
    assert torch.allclose(out[0][0], expected / expected.norm(dim=-1, keepdim=True), atol=1e-6)


def test_every_parameter_of_G_D_H_receives_a_finite_nonzero_gradient():
    torch.manual_seed(0)
    G = init_weights(ResnetGenerator(ngf=4, n_blocks=5, antialias=True), "xavier")
    D = init_weights(PatchDiscriminator(ndf=4, antialias=True), "xavier")
    H = init_weights(PatchSampleMLP(G.tap_channels(), nc=8), "xavier")
    x = torch.randn(2, 3, 32, 32)
    y, feats_k = G(x, DEFAULT_TAPS)
    q, ids = H(G.encode(y), 16)
    k, _ = H(feats_k, 16, ids)
    loss = GANLoss()(D(y), True) + sum(PatchNCELoss()(a, b) for a, b in zip(q, k))
    loss.backward()
    for name, p in [*G.named_parameters(), *D.named_parameters(), *H.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["normal", "xavier"])
def test_init_weights_gives_the_official_statistics(kind):
    torch.manual_seed(0)
    net = init_weights(nn.Sequential(nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.Linear(256, 256)), kind)
    conv, bn, lin = net
    expected = 0.02 if kind == "normal" else 0.02 * math.sqrt(2 / (64 * 9 + 128 * 9))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert conv.bias.abs().max() == 0
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert lin.weight.std().item() == pytest.approx(0.02 if kind == "normal" else 0.02 / 16, rel=0.05)


def test_init_weights_leaves_blur_filters_alone():
    G = init_weights(ResnetGenerator(ngf=4, n_blocks=1, antialias=True), "normal")
    assert torch.allclose(G.model[7].filt[0, 0].sum(), torch.tensor(1.0))


# ----------------------------------------------------------------------------- losses

PRED = torch.tensor([[[[0.5, -1.0]]]])


@pytest.mark.parametrize("mode, real, expected", [
    ("lsgan", True, (0.25 + 4.0) / 2), ("lsgan", False, (0.25 + 1.0) / 2),
    ("vanilla", True, (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2),
    ("vanilla", False, (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-1.0))) / 2),
    ("nonsaturating", True, (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2),
    ("nonsaturating", False, (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-1.0))) / 2),
])
def test_gan_loss_matches_hand_computed_values(mode, real, expected):
    assert GANLoss(mode)(PRED, real).item() == pytest.approx(expected, rel=1e-6)


def test_gan_loss_label_smoothing_moves_the_real_target():
    assert GANLoss("lsgan", real_label=0.9)(PRED, True).item() == pytest.approx((0.16 + 3.61) / 2)


def test_gan_loss_rejects_unknown_mode_and_smoothing_it_cannot_do():
    with pytest.raises(ValueError, match="unknown GAN mode"):
        GANLoss("wasserstein")
    with pytest.raises(ValueError, match="nonsaturating"):
        GANLoss("nonsaturating", real_label=0.9)


def test_patchnce_is_near_zero_for_matching_orthogonal_patches():
    feats = torch.eye(8)[None]  # (1, 8, 8): 8 orthogonal unit patches
    assert PatchNCELoss(temperature=0.07)(feats, feats).item() < 1e-5


def test_patchnce_matches_a_hand_computed_value():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    k = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]])
    tau = 0.5
    # patch 0: pos 0.6, negative k1 . q0 = 1.0; patch 1: pos 0.0, negative k0 . q1 = 0.8
    l0 = -math.log(math.exp(0.6 / tau) / (math.exp(0.6 / tau) + math.exp(1.0 / tau) + math.exp(-10 / tau)))
    l1 = -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(0.8 / tau) + math.exp(-10 / tau)))
    assert PatchNCELoss(tau)(q, k).item() == pytest.approx((l0 + l1) / 2, rel=1e-5)


def test_patchnce_of_random_features_is_about_log_p():
    torch.manual_seed(0)
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)
    q, k = unit(torch.randn(4, 64, 256)), unit(torch.randn(4, 64, 256))
    assert PatchNCELoss(temperature=1.0)(q, k).item() == pytest.approx(math.log(64), abs=0.05)
    assert math.log(64) < PatchNCELoss(temperature=0.07)(q, k).item() < math.log(64) + 1.0


def test_patchnce_uses_negatives_from_the_same_image_only():
    q = torch.eye(4)[None].repeat(2, 1, 1)
    k = q.clone()
    k[1] = k[1].roll(1, dims=0)  # image 1's keys are shuffled; image 0 is a perfect match
    loss = PatchNCELoss(0.07)
    assert loss(q[:1], k[:1]).item() < 1e-5
    assert loss(q, k).item() == pytest.approx(loss(q[1:], k[1:]).item() / 2, rel=1e-4)


def test_patchnce_detaches_the_keys():
    q = torch.randn(1, 4, 8, requires_grad=True)
    k = torch.randn(1, 4, 8, requires_grad=True)
    PatchNCELoss()(q, k).backward()
    assert q.grad is not None and k.grad is None


def test_patchnce_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda t: PatchNCELoss(0.5)(t, k), (q,))


# ----------------------------------------------------------------------------- official weights

def official_resnet_generator(ngf=4, n_blocks=2):
    """An independent reference in the official flat layout (keys `model.N...`), strided convs."""
    def block(ch):
        m = nn.Module()
        m.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(),
                                     nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))
        m.forward = lambda x: x + m.conv_block(x)
        return m

    def norm_relu(ch):
        return [nn.InstanceNorm2d(ch), nn.ReLU()]

    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), *norm_relu(ngf),
              nn.Conv2d(ngf, 2 * ngf, 3, 2, 1), *norm_relu(2 * ngf),
              nn.Conv2d(2 * ngf, 4 * ngf, 3, 2, 1), *norm_relu(4 * ngf),
              *[block(4 * ngf) for _ in range(n_blocks)],
              nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, 2, 1, 1), *norm_relu(2 * ngf),
              nn.ConvTranspose2d(2 * ngf, ngf, 3, 2, 1, 1), *norm_relu(ngf),
              nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
    ref = nn.Module()
    ref.model = nn.Sequential(*layers)
    return ref


def test_official_generator_weights_load_and_give_the_official_output():
    torch.manual_seed(0)
    ref = official_resnet_generator()
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # as saved from DataParallel
    state["model.2.running_mean"] = torch.zeros(4)  # PyTorch 0.4 checkpoints carried these
    G = load_official_state_dict(ResnetGenerator(ngf=4, n_blocks=2), state)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(G(x), ref.model(x), atol=1e-6)


def test_official_patchsample_keys_load_into_H():
    H = PatchSampleMLP([3, 8], nc=4)
    official = {f"mlp_{i}.{j}.{p}": torch.randn_like(v)
                for i, mlp in enumerate(H.mlps) for j in (0, 2) for p, v in mlp[j].named_parameters()}
    load_official_state_dict(H, official)
    assert torch.equal(H.mlps[1][2].weight, official["mlp_1.2.weight"])


def test_our_state_dict_round_trips_through_the_official_loader():
    D = PatchDiscriminator(ndf=4, antialias=True)
    D2 = load_official_state_dict(PatchDiscriminator(ndf=4, antialias=True), D.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(D(x), D2(x))


def test_mismatched_official_weights_name_the_first_mismatch():
    with pytest.raises(ValueError, match="model.0.weight.*does not fit.*model.1.weight"):
        load_official_state_dict(ResnetGenerator(ngf=4, n_blocks=2), PatchDiscriminator(ndf=4).state_dict())
    with pytest.raises(ValueError, match="'model.12.weight' .* does not fit ResnetGenerator.model.12.conv_block"):
        load_official_state_dict(ResnetGenerator(ngf=4, n_blocks=3), ResnetGenerator(ngf=4, n_blocks=2).state_dict())
    with pytest.raises(ValueError, match="has 8 tensors but PatchSampleMLP has 4; first unmatched: 'mlps.1.0.weight'"):
        load_official_state_dict(PatchSampleMLP([3], nc=4), PatchSampleMLP([3, 3], nc=4).state_dict())
