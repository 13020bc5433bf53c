"""pytest checks of every component, in the README's reading order: shapes, parameter counts, gradients, loss values
on known inputs, files written, errors raised. A failure of a model-file component says which rule of the paper (or
of the official code) the code breaks.

    python -m pytest -q test_components.py              # all of it, on a CPU (the CUDA cases skip without a GPU)
    python -m pytest -q test_components.py -k patchnce  # one component's tests alone, in seconds
    python -m pytest -q -m gpu test_components.py       # what runs differently on CUDA (each case also on the CPU)

The sections, and the -k word of each component (a test's name starts with test_WORD):
    layers.py        conv_norm_act (norms, conv biases, activations, padding), residual_block, blur (blur-pool down
                     and up), resampling (strided or blurred down- and up-sampling), init_weights
    networks.py      resnet_generator (with CUT's encoder taps), unet_generator, patchgan, patch_sample_mlp (CUT's
                     H), define_g (generators by their official names), frozen (D fixed while G steps)
    losses.py        gan_loss, patchnce
    official files   official_weights (official checkpoints loaded, read from the file alone, translated with)
    cycle_gan.py     image_pool, cyclegan (the config, the terms of Eq. 3 and the identity loss, the step, the pictures)
    cut_model.py     cut_model (the presets, Eq. 5's terms, the step, FastCUT's flip, the similarity maps)
    data             dataset (listing, loading, jitter, the sampler)
    the run folder   run_folder (logs, plots, grids, the page, checkpoints, the lock)
    the Trainer      trainer (Adam, the lr schedule, precision, the checkpoint, what a model offers)
    the commands     train_cli, resume_cli, translate_cli
    faults           faults (bad options and files, full disks, out of memory, NaN, Ctrl-C)
    several GPUs     ddp (torchrun on two CPU processes)
    on a GPU         gpu (also -m gpu; the device's step against the CPU's, precision, compile, loaders)
    the guide        guide (docs/GUIDE.md's map, traces and ablations run as code)
"""
import argparse
import ast
import contextlib
import copy
import csv
import dataclasses
import errno
import functools
import http.server
import importlib
import inspect
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import warnings
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data_utility as du
import train_gan
import translate
from cut_model import CUT, FASTCUT, CUTConfig
from cycle_gan import CycleGAN, CycleGANConfig, ImagePool
from layers import (BlurDownsample, BlurUpsample, ResnetBlock, activation, binomial_filter, conv_bias, conv_norm_act,
                    downsample, full_precision, init_weights, norm_layer, padding, upsample)
from losses import GAN_MODES, GANLoss, PatchNCELoss
from networks import (DEFAULT_TAPS, GENERATORS, PatchDiscriminator, PatchSampleMLP, ResnetGenerator, UnetBlock,
                      UnetGenerator, define_G, frozen, load_official_state_dict, official_generator)
from train_gan import Trainer, adam, lr_factor
from train_gan import main as cli
from translate import main as translate_cli

# The `gpu` marker selects the tests of what runs differently on CUDA (-m gpu). This file is the suite's only
# configuration, so the marker is not registered and its unknown-marker warning is silenced here.
warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning, message=".*gpu")


def on(device: str, *more, gpus: int = 1):
    """A device parameter (and `more` values beside it): cuda is skipped where fewer than `gpus` CUDA GPUs
    are at hand."""
    return pytest.param(device, *more, id="-".join((device, *more)), marks=pytest.mark.skipif(
        device == "cuda" and torch.cuda.device_count() < gpus, reason=f"needs {gpus} CUDA GPU(s)"))


DEVICES = [on("cpu"), on("cuda")]


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


COLLECTED = """
import json, os
def pytest_collection_finish(session):
    with open(os.environ["COLLECTED"], "w") as f:
        json.dump([[i.name, i.originalname, [m.name for m in i.iter_markers()]] for i in session.items], f)
"""


def test_index_words_select_exactly_their_components_tests(tmp_path):
    """Each -k word of the index above selects the tests named test_WORD..., and no other: pytest's -k matches a
    word anywhere in a test's name (its parameters' ids too) and its marks' names (gpu's own are its marks)."""
    (tmp_path / "collected_names.py").write_text(COLLECTED)
    subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "collected_names", __file__],
                   env={**os.environ, "PYTHONPATH": str(tmp_path), "COLLECTED": str(tmp_path / "items.json")},
                   capture_output=True, check=True)
    items = json.loads((tmp_path / "items.json").read_text())
    lines = __doc__.split("the -k word of each component")[1].splitlines()[1:]
    index = "".join(("," if line[:21].strip() else " ") + line[21:] for line in lines)  # a label starts a list
    words = [w.split()[0] for w in re.sub(r"\([^)]*\)", "", index).split(",") if w.strip()]
    assert len(words) == 27 and all(any(o.startswith(f"test_{w}_") for _, o, _ in items) for w in words), words
    for word in words:
        chosen = {name for name, _, marks in items if word in name.lower() or word != "gpu" and word in marks}
        stray = {name for name in chosen if not name.startswith(f"test_{word}_")}
        assert not stray, f"-k {word} also selects {sorted(stray)}"


def test_index_every_assert_of_the_model_file_sections_says_the_rule_it_checks():
    """A learner who rewrites a component reads the failure's message: a bare assert prints numbers alone."""
    source = Path(__file__).read_text()
    lines = source.splitlines()
    first, last = (next(i for i, line in enumerate(lines, 1) if line.startswith("# ====") and line.endswith(title))
                   for title in (" layers.py", " data"))
    bare = [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Assert) and first < node.lineno < last and node.msg is None]
    assert not bare, f"asserts without a message at lines {bare}"


# ============================================================================= layers.py

@pytest.mark.parametrize("kind, layer", [("instance", nn.InstanceNorm2d), ("batch", nn.BatchNorm2d),
                                         ("none", nn.Identity)])
def test_conv_norm_act_norms_are_those_of_both_codes(kind, layer):
    norm = norm_layer(kind, 8)
    assert type(norm) is layer, f"norm {kind!r}: the official code uses {layer.__name__}"
    if kind != "none":
        learned = kind == "batch"
        assert norm.affine == learned and norm.track_running_stats == learned, \
            f"{kind} norm: the official {layer.__name__} has affine and running statistics {learned}"
    assert conv_bias(kind) == (kind == "instance"), \
        "the official convs have a bias only before instance norm (batch norm shifts; 'none' is an official quirk)"
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        norm_layer("layer", 8)


def test_conv_norm_act_activations_are_relu_leaky_relu_of_slope_0_2_and_tanh_in_place():
    x = torch.tensor([-2.0, 0.5])
    expected = {"relu": [0.0, 0.5], "lrelu": [-0.4, 0.5], "tanh": [math.tanh(-2.0), math.tanh(0.5)],
                "none": [-2.0, 0.5]}
    for kind, values in expected.items():
        assert activation(kind)(x.clone()).tolist() == pytest.approx(values), \
            f"{kind}: ReLU, LeakyReLU(0.2) (CycleGAN appendix 7.2), tanh, or nothing"
    assert activation("relu").inplace and activation("lrelu").inplace, "ReLUs run in place, as officially (memory)"
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        activation("gelu")


def test_conv_norm_act_pads_by_reflection_replication_or_zeros():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    expected = {"reflect": [1.0, 0.0, 1.0, 2.0, 1.0], "replicate": [0.0, 0.0, 1.0, 2.0, 2.0],
                "zeros": [0.0, 0.0, 1.0, 2.0, 0.0]}
    for mode, row in expected.items():
        assert padding(mode, 1)(x)[0, 0, 1].tolist() == row, f"{mode} padding of [0, 1, 2] by 1"
    with pytest.raises(ValueError, match="unknown padding 'circular'"):
        padding("circular", 1)


def test_conv_norm_act_lays_out_pad_conv_norm_activation_as_flat_lists():
    reflect = conv_norm_act(3, 8, 7, pad=3, pad_mode="reflect")
    assert [type(m).__name__ for m in reflect] == ["ReflectionPad2d", "Conv2d", "InstanceNorm2d", "ReLU"], \
        "c7s1-k (CycleGAN appendix 7.2): reflection pad 3, 7x7 conv, instance norm, ReLU; as a flat list, whose " \
        "indices the official checkpoints name"
    assert reflect[0].padding == (3, 3, 3, 3) and reflect[1].padding == (0, 0) and reflect[1].kernel_size == (7, 7), \
        "c7s1-k: a reflection pad of 3 keeps H and W through the unpadded 7x7 conv"
    assert reflect[1].bias is not None, "a conv before instance norm has a bias, as officially"
    zeros = conv_norm_act(8, 16, 4, stride=2, pad=1, norm="batch", act="lrelu")
    assert [type(m).__name__ for m in zeros] == ["Conv2d", "BatchNorm2d", "LeakyReLU"], \
        "zero padding is done inside the conv, with no layer of its own"
    assert (zeros[0].padding, zeros[0].stride, zeros[0].bias) == ((1, 1), (2, 2), None), \
        "zero padding 1 and stride 2 in the conv; no bias before batch norm"
    bare = conv_norm_act(4, 4, 3)[0]
    assert (bare.stride, bare.padding) == ((1, 1), (0, 0)), "by default a conv of stride 1, unpadded"
    plain = conv_norm_act(4, 4, 3, pad=1, norm="none", act="none", bias=True)
    assert [type(m).__name__ for m in plain] == ["Conv2d", "Identity"] and plain[0].bias is not None, \
        "norm 'none' keeps its place as an Identity (the official layer indices); act 'none' adds nothing"


def test_conv_norm_act_full_precision_lifts_half_precision_to_float32_only():
    for dtype, lifted in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                          (torch.float32, torch.float32), (torch.float64, torch.float64)):
        assert full_precision(torch.ones(2, dtype=dtype)).dtype == lifted, f"{dtype} -> {lifted}"


def test_residual_block_adds_its_input_to_two_reflect_padded_3x3_convs():
    torch.manual_seed(0)
    block = ResnetBlock(4)
    x = torch.randn(2, 4, 8, 8)
    out, residual = block(x), block.conv_block(x)
    assert not torch.allclose(out, residual), \
        "a residual block keeps its skip: it returns x + F(x), not F(x) (He et al. 2016; CycleGAN appendix 7.2's Rk)"
    assert torch.allclose(out, x + residual), \
        "a residual block returns x + F(x) with nothing after the sum: no ReLU there (the official ResnetBlock)"
    pads = [m for m in block.conv_block if isinstance(m, (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d))]
    convs = [m for m in block.conv_block if isinstance(m, nn.Conv2d)]
    assert [type(m) for m in pads] == [nn.ReflectionPad2d] * 2 and all(c.padding == (0, 0) for c in convs), \
        "each 3x3 conv of a residual block is reflection-padded, not zero-padded (CycleGAN appendix 7.2: " \
        "reflection padding reduces artifacts; the official ResnetBlock's padding_type 'reflect')"
    assert [type(m).__name__ for m in block.conv_block] == ["ReflectionPad2d", "Conv2d", "InstanceNorm2d", "ReLU",
                                                            "ReflectionPad2d", "Conv2d", "InstanceNorm2d"], \
        "Rk (CycleGAN appendix 7.2): two 3x3 convs, each with instance norm, a ReLU between them only " \
        "(the official ResnetBlock's order)"
    for pad, conv in ((block.conv_block[0], block.conv_block[1]), (block.conv_block[4], block.conv_block[5])):
        assert pad.padding == (1, 1, 1, 1) and conv.kernel_size == (3, 3) and conv.stride == (1, 1), \
            "each conv of a residual block is 3x3, stride 1, after a reflection pad of 1: H and W are kept"
    assert n_params(block) == 2 * (4 * 4 * 9 + 4), "two 3x3 convs of C -> C channels, with biases"
    dropped = ResnetBlock(4, dropout=True).conv_block
    assert isinstance(dropped[4], nn.Dropout) and dropped[4].p == 0.5, \
        "with dropout (the official --no_dropout off) Dropout(0.5) sits between the two convs"


def test_blur_filters_are_the_binomial_ones():
    assert torch.equal(binomial_filter(3) * 16, torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])), \
        "blur-pool (Zhang 2019, as the CUT repository's Downsample) down-samples with [1, 2, 1] x [1, 2, 1] / 16"
    row = torch.tensor([1.0, 3, 3, 1])
    assert torch.equal(binomial_filter(4) * 64, torch.outer(row, row)), \
        "the CUT repository's Upsample up-samples with [1, 3, 3, 1] x [1, 3, 3, 1] / 64"
    for blur, side in ((BlurDownsample(5), 3), (BlurUpsample(5), 4)):
        assert blur.filt.shape == (5, 1, side, side) and "filt" in blur.state_dict(), \
            "one filter per channel, a buffer named filt, as in the official checkpoints"


def test_blur_downsample_blurs_then_keeps_every_second_pixel():
    impulse = torch.zeros(1, 1, 6, 6)
    impulse[0, 0, 2, 2] = 16.0
    expected = torch.zeros(1, 1, 3, 3)
    expected[0, 0, 1, 1] = 4.0  # the filter's centre, 4/16: the pixels between were blurred, then dropped
    assert torch.equal(BlurDownsample(1)(impulse), expected), "blur-pool: blur [1,2,1]^2/16, then stride 2"
    x = torch.randn(2, 3, 5, 7)
    reference = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), BlurDownsample(3).filt, stride=2, groups=3)
    assert torch.allclose(BlurDownsample(3)(x), reference), "reflection-padded by 1, each channel on its own"
    assert BlurDownsample(3)(x).shape == (2, 3, 3, 4), "(H, W) -> (ceil(H/2), ceil(W/2))"


def test_blur_upsample_spreads_each_pixel_over_a_4x4_binomial_patch():
    impulse = torch.zeros(1, 1, 3, 3)
    impulse[0, 0, 1, 1] = 16.0
    out = BlurUpsample(1)(impulse)
    assert out.shape == (1, 1, 6, 6), "(H, W) -> (2H, 2W)"
    patch = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1]))
    assert torch.equal(out[0, 0, 1:5, 1:5], patch) and out.sum() == 4 * 16, \
        "zero-insertion then the [1,3,3,1]^2/64 filter, times 4 to keep the mean"


def test_blur_upsample_pads_like_replicate_padding():
    x = torch.randn(2, 3, 5, 7)
    expected = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), BlurUpsample(3).filt, stride=2, padding=2,
                                  groups=3)
    assert torch.allclose(BlurUpsample(3)(x), expected[:, :, 1:-1, 1:-1], atol=1e-6), \
        "the official up-sampling pads by replicating the border, then crops one pixel each side"


def test_blur_sampling_halves_and_doubles_and_keeps_constants():
    x = torch.full((1, 2, 8, 8), 3.0)
    assert torch.allclose(BlurDownsample(2)(x), torch.full((1, 2, 4, 4), 3.0)), "a blur keeps a constant image"
    assert torch.allclose(BlurUpsample(2)(x), torch.full((1, 2, 16, 16), 3.0)), "a blur keeps a constant image"


@pytest.mark.parametrize("antialias", [False, True])
def test_resampling_halves_and_doubles_as_each_official_code_does(antialias):
    down, up = downsample(4, 8, "instance", antialias), upsample(8, 4, "instance", antialias)
    x = torch.randn(1, 4, 8, 8)
    how = "a stride-1 conv and a blur-pool halve H and W once, blur up-sampling and a stride-1 conv double them " \
        "(the CUT repository's anti-aliased sampling)" if antialias else "d_k halves H and W, u_k doubles them " \
        "exactly (CycleGAN appendix 7.2; a stride-2 3x3 transposed conv needs output_padding 1 to give 2H, not 2H - 1)"
    assert nn.Sequential(*down)(x).shape == (1, 8, 4, 4), how
    assert nn.Sequential(*up)(torch.randn(1, 8, 4, 4)).shape == (1, 4, 8, 8), how
    if antialias:
        assert [type(m).__name__ for m in down] == ["Conv2d", "InstanceNorm2d", "ReLU", "BlurDownsample"], \
            "CUT: conv3x3 stride 1, norm, ReLU, then blur-pool (the official antialiased down-sampling)"
        assert [type(m).__name__ for m in up] == ["BlurUpsample", "Conv2d", "InstanceNorm2d", "ReLU"], \
            "CUT: blur up-sampling, then conv3x3 stride 1, norm, ReLU"
        assert down[0].stride == (1, 1) and up[1].stride == (1, 1) and up[1].padding == (1, 1), \
            "CUT's convs keep the size: the blurs alone halve and double it"
    else:
        assert [type(m).__name__ for m in down] == ["Conv2d", "InstanceNorm2d", "ReLU"] and down[0].stride == (2, 2), \
            "CycleGAN's d_k: a 3x3 conv of stride 2, instance norm, ReLU"
        assert [type(m).__name__ for m in up] == ["ConvTranspose2d", "InstanceNorm2d", "ReLU"], \
            "CycleGAN's u_k: a 3x3 fractionally-strided conv (stride 1/2), instance norm, ReLU"
        t = up[0]
        assert (t.kernel_size, t.stride, t.padding, t.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1)), \
            "u_k: a 3x3 transposed conv, stride 2, padding 1 and output padding 1, which doubles H and W exactly"
        assert t.bias is not None and down[0].bias is not None, "biases before instance norm, as officially"
    assert down[0].kernel_size == (3, 3) and down[0].padding == (1, 1), "the conv comes first: CUT taps its output"


@pytest.mark.parametrize("kind", ["normal", "xavier"])
def test_init_weights_gives_each_official_codes_statistics(kind):
    torch.manual_seed(0)
    net = init_weights(nn.Sequential(nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.Linear(256, 256)), kind)
    conv, bn, lin = net
    expected = 0.02 if kind == "normal" else 0.02 * math.sqrt(2 / (64 * 9 + 128 * 9))
    rule = "CycleGAN (appendix 7.1): N(0, 0.02)" if kind == "normal" else \
        "the CUT repository: xavier_normal with gain 0.02"
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05), f"{rule} for convs"
    assert abs(conv.weight.mean().item()) < 0.1 * expected, f"{rule}: zero mean"
    assert lin.weight.std().item() == pytest.approx(0.02 if kind == "normal" else 0.02 / 16, rel=0.05), \
        f"{rule} for linear layers too"
    assert conv.bias.abs().max() == 0 and lin.bias.abs().max() == 0, "biases start at 0"
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01) and bn.weight.std().item() == \
        pytest.approx(0.02, rel=0.2) and bn.bias.abs().max() == 0, "batch-norm scales N(1, 0.02), shifts 0"
    with pytest.raises(ValueError, match="unknown init 'kaiming'"):
        init_weights(conv, "kaiming")


def test_init_weights_takes_the_gain_and_leaves_the_fixed_filters_alone():
    torch.manual_seed(0)
    assert init_weights(nn.Conv2d(64, 64, 3), "normal", 0.5).weight.std().item() == pytest.approx(0.5, rel=0.05), \
        "normal init draws N(0, gain): the gain given, not a fixed 0.02"
    G = init_weights(ResnetGenerator(ngf=4, n_blocks=1, antialias=True), "normal")
    assert torch.equal(G.model[7].filt[0, 0], binomial_filter(3)), "the blur filters are fixed buffers, not weights"


# ============================================================================= networks.py

@pytest.mark.parametrize("n_blocks, antialias, expected",
                         [(9, False, 11_378_179), (6, False, 7_837_699), (9, True, 11_378_179)])
def test_resnet_generator_has_the_official_parameter_count(n_blocks, antialias, expected):
    assert n_params(ResnetGenerator(n_blocks=n_blocks, antialias=antialias)) == expected, \
        f"the official ResNet generator, ngf 64, {n_blocks} blocks, has {expected:,} parameters"


def test_resnet_generator_built_plainly_is_the_official_network():
    assert n_params(ResnetGenerator()) == 11_378_179, "the defaults: ngf 64, 9 blocks, RGB to RGB"
    assert not any(isinstance(m, nn.Dropout) for m in ResnetGenerator().modules()), "no dropout (--no_dropout)"


SIZES = [(64, 64), (128, 128), (256, 256), (64, 96)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("antialias", [False, True])
def test_resnet_generator_keeps_input_size(size, antialias):
    G = ResnetGenerator(ngf=4, n_blocks=2, antialias=antialias)
    y = G(torch.randn(2, 3, *size))
    assert y.shape == (2, 3, *size), "G maps an image to an image of the same size"
    assert y.abs().max() <= 1, "the last layer is tanh: outputs in [-1, 1]"


def test_resnet_generator_is_c7s1_d_d_n_times_R_u_u_c7s1_tanh():
    G = ResnetGenerator(in_channels=1, out_channels=3, ngf=4, n_blocks=3)
    kinds = [type(m).__name__ for m in G.model]
    assert kinds[:2] == ["ReflectionPad2d", "Conv2d"] and G.model[1].kernel_size == (7, 7) and \
        G.model[0].padding == (3, 3, 3, 3), "c7s1-ngf first: reflection pad 3, a 7x7 conv (CycleGAN appendix 7.2)"
    blocks = [b for b in G.model if isinstance(b, ResnetBlock)]
    assert len(blocks) == 3 and all(b.conv_block[1].in_channels == 16 for b in blocks), "n_blocks R blocks of 4 ngf"
    assert kinds[-3:] == ["ReflectionPad2d", "Conv2d", "Tanh"] and G.model[-2].out_channels == 3 and \
        G.model[-2].bias is not None and G.model[-3].padding == (3, 3, 3, 3), \
        "c7s1-3 last: a reflection pad of 3, a 7x7 conv to the output channels (CycleGAN appendix 7.2), with a " \
        "bias, as no norm follows, then tanh (the official ResnetGenerator)"
    assert G.model[1].in_channels == 1 and G.side_multiple == 4, "two stride-2 levels: sides a multiple of 4"
    follows = [type(m).__name__ for m in ResnetGenerator(ngf=4, n_blocks=1, antialias=True).modules()]
    assert "BlurUpsample" in follows, "antialias_up left None follows antialias, so one switch builds the official " \
        "CUT generator (officially two independent flags, --no_antialias and --no_antialias_up, both off by default)"
    strided_up = ResnetGenerator(ngf=4, n_blocks=1, antialias=True, antialias_up=False)
    assert "BlurUpsample" not in [type(m).__name__ for m in strided_up.modules()], \
        "antialias_up False (the official --no_antialias_up): transposed convs up, blur-pool down only"


def test_resnet_generator_accepts_one_channel_images():
    assert ResnetGenerator(1, 1, ngf=4, n_blocks=1)(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32), \
        "grayscale in, grayscale out (input_nc = output_nc = 1)"


def test_resnet_generator_taps_have_cuts_shapes_at_256():
    G = ResnetGenerator(antialias=True)
    shapes = [tuple(f.shape) for f in G(torch.randn(1, 3, 256, 256), DEFAULT_TAPS, encode_only=True)]
    assert shapes == [(1, 3, 262, 262), (1, 128, 256, 256), (1, 256, 128, 128), (1, 256, 64, 64), (1, 256, 64, 64)], \
        "the CUT paper's appendix (training details): the taps are the (padded) input, the two down-sampling " \
        "convs, residual blocks 1 and 5"
    assert [G.tap(t)[0] for t in DEFAULT_TAPS] == [0, 4, 8, 12, 16], \
        "the official nce_layers 0,4,8,12,16: down1 and down2 are the down-sampling convs themselves (layers 4 and " \
        "8), read before their norm"
    assert G.tap_channels() == [3, 128, 256, 256, 256] and G.tap(12) == G.tap("res1") == (12, 256), \
        "a tap by name or by official index: (layer, channels)"


def test_resnet_generator_taps_are_conv_outputs_before_norm():
    G = ResnetGenerator(ngf=4, n_blocks=2, antialias=True)
    x = torch.randn(1, 3, 32, 32)
    down1 = G(x, ["down1"], encode_only=True)[0]
    assert isinstance(G.model[4], nn.Conv2d), "official nce_layers 4 is the first down-sampling conv itself"
    assert torch.allclose(down1, G.model[4](G.model[:4](x))), "official nce_layers 4: the conv's output"
    assert down1.mean(dim=(2, 3)).abs().max() > 1e-4, "taken before the instance norm"


def test_resnet_generator_encodes_only_as_deep_as_the_deepest_tap():
    G = ResnetGenerator(ngf=4, n_blocks=6, antialias=True)
    ran = []
    for i, layer in enumerate(G.model):
        layer.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    G(torch.randn(1, 3, 32, 32), ["input", "res1"], encode_only=True)
    assert max(ran) == G.tap("res1")[0], "encode_only stops at the deepest tap, as the official encoder does"


def test_resnet_generator_forward_with_taps_matches_the_plain_forward_and_the_encoder_alone():
    G = ResnetGenerator(ngf=4, n_blocks=5, antialias=True)
    x = torch.randn(2, 3, 32, 32)
    y, feats = G(x, DEFAULT_TAPS)
    assert torch.allclose(y, G(x)), "taps only read the features: G(x) is unchanged"
    for a, b in zip(feats, G(x, DEFAULT_TAPS, encode_only=True)):
        assert torch.allclose(a, b), "one pass gives G(x) and the same features as the encoder alone"
    assert all(f.requires_grad for f in feats[1:]), \
        "the tapped features keep G's graph: PatchNCE trains G's encoder through them (CUT Sec. 3.2)"
    sum(f.sum() for f in feats[1:]).backward()
    assert G.model[1].weight.grad is not None and G.model[1].weight.grad.abs().sum() > 0, \
        "the tapped features keep G's graph: PatchNCE trains G's encoder through them (CUT Sec. 3.2)"


def test_resnet_generator_unknown_tap_names_the_valid_ones():
    with pytest.raises(ValueError, match="res1 \\(12\\)"):
        ResnetGenerator(ngf=4, n_blocks=5, antialias=True)(torch.randn(1, 3, 16, 16), ["res7"], encode_only=True)


@pytest.mark.parametrize("num_downs, expected", [(8, 54_409_603), (7, 41_825_667)])
def test_unet_generator_has_the_pix2pix_parameter_count(num_downs, expected):
    assert n_params(UnetGenerator(num_downs=num_downs)) == expected, \
        f"the official U-Net, ngf 64, {num_downs} downs, has {expected:,} parameters"


def test_unet_generator_levels_return_their_input_beside_their_output():
    torch.manual_seed(0)
    innermost = UnetBlock(8, 4)
    assert [type(m).__name__ for m in innermost.model] == ["LeakyReLU", "Conv2d", "ReLU", "ConvTranspose2d",
                                                           "InstanceNorm2d"], \
        "the innermost level has no norm on its 1x1 bottleneck (pix2pix's official UnetSkipConnectionBlock): an " \
        "instance norm of one value per channel would fail"
    x = torch.randn(1, 8, 2, 2)
    out = innermost(x)
    assert out.shape == (1, 16, 2, 2) and torch.equal(out[:, :8], x), \
        "each U-Net level but the outermost returns its input beside its output, (B, 2C, H, W): the skip " \
        "connections of pix2pix (arXiv 1611.07004, Sec. 3.2.1, \"Generator with skips\")"


def test_unet_generator_built_plainly_is_the_official_network():
    net = UnetGenerator()
    assert n_params(net) == 54_409_603, "the defaults: ngf 64, 8 downs (unet_256), RGB to RGB"
    assert not any(isinstance(m, nn.Dropout) for m in net.modules()), "no dropout by default (--no_dropout)"


@pytest.mark.parametrize("size", SIZES)
def test_unet_generator_keeps_input_size(size):
    assert UnetGenerator(num_downs=5, ngf=4)(torch.randn(1, 3, *size)).shape == (1, 3, *size), \
        "the U-Net maps an image to an image of the same size"


def test_unet_generator_rejects_sides_not_divisible_by_its_depth_and_too_few_levels():
    assert UnetGenerator(num_downs=5, ngf=4).side_multiple == 32, "num_downs stride-2 levels: sides of 2**num_downs"
    with pytest.raises(ValueError, match="multiples of 32"):
        UnetGenerator(num_downs=5, ngf=4)(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match="num_downs >= 5, got 4"):
        UnetGenerator(num_downs=4)


def test_unet_generator_levels_are_the_pix2pix_ones_with_skips():
    net = UnetGenerator(in_channels=1, out_channels=2, num_downs=6, ngf=4, dropout=True)
    outer = net.model.model
    assert [type(m).__name__ for m in outer] == ["Conv2d", "UnetBlock", "ReLU", "ConvTranspose2d", "Tanh"], \
        "the outermost level: down-conv, the inner levels, ReLU, up-conv, tanh; no skip around it"
    assert outer[0].in_channels == 1 and outer[3].out_channels == 2 and outer[0].bias is not None, \
        "the outermost level maps in_channels down and back up to out_channels; its down-conv has a bias where " \
        "instance norm is used, as every level's (the official UnetSkipConnectionBlock: bias=use_bias)"
    levels, block = [], outer[1]
    while block is not None:
        levels.append(block)
        block = next((m for m in block.model if isinstance(m, type(block))), None)
    assert len(levels) == 5, "num_downs - 1 inner levels"
    innermost = [type(m).__name__ for m in levels[-1].model]
    assert innermost == ["LeakyReLU", "Conv2d", "ReLU", "ConvTranspose2d", "InstanceNorm2d"], \
        "the innermost level has no norm on its 1x1 bottleneck"
    leaky = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 5 and all(m.negative_slope == 0.2 for m in leaky) and \
        all(isinstance(level.model[0], nn.LeakyReLU) for level in levels), \
        "each inner level goes down through a LeakyReLU(0.2), the way up through a ReLU (pix2pix, arXiv " \
        "1611.07004, appendix 6.1.1: the encoder's ReLUs are leaky, slope 0.2, the decoder's are not)"
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 1, "dropout in the ngf*8 levels between (6 - 5)"
    x = torch.randn(1, 4, 64, 64)
    assert levels[0](x).shape == (1, 8, 64, 64), "an inner level returns its input and its output side by side"
    assert torch.equal(levels[0](x)[:, :4], x), "the skip: the level's input itself"


@pytest.mark.parametrize("antialias", [False, True])
def test_patchgan_has_the_official_parameter_count(antialias):
    assert n_params(PatchDiscriminator(ndf=64, n_layers=3, antialias=antialias)) == 2_764_737, \
        "the official 70x70 PatchGAN, ndf 64, 3 layers, has 2,764,737 parameters"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("antialias", [False, True])
def test_patchgan_gives_one_logit_per_overlapping_patch(size, antialias):
    D = PatchDiscriminator(ndf=4, antialias=antialias)
    h, w = size
    assert D(torch.randn(2, 3, h, w)).shape == (2, 1, h // 8 - 2, w // 8 - 2), \
        "(H/8 - 2) x (W/8 - 2) verdicts: C64, C128 and C256 halve the sides, C512 and the last conv at stride 1 " \
        "take 1 each (the official NLayerDiscriminator)"


@pytest.mark.parametrize("antialias, field", [(False, 70), (True, 84)])
def test_patchgan_verdict_sees_a_70x70_patch_84x84_when_anti_aliased(antialias, field):
    torch.manual_seed(0)
    D = PatchDiscriminator(1, ndf=4, norm="none", antialias=antialias)  # no norm: nothing reaches further
    x = torch.randn(1, 1, 192, 192, requires_grad=True)
    D(x)[0, 0, 10, 10].backward()
    seen = x.grad[0, 0].abs() > 0
    rows, cols = seen.any(1).nonzero(), seen.any(0).nonzero()
    rule = "CycleGAN Sec. 4: the 70x70 PatchGAN" if field == 70 else \
        "the CUT repository's anti-aliased PatchGAN: each blur-pool widens CycleGAN's 70x70 to 84x84"
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (field, field), \
        f"each verdict judges a {field}x{field} patch ({rule})"


def test_patchgan_is_c64_c128_c256_c512_then_one_channel():
    D = PatchDiscriminator(in_channels=1, ndf=4, n_layers=3)
    assert isinstance(D.model[-1], nn.Conv2d), \
        f"the PatchGAN ends in its 1-channel conv, no {type(D.model[-1]).__name__} after it: its output is a logit " \
        "(CycleGAN appendix 7.2: a convolution produces the 1-dimensional output; LSGAN's squares and vanilla's " \
        "BCE with logits take it raw, and the official NLayerDiscriminator has no sigmoid)"
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 8), (8, 16), (16, 32), (32, 1)], \
        "C64-C128-C256-C512, then a conv to 1 channel (CycleGAN appendix 7.2)"
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1], \
        "C64, C128, C256 at stride 2, C512 and the last conv at stride 1: the official NLayerDiscriminator, whose " \
        "verdicts see 70x70 patches (CycleGAN appendix 7.2 writes every Ck at stride 2, which would see 94x94)"
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs), \
        "every Ck is a 4x4 conv (CycleGAN appendix 7.2), padded by 1 (the official code)"
    kinds = [type(m).__name__ for m in D.model]
    assert kinds[:2] == ["Conv2d", "LeakyReLU"], "no norm on C64, the first layer"
    assert convs[0].bias is not None and convs[-1].bias is not None, "the first and last convs have biases"
    assert all(m.negative_slope == 0.2 for m in D.modules() if isinstance(m, nn.LeakyReLU)), "LeakyReLU slope 0.2"
    assert PatchDiscriminator(ndf=4, n_layers=5).model[-1].in_channels == 32, "channels cap at 8 ndf"
    blurred = PatchDiscriminator(ndf=4, antialias=True)
    assert sum(isinstance(m, BlurDownsample) for m in blurred.modules()) == 3 and \
        all(c.stride == (1, 1) for c in blurred.modules() if isinstance(c, nn.Conv2d)), \
        "with blur-pool (CUT) each stride-2 conv becomes stride 1 plus a blur-pool"


def test_patchgan_accepts_one_channel_images():
    assert PatchDiscriminator(1, ndf=4)(torch.randn(1, 1, 64, 64)).shape == (1, 1, 6, 6), \
        "grayscale in: one logit per patch, 64 / 8 - 2 = 6 a side"


def test_patch_sample_mlp_is_a_two_layer_mlp_per_tap():
    H = PatchSampleMLP([3, 8], nc=16)
    for mlp, c in zip(H.mlps, (3, 8)):
        assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"], "CUT Sec. 3.2: H is a 2-layer MLP"
        assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (c, 16, 16), \
            "one MLP per tapped layer, from its channels to netF_nc (256) wide"
    with pytest.raises(ValueError, match="H has 2 MLPs but got 1 feature maps"):
        H([torch.randn(1, 3, 4, 4)])


def test_patch_sample_mlp_reuses_ids_and_normalises():
    torch.manual_seed(0)
    H = PatchSampleMLP([3, 8], nc=16)
    feats = [torch.randn(2, 3, 6, 6), torch.randn(2, 8, 4, 4)]
    out, ids = H(feats, num_patches=20)
    assert [tuple(f.shape) for f in out] == [(2, 20, 16), (2, 16, 16)], "P = min(num_patches, H*W) places a layer"
    assert all(torch.allclose(f.norm(dim=-1), torch.ones(f.shape[:2]), atol=1e-5) for f in out), \
        "H's outputs are L2-normalised onto the unit sphere, each patch's vector of nc numbers (the CUT paper; the " \
        "official PatchSampleF: Normalize(2))"
    assert len(set(ids[0].tolist())) == 20 and max(ids[0].tolist()) < 36 and sorted(ids[1].tolist()) == \
        list(range(16)), "places are drawn without repeats, inside the map"
    again, ids2 = H(feats, num_patches=20, patch_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2)), "given ids, H samples those places"
    assert all(torch.allclose(a, b) for a, b in zip(out, again)), "the queries meet the keys at the same places"


def test_patch_sample_mlp_samples_the_given_locations_of_every_image():
    torch.manual_seed(0)
    H = PatchSampleMLP([2], nc=4)
    feat = torch.randn(2, 2, 3, 3)
    out, _ = H([feat], patch_ids=[torch.tensor([0, 4, 8])])  # the diagonal of a 3x3 map
    for b in range(2):
        picked = torch.stack([feat[b, :, 0, 0], feat[b, :, 1, 1], feat[b, :, 2, 2]])
        expected = H.mlps[0](picked)
        assert torch.allclose(out[0][b], expected / expected.norm(dim=-1, keepdim=True), atol=1e-6), \
            "z_l^s: the MLP of layer l at place s, normalised; the same places for every image of the batch"


def test_patch_sample_mlp_normalises_as_the_official_code_does():
    torch.manual_seed(0)
    H = PatchSampleMLP([4], nc=8)
    with torch.no_grad():
        H.mlps[0][2].weight.mul_(1e-6), H.mlps[0][2].bias.mul_(1e-6)  # outputs of norm ~1e-7: the epsilon shows
    feat, ids = torch.randn(1, 4, 3, 3), torch.arange(9)
    v = H.mlps[0](feat.flatten(2).transpose(1, 2))
    assert torch.allclose(H.project(0, feat, ids), v / (v.norm(dim=-1, keepdim=True) + 1e-7), rtol=1e-4), \
        "the official Normalize: x / (||x|| + 1e-7)"


def test_patch_sample_mlp_projects_in_float32_under_autocast():
    torch.manual_seed(0)
    H = PatchSampleMLP([4], nc=8)
    feat, ids = torch.randn(1, 4, 3, 3), torch.arange(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = H.project(0, feat.bfloat16(), ids)
    assert low.dtype == torch.float32, "H runs in float32 whatever the precision: its normalisation overflows fp16"
    assert torch.allclose(low, H.project(0, feat.bfloat16().float(), ids), atol=1e-6), \
        "the same projection as from the float32 features"


@pytest.mark.parametrize("name, kind, depth", [("resnet_9blocks", ResnetGenerator, 9),
                                               ("resnet_6blocks", ResnetGenerator, 6),
                                               ("unet_256", UnetGenerator, 8), ("unet_128", UnetGenerator, 7)])
def test_define_g_builds_each_official_generator_by_name(name, kind, depth):
    G = define_G(name, 1, 3, ngf=4)
    assert type(G) is kind and name in GENERATORS, f"--netG {name}: the official generator of that name"
    if kind is ResnetGenerator:
        assert sum(isinstance(m, ResnetBlock) for m in G.model) == depth, f"{name}: {depth} residual blocks"
        assert G.side_multiple == 4, "a ResNet's sides are multiples of 4: its two stride-2 levels"
    else:
        assert G.num_downs == depth and G.side_multiple == 2 ** depth, \
            f"{name}: {depth} downs, sides a multiple of 2**{depth}"
    side = max(G.side_multiple, 16)
    assert G(torch.zeros(1, 1, side, side)).shape == (1, 3, side, side), \
        f"{name} maps a 1-channel image to 3 channels at its size"


def test_define_g_passes_its_options_on_and_names_the_valid_generators():
    plain = define_G("resnet_9blocks")
    assert n_params(plain) == 11_378_179 and not any(isinstance(m, (nn.Dropout, BlurDownsample, BlurUpsample))
                                                     for m in plain.modules()), \
        "define_G's defaults: the official ngf 64, no dropout, strided convs (CycleGAN's; CUT passes its blur switches)"
    G = define_G("resnet_6blocks", ngf=8, norm="batch", dropout=True, antialias=True, antialias_up=False)
    kinds = {type(m).__name__ for m in G.modules()}
    assert G.model[1].out_channels == 8 and {"BatchNorm2d", "Dropout", "BlurDownsample"} <= kinds and \
        "BlurUpsample" not in kinds, "ngf, norm, dropout and both blur switches reach the network"
    for dropout, antialias in ((True, False), (False, True)):
        built = define_G("resnet_6blocks", ngf=4, dropout=dropout, antialias=antialias)
        kinds = {type(m).__name__ for m in built.modules()}
        assert ("Dropout" in kinds, "BlurDownsample" in kinds) == (dropout, antialias), \
            f"dropout={dropout}, antialias={antialias}: each reaches the ResnetGenerator in its own place"
    with pytest.raises(ValueError, match="unknown generator 'resnet_2'.*resnet_9blocks"):
        define_G("resnet_2")


def test_frozen_fixes_D_while_G_steps_and_lets_go_after_even_on_an_error():
    D, G = nn.Linear(2, 1), nn.Linear(2, 2)
    with frozen(D):
        assert not any(p.requires_grad for p in D.parameters()), "frozen: D takes no gradient (set_requires_grad)"
        D(G(torch.ones(1, 2))).sum().backward()
    assert all(p.grad is None for p in D.parameters()), "G's loss through a frozen D gives D no gradient"
    assert all(p.grad is not None for p in G.parameters()), "while G, upstream, gets its gradient"
    with pytest.raises(RuntimeError), frozen(D, G):
        raise RuntimeError("a step failed")
    assert all(p.requires_grad for p in [*D.parameters(), *G.parameters()]), "unfrozen after the block, error or not"


# ============================================================================= losses.py

PRED = torch.tensor([[[[0.5, -1.0]]]])


@pytest.mark.parametrize("mode, real, expected", [
    ("lsgan", True, (0.25 + 4.0) / 2), ("lsgan", False, (0.25 + 1.0) / 2),
    ("vanilla", True, (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2),
    ("vanilla", False, (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-1.0))) / 2),
    ("nonsaturating", True, (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2),
    ("nonsaturating", False, (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-1.0))) / 2),
])
def test_gan_loss_matches_hand_computed_values(mode, real, expected):
    rule = {"lsgan": "LSGAN (CycleGAN Sec. 4, both official codes): mean (D - label)^2",
            "vanilla": "Eq. 1's log-likelihood: BCE on the logits",
            "nonsaturating": "the CUT repository's nonsaturating: softplus(-D) for real, softplus(D) for fake"}[mode]
    assert GANLoss(mode)(PRED, real).item() == pytest.approx(expected, rel=1e-6), \
        f"{rule}, target {'real (1)' if real else 'fake (0)'}: {expected:.6f}"


def test_gan_loss_label_smoothing_moves_the_real_target():
    assert GANLoss("lsgan", real_label=0.9)(PRED, True).item() == pytest.approx((0.16 + 3.61) / 2), \
        "one-sided label smoothing: real is 0.9, so (0.5 - 0.9)^2 and (-1 - 0.9)^2"
    assert GANLoss("vanilla", 0.9, 0.1)(PRED, False).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(PRED, torch.full_like(PRED, 0.1)).item()), "and fake_label is fake's target"


def test_gan_loss_verdict_is_lsgans_output_or_the_probability_of_real():
    assert torch.equal(GANLoss("lsgan").verdict(PRED), PRED), "LSGAN pulls D's output to 1 (real), 0 (fake): as is"
    for mode in ("vanilla", "nonsaturating"):
        assert torch.equal(GANLoss(mode).verdict(PRED), torch.sigmoid(PRED)), f"{mode}: a logit, read by a sigmoid"


def test_gan_loss_rejects_unknown_mode_and_smoothing_it_cannot_do():
    assert GAN_MODES == ("lsgan", "vanilla", "nonsaturating"), \
        "the three GAN losses of the official --gan_mode (wgangp is not here)"
    with pytest.raises(ValueError, match="unknown GAN mode"):
        GANLoss("wasserstein")
    with pytest.raises(ValueError, match="nonsaturating"):
        GANLoss("nonsaturating", real_label=0.9)
    with pytest.raises(ValueError, match="nonsaturating"):
        GANLoss("nonsaturating", fake_label=0.1)
    for label in (1.5, 0.0):  # above 1, BCE has no minimum (D's logits run off); at the fake label, nothing to learn
        with pytest.raises(ValueError, match=rf"real_label {label} is outside \(0.0, 1\]"):
            GANLoss("vanilla", real_label=label)


def test_patchnce_divides_each_similarity_by_the_temperature():
    torch.manual_seed(0)
    q, k = (F.normalize(torch.randn(2, 16, 8), dim=-1) for _ in range(2))
    tau = 0.5
    assert PatchNCELoss(tau)(q, k).item() == pytest.approx(PatchNCELoss(1.0)(q / tau, k).item(), rel=1e-4), \
        "CUT Eq. 2 divides every similarity by the temperature tau: the loss at tau is the loss at tau = 1 of " \
        "similarities 1/tau times larger"


def test_patchnce_fills_the_positives_place_among_the_negatives_with_minus_10():
    q = torch.tensor([[[0.6, 0.8]]])  # one patch: its only 'negative' is its own key again, on the diagonal
    tau = 5.0  # a high temperature, where the filled value weighs
    own = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(-10 / tau)))
    assert PatchNCELoss(tau)(q, q).item() == pytest.approx(own, rel=1e-6), \
        "the positive's duplicate among the negatives is no negative: the official code fills its place with -10 " \
        "(CUT Eq. 3 takes the negatives z^(S \\ s), the other places)"


def test_patchnce_is_near_zero_for_matching_orthogonal_patches():
    feats = torch.eye(8)[None]  # (1, 8, 8): 8 orthogonal unit patches
    assert PatchNCELoss(temperature=0.07)(feats, feats).item() < 1e-4, \
        "CUT Eq. 2: a query identical to its positive and orthogonal to the negatives costs nothing"


def test_patchnce_matches_a_hand_computed_value():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    k = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]])
    tau = 0.5
    # patch 0: pos 0.6, negative k1 . q0 = 1.0; patch 1: pos 0.0, negative k0 . q1 = 0.8
    l0 = -math.log(math.exp(0.6 / tau) / (math.exp(0.6 / tau) + math.exp(1.0 / tau) + math.exp(-10 / tau)))
    l1 = -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(0.8 / tau) + math.exp(-10 / tau)))
    assert PatchNCELoss(tau)(q, k).item() == pytest.approx((l0 + l1) / 2, rel=1e-5), \
        "CUT Eq. 2: -log exp(v.v+/tau) / (exp(v.v+/tau) + sum exp(v.v-/tau)), the positive the same place's key; " \
        "averaged over the queries, as the official code (Eq. 3 sums)"


def test_patchnce_of_random_features_is_about_log_p():
    torch.manual_seed(0)
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    q, k = unit(torch.randn(4, 64, 256)), unit(torch.randn(4, 64, 256))
    assert PatchNCELoss(temperature=1.0)(q, k).item() == pytest.approx(math.log(64), abs=0.05), \
        "unrelated features: picking the positive among P = 64 candidates costs log P"
    assert math.log(64) < PatchNCELoss(temperature=0.07)(q, k).item() < math.log(64) + 1.0, \
        "at tau = 0.07 the random similarities, divided by tau, spread the logits: a little above log P"


def test_patchnce_uses_negatives_from_the_same_image_only():
    q = torch.eye(4)[None].repeat(2, 1, 1)
    k = q.clone()
    k[1] = k[1].roll(1, dims=0)  # image 1's keys are shuffled; image 0 is a perfect match
    loss = PatchNCELoss(0.07)
    assert loss(q[:1], k[:1]).item() < 1e-5, "image 0's queries each match their own key, orthogonal to the rest"
    assert loss(q, k).item() == pytest.approx(loss(q[1:], k[1:]).item() / 2, rel=1e-4), \
        "CUT Sec. 3.2: internal negatives, the other patches of the query's own image; averaged over all the " \
        "queries, as the official code (Eq. 3 sums)"


def official_patchnce(feat_q, feat_k, batch_size, all_negatives_from_minibatch, temperature=0.07):
    """PatchNCE as the official models/patchnce.py computes it, from its features flattened to (B*P, C):
    one (1 + N)-way cross-entropy per query, averaged as cut_model.calculate_NCE_loss does."""
    dim = feat_q.shape[-1]
    q, k = feat_q.reshape(-1, dim), feat_k.reshape(-1, dim).detach()
    l_pos = torch.bmm(q[:, None, :], k[:, :, None]).view(-1, 1)
    rows = 1 if all_negatives_from_minibatch else batch_size
    q, k = q.view(rows, -1, dim), k.view(rows, -1, dim)
    l_neg = torch.bmm(q, k.transpose(2, 1))
    l_neg = l_neg.masked_fill(torch.eye(l_neg.shape[1], dtype=torch.bool)[None], -10.0).view(-1, l_neg.shape[1])
    logits = torch.cat((l_pos, l_neg), dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long), reduction="none").mean()


@pytest.mark.parametrize("negatives, from_minibatch", [("image", False), ("batch", True)])
def test_patchnce_equals_patchnce_py_with_and_without_the_whole_batchs_negatives(negatives, from_minibatch):
    torch.manual_seed(0)
    q, k = (F.normalize(torch.randn(3, 16, 8), dim=-1) for _ in range(2))
    ours = PatchNCELoss(0.07, negatives)(q, k)
    assert ours.item() == pytest.approx(official_patchnce(q, k, 3, from_minibatch).item(), rel=1e-6), \
        f"negatives {negatives!r}: the official patchnce.py's loss"
    other = "batch" if negatives == "image" else "image"
    assert ours.item() != pytest.approx(PatchNCELoss(0.07, other)(q, k).item(), rel=1e-3), "the flag matters"


def test_patchnce_external_negatives_are_the_other_images_patches_only():
    torch.manual_seed(0)
    q, k = (F.normalize(torch.randn(2, 8, 4), dim=-1) for _ in range(2))
    expected = []
    for b in range(2):  # by hand: each query against its positive and the 8 patches of the other image
        for i in range(8):
            logits = torch.cat([(q[b, i] @ k[b, i])[None], k[1 - b] @ q[b, i]]) / 0.07
            expected.append(-logits.log_softmax(0)[0])
    others = PatchNCELoss(0.07, "others")
    assert others(q, k).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5), \
        "'others': each query's negatives are the patches of the other images of the batch, none of its own " \
        "(external negatives taken from the batch; the paper's ablation draws them from a memory bank)"
    with pytest.raises(ValueError, match="batch of 2 or more"):
        others(q[:1], k[:1])


def test_patchnce_detaches_the_keys():
    q = torch.randn(1, 4, 8, requires_grad=True)
    k = torch.randn(1, 4, 8, requires_grad=True)
    PatchNCELoss()(q, k).backward()
    assert q.grad is not None and k.grad is None, "the keys (the input's patches) get no gradient, as officially"


def test_patchnce_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    q, k = (F.normalize(torch.randn(2, 64, 16), dim=-1) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = PatchNCELoss()(q.bfloat16(), k.bfloat16())
    assert low.dtype == torch.float32, "similarities / 0.07 overflow half precision: PatchNCE runs in float32"
    assert low.item() == pytest.approx(PatchNCELoss()(q.bfloat16().float(), k.bfloat16().float()).item(), abs=1e-5), \
        "the same loss as from the float32 features"


def test_patchnce_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda t: PatchNCELoss(0.5)(t, k), (q,)), \
        "PatchNCE's gradient is the derivative of its value"


def test_patchnce_rejects_a_temperature_and_negatives_it_cannot_use():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        PatchNCELoss(0.0)
    with pytest.raises(ValueError, match="unknown negatives 'all'"):
        PatchNCELoss(0.07, "all")


# ============================================================================= official files

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


def test_official_weights_generator_weights_load_and_give_the_official_output():
    torch.manual_seed(0)
    ref = official_resnet_generator()
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # as the CUT repository saves on a CPU
    state["model.2.running_mean"] = torch.zeros(4)  # as checkpoints saved before PyTorch 0.4 carried
    try:
        G = load_official_state_dict(ResnetGenerator(ngf=4, n_blocks=2), state)
    except ValueError as e:
        pytest.fail(f"the CUT repository run on a CPU saves its DataParallel wrapper, so each name starts with "
                    f"module.; a file saved before PyTorch 0.4 carries running statistics of instance norms, which "
                    f"have none (the official BaseModel.__patch_instance_norm_state_dict drops them): both load: {e}")
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(G(x), ref.model(x), atol=1e-6), \
        "the official generator's weights give the official output here (module. prefixes, stale stats dropped)"


def test_official_weights_patchsample_keys_load_into_H():
    H = PatchSampleMLP([3, 8], nc=4)
    official = {f"mlp_{i}.{j}.{p}": torch.randn_like(v)
                for i, mlp in enumerate(H.mlps) for j in (0, 2) for p, v in mlp[j].named_parameters()}
    load_official_state_dict(H, official)
    assert torch.equal(H.mlps[1][2].weight, official["mlp_1.2.weight"]), "the official netF's mlp_1.2 is H's"


def test_official_weights_loader_round_trips_our_state_dict_and_keeps_stats_a_net_has():
    D = PatchDiscriminator(ndf=4, antialias=True)
    D2 = load_official_state_dict(PatchDiscriminator(ndf=4, antialias=True), D.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(D(x), D2(x)), "our own state_dict loads back into the same network"
    torch.manual_seed(0)
    batch = ResnetGenerator(ngf=4, n_blocks=1, norm="batch")
    state = {k: v + 1 if k.endswith("running_mean") else v for k, v in batch.state_dict().items()}
    loaded = load_official_state_dict(ResnetGenerator(ngf=4, n_blocks=1, norm="batch"), state)
    assert torch.equal(loaded.model[2].running_mean, state["model.2.running_mean"]), \
        "running statistics are dropped only where the network has none (instance norm)"
    older = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # saved before PyTorch 0.4.1
    loaded = load_official_state_dict(ResnetGenerator(ngf=4, n_blocks=1, norm="batch"), older)
    assert torch.equal(loaded.model[2].running_mean, state["model.2.running_mean"]), \
        "a batch norm saved before PyTorch 0.4.1 has no num_batches_tracked; torch's own load_state_dict adds it"


def test_official_weights_loader_names_the_first_mismatch():
    with pytest.raises(ValueError, match="model.0.weight.*does not fit.*model.1.weight"):
        load_official_state_dict(ResnetGenerator(ngf=4, n_blocks=2), PatchDiscriminator(ndf=4).state_dict())
    with pytest.raises(ValueError, match="'model.12.weight' .* does not fit ResnetGenerator.model.12.conv_block"):
        load_official_state_dict(ResnetGenerator(ngf=4, n_blocks=3), ResnetGenerator(ngf=4, n_blocks=2).state_dict())
    with pytest.raises(ValueError, match="has 8 tensors but PatchSampleMLP has 4; first unmatched: 'mlps.1.0.weight'"):
        load_official_state_dict(PatchSampleMLP([3], nc=4), PatchSampleMLP([3, 3], nc=4).state_dict())
    with pytest.raises(ValueError, match="has 4 tensors but PatchSampleMLP has 8; first unmatched: 'mlps.1.0.weight'"):
        load_official_state_dict(PatchSampleMLP([3, 3], nc=4), PatchSampleMLP([3], nc=4).state_dict())


def test_official_weights_generator_is_read_from_the_file_alone():
    for net in (ResnetGenerator(1, 3, ngf=8, n_blocks=6, norm="batch", dropout=True),
                ResnetGenerator(3, 1, ngf=4, n_blocks=2, norm="none", antialias=True),
                ResnetGenerator(3, 3, ngf=4, n_blocks=3, norm="instance"),
                UnetGenerator(1, 1, num_downs=6, ngf=4, norm="batch"),
                UnetGenerator(3, 2, num_downs=5, ngf=4, norm="instance"),
                UnetGenerator(1, 3, num_downs=5, ngf=4, norm="none")):
        built = official_generator(net.state_dict())
        assert type(built) is type(net) and n_params(built) == n_params(net), \
            f"{type(net).__name__}: the architecture is read from the names and shapes of the file's tensors"
        assert [type(m) for m in built.modules()] == [type(m) for m in net.modules()], "layer for layer"
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), net.state_dict().values())), \
            "with the file's weights, tensor for tensor"
    parallel = {f"module.{k}": v for k, v in ResnetGenerator(ngf=4, n_blocks=2).state_dict().items()}
    try:
        official_generator(parallel)
    except ValueError as e:
        pytest.fail(f"a file the CUT repository saved on a CPU holds its DataParallel wrapper, every name prefixed "
                    f"with module.: its architecture is read as that of the same file without the prefixes: {e}")


# Where the official CUT code (taesungp/contrastive-unpaired-translation, models/networks.py) puts the blur
# filters of a ResnetGenerator(ngf=4, n_blocks=2) under each of its two flags, and the index of its last
# conv: {filt index: kernel side} (3: blur-pool down, 4: blur up), as read off the official code.
OFFICIAL_BLUR_LAYOUTS = {  # (--no_antialias, --no_antialias_up)
    (False, False): ({7: 3, 11: 3, 14: 4, 18: 4}, 23), (True, False): ({12: 4, 16: 4}, 21),
    (False, True): ({7: 3, 11: 3}, 21), (True, True): ({}, 19)}


@pytest.mark.parametrize("flags", list(OFFICIAL_BLUR_LAYOUTS))
def test_official_weights_antialias_flags_have_the_cut_repositorys_layout_and_are_read_back(flags):
    no_antialias, no_antialias_up = flags
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=4, n_blocks=2, antialias=not no_antialias, antialias_up=not no_antialias_up).eval()
    state = net.state_dict()
    filters = {int(k.split(".")[1]): t.shape[-1] for k, t in state.items() if k.endswith(".filt")}
    assert (filters, int(next(reversed(state)).split(".")[1])) == OFFICIAL_BLUR_LAYOUTS[flags], \
        f"--no_antialias {no_antialias}, --no_antialias_up {no_antialias_up}: the official layer indices"
    try:
        built = official_generator(state).eval()
    except ValueError as e:
        pytest.fail(f"the switches are read from the sizes of the filt buffers a file holds: 3x3 ones are blur-pool "
                    f"down-sampling, 4x4 ones blur up-sampling; this file was read otherwise: {e}")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(built(x), net(x)), "both switches read back from the filters a file holds"
    cut = CUT(CUTConfig(**TINY_CUT, antialias=not no_antialias, antialias_up=not no_antialias_up))
    assert [type(m).__name__ for m in cut.G.modules() if "Blur" in type(m).__name__] == \
        ["BlurDownsample"] * 2 * (not no_antialias) + ["BlurUpsample"] * 2 * (not no_antialias_up), \
        "CUTConfig's two switches reach G as the official flags do"
    assert any(isinstance(m, BlurDownsample) for m in cut.D.modules()) == (not no_antialias), \
        "D takes the first switch only, as officially"


def test_official_weights_generator_names_what_a_file_holds_when_it_is_no_generator():
    for state, pattern in ((torch.randn(3), "it holds a Tensor, not a state_dict"),
                           ({"w": torch.randn(3, 3), "n": 3}, "not all of them tensors"),
                           ({"w": torch.randn(3, 3)}, r"the first 'w' \(3, 3\); expected a ResNet generator"),
                           (PatchDiscriminator(ndf=4).state_dict(), "a PatchGAN discriminator's first layer")):
        with pytest.raises(ValueError, match=pattern):
            official_generator(state)


def official_files(folder: Path) -> dict[str, tuple[nn.Module, int]]:
    """Generator files as the official codes save them (bare state_dicts in their key layout), each with
    the network that wrote it and the side its test images need: the CycleGAN zoo's ResNet (9 blocks),
    a latest_net_G_A.pth of 6 blocks with module. keys (as the CUT repository saves on a CPU), U-Nets 128 and 256, a CUT
    latest_net_G.pth (blur-pool), and an old file whose instance norms carry running statistics."""
    torch.manual_seed(0)
    nets = {"horse2zebra.pth": (ResnetGenerator(ngf=4, n_blocks=9), 36),
            "latest_net_G_A.pth": (ResnetGenerator(ngf=4, n_blocks=6), 36),
            "unet128_net_G.pth": (UnetGenerator(num_downs=7, ngf=4), 128),
            "unet256_net_G.pth": (UnetGenerator(num_downs=8, ngf=4), 256),
            "cut_latest_net_G.pth": (ResnetGenerator(ngf=4, n_blocks=9, antialias=True), 36),
            "cut_no_antialias_net_G.pth": (ResnetGenerator(ngf=4, n_blocks=9, antialias=False, antialias_up=True), 36),
            "cut_no_antialias_up_net_G.pth": (ResnetGenerator(ngf=4, n_blocks=9, antialias=True, antialias_up=False),
                                              36),
            "old_style_monet.pth": (ResnetGenerator(ngf=4, n_blocks=9), 36)}
    folder.mkdir(parents=True)
    for name, (net, _) in nets.items():
        state = net.state_dict()
        if name == "latest_net_G_A.pth":
            state = {f"module.{k}": v for k, v in state.items()}
        if name.startswith("old_"):  # PyTorch 0.3 saved running stats for every instance norm
            for i, layer in enumerate(net.model):
                if isinstance(layer, nn.InstanceNorm2d):
                    state[f"model.{i}.running_mean"] = torch.zeros(layer.num_features)
                    state[f"model.{i}.running_var"] = torch.ones(layer.num_features)
        torch.save(state, folder / name)
    return nets


def test_official_weights_files_translate_as_the_networks_that_wrote_them(tmp_path):
    nets = official_files(tmp_path / "official")
    for name, (net, side) in nets.items():
        inputs = tmp_path / f"in_{side}"
        if not inputs.exists():
            inputs.mkdir()
            rng = np.random.default_rng(side)
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(inputs / "photo.png")
        out = tmp_path / f"out_{name}"
        assert translate_cli(["--checkpoint", str(tmp_path / "official" / name), "--input", str(inputs),
                              "--output", str(out), "--device", "cpu"]) == 0, \
            f"{name}: translate.py takes an official generator file as it is"
        with torch.no_grad():
            expected = du.to_image(net.eval()(du.to_tensor(Image.open(inputs / "photo.png"))[None])[0])
        got = np.asarray(Image.open(out / "photo.png"), dtype=int)
        assert np.abs(got - np.asarray(expected, dtype=int)).max() <= 1, name
    grid = tmp_path / "zoo.png"  # compare takes official files too: input | CycleGAN zoo | CUT
    assert translate_cli(["--checkpoint", str(tmp_path / "official" / "horse2zebra.pth"),
                          str(tmp_path / "official" / "cut_latest_net_G.pth"), "--input", str(tmp_path / "in_36"),
                          "--grid", str(grid), "--size", "36", "--device", "cpu"]) == 0, \
        "a grid compares official files too"
    assert Image.open(grid).size == (3 * 38 + 2, 38 + 2), "one row: the input, then each model's translation"


# ============================================================================= cycle_gan.py

TINY = dict(netG="resnet_6blocks", ngf=4, ndf=4)


def pair(size=64, seed=0):
    """One image of each domain, (1, 3, size, size) in [-1, 1], seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1, torch.rand(1, 3, size, size, generator=g) * 2 - 1


class Recorder:
    """A trainer that changes no weight: it records what each backward was given, by group, and steps nothing, so
    a test reads a step's terms against the paper's formulas with the networks as they were."""

    def __init__(self):
        self.backward_into = []

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss, group):
        self.backward_into.append((group, loss))

    def step(self, group):
        pass


def test_image_pool_fills_then_swaps_half_the_time():
    torch.manual_seed(0)
    pool = ImagePool(3)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first), first), \
        "while the history fills, D sees the new fakes (the official util/image_pool.py; CycleGAN Sec. 4 keeps 50)"
    queries = [torch.full((1, 1, 1, 1), 10.0 + i) for i in range(200)]
    answers = [pool.query(q) for q in queries]
    swapped = sum(not torch.equal(a, q) for a, q in zip(answers, queries))
    assert 70 < swapped < 130, \
        "once full, half the time D sees an older fake from the history instead (the official util/image_pool.py)"
    assert len(pool.images) == 3 and ImagePool().size == 50, \
        "the history holds pool_size images, by default CycleGAN Sec. 4's 50"
    old = {a.item() for a, q in zip(answers, queries) if not torch.equal(a, q)}
    assert old <= {0.0, 1.0, 2.0, *(10.0 + i for i in range(200))} and len(old) > 3, \
        "a swap returns an older fake and keeps the new one in its place, so later swaps return later fakes (the " \
        "official util/image_pool.py)"


def test_image_pool_starts_again_when_a_resume_changes_the_crop():
    pool = ImagePool(2)
    pool.query(torch.zeros(1, 3, 8, 8))
    bigger = torch.ones(2, 3, 12, 12)
    assert torch.equal(pool.query(bigger), bigger) and all(img.shape[-1] == 12 for img in pool.images), \
        "fakes of another size (a resume at another --crop-size) cannot share the history: it fills again from them"


def test_image_pool_stores_each_fake_detached_and_size_0_passes_them_through():
    pool = ImagePool(2)
    fake = torch.ones(2, 1, 2, 2, requires_grad=True) * 3
    out = pool.query(fake)
    assert not out.requires_grad and all(not t.requires_grad for t in pool.images), "D's fakes carry no graph of G"
    assert [tuple(t.shape) for t in pool.images] == [(1, 1, 2, 2)] * 2, "one image at a time"
    assert torch.equal(ImagePool(0).query(fake), fake.detach()) and not ImagePool(0).images, "pool 0: no history"


def test_cyclegan_config_is_the_papers_and_junyanzs():
    c = CycleGANConfig()
    paper = {"lambda_cycle": (10.0, "Sec. 4: lambda = 10 in Eq. 3"),
             "lambda_identity": (0.5, "appendix 7.1: 0.5 lambda"),
             "pool_size": (50, "Sec. 4: a history of 50 generated images"), "lr": (2e-4, "Sec. 4: Adam, lr 0.0002"),
             "beta1": (0.5, "junyanz's --beta1 0.5 (Sec. 4 names Adam and its lr)"),
             "epochs": (100, "Sec. 4: 100 epochs at lr"),
             "epochs_decay": (100, "Sec. 4: then 100 of linear decay"), "gan_mode": ("lsgan", "Sec. 4: least squares"),
             "ngf": (64, "appendix 7.2: c7s1-64 first"), "ndf": (64, "appendix 7.2: C64 first"),
             "n_layers_D": (3, "the 70x70 PatchGAN: C64-C128-C256-C512 (appendix 7.2)"),
             "netG": ("resnet_9blocks", "junyanz's default (the paper: 9 blocks at 256)"),
             "norm": ("instance", "appendix 7.2: instance norm"), "dropout": (False, "junyanz's --no_dropout"),
             "init_gain": (0.02, "appendix 7.1: N(0, 0.02)"), "real_label": (1.0, "real is 1, no smoothing"),
             "channels_x": (3, "RGB"), "channels_y": (3, "RGB")}
    assert {f.name for f in dataclasses.fields(c)} == set(paper), "every option of CycleGAN, checked here"
    assert_options_say_what_they_are_refuse_what_cannot_work_and_let_a_resume_change_the_schedule(c, {
        "lambda_cycle": 0, "lambda_identity": 0, "pool_size": 0, "ngf": 1, "ndf": 1, "n_layers_D": 1, "epochs": 0,
        "epochs_decay": 0}, {"lr": 0, "init_gain": 0, "real_label": 0}, {
        "channels_x": (1, 3), "channels_y": (1, 3), "netG": GENERATORS, "norm": ("instance", "batch", "none"),
        "gan_mode": GAN_MODES})
    for name, (value, rule) in paper.items():
        assert getattr(c, name) == value, f"CycleGANConfig.{name}: {value!r} ({rule}), got {getattr(c, name)!r}"
    model = CycleGAN()
    assert (model.groups, model.directions, model.resize_crop_in_decay, model.drop_last) == \
        ({"G": ("G", "F"), "D": ("D_X", "D_Y")}, {"x2y": "G", "y2x": "F"}, True, False), \
        "junyanz's two Adams (G and F; D_X and D_Y); both directions; the jitter throughout; every batch trained " \
        "(junyanz's data/__init__.py)"
    first = model.G.model[1].weight
    assert first.std().item() == pytest.approx(0.02, rel=0.05) and abs(first.mean().item()) < 2e-3, \
        "CycleGAN appendix 7.1, and junyanz's init: N(0, 0.02)"
    assert not any(isinstance(m, (BlurDownsample, BlurUpsample)) for m in model.G.modules()), \
        "junyanz's CycleGAN: strided and transposed convs, no blur-pool"


def assert_options_say_what_they_are_refuse_what_cannot_work_and_let_a_resume_change_the_schedule(
        config, at_least: dict, above: dict, choices: dict) -> None:
    """A config's fields are the command's flags: each says what it is (--help); a weight, a history, an epoch count
    is never below 0, a count of filters, layers or places never below 1, a learning rate, a temperature, an init's
    gain (at 0 every weight is 0, and no gradient reaches them) or a real label never 0; a choice is among the values
    the networks and losses take; a resume may change the schedule alone."""
    fields = dataclasses.fields(config)
    assert all(f.metadata["help"] for f in fields), "each option says what it is, for --help"
    assert {f.name: f.metadata["at_least"] for f in fields if "at_least" in f.metadata} == at_least, \
        "weights, histories and epochs are >= 0; filters, layers and places >= 1"
    assert {f.name: f.metadata["above"] for f in fields if "above" in f.metadata} == above, \
        "rates, temperatures, init gains and real labels are > 0"
    assert {f.name: tuple(f.metadata["choices"]) for f in fields if "choices" in f.metadata} == choices, \
        "a choice is one the networks and losses take"
    assert {f.name for f in fields if f.metadata.get("resume") == "changeable"} == {"lr", "epochs", "epochs_decay"}, \
        "a resume may change the schedule alone: the rest makes the run what it is"


def cyclegan_terms():
    """A CycleGAN step through a Recorder, in float64 (the networks stay as they are), and each of its terms written
    again from the paper on the same networks: {term: (the paper's value, the networks it trains, the rule)}."""
    torch.manual_seed(0)
    model = CycleGAN(CycleGANConfig(**TINY, lambda_cycle=3.0, lambda_identity=0.2, real_label=0.9, pool_size=0))
    nets = {"G": model.G.double(), "F": model.F.double(), "D_X": model.D_X.double(), "D_Y": model.D_Y.double()}
    x, y = (t.double() for t in pair(32))
    recorder = Recorder()
    losses = model.train_step(x, y, recorder)
    G, F_, D_X, D_Y = nets.values()
    ls = lambda d, label: ((d - label) ** 2).mean()  # noqa: E731  LSGAN, real label 0.9 (smoothed) and fake 0
    l1 = lambda a, b: (a - b).abs().mean()  # noqa: E731
    expected = {"G_gan": (ls(D_Y(G(x)), 0.9), {"G"}, "Eq. 1, LSGAN: G(x) fools D_Y, (D_Y(G(x)) - real)^2"),
                "F_gan": (ls(D_X(F_(y)), 0.9), {"F"}, "Eq. 1 the other way: F(y) fools D_X"),
                "cycle_X": (3.0 * l1(F_(G(x)), x), {"G", "F"}, "Eq. 2 times lambda: |F(G(x)) - x|_1"),
                "cycle_Y": (3.0 * l1(G(F_(y)), y), {"G", "F"}, "Eq. 2 times lambda: |G(F(y)) - y|_1"),
                "idt_X": (0.6 * l1(F_(x), x), {"F"}, "Sec. 5.2: lambda_identity lambda |F(x) - x|_1"),
                "idt_Y": (0.6 * l1(G(y), y), {"G"}, "Sec. 5.2: lambda_identity lambda |G(y) - y|_1"),
                "D_Y": (0.5 * (ls(D_Y(y), 0.9) + ls(D_Y(G(x).detach()), 0)), {"D_Y"},
                        "Eq. 1 for D_Y, real y against G(x), halved (appendix 7.1)"),
                "D_X": (0.5 * (ls(D_X(x), 0.9) + ls(D_X(F_(y).detach()), 0)), {"D_X"},
                        "Eq. 1 for D_X, real x against F(y), halved (appendix 7.1)")}
    return nets, losses, recorder, expected


def test_cyclegan_step_computes_each_term_of_eq_3_and_of_the_identity_loss():
    _, losses, _, expected = cyclegan_terms()
    assert set(losses) == set(expected), \
        "Eq. 3's four terms for G and F (two GAN, two cycle), Sec. 5.2's two identity terms, and each D's loss"
    mean = " as a mean over the pixels, as both official codes (nn.L1Loss) take it: Eq. 2's norm, a sum, is " \
        "C x H x W times larger"
    for name, (value, _, rule) in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-9), \
            f"{name}: {rule}" + (mean if name.startswith(("cycle", "idt")) else "")


def gradient(loss, nets: dict) -> torch.Tensor:
    """The gradient `loss` sends into the parameters of `nets`, flattened in their order (zeros where none reaches)."""
    params = [p for net in nets.values() for p in net.parameters()]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if loss.requires_grad else \
        [None] * len(params)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def assert_each_term_sends_its_gradient_where_it_belongs(nets, groups, losses, recorder, expected, held):
    """Each term alone: the gradient it sends into each network is its formula's (`expected`, relative to that
    gradient's own size) where the term trains that network, and zero exactly where it does not (`held`: why a term
    of one group reaches none of the other group's networks). Then each group's trainer.backward carries the
    gradients of the group's terms, each once, and the groups step in the model's order (`groups`)."""
    sizes = [sum(p.numel() for p in net.parameters()) for net in nets.values()]
    group_of = {name: group for group, members in groups.items() for name in members}
    term_group = {term: group_of[min(trains)] for term, (_, trains, _) in expected.items()}
    got = {term: gradient(losses[term], nets) for term in expected}
    for term, (formula, trains, rule) in expected.items():
        want, where = dict(zip(nets, gradient(formula, nets).split(sizes))), " and ".join(sorted(trains))
        for name, g in zip(nets, got[term].split(sizes)):
            if name in trains:
                assert g.any(), f"{term} sends no gradient into {name}, which it trains ({rule}): is what it is " \
                    f"computed from detached, or taken through another network than {where}?"
                apart = ((g - want[name]).norm() / want[name].norm()).item()
                assert apart < 1e-6, f"{term}'s gradient into {name} is not that of {rule} ({apart:.2g} apart, " \
                    "relative to its size)"
            else:
                assert not g.any(), f"{term} sends a gradient into {name}, where it should reach {where} alone " \
                    f"({rule})" + (f": {held[term_group[term]]}" if group_of[name] != term_group[term] else "")
    nothing = torch.zeros(sum(sizes), dtype=torch.float64)
    for group in groups:
        own = [term for term in expected if term_group[term] == group]
        sent = sum((gradient(loss, nets) for g, loss in recorder.backward_into if g == group), nothing)
        residual = sent - sum(got[term] for term in own)
        for term in expected if residual.norm() > 1e-9 * sent.norm() else ():
            assert (residual + got[term]).norm() > 1e-9 * got[term].norm(), \
                f"{term} is logged but its gradient never reaches trainer.backward(..., {group!r}): it is left out " \
                f"of what {group} steps on"
            assert (residual - got[term]).norm() > 1e-9 * got[term].norm(), \
                f"{term}'s gradient reaches trainer.backward(..., {group!r}) " + \
                ("twice" if term in own else f"though it is a term of {term_group[term]}")
        assert residual.norm() <= 1e-9 * sent.norm(), \
            f"what trainer.backward(..., {group!r}) gets is not the sum of {group}'s terms, {', '.join(own)}"
    stepped = list(dict.fromkeys(group for group, _ in recorder.backward_into))
    assert stepped == list(groups), f"the groups back-propagate in the order {' then '.join(groups)}"


def test_cyclegan_step_sends_each_terms_gradient_into_the_networks_it_trains_alone():
    nets, losses, recorder, expected = cyclegan_terms()
    assert_each_term_sends_its_gradient_where_it_belongs(
        nets, {"G": ("G", "F"), "D": ("D_X", "D_Y")}, losses, recorder, expected,
        {"G": "D_X and D_Y stay fixed while G and F step (junyanz's set_requires_grad([netD_A, netD_B], False), "
              "networks.frozen)",
         "D": "each D judges fakes taken out of G's and F's graph (ImagePool.query detaches them)"})


def snapshot(nets):
    return {name: [p.detach().clone() for p in net.parameters()] for name, net in nets.items()}


def update(trainer, loss, group):
    """One plain optimiser step of `group` on `loss` (the official steps, written out in tests)."""
    trainer.backward(loss, group)
    trainer.step(group)


def steps_checked(trainer, monkeypatch, rules: dict[str, str]) -> None:
    """Make each trainer.step(group) first check that the networks of the other groups hold no gradient: `rules`
    names, per group stepped, the rule that a gradient there breaks ({name}: the network that holds one). It fails
    at the step itself, before a graph freed by the wrong backward ends the step in a torch error."""
    step = trainer.step

    def checked(group):
        for name in (n for g, members in trainer.model.groups.items() if g != group for n in members):
            assert all(p.grad is None for p in trainer.nets[name].parameters()), rules[group].format(name=name)
        step(group)
    monkeypatch.setattr(trainer, "step", checked)


def test_cyclegan_step_holds_D_X_and_D_Y_fixed_while_G_and_F_step(monkeypatch):
    torch.manual_seed(0)
    trainer = Trainer(CycleGAN(CycleGANConfig(**TINY)))
    steps_checked(trainer, monkeypatch, {
        "G": "D_X and D_Y stay fixed while G and F step (junyanz's set_requires_grad([netD_A, netD_B], False), "
             "networks.frozen): G's and F's terms left gradients in {name}, which its own step would add to its loss's",
        "D": "the discriminators' losses judge fakes taken out of G's and F's graph (ImagePool.query detaches "
             "them): D's losses sent gradients into {name}"})
    trainer.train_step(*pair(32))


def test_cyclegan_step_shows_D_the_fakes_its_history_of_fakes_returns(monkeypatch):
    torch.manual_seed(0)
    model = CycleGAN(CycleGANConfig(**TINY))
    x, y = pair(32)
    older = {"D_Y": torch.rand(1, 3, 32, 32) * 2 - 1, "D_X": torch.rand(1, 3, 32, 32) * 2 - 1}  # from the history
    shown = {}

    def from_history(fake, name):  # the pool keeps the new fake and returns an older one
        shown[name] = fake
        return older[name]
    for name, pool in (("D_Y", model.pool_Y), ("D_X", model.pool_X)):
        monkeypatch.setattr(pool, "query", functools.partial(from_history, name=name))
    losses = model.train_step(x, y, Recorder())
    gan = model.gan_loss
    with torch.no_grad():
        assert set(shown) == {"D_Y", "D_X"} and torch.equal(shown["D_Y"], model.G(x)) and \
            torch.equal(shown["D_X"], model.F(y)), \
            "each new fake goes into its image pool (CycleGAN Sec. 4): G(x) into D_Y's, F(y) into D_X's"
        for name, D, real in (("D_Y", model.D_Y, y), ("D_X", model.D_X, x)):
            expected = 0.5 * (gan(D(real), True) + gan(D(older[name]), False))
            assert losses[name].item() == pytest.approx(expected.item(), rel=1e-5), \
                f"{name} judges the fake its image pool returns, not the newest one alone (CycleGAN Sec. 4: D is " \
                "updated with a history of generated images)"


def test_cyclegan_step_changes_every_network_and_gives_finite_losses():
    torch.manual_seed(0)
    model = Trainer(CycleGAN(CycleGANConfig(**TINY)))
    before = snapshot(model.nets)
    losses = model.train_step(torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1)
    assert all(math.isfinite(v) for v in losses.values()), losses
    for name, net in model.nets.items():
        assert all(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())), \
            f"one step updates {name}"
    assert model.global_step == 1, "one step counted"


def test_cyclegan_step_gives_the_weights_of_one_backward_through_the_whole_objective():
    """The step back-propagates the x part and the y part of G's and F's terms separately; the official step
    builds the whole objective and back-propagates it once. Both must end with the same weights."""
    torch.manual_seed(0)
    split = Trainer(CycleGAN(CycleGANConfig(**TINY)))
    whole = copy.deepcopy(split)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    losses = split.train_step(x, y)

    m, gan, l1 = whole.model, whole.model.gan_loss, F.l1_loss  # the official step, written out
    fake_y, fake_x = m.G(x), m.F(y)
    m.D_X.requires_grad_(False), m.D_Y.requires_grad_(False)
    terms = {"G_gan": gan(m.D_Y(fake_y), True), "F_gan": gan(m.D_X(fake_x), True),
             "cycle_X": 10 * l1(m.F(fake_y), x), "cycle_Y": 10 * l1(m.G(fake_x), y),
             "idt_Y": 5 * l1(m.G(y), y), "idt_X": 5 * l1(m.F(x), x)}
    update(whole, sum(terms.values()), "G")
    m.D_X.requires_grad_(True), m.D_Y.requires_grad_(True)
    terms["D_Y"] = 0.5 * (gan(m.D_Y(y), True) + gan(m.D_Y(fake_y.detach()), False))
    terms["D_X"] = 0.5 * (gan(m.D_X(x), True) + gan(m.D_X(fake_x.detach()), False))
    update(whole, terms["D_Y"] + terms["D_X"], "D")
    assert dict(losses) == pytest.approx({k: v.item() for k, v in terms.items()}, rel=1e-5), \
        "the logged terms are those of the official step (cycle weight 10, identity 5)"
    for name, net in split.nets.items():
        for (pname, a), b in zip(net.named_parameters(), whole.nets[name].parameters()):
            assert torch.allclose(a, b, atol=1e-6), \
                f"{name}.{pname}: junyanz's step, G and F on Eq. 3 and the identity loss with D fixed, then D_X " \
                "and D_Y"


def saved_bytes_of(step) -> tuple[int, int]:
    """(peak, total) bytes of the tensors that autograd saved for backward while `step()` ran."""
    live, peak, total = [0], [0], [0]

    class Saved:
        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            live[0] += self.n
            total[0] += self.n
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.t):
        step()
    assert live[0] == 0, "every tensor saved for backward was freed by the end of the step"
    return peak[0], total[0]


def test_cyclegan_step_holds_the_graph_of_one_domain_part_at_a_time():
    torch.manual_seed(0)
    model = Trainer(CycleGAN(CycleGANConfig(**TINY)))
    peak, total = saved_bytes_of(lambda: model.train_step(torch.rand(1, 3, 64, 64) * 2 - 1,
                                                          torch.rand(1, 3, 64, 64) * 2 - 1))
    assert 0.3 * total < peak < 0.6 * total, \
        "the terms from x are back-propagated before those from y are built"


def test_cyclegan_step_names_its_networks_by_role():
    """generator_half runs for x (G, F, D_Y) and for y (F, G, D_X): it names its networks by role."""
    params = set(inspect.signature(CycleGAN.generator_half).parameters)
    assert not params & {"G", "F", "D", "D_X", "D_Y"} and {"translate", "back", "judge"} <= params, \
        "a parameter is never named after a paper symbol it does not stand for in every call"


def test_cyclegan_has_no_identity_loss_when_its_weight_is_zero():
    model = Trainer(CycleGAN(CycleGANConfig(**TINY, lambda_identity=0)))
    assert "idt_X" not in model.train_step(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)), \
        "Sec. 5.2's identity loss is off at weight 0"


def test_cyclegan_maps_grayscale_to_colour():
    with pytest.raises(ValueError, match="--lambda-identity 0"):
        CycleGAN(CycleGANConfig(**TINY, channels_x=1, channels_y=3))
    model = Trainer(CycleGAN(CycleGANConfig(**TINY, channels_x=1, channels_y=3, lambda_identity=0)))
    model.train_step(torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 32, 32))
    assert model.model.G(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32), "G: X (1 channel) -> Y (3)"
    assert model.model.F(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32), "F: Y -> X"
    assert model.model.D_X.model[0].in_channels == 1 and model.model.D_Y.model[0].in_channels == 3, \
        "D_X judges X's 1-channel images, D_Y judges Y's 3-channel ones"


def test_cyclegan_verdicts_are_each_Ds_output_on_real_images_and_on_translations():
    torch.manual_seed(0)
    model = CycleGAN(CycleGANConfig(**TINY))
    x, y = pair(32)
    with torch.no_grad():
        verdicts = model.verdicts(x, y)
        judges = {"D_Y": (model.D_Y, y, model.G(x)), "D_X": (model.D_X, x, model.F(y))}
        assert list(verdicts) == list(judges), "D_Y judges domain Y, D_X domain X"
        for name, (D, real, fake) in judges.items():
            got_real, got_fake, on_real, on_fake = verdicts[name]
            assert torch.equal(got_real, real) and torch.equal(got_fake, fake), f"{name}: its real images, its fakes"
            assert torch.equal(on_real, D(real)) and torch.equal(on_fake, D(fake)), \
                f"{name}'s LSGAN output is its verdict, one per overlapping patch"


def test_cyclegan_visuals_are_x_G_x_F_G_x_then_y_F_y_G_F_y():
    torch.manual_seed(0)
    model = CycleGAN(CycleGANConfig(**TINY))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        rows = model.visuals(x, y)
        expected = [[x[i], model.G(x)[i], model.F(model.G(x))[i]] for i in range(2)] + \
            [[y[i], model.F(y)[i], model.G(model.F(y))[i]] for i in range(2)]
    assert len(rows) == 4 and all(torch.allclose(a, b, atol=1e-6)
                                  for r, e in zip(rows, expected) for a, b in zip(r, e)), \
        "rows x | G(x) | F(G(x)) then y | F(y) | G(F(y)): the cycles of Eq. 2"
    assert model.visuals_caption().startswith("rows of a test image x: x, G(x), F(G(x))"), \
        "the caption says what the rows show"


def test_cyclegan_extra_state_carries_the_history_of_fakes():
    torch.manual_seed(0)
    model = CycleGAN(CycleGANConfig(**TINY))
    model.train_step(*pair(32), Recorder())
    state = model.extra_state()
    again = CycleGAN(CycleGANConfig(**TINY))
    again.load_extra_state(state, torch.device("cpu"))
    for ours, theirs in ((model.pool_X, again.pool_X), (model.pool_Y, again.pool_Y)):
        assert len(theirs.images) == 1 and torch.equal(ours.images[0], theirs.images[0]), \
            "an exact resume restores the history of fakes (Sec. 4)"


def test_cyclegan_logs_each_loss_under_a_name_that_stands_in_its_file():
    source = (Path(__file__).parent / "cycle_gan.py").read_text()
    names = list(Trainer(CycleGAN(CycleGANConfig(**TINY))).train_step(*pair(32)))
    assert names and all(f'"{name}"' in source for name in names), names


def imported_by(path: str) -> set[str]:
    """The top-level modules a file of this folder imports."""
    tree = ast.parse((Path(__file__).parent / path).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return {m.split(".")[0] for m in modules}


def test_cyclegan_file_imports_only_torch_the_standard_library_and_the_network_files():
    assert imported_by("cycle_gan.py") <= {"layers", "networks", "losses", "torch", *sys.stdlib_module_names}, \
        "a model file is its paper and nothing else"


# ============================================================================= cut_model.py

TINY_CUT = dict(netG="resnet_6blocks", ngf=4, ndf=4, netF_nc=8, num_patches=32)
PRESETS = {"cut": {}, "fastcut": FASTCUT}  # what the names change in CUTConfig's defaults


def test_cut_model_presets_and_config_are_the_cut_repositorys():
    cut, fast = CUTConfig(), CUTConfig(**FASTCUT)
    assert (cut.lambda_nce, cut.nce_idt, cut.flip_equivariance, cut.epochs, cut.epochs_decay) == \
        (1.0, True, False, 200, 200), \
        "CUT: lambda_X = lambda_Y = 1 (Sec. 3.3, after Eq. 5); no flips, 200 + 200 epochs (the CUT repository's)"
    assert (fast.lambda_nce, fast.nce_idt, fast.flip_equivariance, fast.epochs, fast.epochs_decay) == \
        (10.0, False, True, 150, 50), \
        "FastCUT: lambda_X = 10 and no Y term (Sec. 3.3, after Eq. 5); flip-equivariance (the paper's appendix, " \
        "training details); 150 + 50 epochs (the CUT repository's)"
    official = {"netG": "resnet_9blocks", "ngf": 64, "ndf": 64, "n_layers_D": 3, "norm": "instance",
                "dropout": False, "antialias": True, "antialias_up": True, "gan_mode": "lsgan", "real_label": 1.0,
                "lambda_gan": 1.0, "nce_layers": DEFAULT_TAPS, "num_patches": 256, "nce_temperature": 0.07,
                "nce_negatives": "image", "netF_nc": 256, "lr": 2e-4, "beta1": 0.5, "init_gain": 0.02,
                "channels_x": 3, "channels_y": 3}
    for name, value in official.items():
        assert getattr(cut, name) == value, \
            f"CUTConfig.{name}: the CUT repository's {value!r}, got {getattr(cut, name)!r}"
    assert {f.name for f in dataclasses.fields(cut)} == set(official) | set(FASTCUT), "every option checked"
    assert_options_say_what_they_are_refuse_what_cannot_work_and_let_a_resume_change_the_schedule(cut, {
        "lambda_nce": 0, "num_patches": 1, "lambda_gan": 0, "ngf": 1, "ndf": 1, "n_layers_D": 1, "netF_nc": 1,
        "epochs": 0, "epochs_decay": 0}, {"nce_temperature": 0, "lr": 0, "init_gain": 0, "real_label": 0}, {
        "nce_negatives": ("image", "batch", "others"), "gan_mode": GAN_MODES, "netG": GENERATORS,
        "norm": ("instance", "batch", "none"), "channels_x": (1, 3), "channels_y": (1, 3)})


def test_cut_model_networks_are_the_cut_repositorys():
    torch.manual_seed(0)
    model = CUT(CUTConfig(netG="resnet_6blocks"))
    assert (model.groups, model.directions, model.resize_crop_in_decay, model.drop_last) == \
        ({"D": ("D",), "G": ("G", "H")}, {"x2y": "G"}, False, True), \
        "D steps alone, G and H together; one direction; the decay epochs resize to the crop; a short last batch is " \
        "dropped (the CUT repository; its data/__init__.py for the last)"
    kinds = {type(m).__name__ for net in (model.G, model.D) for m in net.modules()}
    assert {"BlurDownsample", "BlurUpsample"} <= kinds, "the official anti-aliased G and D"
    assert [m[0].in_features for m in model.H.mlps] == [3, 128, 256, 256, 256] and model.H.mlps[0][2].out_features \
        == 256, "H: an MLP per tap (Sec. 3.2), 256 wide (the appendix's), built from the taps' channels"
    conv, linear = model.G.model[1].weight, model.H.mlps[0][0].weight
    assert conv.std().item() == pytest.approx(0.02 * math.sqrt(2 / (3 * 49 + 64 * 49)), rel=0.05), \
        "xavier_normal init, gain 0.02 (the CUT repository's)"
    assert linear.std().item() == pytest.approx(0.02 * math.sqrt(2 / (3 + 256)), rel=0.1), \
        "H's linear layers: xavier_normal, gain 0.02 too"
    assert (model.gan_loss.mode, model.nce_loss.temperature, model.nce_loss.negatives) == ("lsgan", 0.07, "image"), \
        "LSGAN, tau 0.07, internal negatives: the CUT repository's defaults"


def test_cut_model_queries_and_keys_are_sampled_at_the_same_places(monkeypatch):
    model = CUT(CUTConfig(**TINY_CUT))
    calls = []
    forward = model.H.forward

    def record(feats, num_patches=256, patch_ids=None):
        out, ids = forward(feats, num_patches, patch_ids)
        calls.append((patch_ids, ids))
        return out, ids
    monkeypatch.setattr(model.H, "forward", record)
    model.train_step(*pair(), Recorder())
    assert len(calls) == 4, "keys then queries, for the X term and the Y term"
    for (given_k, drawn), (given_q, used) in (calls[0:2], calls[2:4]):
        assert given_k is None and given_q is drawn, "the keys' places are drawn, then given to the queries"
        assert all(torch.equal(a, b) for a, b in zip(drawn, used)), "Eq. 3: z_l^s and its query at the same s"


def cut_terms():
    """A CUT step through a Recorder, in float64 (the networks stay as they are), and each of its terms written
    again from the paper on the same networks, the same patches drawn: {term: (the paper's value, the networks it
    trains, the rule)}."""
    torch.manual_seed(0)
    model = CUT(CUTConfig(**TINY_CUT, lambda_gan=2.0, lambda_nce=3.0, real_label=0.9))
    nets = {"G": model.G.double(), "D": model.D.double(), "H": model.H.double()}
    x, y = (t.double() for t in pair(32))
    recorder = Recorder()
    torch.manual_seed(1)
    losses = model.train_step(x, y, recorder)
    G, D, H, taps = model.G, model.D, model.H, model.config.nce_layers
    ls = lambda d, label: ((d - label) ** 2).mean()  # noqa: E731  LSGAN, real label 0.9 (smoothed)
    torch.manual_seed(1)  # the same places as the step's, drawn in the same order
    nce = []
    for real in (x, y):
        fake, keys = G(real, taps)
        k, ids = H(keys, 32)
        q, _ = H(G(fake, taps, encode_only=True), 32, ids)
        nce.append(sum(PatchNCELoss(0.07)(qi, ki) for qi, ki in zip(q, k)) / len(q))
    expected = {"D": (0.5 * (ls(D(G(x).detach()), 0) + ls(D(y), 0.9)), {"D"}, "Eq. 1 for D, real y against G(x), "
                      "halved"),
                "G_gan": (2.0 * ls(D(G(x)), 0.9), {"G"}, "Eq. 1 for G, G(x) fools D, times lambda_GAN (the official "
                          "--lambda_GAN; Eq. 5 has no weight there)"),
                "NCE_X": (3.0 * nce[0] / 2, {"G", "H"}, "Eq. 5's lambda_X PatchNCE(G, H, X), Eq. 3 averaged over "
                          "places and layers as the official code does (Eq. 3 sums), halved: the official code "
                          "averages the X and Y terms"),
                "NCE_Y": (3.0 * nce[1] / 2, {"G", "H"}, "Eq. 5's lambda_Y PatchNCE(G, H, Y), the identity term: "
                          "G(y)'s patches against y's, averaged and halved the same way")}
    return nets, losses, recorder, expected


def test_cut_model_step_computes_each_term_of_eq_5_as_the_official_code_weighs_it():
    _, losses, _, expected = cut_terms()
    assert set(losses) == set(expected), "D's loss, and Eq. 5's three terms: L_GAN, lambda_X and lambda_Y PatchNCE"
    for name, (value, _, rule) in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-9), f"{name}: {rule}"


def test_cut_model_step_sends_each_terms_gradient_into_the_networks_it_trains_alone():
    nets, losses, recorder, expected = cut_terms()
    assert_each_term_sends_its_gradient_where_it_belongs(
        nets, {"D": ("D",), "G": ("G", "H")}, losses, recorder, expected,
        {"G": "D stays fixed while G and H step (the official set_requires_grad(netD, False), networks.frozen)",
         "D": "D's loss judges G(x) taken out of G's graph (the official compute_D_loss: fake_B.detach())"})


def test_cut_model_step_holds_D_fixed_while_G_and_H_step(monkeypatch):
    for mode in ("cut", "fastcut"):
        torch.manual_seed(0)
        trainer = Trainer(CUT(CUTConfig(**PRESETS[mode], **TINY_CUT)))
        steps_checked(trainer, monkeypatch, {
            "D": "D's loss judges G(x) taken out of G's graph (the official compute_D_loss: fake_B.detach()): D's "
                 "loss sent gradients into {name}",
            "G": "D stays fixed while G and H step (the official set_requires_grad(netD, False), networks.frozen): "
                 "G's adversarial term left gradients in {name}, which D's next step would add to its own loss's"})
        trainer.train_step(*pair(32))


def test_cut_model_fastcut_has_no_identity_term_and_weighs_nce_x_whole():
    torch.manual_seed(0)
    model = CUT(CUTConfig(**{**FASTCUT, "flip_equivariance": False}, **TINY_CUT))
    x, y = pair(32)
    torch.manual_seed(1)
    losses = model.train_step(x, y, Recorder())
    torch.manual_seed(1)
    with torch.no_grad():
        fake, keys = model.G(x, model.config.nce_layers)
        nce = model.patch_nce(keys, fake, False)
    assert set(losses) == {"D", "G_gan", "NCE_X"}, "FastCUT: no lambda_Y identity term"
    assert losses["NCE_X"].item() == pytest.approx(10 * nce.item(), rel=1e-5), "FastCUT: lambda_X = 10, not halved"
    off = CUT(CUTConfig(**TINY_CUT, lambda_nce=0.0)).train_step(x, y, Recorder())
    assert set(off) == {"D", "G_gan"}, "lambda_NCE 0: no PatchNCE term at all"


def test_cut_model_patch_nce_is_the_mean_over_layers_of_eq_2_at_places_shared_by_queries_and_keys():
    torch.manual_seed(0)
    model = CUT(CUTConfig(**TINY_CUT))
    x = pair(32)[0]
    with torch.no_grad():
        fake, keys = model.G(x, model.config.nce_layers)
        torch.manual_seed(3)
        loss = model.patch_nce(keys, fake, flipped=False)
        torch.manual_seed(3)
        k, ids = model.H(keys, 32)
        q, _ = model.H(model.G(fake, model.config.nce_layers, encode_only=True), 32, ids)
        per_layer = [PatchNCELoss(0.07)(qi, ki).item() for qi, ki in zip(q, k)]
    assert len(per_layer) == 5 and loss.item() == pytest.approx(sum(per_layer) / 5, rel=1e-6), \
        "Eq. 3: Eq. 2 at each tapped layer, the queries G(x)'s patches at the keys' places; where Eq. 3 sums over " \
        "the layers, the official code averages them: the sum / 5"


def test_cut_model_fastcut_flip_mirrors_the_input_not_the_target(monkeypatch):
    model = CUT(CUTConfig(**FASTCUT, **TINY_CUT))
    monkeypatch.setattr(model, "flip_this_step", lambda: True)
    seen = {"G": [], "D": []}
    model.G.model[0].register_forward_pre_hook(lambda m, inp: seen["G"].append(inp[0].detach().clone()))
    model.D.model[0].register_forward_pre_hook(lambda m, inp: seen["D"].append(inp[0].detach().clone()))
    x, y = pair()
    Trainer(model).train_step(x, y)
    assert torch.equal(seen["G"][0], x.flip(3)), "FastCUT: G translates x mirrored left to right"
    assert torch.equal(seen["G"][1], x), "the keys come from x as it is"
    assert any(torch.equal(d, y) for d in seen["D"]), "D sees the real y unmirrored"
    assert not any(torch.equal(d, y.flip(3)) for d in seen["D"]), \
        "FastCUT mirrors G's input only: D never sees y mirrored"


def test_cut_model_flipped_nce_compares_the_mirrored_back_queries_with_the_unmirrored_keys():
    torch.manual_seed(0)
    model = CUT(CUTConfig(**FASTCUT, **TINY_CUT))
    x = pair(32)[0]
    G, H, taps = model.G, model.H, model.config.nce_layers
    with torch.no_grad():
        fake, keys = model.translate_with_keys(x, flipped=True)
        torch.manual_seed(2)
        loss = model.patch_nce(keys, fake, flipped=True)
        assert torch.equal(fake, G(x.flip(3))), "G(x mirrored)"
        assert all(torch.equal(a, b) for a, b in zip(keys, G(x, taps, encode_only=True))), "keys: x unmirrored"
        torch.manual_seed(2)
        k, ids = H(keys, 32)
        q, _ = H([f.flip(3) for f in G(fake, taps, encode_only=True)], 32, ids)
        expected = sum(PatchNCELoss(0.07)(qi, ki) for qi, ki in zip(q, k)) / 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6), \
        "FastCUT's flip-equivariance: G's output is encoded, mirrored back, then matched place by place"


def test_cut_model_flips_half_the_steps_only_when_flip_equivariance_is_on():
    torch.manual_seed(0)
    fastcut = CUT(CUTConfig(**FASTCUT, **TINY_CUT))
    flips = [fastcut.flip_this_step() for _ in range(200)]
    assert 70 < sum(flips) < 130, "FastCUT mirrors G's input half the time"
    assert not any(CUT(CUTConfig(**TINY_CUT)).flip_this_step() for _ in range(20)), "CUT never does"


def test_cut_model_step_changes_G_D_H_and_gives_finite_losses():
    for mode, expected in (("cut", {"D", "G_gan", "NCE_X", "NCE_Y"}), ("fastcut", {"D", "G_gan", "NCE_X"})):
        torch.manual_seed(0)
        model = Trainer(CUT(CUTConfig(**PRESETS[mode], **TINY_CUT)))
        before = snapshot(model.nets)
        losses = model.train_step(*pair())
        assert set(losses) == expected and all(math.isfinite(v) for v in losses.values()), (mode, losses)
        for name, net in model.nets.items():
            assert all(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())), \
                f"{mode}: one step updates {name}"


def test_cut_model_fresh_nce_is_near_log_num_patches():
    torch.manual_seed(0)
    model = CUT(CUTConfig(netG="resnet_6blocks", ndf=8))  # official widths: ngf 64, H 256 wide
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    fake, keys = model.G(x, model.config.nce_layers)
    k, ids = model.H(keys, 256)
    q, _ = model.H(model.G(fake, DEFAULT_TAPS, encode_only=True), 256, ids)
    # At res1 and res5 (16x16 = 256 places) a fresh H gives near-random unit vectors, so the loss is
    # about log(256); the shallow taps are higher because a fresh G's output is almost constant.
    deep = [model.nce_loss(a, b).item() for a, b in zip(q[3:], k[3:])]
    assert deep == pytest.approx([math.log(256)] * 2, abs=0.5), "a fresh H: Eq. 2 near log P, P = 256"


def test_cut_model_reuses_the_main_pass_for_keys_when_not_flipped():
    model = CUT(CUTConfig(**TINY_CUT))
    calls = []
    model.G.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0], kwargs)), with_kwargs=True)
    x, y = pair()
    Trainer(model).train_step(x, y)
    assert len(calls) == 4, "G(x) with taps, encode(G(x)) for the queries; the same for y"
    for real, (main_input, main_kw), (query_input, query_kw) in ((x, *calls[:2]), (y, *calls[2:])):
        assert torch.equal(main_input, real) and not main_kw.get("encode_only"), \
            "the main pass: G on the real image, whole"
        assert query_kw.get("encode_only") and not torch.equal(query_input, real), \
            "the queries' pass: G's encoder on G's output"


def test_cut_model_step_gives_the_gradients_of_one_pass_of_G_over_x_and_y_together(monkeypatch):
    """The step back-propagates the terms of G(x), then builds and back-propagates the identity term
    of G(y); the official step runs G once on x and y together and back-propagates Eq. 5 once."""
    torch.manual_seed(0)
    trainer = Trainer(CUT(CUTConfig(**TINY_CUT)))
    official = copy.deepcopy(trainer)
    grads, step = {}, trainer.step

    def record(group):
        grads[group] = [p.grad.clone() for p in trainer.optimizers[group].param_groups[0]["params"]]
        step(group)
    monkeypatch.setattr(trainer, "step", record)
    x, y = pair()
    torch.manual_seed(1)  # the same patches drawn in both steps
    losses = trainer.train_step(x, y)

    m, gan, taps = official.model, official.model.gan_loss, official.model.config.nce_layers  # the official step
    torch.manual_seed(1)
    fake, keys = m.G(torch.cat([x, y]), taps)
    update(official, 0.5 * (gan(m.D(fake[:1].detach()), False) + gan(m.D(y), True)), "D")
    m.D.requires_grad_(False)
    nce = [m.patch_nce([k[i:i + 1] for k in keys], fake[i:i + 1], False) for i in (0, 1)]
    g_gan = gan(m.D(fake[:1]), True)
    expected = torch.autograd.grad(g_gan + (nce[0] + nce[1]) / 2, official.optimizers["G"].param_groups[0]["params"])
    assert [losses[k] for k in ("G_gan", "NCE_X", "NCE_Y")] == \
        pytest.approx([g_gan.item(), nce[0].item() / 2, nce[1].item() / 2], rel=1e-5), \
        "the logged terms are those of the objective: the official code averages the two NCE terms"
    assert len(grads["G"]) == len(expected), \
        "the G group steps G's and H's parameters, as the official optimizer_G and optimizer_F do"
    # Equal up to float rounding (G ran on batches of 1, not 2), judged over all of G and H at once:
    # the biases before an instance norm have a zero gradient, made of rounding alone.
    got, want = torch.cat([g.flatten() for g in grads["G"]]), torch.cat([g.flatten() for g in expected])
    assert (got - want).norm() <= 1e-5 * want.norm(), "G and H step on the gradient of all of Eq. 5, with D fixed"


def test_cut_model_step_frees_the_graph_of_G_x_before_it_builds_G_y():
    torch.manual_seed(0)
    model = Trainer(CUT(CUTConfig(**TINY_CUT)))
    peak, total = saved_bytes_of(lambda: model.train_step(*pair()))
    assert 0.3 * total < peak < 0.7 * total, "G(x)'s terms are back-propagated before G(y) is built"


def biases_before_instance_norm(net: nn.Module) -> set[str]:
    """The names of the conv biases whose conv feeds an instance norm directly."""
    found = set()
    for prefix, module in net.named_modules():
        children = list(module.named_children())
        for (name, conv), (_, after) in zip(children, children[1:]):
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and conv.bias is not None and \
                    isinstance(after, nn.InstanceNorm2d):
                found.add(f"{prefix}.{name}.bias".lstrip("."))
    return found


def test_cut_model_gradients_reach_every_weight_but_the_biases_an_instance_norm_cancels():
    """In float64, so that a gradient that is zero reads as zero, not as rounding."""
    torch.manual_seed(0)
    G = init_weights(ResnetGenerator(ngf=4, n_blocks=5, antialias=True), "xavier").double()
    D = init_weights(PatchDiscriminator(ndf=4, antialias=True), "xavier").double()
    H = init_weights(PatchSampleMLP(G.tap_channels(), nc=8), "xavier").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y, feats_k = G(x, DEFAULT_TAPS)
    q, ids = H(G(y, DEFAULT_TAPS, encode_only=True), 16)
    k, _ = H(feats_k, 16, ids)
    (GANLoss()(D(y), True) + sum(PatchNCELoss()(a, b) for a, b in zip(q, k))).backward()
    # down1 and down2 tap their conv's output before its norm: PatchNCE reaches those biases through the taps.
    tapped = {f"model.{G.tap(t)[0]}.bias" for t in DEFAULT_TAPS}
    for net_name, net in (("G", G), ("D", D), ("H", H)):
        cancelled = biases_before_instance_norm(net) - (tapped if net is G else set())
        largest = max(p.grad.abs().max() for p in net.parameters())
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{net_name}.{name}: Eq. 5 reaches it"
            if name in cancelled:
                assert p.grad.abs().max() <= 1e-9 * largest, \
                    f"{net_name}.{name} feeds an instance norm, which subtracts each channel's mean and the bias " \
                    "with it: its gradient is zero (the official code keeps the bias, so its checkpoints load)"
            else:
                assert p.grad.abs().max() >= 1e-7 * largest, \
                    f"{net_name}.{name}: Eq. 5 reaches every other weight of G, D and H with a gradient far above " \
                    "rounding"


def test_cut_model_short_training_on_one_pair_drives_nce_down():
    torch.manual_seed(0)
    model = Trainer(CUT(CUTConfig(**{**TINY_CUT, "ngf": 8})))
    x, y = pair(32)
    first = model.train_step(x, y)["NCE_X"]
    for _ in range(10):
        last = model.train_step(x, y)["NCE_X"]
    assert last < 0.75 * first, "G and H learn to pick each output patch's own input patch"


def test_cut_model_rejects_a_unet_and_channel_mismatches_clearly():
    with pytest.raises(ValueError, match="encoder taps of a ResNet.*--netG resnet_9blocks"):
        CUT(CUTConfig(netG="unet_128", ngf=4))
    # G(x) goes through G's own encoder, so CUT needs the same channels in X and Y, identity term or not.
    for mode in ("cut", "fastcut"):
        with pytest.raises(ValueError, match="same number of channels.*--model cycle_gan"):
            CUT(CUTConfig(**PRESETS[mode], **TINY_CUT, channels_x=1))
    gray = Trainer(CUT(CUTConfig(**FASTCUT, **TINY_CUT, channels_x=1, channels_y=1)))
    gray.train_step(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
    assert gray.model.G(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32), \
        "grayscale to grayscale: CUT needs the same channels in X and Y"


def test_cut_model_similarity_map_of_an_image_with_itself_peaks_at_each_query_point():
    torch.manual_seed(0)
    model = CUT(CUTConfig(**{**TINY_CUT, "ngf": 16, "netF_nc": 64}))  # wide enough for distinct patches
    x = torch.rand(2, 3, 64, 64) * 2 - 1  # noise: every patch differs from the others
    points = [(0.5, 0.5), (0.1, 0.8), (0.9, 0.05), (1.0, 1.0)]
    maps = model.similarity_maps(x, x, points)  # deepest tap, res5: 16x16 at 64x64
    assert torch.equal(maps, model.similarity_maps(x, x, points, layer=4)), "by default, the deepest tap's (res5)"
    assert maps.shape == (2, 4, 16, 16) and torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(2, 4)), \
        "for each query point, a softmax over every patch of the target"
    peaks = maps.flatten(2).argmax(-1)  # (B, Q) flat locations
    assert peaks.tolist() == [[8 * 16 + 8, 1 * 16 + 12, 14 * 16 + 0, 15 * 16 + 15]] * 2, \
        "a patch is most like itself: each map peaks where its point is (a side's end is its last patch)"
    shallow = model.similarity_maps(x, x, points, layer=1)  # down1: 64x64
    assert shallow.shape == (2, 4, 64, 64) and shallow.flatten(2).argmax(-1)[0, 0] == 32 * 64 + 32, \
        "at down1 (64x64 at 64x64) too, the centre point's map peaks at the centre"


def test_cut_model_similarity_map_is_the_softmax_of_eq_2s_similarities_over_tau():
    torch.manual_seed(0)
    model = CUT(CUTConfig(**TINY_CUT, nce_temperature=0.5))
    source, target = pair(32)
    maps = model.similarity_maps(source, target, [(0.25, 0.75)], layer=-2)
    with torch.no_grad():
        fq, fk = (model.G(t, ["res1"], encode_only=True)[0] for t in (source, target))  # (1, 16, 8, 8)
        q = model.H.project(3, fq, torch.tensor([2 * 8 + 6]))
        k = model.H.project(3, fk, torch.arange(64))
        expected = ((q @ k.transpose(1, 2)) / 0.5).softmax(-1).view(1, 1, 8, 8)
    assert torch.allclose(maps, expected, atol=1e-6), \
        "the map is Eq. 2's logits, similarity / tau with H's projections at the tap, through a softmax"


def test_cut_model_verdicts_are_Ds_output_on_real_images_and_on_translations():
    for gan_mode, read in (("lsgan", lambda t: t), ("vanilla", torch.sigmoid)):
        torch.manual_seed(0)
        model = CUT(CUTConfig(**TINY_CUT, gan_mode=gan_mode))
        x, y = pair(32)
        with torch.no_grad():
            real, fake, on_real, on_fake = model.verdicts(x, y)["D"]
            assert torch.equal(real, y) and torch.equal(fake, model.G(x)), "D judges real y and G(x)"
            assert torch.equal(on_real, read(model.D(y))) and torch.equal(on_fake, read(model.D(model.G(x)))), \
                f"{gan_mode}: LSGAN's output is the verdict; a logit is read through a sigmoid"
        assert on_real.shape == (1, 1, 2, 2), "32 / 8 - 2: a verdict per overlapping patch"


def test_cut_model_visuals_show_the_identity_path_when_it_is_trained():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    for mode, columns in (("cut", 4), ("fastcut", 2)):
        model = CUT(CUTConfig(**PRESETS[mode], **TINY_CUT))
        rows = model.visuals(x, y)
        with torch.no_grad():
            assert len(rows) == 2 and all(len(r) == columns for r in rows) and torch.equal(rows[1][1], model.G(x)[1]), \
                f"{mode}: a row per test image, its x then G(x)"
            if mode == "cut":
                assert torch.equal(rows[0][2], y[0]) and torch.equal(rows[0][3], model.G(y)[0]), \
                    "CUT: x | G(x) | y | G(y), the identity path of Eq. 5's lambda_Y term"
        assert model.visuals_caption().startswith("each row: a test image x, G(x)"), \
            "the caption says what the rows show"


def test_cut_model_file_imports_only_torch_the_standard_library_and_the_network_files():
    assert imported_by("cut_model.py") <= {"layers", "networks", "losses", "torch", *sys.stdlib_module_names}, \
        "a model file is its paper and nothing else"


def test_cut_model_logs_each_loss_under_a_name_that_stands_in_its_file():
    source = (Path(__file__).parent / "cut_model.py").read_text()
    names = list(Trainer(CUT(CUTConfig(**TINY_CUT))).train_step(*pair(32)))
    assert names and all(f'"{name}"' in source for name in names), names


# ============================================================================= data


SHARED = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "apple2orange"


def write_mixed_images(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """n images of assorted formats, modes and sizes (png/jpg, RGB, L, RGBA, P, odd sides)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [("RGB", "jpg", (40, 30)), ("L", "png", (33, 47)), ("RGBA", "png", (64, 64)), ("P", "PNG", (50, 41))]
    paths = []
    for i in range(n):
        mode, ext, (w, h) = kinds[i % len(kinds)]
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
        sub = folder / ("nested" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        paths.append(sub / f"img{i}.{ext}")
        img.save(paths[-1])
    return paths


@pytest.fixture
def dataset_root(tmp_path):
    for split, n in (("trainA", 4), ("trainB", 3), ("testA", 2), ("testB", 2)):
        write_mixed_images(tmp_path / "ds" / split, n, seed=len(split) + n)
    return tmp_path / "ds"


def test_dataset_lists_images_recursively_ignoring_case_and_other_files(tmp_path):
    paths = write_mixed_images(tmp_path, 4)
    (tmp_path / "notes.txt").write_text("not an image")
    assert du.list_images(tmp_path) == sorted(paths)


@pytest.mark.parametrize("layout", list(du.LAYOUTS.values()))
def test_dataset_finds_both_layouts_and_swaps_them_for_BtoA(tmp_path, layout):
    for name in layout:
        (tmp_path / name).mkdir()
    found = du.find_domains(tmp_path)
    assert [found[k].name for k in ("train_x", "train_y", "test_x", "test_y")] == list(layout)
    swapped = du.find_domains(tmp_path, "BtoA")
    assert (swapped["train_x"].name, swapped["test_y"].name) == (layout[1], layout[2])


def test_dataset_folder_of_an_unknown_layout_is_named_with_what_it_holds(tmp_path):
    (tmp_path / "apples").mkdir()
    with pytest.raises(du.UsageError, match="neither layout.*found apples/"):
        du.find_domains(tmp_path)
    with pytest.raises(du.UsageError, match="does not exist"):
        du.find_domains(tmp_path / "missing")


@pytest.mark.parametrize("channels", [3, 1])
def test_dataset_gives_cropped_tensors_in_range(dataset_root, channels):
    data = du.UnpairedDataset(dataset_root / "trainA", dataset_root / "trainB", 36, 32, channels, 3)
    assert len(data) == 4  # the larger domain
    sampler = du.PairSampler(4, 3, seed=1)
    for pick in sampler:
        x, y = data[pick]
        assert x.shape == (channels, 32, 32) and y.shape == (3, 32, 32)
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1


def test_dataset_stops_resizing_and_cropping_from_its_no_crop_epoch_but_still_flips(dataset_root):
    data = du.UnpairedDataset(dataset_root / "trainA", dataset_root / "trainB", 64, 32, no_crop_from_epoch=1)
    whole = du.to_tensor(du.load_image(data.files[0][0], 3, 32).resize((32, 32), Image.BICUBIC))
    decay = [data[(0, 0, seed, 1)][0] for seed in range(8)]  # epoch 1: resized to the crop size, maybe flipped
    assert all(torch.equal(x, whole) or torch.equal(x, whole.flip(2)) for x in decay)
    assert any(torch.equal(x, whole) for x in decay) and any(torch.equal(x, whole.flip(2)) for x in decay)
    jittered = [data[(0, 0, seed, 0)][0] for seed in range(8)]  # epoch 0: resized to 64, cropped to 32
    assert not any(torch.equal(x, whole) or torch.equal(x, whole.flip(2)) for x in jittered)


def cli_args(root, out, *extra):
    return ["--model", "cycle_gan", "--dataroot", str(root), "--output-dir", str(out), "--name", "run",
            "--crop-size", "32", "--load-size", "36", "--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks",
            "--max-steps", "2", "--workers", "0", "--device", "cpu", "--log-every", "1", *extra]


def started(argv):
    """The trainer a new run of `argv` would start with, and its run record."""
    run, config, device, checkpoint = train_gan.decide(argv)
    return train_gan.make_trainer(run, config, device, checkpoint), run


@pytest.mark.parametrize("model, extra, no_crop_from", [
    ("cut", ["--epochs", "2"], 2), ("fastcut", ["--epochs", "2"], 2), ("fastcut", [], 150),
    ("cycle_gan", ["--epochs", "2"], None)])
def test_dataset_resize_and_crop_stop_in_the_decay_epochs_of_cut_and_fastcut_only(
        dataset_root, tmp_path, model, extra, no_crop_from):
    run, config, device, _ = train_gan.decide(cli_args(dataset_root, tmp_path, "--model", model, *extra))
    loader = train_gan.training_loader(run, config, du.find_domains(dataset_root), device)
    assert loader.dataset.no_crop_from_epoch == no_crop_from  # epochs from 0
    if not extra:  # the model's own schedule: FastCUT's 150 + 50
        assert (config.epochs, config.epochs_decay) == (150, 50)


def test_dataset_sampler_covers_x_each_epoch_and_depends_only_on_seed_and_epoch():
    s = du.PairSampler(5, 3, seed=7)
    picks = list(s)
    assert sorted(p.x for p in picks) == [0, 1, 2, 3, 4] and all(0 <= p.y < 3 for p in picks)
    assert {p.epoch for p in picks} == {0}  # the epoch travels with the pick (the dataset's jitter depends on it)
    s.set_epoch(1)
    assert list(s) != picks and {p.epoch for p in s} == {1}
    s.set_epoch(0, start=2)  # a resume's place: the images already trained are skipped
    assert list(s) == picks[2:] and len(s) == 3 and list(du.PairSampler(5, 3, seed=7, limit=4)) == picks[:4]
    ranks = [du.PairSampler(6, 3, seed=7, rank=r, world=2) for r in (0, 1)]
    whole = list(du.PairSampler(6, 3, seed=7))
    assert list(ranks[0]) + list(ranks[1]) != whole and sorted(list(ranks[0]) + list(ranks[1])) == sorted(whole)
    for rank in ranks:
        rank.set_epoch(0, start=3)
    assert [len(r) for r in ranks] == [1, 1] and sorted(list(ranks[0]) + list(ranks[1])) == sorted(whole[3:5]), \
        "after a resume each rank takes as many of the rest, the odd one left for the next epoch"


def test_dataset_jitter_is_deterministic_per_seed_and_flips_sometimes():
    img = Image.fromarray(np.arange(40 * 40 * 3, dtype=np.uint8).reshape(40, 40, 3))
    crops = [np.asarray(du.jitter(img, 36, 32, np.random.default_rng(s))) for s in range(8)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert np.array_equal(crops[0], np.asarray(du.jitter(img, 36, 32, np.random.default_rng(0))))
    assert len({c.tobytes() for c in crops}) > 1


def test_dataset_image_tensor_round_trip():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8))
    t = du.to_tensor(img)
    assert t.shape == (3, 8, 6) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(du.to_image(t)), np.asarray(img))


@pytest.mark.parametrize("mode, array", [
    ("I;16", np.arange(600, dtype=np.uint16).reshape(20, 30) * 100),
    ("F", np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)),  # a float TIFF in [0, 1]
    ("CMYK", None), ("RGBA", None), ("P", None), ("L", None), ("1", None)])
def test_dataset_loads_every_image_mode_as_8bit_rgb_or_gray(tmp_path, mode, array):
    if array is not None:
        img = Image.fromarray(array)
    else:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"img.{ {'CMYK': 'jpg', 'F': 'tiff'}.get(mode, 'png')}"
    img.save(path)
    rgb, gray = du.load_image(path, 3), du.load_image(path, 1)
    assert (rgb.mode, gray.mode, rgb.size) == ("RGB", "L", (30, 20))
    assert np.asarray(gray).std() > 5  # not clipped to one value
    if mode == "I;16":  # 16 bits scaled to 8, as the image shows, not stretched to its own range
        assert np.abs(np.asarray(gray, dtype=float) - array / 257).max() <= 0.5


def test_dataset_small_and_huge_images_become_crops(tmp_path):
    for split, size in (("trainA", (10, 7)), ("trainB", (5000, 3000))):
        (tmp_path / split).mkdir()
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / split / "img.jpg", quality=50)
    data = du.UnpairedDataset(tmp_path / "trainA", tmp_path / "trainB", 72, 64)
    x, y = data[(0, 0, 0, 0)]
    assert x.shape == y.shape == (3, 64, 64)
    assert du.load_image(tmp_path / "trainB" / "img.jpg", 3, 72).size == (625, 375)  # decoded at 1/8 scale


def test_dataset_broken_images_give_way_when_loaded_and_each_is_named_in_one_warning(tmp_path):
    for split in ("trainA", "trainB"):
        write_mixed_images(tmp_path / split, 3)
    jpg = (tmp_path / "trainA" / "img0.jpg").read_bytes()
    broken = [tmp_path / "trainA" / "text.png", tmp_path / "trainA" / "truncated.jpg"]
    broken[0].write_text("hello")
    broken[1].write_bytes(jpg[:len(jpg) // 2])
    data = du.UnpairedDataset(tmp_path / "trainA", tmp_path / "trainB", 36, 32)  # lists; opens the first only
    i = data.files[0].index(broken[0])  # text.png, then truncated.jpg, are the last two: the first takes over
    x, _ = data[(i, 0, 0, 0)]
    assert data.unreadable[0].nonzero().flatten().tolist() == [i, i + 1] and torch.equal(x, data[(0, 0, 0, 0)][0])
    data.unreadable[0][:] = False
    loader = torch.utils.data.DataLoader(data, 1, sampler=[(i, 0, 0, 0), (i + 1, 1, 1, 0), (i, 2, 2, 0)],
                                         num_workers=2)  # found by the workers, named by the main process
    with pytest.warns(UserWarning) as record:
        waits = [waited for _, _, waited in du.batches(loader)]
    assert sorted(str(w.message) for w in record) == [f"skipping unreadable image {p}: another image of its domain "
                                                      f"takes its place" for p in broken]  # once each
    assert len(waits) == 3 and all(w > 0 for w in waits)
    with pytest.warns(UserWarning) as record:
        assert du.load_fixed_images(tmp_path / "trainA", 5, 16).shape == (3, 3, 16, 16)  # the grid's: all it can
    assert [str(w.message) for w in record] == [f"skipping unreadable image {p}" for p in broken]


def exif_rotated_jpeg(path: Path, size=(40, 24)) -> Image.Image:
    """A JPEG stored sideways with EXIF orientation 6 (turn it 90 degrees clockwise to view it): stored red on
    the left, blue on the right, it shows red on top. Returns the upright picture."""
    stored = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    stored[:, :size[0] // 2, 0] = stored[:, size[0] // 2:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = np.zeros((size[0], size[1], 3), dtype=np.uint8)
    upright[:size[0] // 2, :, 0] = upright[size[0] // 2:, :, 2] = 255
    return Image.fromarray(upright)


def test_dataset_applies_exif_orientation_on_every_read(dataset_root, tmp_path):
    photos = tmp_path / "phone"
    photos.mkdir()
    upright = exif_rotated_jpeg(photos / "IMG_0001.jpg")
    loaded = du.load_image(photos / "IMG_0001.jpg")
    assert loaded.size == (24, 40) == upright.size
    assert np.abs(np.asarray(loaded, dtype=int) - np.asarray(upright, dtype=int)).mean() < 8  # JPEG rounding
    assert du.load_fixed_images(photos, 1, 16).shape == (1, 3, 16, 16)
    out = tmp_path / "out"
    assert cli(one_epoch(dataset_root, out)) == 0
    assert translate_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input", str(photos),
                          "--output", str(tmp_path / "res"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "res" / "IMG_0001.png").size == (24, 40)  # upright, at its upright size


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared apple2orange dataset is absent")
def test_dataset_real_apple2orange_loads():
    data = du.UnpairedDataset(SHARED / "trainA", SHARED / "trainB", 286, 256)
    assert len(data) == 1019
    x, y = data[next(iter(du.PairSampler(995, 1019)))]
    assert x.shape == y.shape == (3, 256, 256)


def test_dataset_download_fails_offline_with_a_clear_message(tmp_path, monkeypatch):

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(du.urllib.request, "urlopen", offline)
    with pytest.raises(du.UsageError, match="could not download .*apple2orange.zip.*offline"):
        du.download("apple2orange", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file left
    with pytest.raises(du.UsageError, match="unknown dataset"):
        du.download("pears2plums", tmp_path)


def test_dataset_download_unzips_an_official_zip_into_root_name_once(tmp_path, capsys, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    with zipfile.ZipFile(server / "apple2orange.zip", "w") as z:  # laid out as the official zips are
        for split in ("trainA", "trainB", "testA", "testB"):
            z.writestr(f"apple2orange/{split}/0.jpg", b"jpeg bytes")
    (server / "facades.zip").write_bytes(b"not a zip")
    monkeypatch.setattr(du, "DATASET_URL", server.as_uri() + "/{}.zip")  # a file:// server
    root = tmp_path / "data"
    du.download_command(["apple2orange", "--root", str(root)])  # train_gan.py download apple2orange --root ROOT
    assert capsys.readouterr().out.strip() == str(root / "apple2orange")
    assert sorted(p.name for p in (root / "apple2orange").iterdir()) == ["testA", "testB", "trainA", "trainB"]
    assert sorted(p.name for p in root.iterdir()) == ["apple2orange"]  # no .part left
    with monkeypatch.context() as offline:  # there already: no download
        offline.setattr(du.urllib.request, "urlopen", None)
        assert du.download("apple2orange", root) == root / "apple2orange"
    with pytest.raises(du.UsageError, match=f"could not unzip .*facades.zip .*unzip it in {root}: it holds facades/"):
        du.download("facades", root)
    assert sorted(p.name for p in root.iterdir()) == ["apple2orange"]


# ============================================================================= the run folder


def run_cli(argv, capsys, command=cli):
    """(exit code, stderr lines) of an in-process call of a command (train_gan.py's main, or translate.py's)."""
    capsys.readouterr()  # drop what earlier calls printed
    code = command([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_error(code, err, pattern, exit_code=2):
    """The command ended with `exit_code` (2: a bad input, nothing done; 1: a started run had to stop) and one
    `error:` line, its last, matching `pattern`, and no traceback (a usage error prints nothing else; a run's
    progress bar may stand before its error)."""
    assert code == exit_code and "Traceback" not in "".join(err), err
    assert [line for line in err if line.startswith("error:")] == err[-1:] and re.search(pattern, err[-1]), err
    assert exit_code != 2 or len(err) == 1, err


def assert_no_temporaries(folder: Path):
    assert not [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".part"))]


def ended_after_ctrl_c(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """The output of a command sent Ctrl-C; one still running `timeout` seconds later lost the signal: it is killed
    (with its loader's workers), not left training beside the tests."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running {timeout} s after Ctrl-C: the signal was lost") from None


class StopAfter:
    """A stop flag that is raised after n steps."""

    def __init__(self, n):
        self.n, self.agreed = n, False

    @property
    def requested(self):
        self.n -= 1
        return self.n <= 0


def test_run_folder_grid_lays_out_rows_and_columns(tmp_path):
    rows = [[torch.zeros(3, 8, 8), torch.ones(1, 8, 8)]] * 3
    du.save_grid(rows, tmp_path / "g.png", pad=2)
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (2 * 10 + 2, 3 * 10 + 2)
    assert grid.getpixel((2 + 10 + 1, 3)) == (255, 255, 255)  # the one-channel column, shown as gray


def test_run_folder_plot_draws_a_panel_for_each_entry_that_has_points(tmp_path):
    for step in range(1, 4):
        du.append_row(tmp_path / "l.csv", {"step": step, "epoch": 1, "G": 1.0 / step, "D": 0.5})
    table = du.read_table(tmp_path / "l.csv")
    du.plot(table, "step", {"G": ["G"], "D": ["D"], "none": ["F"]}, tmp_path / "two.png")
    du.plot(table, "step", {"G": ["G"]}, tmp_path / "one.png", level=0.5)
    (tmp_path / "no.png").write_bytes(b"an earlier plot")  # a resume from step 0 drops every row of the log
    du.plot(table, "step", {"none": ["F"]}, tmp_path / "no.png")
    assert Image.open(tmp_path / "two.png").height > Image.open(tmp_path / "one.png").height > 100
    assert not (tmp_path / "no.png").exists(), "nothing to plot: no picture, not an earlier one"


def test_run_folder_log_rows_follow_the_column_order_of_an_existing_file(tmp_path):
    du.append_row(tmp_path / "l.csv", {"step": 1, "epoch": 1, "D": 0.5, "G": 1.0})
    du.append_row(tmp_path / "l.csv", {"step": 123456, "epoch": 1, "G": 2.0, "D": 0.25})  # another order
    with open(tmp_path / "l.csv", newline="") as f:
        assert list(csv.reader(f)) == [["step", "epoch", "D", "G"], ["1", "1", "0.5", "1"],
                                       ["123456", "1", "0.25", "2"]]


def test_run_folder_log_edited_by_hand_is_read_for_what_parses_and_appended_to_as_it_stands(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("step,epoch,D\n1,1,0.5\nmy note, see above\n2,1,oops\n3,1,0.25,extra\n")
    assert du.read_table(path) == [{"step": 1, "epoch": 1, "D": 0.5}, {}, {"step": 2, "epoch": 1},
                                   {"step": 3, "epoch": 1, "D": 0.25}]
    du.append_row(path, {"step": 4, "epoch": 1, "D": 0.125, "G_gan": 1.0})  # G_gan has no column: it gets one
    assert path.read_text().splitlines()[0] == "step,epoch,D,G_gan" and du.read_table(path)[-1]["G_gan"] == 1.0
    du.plot(du.read_table(path), "step", {"D": ["D"]}, tmp_path / "losses.png")
    assert Image.open(tmp_path / "losses.png").size[0] > 100
    path.write_bytes(b"step,epoch,D\n1,1,\xff\xfe\n")  # saved by an editor in another encoding
    du.append_row(path, {"step": 2, "epoch": 1, "D": 0.5})
    assert du.read_table(path) == [{"step": 1, "epoch": 1}, {"step": 2, "epoch": 1, "D": 0.5}]
    path.write_bytes(b"\xef\xbb\xbfstep,epoch,D\n1,1,0.5\n")  # re-saved by a spreadsheet as 'CSV UTF-8', with a BOM
    du.append_row(path, {"step": 2, "epoch": 1, "D": 0.25})
    du.drop_rows_after(path, "step", 1)
    du.append_row(path, {"step": 2, "epoch": 1, "D": 0.125})
    assert du.read_table(path) == [{"step": 1, "epoch": 1, "D": 0.5}, {"step": 2, "epoch": 1, "D": 0.125}]


def test_run_folder_checkpoint_is_written_atomically_and_a_copy_kept(tmp_path, monkeypatch):
    folder, path = du.RunFolder(tmp_path, "then try again"), tmp_path / "latest.pt"
    folder.save_checkpoint({"epoch": 1}, keep=True)
    assert torch.load(tmp_path / "epoch_001.pt", weights_only=True) == {"epoch": 1}

    def crash(obj, f):
        f.write(b"half a checkp")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        folder.save_checkpoint({"epoch": 2}, keep=True)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001.pt", "latest.pt"]


def test_run_folder_verdict_picture_lays_each_verdict_over_its_image_and_the_balance_is_its_mean(tmp_path):
    """D says real (1) of the left half of the patches of the real image and fake (0) of the rest, and fake of
    the whole translation: bright on the left of the first cell, dark on its right and over the second."""
    image = torch.zeros(2, 3, 32, 32)  # mid-gray
    on_real = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(2, 1, 4, 1)  # (2, 1, 4, 4): left columns real
    folder = du.RunFolder(tmp_path)
    said = folder.record_epoch(1, {"D": 0.25}, [[image[0]]], verdicts={"D": (image, image, on_real, on_real * 0)})
    assert "D 0.250, D_real 0.500, D_fake 0.000" in said
    picture = np.asarray(Image.open(folder.picture("d_epoch", 1)).convert("L"), dtype=float)
    assert picture.shape == (2 * 34 + 2, 2 * 34 + 2)  # a row per image, the real one and the translation
    first, second = picture[2:34, 2:34], picture[2:34, 36:68]
    assert first[:, :8].min() > 150 and first[:, -8:].max() < 60 and second.max() < 60
    assert np.array_equal(np.asarray(Image.open(folder.picture("d_epoch", 1)).convert("RGB"))[2:34, 2:34],
                          np.asarray(du.heat_over(image[0], on_real[0, 0])))  # the upsampled map, over the image
    row = next(csv.DictReader((tmp_path / "epochs.csv").open()))
    assert (float(row["D_real"]), float(row["D_fake"])) == (0.5, 0.0) and (tmp_path / "balance.png").exists()
    folder.record_epoch(2, {"D": 0.25}, [[image[0]]], verdicts={"D": (image, image[:1], on_real, on_real[:1])})
    assert Image.open(folder.picture("d_epoch", 2)).height == 34 + 2  # 2 test images of one domain, 1 of the other


def parse_page(path: Path) -> dict:
    """What a person sees on a run's index.html: the images it shows (their src), the epoch sections in
    page order, whether it reloads itself, and its text."""

    class Page(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.seen["images"].append(a["src"].split("?")[0])
            elif tag == "section":
                self.seen["epochs"].append(int(a["id"].removeprefix("epoch-")))
            self.seen["refresh"] |= tag == "meta" and a.get("http-equiv") == "refresh"

        def handle_data(self, data):
            self.seen["text"].append(data)
    page = Page()
    page.seen = {"images": [], "epochs": [], "refresh": False, "text": []}
    page.feed(path.read_text())
    return {**page.seen, "text": " ".join(page.seen["text"])}


@pytest.mark.parametrize("model", ["cut", "cycle_gan"])
def test_run_folder_page_shows_every_epoch_newest_first_and_reloads_only_while_the_run_goes(
        dataset_root, tmp_path, monkeypatch, model):
    out, pages = tmp_path / "out", []
    record_epoch = du.RunFolder.record_epoch

    def keep_page(folder, *args, **kw):  # the page as it stands after each epoch
        said = record_epoch(folder, *args, **kw)
        pages.append(parse_page(folder.path / "index.html"))
        return said
    monkeypatch.setattr(du.RunFolder, "record_epoch", keep_page)
    assert cli(cli_args(dataset_root, out, "--model", model, "--epochs", "1", "--epochs-decay", "0")) == 0
    argv = cli_args(dataset_root, out, "--model", model, "--epochs", "1", "--epochs-decay", "1", "--resume")
    assert cli(argv) == 0
    run = out / "run"
    page = parse_page(run / "index.html")
    assert page["epochs"] == [2, 1]  # newest first; the resumed run kept epoch 1
    assert pages[-1]["refresh"] and not page["refresh"] and "finished: 2 of 2 epochs done" in page["text"]
    assert page["images"][0] == "losses.png" and all((run / src).is_file() for src in page["images"])
    nce = ["nce_epoch_002.png", "nce_epoch_001.png"] if model == "cut" else []
    assert page["images"][1] == "balance.png" and "where the two meet when neither network wins" in page["text"]
    assert page["images"][2:] == ["epoch_002.png", *nce[:1], "d_epoch_002.png", "epoch_001.png", *nce[1:],
                                  "d_epoch_001.png"]
    assert "bright real (1), dark fake (0)" in page["text"]
    judges = ["D_Y", "D_X"] if model == "cycle_gan" else ["D"]  # the balance of both epochs, the resume's too
    rows = list(csv.DictReader((run / "epochs.csv").open()))
    assert [sorted(k for k in r if k.endswith(("_real", "_fake"))) for r in rows] == \
        [sorted(f"{d}_{side}" for d in judges for side in ("real", "fake"))] * 2
    assert " ".join(["python", "train_gan.py", *argv]) in page["text"]  # the options each start asked for
    assert ("rows of a test image x" if model == "cycle_gan" else "each row: a test image x, G(x)") in page["text"]
    assert re.search(r"epoch 1 (\w+ -?[\d.]+, )*\w+ -?[\d.]+; \d+ s, [\d.]+ img/s, \d+% of it waiting for data",
                     page["text"])
    record = json.loads((run / "options.json").read_text())  # every option, readable without torch
    assert record["run"]["model"] == model and record["run"]["crop_size"] == 32
    checkpoint = torch.load(run / "latest.pt", weights_only=True)  # the same two records, once each
    assert checkpoint["run"] == record["run"] and json.loads(json.dumps(checkpoint["config"])) == record["config"]
    assert ("lambda_cycle" in record["config"]) == (model == "cycle_gan") and "lambda_cycle" not in record["run"]
    assert [(r["epoch"], r["images"], r["command"][2:] == argv) for r in record["runs"]] == [(0, 0, 0), (1, 0, 1)]


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


# As this machine runs Chromium headless: no sandbox as root, and none of the background connections that
# a closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


PROBE = """<iframe id="page" src="run/index.html" width="1100" height="900"></iframe><pre id="seen"></pre><script>
page.onload = () => {
  const images = [...page.contentDocument.images];
  Promise.all(images.map(i => i.complete ? 0 : new Promise(done => { i.onload = i.onerror = done; }))).then(() => {
    seen.textContent = JSON.stringify(images.map(i => [i.getAttribute("src").split("?")[0], i.naturalWidth]));
  });
};
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_run_folder_page_shows_every_image_in_a_real_browser(dataset_root, tmp_path):
    """The page of a tiny CUT run, served as the README says (python -m http.server), opened in headless
    Chromium: every image it names loads (natural width > 0); and a screenshot of it, to look at."""
    out = tmp_path / "site"
    assert cli(cli_args(dataset_root, out, "--model", "cut", "--epochs", "1", "--epochs-decay", "1")) == 0
    (out / "probe.html").write_text(PROBE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        run = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*run, "--virtual-time-budget=20000", "--dump-dom", f"{site}/probe.html"],
                             capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "page.png"
        subprocess.run([*run, f"--screenshot={shot}", "--window-size=1100,1400", "--hide-scrollbars",
                        f"{site}/run/index.html"], capture_output=True, timeout=120)
    finally:
        server.shutdown()
    seen = json.loads(re.search(r'<pre id="seen">(.*?)</pre>', dom, flags=re.S).group(1))
    assert [src for src, _ in seen] == ["losses.png", "balance.png", "epoch_002.png", "nce_epoch_002.png",
                                        "d_epoch_002.png", "epoch_001.png", "nce_epoch_001.png", "d_epoch_001.png"]
    assert all(width > 0 for _, width in seen), seen
    picture = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert picture.shape == (1400, 1100) and picture.std() > 10  # a page drawn, not a blank one


def test_run_folder_page_of_a_stopped_run_stops_reloading_and_says_how_to_go_on(dataset_root, tmp_path):
    argv = cli_args(dataset_root, tmp_path / "out", "--epochs", "2", "--epochs-decay", "0")
    train_gan.train(argv, stop=StopAfter(3))
    page = parse_page(tmp_path / "out" / "run" / "index.html")
    assert not page["refresh"] and page["epochs"] == [1]
    assert "stopped with 1 of 2 epochs done; continue with: python train_gan.py --resume --name run" in page["text"]


def test_run_folder_hand_edited_losses_csv_never_stops_a_resumed_run_or_its_page(dataset_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0")) == 0
    losses = out / "run" / "losses.csv"
    rows = list(csv.reader(losses.open()))
    with losses.open("w", newline="") as f:  # opened in a spreadsheet: a column removed, a note typed
        csv.writer(f).writerows([r[:3] + r[4:] for r in rows] + [["checked: looks fine"]])
    with (out / "run" / "epochs.csv").open("a") as f:  # a note that reads as a number, but no epoch's
        f.write("NaN,to check\n")
    code, err = run_cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "1", "--resume"), capsys)
    assert code == 0 and "Traceback" not in "".join(err), err
    assert len(list(csv.reader(losses.open()))) == len(rows) + 1 + 2  # the run went on appending
    assert parse_page(out / "run" / "index.html")["epochs"] == [2, 1] and (out / "run" / "losses.png").exists()


def test_run_folder_map_options_turn_their_maps_off(dataset_root, tmp_path):
    assert cli(cli_args(dataset_root, tmp_path, "--model", "fastcut", "--epochs", "1", "--epochs-decay", "0",
                        "--no-nce-map", "--no-d-map")) == 0
    run = tmp_path / "run"
    assert (run / "epoch_001.png").exists() and not list(run.glob("nce_epoch_*")) + list(run.glob("d_epoch_*"))
    assert not (run / "balance.png").exists() and "D_real" not in (run / "epochs.csv").read_text()


HOLD_LOCK = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import data_utility
with data_utility.RunFolder(Path(sys.argv[2])).held(new=False):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_run_folder_lock_keeps_one_run_per_folder_and_a_killed_holder_never_blocks(dataset_root, tmp_path, capsys):
    run = tmp_path / "out" / "run"
    assert cli(one_epoch(dataset_root, tmp_path / "out")) == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(Path(__file__).parent), str(run)],
                              stdout=subprocess.PIPE, text=True)  # the run goes on training in another process
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (one_epoch(dataset_root, tmp_path / "out"), next_epoch(dataset_root, tmp_path / "out")):
            code, err = run_cli(argv, capsys)  # a second run, or a resume, into the held folder
            assert_error(code, err, rf"in use by another run \(process {holder.pid}\)")
        holder.kill()  # kill -9: no chance to clean up
        holder.wait()
        assert cli(next_epoch(dataset_root, tmp_path / "out")) == 0  # the dead holder's lock is gone with it
        assert torch.load(run / "latest.pt", weights_only=True)["epoch"] == 2
    finally:
        holder.kill()
        holder.wait()


# ============================================================================= the Trainer


def test_trainer_step_returns_losses_out_of_the_graph_and_a_log_window_is_read_in_one_copy(monkeypatch):
    torch.manual_seed(0)
    losses = Trainer(CycleGAN(CycleGANConfig(**TINY))).train_step(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    assert all(v.dim() == 0 and not v.requires_grad for v in losses.values())
    stacks, stack = [], torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacks.append(1) or stack(*a, **k))
    sums = {"a": torch.tensor(3.0), "b": torch.tensor(0.5, dtype=torch.bfloat16)}  # two steps' sums
    assert train_gan.finite_means(sums, 2, "") == {"a": 1.5, "b": 0.25}
    assert len(stacks) == 1  # every loss came over in one copy


def test_trainer_adam_is_fused_where_torch_has_the_kernel_and_plain_where_not(monkeypatch):
    params = [nn.Parameter(torch.zeros(3))]
    has_cpu_kernel = tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 4)
    assert bool(adam(params, CycleGANConfig()).defaults["fused"]) == has_cpu_kernel
    adam_cls = torch.optim.Adam

    def old_torch(params, fused=None, **kw):  # torch < 2.4 on a CPU
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return adam_cls(params, **kw)
    monkeypatch.setattr(torch.optim, "Adam", old_torch)
    opt = adam(params, CycleGANConfig(lr=1e-3, beta1=0.3))
    assert not opt.defaults["fused"] and opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.3, 0.999)


def test_trainer_load_uses_this_machines_adam_kernel_and_continues_exactly(tmp_path):
    torch.manual_seed(0)
    model = Trainer(CycleGAN(CycleGANConfig(**TINY)))
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    model.train_step(x, y)
    du.RunFolder(tmp_path).save_checkpoint(model.state(train_gan.Run()))
    state = du.load_torch(tmp_path / "latest.pt")
    for opt in state["optimizers"].values():  # as saved by the multi-tensor Adam of an older version
        for group in opt["param_groups"]:
            group.update(fused=None, foreach=True)
    resumed = Trainer(CycleGAN(CycleGANConfig(**TINY)))
    resumed.load(state)
    assert all(g["fused"] == opt.defaults["fused"] and g["foreach"] == opt.defaults["foreach"]
               for opt in resumed.optimizers.values() for g in opt.param_groups)
    torch.manual_seed(1)
    model.train_step(x, y)
    torch.manual_seed(1)
    resumed.train_step(x, y)
    for name, net in model.nets.items():
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(net.parameters(), resumed.nets[name].parameters()))


@pytest.mark.parametrize("epoch, expected", [(0, 1.0), (99, 1.0), (100, 1 - 1 / 101), (150, 1 - 51 / 101),
                                             (199, 1 / 101)])
def test_trainer_lr_schedule_is_constant_then_linear(epoch, expected):
    assert lr_factor(epoch, 100, 100) == pytest.approx(expected)


def test_trainer_finish_epoch_sets_the_scheduled_lr():
    model = Trainer(CycleGAN(CycleGANConfig(**TINY, epochs=1, epochs_decay=3)))
    model.finish_epoch()
    assert model.optimizers["G"].param_groups[0]["lr"] == pytest.approx(2e-4 * (1 - 1 / 4))


@pytest.mark.parametrize("model_cls, config", [(CycleGAN, CycleGANConfig(**TINY)), (CUT, CUTConfig(**TINY_CUT))],
                         ids=["cycle_gan", "cut"])
def test_trainer_fp16_loss_scaling_over_several_backward_passes_gives_the_fp32_step(model_cls, config, monkeypatch):
    """The fp16 path (CUDA) scales each part's backward and unscales the sum once. Run here in fp32
    arithmetic (autocast off): with a power-of-two scale the weights must match the plain step's."""
    torch.manual_seed(0)
    plain = Trainer(model_cls(copy.deepcopy(config)))
    torch.manual_seed(0)
    scaled = Trainer(model_cls(copy.deepcopy(config)), "cpu", "fp16")  # the same weights
    monkeypatch.setattr(scaled, "autocast", contextlib.nullcontext)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    for model in (plain, scaled):
        torch.manual_seed(1)
        model.train_step(x, y)
    assert set(scaled.scalers) == set(scaled.optimizers)
    assert all(s.get_scale() == 2.0 ** 16 for s in scaled.scalers.values())  # no step was skipped
    for name, net in plain.nets.items():
        for (pname, a), b in zip(net.named_parameters(), scaled.nets[name].parameters()):
            assert torch.allclose(a, b, atol=1e-6), f"{name}.{pname}"


def test_trainer_both_models_offer_what_the_commands_use():
    for model in (CycleGAN(CycleGANConfig(**TINY)), CUT(CUTConfig(**TINY_CUT))):
        nets = train_gan.networks(model)
        assert all(isinstance(getattr(model, name), nn.Module) for name in nets), "each group names its networks"
        assert "x2y" in model.directions and set(model.directions.values()) <= set(nets), "a way names a network"
        assert all(callable(getattr(model, m)) for m in ("train_step", "visuals", "visuals_caption", "verdicts"))
    assert hasattr(CUT, "similarity_maps") and not hasattr(CycleGAN, "similarity_maps")


# ============================================================================= the commands: train_gan.py


# grid (columns, rows) per model: CycleGAN x | G(x) | F(G(x)) and y | F(y) | G(F(y)); CUT x | G(x) | y | G(y)
GRID = {"cycle_gan": (3, 4), "cut": (4, 2), "fastcut": (2, 2)}


@pytest.mark.parametrize("model", list(GRID))
def test_train_cli_writes_grid_csv_plot_and_checkpoint_then_resumes(dataset_root, tmp_path, capsys, model):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--model", model, "--epochs", "1", "--epochs-decay", "0")) == 0
    run = out / "run"
    assert {p.name for p in run.iterdir()} >= {"epoch_001.png", "losses.csv", "losses.png", "latest.pt"}
    cols, rows = GRID[model]
    assert Image.open(run / "epoch_001.png").size == (cols * 34 + 2, rows * 34 + 2)
    if model == "cycle_gan":
        assert not list(run.glob("nce_epoch_*"))
    else:  # 2 test images a row: x, G(x), then a map for each of the 3 query points
        assert Image.open(run / "nce_epoch_001.png").size == (5 * 34 + 2, 2 * 34 + 2)
    assert len((run / "losses.csv").read_text().splitlines()) == 3  # header + one row per step
    state = torch.load(run / "latest.pt", weights_only=True)
    assert (state["run"]["model"], state["epoch"], state["step"], state["images"]) == (model, 1, 2, 0)
    # D's map: a row per fixed test image (testA holds 2), a real image and a translation for each D
    assert Image.open(run / "d_epoch_001.png").size == ((4 if model == "cycle_gan" else 2) * 34 + 2, 2 * 34 + 2)
    # the balance: each D's mean verdict (LSGAN: its output) on the fixed images and on their translations
    net = train_gan.load_model(state)
    x, y = (du.load_fixed_images(dataset_root / split, 4, 32) for split in ("testA", "testB"))
    with torch.no_grad():
        judges = {"D_Y": (net.D_Y, y, net.G(x)), "D_X": (net.D_X, x, net.F(y))} if model == "cycle_gan" else \
            {"D": (net.D, y, net.G(x))}
        expected = {f"{name}_{side}": D(image).mean().item() for name, (D, real, fake) in judges.items()
                    for side, image in (("real", real), ("fake", fake))}
    row = next(csv.DictReader((run / "epochs.csv").open()))
    assert {k: float(row[k]) for k in expected} == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert cli(cli_args(dataset_root, out, "--model", model, "--epochs", "1", "--epochs-decay", "1", "--resume")) == 0
    assert "resuming" in capsys.readouterr().out
    assert (run / "epoch_002.png").exists()
    assert (run / "nce_epoch_002.png").exists() == (model != "cycle_gan")  # the map also comes from a resumed run
    assert torch.load(run / "latest.pt", weights_only=True)["step"] == 4


def test_train_cli_cut_drops_a_short_last_batch_as_officially_so_every_batch_has_its_others(dataset_root, tmp_path):
    argv = cli_args(dataset_root, tmp_path, "--model", "cut", "--nce-negatives", "others", "--batch-size", "3",
                    "--max-steps", "0", "--epochs", "1", "--epochs-decay", "0")  # 4 images: a batch of 3, then 1
    assert cli(argv) == 0 and torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["step"] == 1


def test_train_cli_grayscale_runs_end_to_end(dataset_root, tmp_path):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--model", "fastcut", "--channels-x", "1", "--channels-y", "1",
                        "--epochs", "1", "--epochs-decay", "0")) == 0
    config = torch.load(out / "run" / "latest.pt", weights_only=True)["config"]
    assert (config["channels_x"], config["channels_y"]) == (1, 1)
    assert translate_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input", str(dataset_root / "testA"),
                          "--output", str(tmp_path / "gray"), "--device", "cpu"]) == 0
    assert {Image.open(p).mode for p in (tmp_path / "gray").rglob("*.png")} == {"L"}


@pytest.mark.parametrize("resume", [False, True])
def test_train_cli_decide_gives_every_option_its_value_the_device_included(dataset_root, tmp_path, monkeypatch,
                                                                          resume):
    """A new run: the device's default (crop 128 on a CPU), then the model's (CUT's 200 + 200 epochs), then the flags
    given. A resume: the run's own, then the flags given that may change it; this call's own: the machine."""
    argv = ["--model", "cut", "--dataroot", str(dataset_root), "--output-dir", str(tmp_path / "out"), "--name", "run",
            "--ngf", "4", "--ndf", "4", "--max-steps", "1", "--epochs", "2"]
    if resume:
        train_gan.train(argv + ["--crop-size", "24", "--load-size", "28"], stop=StopAfter(1))
        argv = argv[4:8] + ["--resume", "--lr", "1e-3"]
    run, config, device, checkpoint = train_gan.decide(argv)
    assert (run.model, run.crop_size, config.netG, config.lambda_nce, config.epochs, config.epochs_decay,
            config.lr) == ("cut", 24 if resume else 128, "resnet_6blocks", 1.0, 2, 200, 1e-3 if resume else 2e-4)
    assert device == torch.device("cpu") and run.device == "cpu" and (checkpoint is not None) == resume
    if not resume:  # no name is the default name; "." is the folder it stands for
        monkeypatch.chdir(dataset_root)
        run = train_gan.decide([*argv, "--name", "", "--dataroot", "."])[0]
        assert (run.name, run.dataroot) == (f"cut_{dataset_root.name}", dataset_root)
    assert train_gan.make_trainer(run, config, device, checkpoint).optimizers["G"].param_groups[0]["lr"] == config.lr


def test_train_cli_a_default_changed_in_a_dataclass_is_what_help_shows_and_a_run_uses(
        dataset_root, tmp_path, capsys, monkeypatch):
    """Each default is written once, in its dataclass field: the run record's, or the model config's. Change one of
    each (a learner's first ablation, fewer patches, in cut_model.py), and --help and a run both use them."""
    @dataclasses.dataclass
    class FewerPatches(CUTConfig):
        num_patches: int = dataclasses.field(default=64, metadata=dict(help="places sampled per layer", at_least=1))

    @dataclasses.dataclass
    class LogEveryStep(train_gan.Run):
        log_every: int = train_gan.option(1, "steps averaged into a row of losses.csv", resume="changeable", at_least=1)
    monkeypatch.setitem(train_gan.MODELS, "cut", (CUT, FewerPatches, {}))
    monkeypatch.setattr(train_gan, "Run", LogEveryStep)
    with pytest.raises(SystemExit):
        cli(["--model", "cut", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "places sampled per layer (default: 64)" in help_text and "losses.csv (default: 1)" in help_text
    argv = cli_args(dataset_root, tmp_path, "--model", "cut", "--epochs", "1", "--epochs-decay", "0")
    del argv[argv.index("--log-every"):argv.index("--log-every") + 2]
    assert cli(argv) == 0
    saved = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    assert (saved["config"]["num_patches"], saved["run"]["log_every"]) == (64, 1)
    assert len((tmp_path / "run" / "losses.csv").read_text().splitlines()) == 1 + 2  # a row each step


SMALLEST_CROPS = [("cycle_gan", netG, []) for netG in GENERATORS] + \
    [("cut", netG, [down, up]) for netG in ("resnet_9blocks", "resnet_6blocks")
     for down in ("--antialias", "--no-antialias") for up in ("--antialias-up", "--no-antialias-up")]


@pytest.mark.parametrize("model, netG, blur", SMALLEST_CROPS, ids=[" ".join((m, g, *b)) for m, g, b in SMALLEST_CROPS])
def test_train_cli_crop_smaller_than_its_networks_take_is_refused_naming_the_smallest(
        dataset_root, tmp_path, capsys, model, netG, blur):
    """The smallest crop comes from the networks: at it a step trains; a crop below it is refused in one line that
    names it; and one side multiple below it, the networks themselves fail (so it is the smallest, not a guess)."""
    multiple = int(netG[5:]) if netG.startswith("unet") else 4  # a U-Net's 2 ** downs: unet_128, unet_256
    argv = [*cli_args(dataset_root, tmp_path / "out", "--model", model, "--netG", netG, *blur), "--load-size", "300",
            "--epochs", "0", "--epochs-decay", "0"]  # accepted, it trains nothing
    code, err = run_cli(argv + ["--crop-size", multiple], capsys)
    smallest = int(re.search(r"crops of at least (\d+) pixels", err[-1]).group(1)) if code else multiple
    below = multiple if code else multiple // 2
    code, err = run_cli(argv + ["--crop-size", below, "--name", "below"], capsys)
    assert_error(code, err, rf"--netG {netG} trains on crops of at least {smallest} pixels, a multiple of {multiple}; "
                            rf"got --crop-size {below}: use --crop-size {smallest}")
    trainer, _ = started(argv + ["--crop-size", str(smallest)])
    losses = trainer.train_step(*(torch.rand(1, 3, smallest, smallest) * 2 - 1 for _ in range(2)))
    assert all(math.isfinite(v) for v in losses.values()), f"a step at the smallest crop, {smallest}"
    if smallest > multiple:
        with pytest.raises((RuntimeError, ValueError)):  # a map too small for a pad or a norm
            trainer.train_step(*(torch.rand(1, 3, smallest - multiple, smallest - multiple) for _ in range(2)))


def test_train_cli_help_lists_the_runs_options_and_its_models_alone(capsys):
    for model, own, other in (("cycle_gan", "--lambda-cycle", "--lambda-nce"), ("cut", "--lambda-nce", "--pool-size")):
        with pytest.raises(SystemExit):
            cli(["--model", model, "--help"])
        text = capsys.readouterr().out
        assert own in text and other not in text and "--crop-size" in text, (model, own, other)
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model cut --help lists CUT's" in text and "train_gan.py download NAME" in text and \
        "to use a model: translate.py" in text and "(default: input,down1,down2,res1,res5)" in text  # FastCUT's, typed
    assert "--no-d-map" in text and "--no-resume" not in text and "--no-compile" not in text  # no --no- when off


def test_train_cli_and_translate_import_where_fcntl_and_resource_do_not_exist():
    """Windows has neither module: both scripts must import without them (the lock and the memory figure
    import them where they are used)."""
    code = ("import sys; sys.modules['fcntl'] = sys.modules['resource'] = None\n"
            "import train_gan, translate\n"
            "import torch, data_utility; print(data_utility.peak_memory_mb(torch.device('cpu')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr


def test_train_cli_peak_memory_reads_megabytes_on_linux_and_on_macos(monkeypatch):
    """The benchmark's CPU peak: ru_maxrss counts KiB on Linux and bytes on macOS."""
    import resource
    monkeypatch.setattr(resource, "getrusage", lambda who: argparse.Namespace(ru_maxrss=3 * 2 ** 20))
    for platform, mb in (("linux", 3 * 1024), ("darwin", 3)):
        monkeypatch.setattr(du.sys, "platform", platform)
        assert du.peak_memory_mb(torch.device("cpu")) == mb, platform


@pytest.mark.parametrize("native", [True, False])
def test_train_cli_bf16_on_a_cpu_without_native_bf16_warns_and_still_runs(dataset_root, tmp_path, capsys, monkeypatch,
                                                                          native):
    monkeypatch.setattr(train_gan, "cpu_has_native_bf16", lambda: native)
    code, err = run_cli(cli_args(dataset_root, tmp_path / "out", "--precision", "bf16", "--max-steps", "1",
                                 "--epochs", "1", "--epochs-decay", "0"), capsys)
    assert code == 0, err
    warned = [line for line in err if "no native bf16" in line]
    assert len(warned) == (0 if native else 1) and all(w.startswith("warning: ") for w in warned), err
    assert (tmp_path / "out" / "run" / "latest.pt").exists()


def test_train_cli_losses_are_read_once_per_logged_window_and_averaged(dataset_root, tmp_path, capsys, monkeypatch):
    """The loop reads the step's loss tensors only at logged steps: a csv row is the mean of its
    window, and a NaN is caught at the end of its window, not at its own step."""
    step, nan_at = Trainer.train_step, [None]

    def numbered(self, x, y):  # cycle_X = the step's number, or NaN at step nan_at
        n = self.global_step + 1
        return {**step(self, x, y), "cycle_X": torch.tensor(float("nan") if n == nan_at[0] else n)}
    monkeypatch.setattr(Trainer, "train_step", numbered)
    argv = ["--max-steps", "4", "--epochs", "1", "--epochs-decay", "0", "--log-every"]
    assert cli(cli_args(dataset_root, tmp_path / "a", *argv, "2")) == 0
    rows = list(csv.DictReader((tmp_path / "a" / "run" / "losses.csv").open()))
    assert [(r["step"], float(r["cycle_X"])) for r in rows] == [("2", 1.5), ("4", 3.5)]
    capsys.readouterr()
    assert cli(cli_args(dataset_root, tmp_path / "c", *argv, "3")) == 0  # windows of 3 steps and 1 (mean 2, then 4)
    epoch_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1: "))
    assert "cycle_X 2.500" in epoch_line  # the epoch's mean, (1 + 2 + 3 + 4) / 4, on the console,
    assert float(next(csv.DictReader((tmp_path / "c" / "run" / "epochs.csv").open()))["cycle_X"]) == 2.5  # its log
    assert "cycle_X 2.500" in parse_page(tmp_path / "c" / "run" / "index.html")["text"]  # and its page
    nan_at[0] = 2
    code, err = run_cli(cli_args(dataset_root, tmp_path / "b", *argv, "4"), capsys)
    assert code == 1 and re.search("loss cycle_X became nan by step 4", err[-1]), err


# ============================================================================= the commands: --resume


def test_resume_cli_takes_every_option_not_given_from_the_run(dataset_root, tmp_path, capsys):
    """A stopped run's advice, run as printed, resumes it: the model (not the default FastCUT), the network
    and the data options come from the run; a lower --lr, the NaN advice, is taken."""
    out = tmp_path / "my runs"  # a space: the advice is quoted for a shell
    argv = cli_args(dataset_root, out, "--model", "cut", "--epochs", "1", "--epochs-decay", "1", "--ngf", "8",
                    "--crop-size", "24", "--load-size", "28", "--lr", "1e-3")
    train_gan.train(argv, stop=StopAfter(1))
    advice = shlex.split(re.search(r"continue with: (.*)", capsys.readouterr().out).group(1))
    assert advice[:2] == ["python", "train_gan.py"] and "--model" not in advice
    run, config, device, checkpoint = train_gan.decide(advice[2:] + ["--lr", "5e-4"])
    resumed = train_gan.make_trainer(run, config, device, checkpoint)
    assert (run.model, config.ngf, run.crop_size, run.max_steps, resumed.seen) == ("cut", 8, 24, 2, 1)
    assert resumed.optimizers["G"].param_groups[0]["lr"] == 5e-4  # epoch 1 of 1 + 1: the full lr, the new one
    assert train_gan.train(advice[2:], stop=StopAfter(3)).global_step == 4  # a stop asked on the run's last step
    assert "stopped at" not in capsys.readouterr().out  # ... finds it finished


def test_resume_cli_with_another_batch_size_trains_each_image_of_the_epoch_once(dataset_root, tmp_path, monkeypatch):
    """A run keeps its place in an epoch as the images trained, not the steps: resumed with another --batch-size
    (the advice when memory runs out), the epoch goes on from the image it stopped at, each image once."""
    picked, item = [], du.UnpairedDataset.__getitem__
    monkeypatch.setattr(du.UnpairedDataset, "__getitem__", lambda data, pick: picked.append(pick) or item(data, pick))
    argv = cli_args(dataset_root, tmp_path, "--max-steps", "0", "--epochs", "1", "--epochs-decay", "0")
    train_gan.train(argv, stop=StopAfter(1))  # one image of the epoch's four
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["images"] == 1
    assert train_gan.train(argv + ["--resume", "--batch-size", "3"]).global_step == 2  # the other three at once
    assert picked == list(du.PairSampler(4, 3, seed=0)) and sorted(p.x for p in picked) == [0, 1, 2, 3]


def test_resume_cli_refuses_another_model_network_or_seed(dataset_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0")) == 0
    for flag, value, was in (("--model", "cut", "cycle_gan"), ("--ngf", "8", "4"), ("--seed", "3", "0"),
                             ("--direction", "BtoA", "AtoB")):
        code, err = run_cli(cli_args(dataset_root, out, "--resume", flag, value), capsys)
        assert_error(code, err, f"this run was started with {flag} {was}; {flag} {value} would change it: "
                                f"drop {flag}, or start a new --name")
    plain = ["--resume", "--name", "run", "--output-dir", str(out), "--device", "cpu"]  # the model is the run's
    code, err = run_cli(plain + ["--pool-size", "10"], capsys)
    assert_error(code, err, "this run was started with --pool-size 50; --pool-size 10 would change it")
    code, err = run_cli(plain + ["--epochs", "0"], capsys)
    assert_error(code, err, "this run has finished epoch 1: --epochs 0 --epochs-decay 0 would end it before that")
    code, err = run_cli(plain + ["--dropout"], capsys)
    assert_error(code, err, "this run was started with --no-dropout; --dropout would change it: drop --dropout,")
    code, err = run_cli(plain + ["--num-patches", "64"], capsys)
    assert_error(code, err, r"unrecognized arguments: --num-patches 64 \(see train_gan.py --model cycle_gan --help\)")


@pytest.mark.parametrize("model, stop_after, saved_at", [
    ("cycle_gan", 4, (1, 1)), ("fastcut", 4, (1, 1)),  # mid-way through the second epoch
    ("cycle_gan", 3, (1, 0)),  # on the first epoch's last step: the epoch is finished first
])
def test_resume_cli_after_a_stop_gives_the_same_weights_as_one_run(dataset_root, tmp_path, model, stop_after, saved_at):
    argv = ["--model", model, "--epochs", "1", "--epochs-decay", "1", "--max-steps", "3"]
    train_gan.train(cli_args(dataset_root, tmp_path / "a", *argv))
    train_gan.train(cli_args(dataset_root, tmp_path / "b", *argv), stop=StopAfter(stop_after))
    stopped = torch.load(tmp_path / "b" / "run" / "latest.pt", weights_only=True)
    assert (stopped["epoch"], stopped["images"]) == saved_at
    assert (tmp_path / "b" / "run" / "epoch_001.png").exists()
    train_gan.train(cli_args(dataset_root, tmp_path / "b", *argv, "--resume"))
    a, b = (torch.load(tmp_path / run / "run" / "latest.pt", weights_only=True) for run in "ab")
    assert a["step"] == b["step"] == 6
    for net in a["nets"]:
        for key, tensor in a["nets"][net].items():
            assert torch.allclose(tensor, b["nets"][net][key], atol=1e-6), (net, key)


# ============================================================================= the commands: translate.py


def test_translate_cli_keeps_each_image_size_name_and_subfolder(dataset_root, tmp_path):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0")) == 0
    inputs = write_mixed_images(tmp_path / "in", 4)
    for direction in ("AtoB", "BtoA"):
        target = tmp_path / direction
        assert translate_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input", str(tmp_path / "in"),
                              "--output", str(target), "--direction", direction, "--device", "cpu"]) == 0
        for p in inputs:
            result = Image.open(target / p.relative_to(tmp_path / "in").with_suffix(".png"))
            assert result.size == Image.open(p).size and result.mode == "RGB"


def test_translate_cli_names_and_skips_images_too_small_for_the_generator_and_translates_the_rest(
        dataset_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--model", "fastcut", "--epochs", "1", "--epochs-decay", "0")) == 0
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(du.list_images(dataset_root / "testA")[0], inputs / "photo.jpg")
    for name, (w, h) in (("icon.png", (5, 3)), ("dot.png", (1, 1))):
        Image.new("RGB", (w, h), "orange").save(inputs / name)
    checkpoint = str(out / "run" / "latest.pt")
    code, err = run_cli(["--checkpoint", checkpoint, "--input", inputs, "--output", tmp_path / "res", "--device",
                         "cpu"], capsys, translate_cli)
    assert code == 0 and "Traceback" not in "".join(err), err
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["photo.png"], "the photo is translated"
    for name, size in (("icon.png", "5x3"), ("dot.png", "1x1")):
        assert any(f"skipping {inputs / name} ({size}): the generator needs at least 5 pixels a side" in line
                   for line in err), err
    code, err = run_cli(["--checkpoint", checkpoint, "--input", inputs, "--output", tmp_path / "res1", "--max-side",
                         "1024"], capsys, translate_cli)  # too small before --max-side: no --size advice beside it
    assert any(line.endswith("(5x3): the generator needs at least 5 pixels a side; scale it up first") for line in err)
    for flag in ("--size", "--max-side"):  # options that would shrink every image below that: refused before work
        code, err = run_cli(["--checkpoint", checkpoint, "--input", inputs, "--output", tmp_path / "res2", flag, "4",
                             "--device", "cpu"], capsys, translate_cli)
        assert_error(code, err, rf"{flag} 4 makes images smaller than the 5 pixels a side the model needs: pass "
                                rf"{flag} 5 or more")
        assert not (tmp_path / "res2").exists()
    (inputs / "photo.jpg").unlink()  # none left that it can translate: an error, not "translated 0 images"
    code, err = run_cli(["--checkpoint", checkpoint, "--input", inputs, "--output", tmp_path / "res3"], capsys,
                        translate_cli)
    assert_error(code, err, "none of the images of .* could be translated: see the warnings above", 1)


@pytest.mark.parametrize("trained", ["AtoB", "BtoA"])
def test_translate_cli_direction_names_the_domain_folders_as_training_does(dataset_root, tmp_path, monkeypatch,
                                                                           trained):
    """--direction speaks of the dataset's A and B in both commands: a run trained BtoA has G: B -> A, so
    translating AtoB is its F."""
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0", "--direction", trained)) == 0
    used, load = [], translate.generator

    def spy(path, device, direction):
        g = load(path, device, direction)
        trained = train_gan.load_model(du.load_torch(path))
        used.append(next(name for name in ("G", "F") if net_equal(getattr(trained, name), g)))
        return g
    net_equal = lambda a, b: all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),  # noqa: E731
                                                                    b.state_dict().values()))
    monkeypatch.setattr(translate, "generator", spy)
    for direction in ("AtoB", "BtoA"):
        assert translate_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input", str(dataset_root / "testA"),
                              "--output", str(tmp_path / direction), "--direction", direction]) == 0
    assert used == (["G", "F"] if trained == "AtoB" else ["F", "G"])


def test_translate_cli_grid_puts_each_checkpoint_in_a_column_and_names_problems(dataset_root, tmp_path, capsys):
    ckpts = []
    for model in ("cycle_gan", "fastcut"):
        out = tmp_path / model
        assert cli(cli_args(dataset_root, out, "--model", model, "--epochs", "1", "--epochs-decay", "0")) == 0
        ckpts.append(str(out / "run" / "latest.pt"))
    grid = tmp_path / "grids" / "a2o.jpg"
    assert translate_cli(["--checkpoint", *ckpts, "--input", str(dataset_root / "testA"), "--grid", str(grid),
                          "--count", "3", "--size", "30", "--device", "cpu"]) == 0
    # input | CycleGAN | FastCUT; testA holds 2 images, so 2 rows whatever --count asks; pad 2
    assert Image.open(grid).size == (3 * 32 + 2, 2 * 32 + 2)
    for argv, pattern in [
        (["--direction", "BtoA"], r"fastcut model, which translates its own way only \(AtoB\)"),
        (["--grid", str(tmp_path / "grid.gif")], r"must end in \.png or \.jpg"),
        (["--count", "0"], "must be >= 1"),
        (["--max-side", "20"], "--grid resizes each image to --size .*: drop --max-side"),
        (["--output", str(tmp_path / "res")], "--grid writes one picture and --output a folder of them: pass one"),
    ]:
        code, err = run_cli(["--checkpoint", *ckpts, "--input", str(dataset_root / "testA"),
                             "--grid", str(tmp_path / "g.png"), "--device", "cpu", *argv], capsys, translate_cli)
        assert_error(code, err, pattern)
    code, err = run_cli(["--checkpoint", *ckpts, "--input", str(dataset_root / "testA"), "--output",
                         str(tmp_path / "res")], capsys, translate_cli)
    assert_error(code, err, "takes one model and an --output folder; to compare models, pass --grid")
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "res").exists()


def test_translate_cli_max_side_scales_down_keeping_the_aspect_ratio_and_size_squares(dataset_root, tmp_path, capsys,
                                                                                    monkeypatch):
    out = tmp_path / "out"
    assert cli(one_epoch(dataset_root, out)) == 0
    with monkeypatch.context() as spy:  # what each image is decoded at: a JPEG at the scale --max-side needs
        sides = []
        spy.setattr(translate, "load_image", lambda *a: sides.append(a[2:]) or du.load_image(*a))
        assert translate_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input", str(dataset_root / "testA"),
                              "--output", str(tmp_path / "res"), "--max-side", "20", "--device", "cpu"]) == 0
    assert set(sides) == {(20,)}, "with --max-side, a photo is decoded at a reduced scale, not whole"
    assert Image.open(tmp_path / "res" / "img0.png").size == (20, 15)  # from 40x30
    assert Image.open(tmp_path / "res" / "nested" / "img1.png").size == (14, 20)  # from 33x47, in its subfolder
    code, err = run_cli(["--checkpoint", out / "run" / "latest.pt", "--input", dataset_root / "testA", "--output",
                         tmp_path / "tiny", "--max-side", "5"], capsys, translate_cli)  # 40x30 to 5x4
    assert any(re.search(r"skipping .*img0.jpg \(5x4\): .* needs at least 5 pixels a side; raise --max-side$", line)
               for line in err), err
    argv = ["--checkpoint", out / "run" / "latest.pt", "--input", dataset_root / "testA", "--output", tmp_path / "sq"]
    assert translate_cli([str(a) for a in argv] + ["--size", "24"]) == 0  # the official test.py's square resize
    assert {Image.open(p).size for p in (tmp_path / "sq").rglob("*.png")} == {(24, 24)}
    code, err = run_cli(argv + ["--size", "24", "--max-side", "20"], capsys, translate_cli)
    assert_error(code, err, "--size and --max-side both set the size: pass one")
    (dataset_root / "testA" / "broken.png").write_text("not an image")  # skipped, named once; the rest written
    code, err = run_cli(argv[:-1] + [tmp_path / "with_broken"], capsys, translate_cli)
    assert code == 0 and [line for line in err if "warning" in line] == \
        [f"warning: skipping unreadable image {dataset_root / 'testA' / 'broken.png'}"], err
    assert sorted(p.name for p in (tmp_path / "with_broken").rglob("*.png")) == ["img0.png", "img1.png"]


def test_translate_cli_builds_no_optimiser_and_leaves_the_random_state_as_it_was(dataset_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0")) == 0
    torch.manual_seed(123)
    before = torch.get_rng_state()

    def no_adam(*args, **kw):
        raise AssertionError("translate.py built an optimiser")
    monkeypatch.setattr(torch.optim, "Adam", no_adam)
    assert translate_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input", str(dataset_root / "testA"),
                          "--output", str(tmp_path / "res"), "--device", "cpu"]) == 0
    assert torch.equal(torch.get_rng_state(), before)
    model = train_gan.load_model(du.load_torch(out / "run" / "latest.pt"))
    assert not any(net.training for net in (model.G, model.F, model.D_X, model.D_Y))  # eval mode


def test_translate_cli_wrong_files_get_one_line(dataset_root, tmp_path, capsys):
    opt = torch.optim.Adam(ResnetGenerator(ngf=4, n_blocks=1).parameters())
    files = {"optimizer.pth": (opt.state_dict(), "not all of them tensors"),
             "latest_net_D.pth": (PatchDiscriminator(ndf=4).state_dict(), "a PatchGAN discriminator"),
             "noise.pth": ({"w": torch.randn(3, 3)}, r"the first 'w' \(3, 3\)"),
             "tensor.pth": (torch.randn(3), "it holds a Tensor, not a state_dict"),  # translate.py builds G itself:
             "extra.pth": ({**ResnetGenerator(ngf=4, n_blocks=1).state_dict(), "extra.weight": torch.zeros(3)},
                           "first unmatched: 'extra.weight'$")}  # ... no advice to build it with other options
    for name, (state, pattern) in files.items():
        torch.save(state, tmp_path / name)
        code, err = run_cli(["--checkpoint", str(tmp_path / name), "--input", str(dataset_root / "testA"),
                             "--output", str(tmp_path / "out"), "--device", "cpu"], capsys, translate_cli)
        assert_error(code, err, "neither a checkpoint of train_gan.py nor an official generator.*" + pattern)
    code, err = run_cli(["--checkpoint", str(tmp_path), "--input", str(dataset_root / "testA"), "--output",
                         str(tmp_path / "out")], capsys, translate_cli)
    assert_error(code, err, f"checkpoint {re.escape(str(tmp_path))} is a folder: pass the latest.pt in it")
    official_files(tmp_path / "official")
    code, err = run_cli(["--checkpoint", str(tmp_path / "official" / "horse2zebra.pth"), "--input",
                         str(dataset_root / "testB"), "--output", str(tmp_path / "out"), "--direction", "BtoA"],
                        capsys, translate_cli)
    assert_error(code, err, "one generator, which translates its own way: drop --direction")
    assert not (tmp_path / "out").exists()


def test_translate_cli_pretrained_is_one_command_downloading_once_atomically_and_failing_offline(
        dataset_root, tmp_path, capsys, monkeypatch):
    source = tmp_path / "server" / "horse2zebra.pth"
    source.parent.mkdir()
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=4, n_blocks=9)
    torch.save(net.state_dict(), source)
    monkeypatch.setattr(translate, "PRETRAINED_URL", (tmp_path / "server").as_uri() + "/{}.pth")  # a file:// server
    cache, photos = tmp_path / "cache", tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(photos / "img0.png")
    argv = ["--pretrained", "horse2zebra", "--input", photos, "--cache", cache, "--device", "cpu"]
    code, err = run_cli(argv + ["--output", tmp_path / "zebras"], capsys, translate_cli)
    assert code == 0 and "downloading the official horse2zebra generator" in err[0], err
    assert (cache / "horse2zebra.pth").read_bytes() == source.read_bytes() and len(list(cache.iterdir())) == 1
    with torch.no_grad():  # the downloaded network's own output
        expected = du.to_image(net.eval()(du.to_tensor(du.load_image(photos / "img0.png"))[None])[0])
    got = np.asarray(Image.open(tmp_path / "zebras" / "img0.png"), dtype=int)
    assert np.abs(got - np.asarray(expected, dtype=int)).max() <= 1

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(du.urllib.request, "urlopen", offline)
    code, err = run_cli(argv + ["--output", tmp_path / "again"], capsys, translate_cli)  # cached: no network
    assert code == 0 and not any("downloading" in line for line in err), err
    code, err = run_cli(["--pretrained", "zebra2horse", "--input", photos, "--output", tmp_path / "horses",
                         "--cache", cache], capsys, translate_cli)
    assert_error(code, err[-1:], "could not download .*zebra2horse.pth.*offline")
    assert sorted(p.name for p in cache.iterdir()) == ["horse2zebra.pth"] and not (tmp_path / "horses").exists()

    def cut_short(*args, **kwargs):  # a server that closes the connection early
        response = io.BytesIO(source.read_bytes()[:100])
        response.headers = {"Content-Length": str(source.stat().st_size)}
        return response
    monkeypatch.setattr(du.urllib.request, "urlopen", cut_short)
    code, err = run_cli(["--pretrained", "zebra2horse", "--input", photos, "--output", tmp_path / "horses",
                         "--cache", cache], capsys, translate_cli)
    assert_error(code, err[-1:], r"could not download .*zebra2horse.pth \(cut short at 100 of \d+ bytes\)")
    assert sorted(p.name for p in cache.iterdir()) == ["horse2zebra.pth"], "nothing cut short is kept"
    code, err = run_cli(["--pretrained", "zebra2horse", "--input", photos, "--output", tmp_path / "horses",
                         "--cache", source], capsys, translate_cli)  # a cache under a file
    assert_error(code, err[-1:], "--cache .*horse2zebra.pth cannot be made a folder .*: choose another --cache")
    code, err = run_cli(["--pretrained", "pears2plums", "--input", photos, "--output", tmp_path / "p"], capsys,
                        translate_cli)
    assert_error(code, err, "unknown pretrained model 'pears2plums': choose one of apple2orange, .*"
                            "iphone2dslr_flower")
    assert len(translate.OFFICIAL_PRETRAINED) == 18


# ============================================================================= faults


BAD_OPTIONS = [
    (["--crop-size", "64", "--load-size", "48"], "--crop-size 64 is larger than --load-size 48"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--model", "pix2pix"], "invalid choice: 'pix2pix'"),
    (["--netG", "resnet_2blocks"], "invalid choice: 'resnet_2blocks'"),
    (["--lambda-cycle", "-1"], "--lambda-cycle: must be >= 0"),
    (["--lambda-nce", "-1", "--model", "cut"], "--lambda-nce: must be >= 0"),
    (["--lr", "0"], "--lr: must be > 0, got 0"),
    (["--lr", "inf"], "--lr: must be > 0, got inf"),
    (["--real-label", "nan"], "--real-label: must be > 0, got nan"),
    (["--real-label", "1.5"], r"real_label 1.5 is outside \(0.0, 1\]: use 1, or a little less to smooth it"),
    (["--init-gain", "0"], "--init-gain: must be > 0, got 0"),  # every weight 0: no gradient reaches them
    (["--beta1", "1"], r"--beta1 1.0 is outside \[0, 1\), which torch.optim.Adam refuses"),
    (["--model", "cut", "--nce-temperature", "-0.1"], "--nce-temperature: must be > 0, got -0.1"),
    (["--netG", "unet_128", "--crop-size", "32"], "multiple of 128"),
    (["--crop-size", "30"], "multiple of 4"),
    (["--model", "cut", "--netG", "unet_128", "--crop-size", "128", "--load-size", "128"], "encoder taps"),
    (["--model", "cut", "--nce-layers", "0,5"], "unknown encoder tap 5"),
    # without blur-pool the official index 8 names no tap: the paper's down2 is layer 7 there
    (["--model", "cut", "--no-antialias", "--nce-layers", "0,4,8,12,16"], r"unknown encoder tap 8: .* down2 \(7\)"),
    (["--channels-x", "1"], "--lambda-identity 0"),
    (["--model", "fastcut", "--channels-x", "1"], "same number of channels"),
    (["--model", "cut", "--channels-y", "1", "--no-nce-idt"], "same number of channels"),
    (["--epochs", "x"], "invalid int value: 'x'"),
    (["--crop-size", "x"], r"invalid int value: 'x' \(see train_gan.py --help\)"),  # a run's flag: any model's
    (["--precision", "fp16"], "fp16 is for CUDA GPUs"),
    (["--model", "cut", "--nce-negatives", "others"], "--nce-negatives others with --num-patches 256 and --batch-size "
                                                      "1 leaves a query no negatives: pass --batch-size 2 or more"),
    (["--model", "cut", "--num-patches", "1"], "--nce-negatives image with --num-patches 1 .* no negatives: pass "
                                               "--num-patches 2 or more"),  # Eq. 2 would be 0, and train nothing
    # 4 images of X: CUT drops a short last batch (the CUT repository's data/__init__.py), and an epoch makes none
    (["--model", "cut", "--batch-size", "5"], r"an epoch here has 4 pairs of images, too few for one batch of "
                                              r"--batch-size 5 \(cut drops a short last batch\): lower --batch-size "
                                              r"to 4"),
    (["--model", "fastcut", "--batch-size", "5", "--benchmark", "1"], "too few for one batch of --batch-size 5"),
    (["--model", "fastcut", "--pool-size", "0"], r"unrecognized arguments: --pool-size 0 \(see train_gan.py --model "
                                                 r"fastcut --help\)"),
    (["--lambda-nce", "2"], r"unrecognized arguments: --lambda-nce 2 \(see train_gan.py --model cycle_gan --help\)"),
]


@pytest.mark.parametrize("extra, pattern", BAD_OPTIONS, ids=[" ".join(extra) for extra, _ in BAD_OPTIONS])
def test_faults_bad_options_are_refused_in_one_line(dataset_root, tmp_path, capsys, extra, pattern):
    code, err = run_cli(cli_args(dataset_root, tmp_path / "out", *extra), capsys)
    assert_error(code, err, pattern)
    assert not (tmp_path / "out" / "run" / "latest.pt").exists()


def test_faults_a_device_this_machine_lacks_is_refused_in_one_line(dataset_root, tmp_path, capsys):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    missing = next((name for name, there in available.items() if not there), None)
    if missing is None:
        pytest.skip("this machine has both CUDA and MPS")
    code, err = run_cli(cli_args(dataset_root, tmp_path / "out", "--device", missing), capsys)
    assert_error(code, err, f"--device {missing} is not available on this machine: use --device auto or cpu")
    assert not (tmp_path / "out").exists()


def test_faults_bad_data_folders_are_refused_in_one_line(tmp_path, capsys):
    code, err = run_cli(cli_args(tmp_path / "nowhere", tmp_path / "out"), capsys)
    assert_error(code, err, "nowhere does not exist")
    code, err = run_cli(cli_args(Path(__file__), tmp_path / "out"), capsys)
    assert_error(code, err, "test_components.py is a file: pass --dataroot with a folder holding trainA/")
    (tmp_path / "odd" / "apples").mkdir(parents=True)
    code, err = run_cli(cli_args(tmp_path / "odd", tmp_path / "out"), capsys)
    assert_error(code, err, "neither layout.*found apples/")
    for split in ("trainA", "trainB"):
        (tmp_path / "empty" / split).mkdir(parents=True)
    write_mixed_images(tmp_path / "empty" / "trainA", 2)
    (tmp_path / "empty" / "trainB" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, err = run_cli(cli_args(tmp_path / "empty", tmp_path / "out"), capsys)
    assert_error(code, err, "no readable images in .*trainB")
    assert not (tmp_path / "out").exists(), "a refused dataset leaves no run folder behind"


def test_faults_checkpoint_problems_are_named(dataset_root, tmp_path, capsys):
    latest = tmp_path / "out" / "run" / "latest.pt"
    fresh = functools.partial(Trainer(CycleGAN(CycleGANConfig(**TINY))).state, train_gan.Run(model="cycle_gan"))
    weights_only, unfit, wrong_adam = fresh(), fresh(), fresh()
    unfit["nets"]["G"]["model.1.weight"] = torch.zeros(5, 3, 7, 7)
    wrong_adam["optimizers"]["G"] = wrong_adam["optimizers"]["D"]  # D's Adam where G's belongs
    fit = "latest.pt does not match a cycle_gan of its own config: "
    for held, pattern in [
            (None, "latest.pt does not exist"),
            (b"garbage", "is not a readable checkpoint"),
            (ResnetGenerator(ngf=4, n_blocks=1).state_dict(), "not a checkpoint of a train_gan.py run.*translate"),
            ({k: weights_only[k] for k in ("run", "config", "nets")}, "cannot be resumed.*holds weights only"),
            ({k: v for k, v in weights_only.items() if k != "run"} | {"model": "cycle_gan"},  # an earlier version's
             "cannot be resumed: an earlier train_gan.py wrote it.*translate.py uses it as it is"),
            (unfit, fit + "size mismatch for model.1.weight"),
            (wrong_adam, fit + ".* parameter group")]:
        if held is not None:
            latest.parent.mkdir(parents=True, exist_ok=True)
            latest.write_bytes(held) if isinstance(held, bytes) else torch.save(held, latest)
        code, err = run_cli(cli_args(dataset_root, tmp_path / "out", "--resume"), capsys)
        assert_error(code, err, pattern)


def test_faults_a_new_run_never_overwrites_an_old_one(dataset_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0")) == 0
    before = (out / "run" / "latest.pt").read_bytes()
    code, err = run_cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0"), capsys)
    assert_error(code, err, "already holds a run: pass --resume to continue it, or a new --name")
    assert (out / "run" / "latest.pt").read_bytes() == before


def test_faults_translating_problems_are_named(dataset_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--model", "fastcut", "--epochs", "1", "--epochs-decay", "0")) == 0
    ckpt = out / "run" / "latest.pt"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.png").mkdir()
    (tmp_path / "twins").mkdir()
    for name in ("a.jpg", "a.png"):  # both would become a.png
        Image.new("RGB", (8, 8)).save(tmp_path / "twins" / name)
    for argv, pattern in [
        (["--input", tmp_path / "empty", "--output", tmp_path / "res"], "no images"),
        (["--input", ckpt, "--output", tmp_path / "res"], "image folder .*latest.pt is a file"),
        (["--input", dataset_root / "testA", "--output", dataset_root / "testA" / "res"], "--output is --input or "
         "inside it"),
        (["--input", dataset_root / "testA", "--grid", dataset_root / "testA" / "grid.png"], "--grid is --input "
         "or inside it: choose a file outside it, so no input is overwritten"),
        (["--input", dataset_root / "testA", "--grid", tmp_path / "empty.png"], "--grid .*empty.png is a folder"),
        (["--input", tmp_path / "twins", "--output", tmp_path / "res"], "two images of --input would both be "
         "written as .*a.png: rename one"),
        (["--input", dataset_root / "testB", "--output", tmp_path / "res", "--direction", "BtoA"],
         r"translates its own way only \(AtoB\)"),
        (["--input", dataset_root / "testA"], "takes one model and an --output folder"),
        (["--input", dataset_root / "testA", "--output", tmp_path / "res", "--count", "2"], "--count picks the images"
         " of a --grid; --output translates them all: drop it"),
    ]:
        code, err = run_cli(["--checkpoint", ckpt, *argv], capsys, translate_cli)
        assert_error(code, err, pattern)
    code, err = run_cli(["--input", dataset_root / "testA", "--output", tmp_path / "res"], capsys, translate_cli)
    assert_error(code, err, "name a model: --checkpoint FILE or --pretrained NAME")


def training_state(path: Path) -> tuple:
    """A checkpoint's place and weights, which a start leaves as they were (it rewrites the options alone)."""
    s = torch.load(path, weights_only=True)
    return s["epoch"], s["step"], s["images"], [t.tolist() for net in s["nets"].values() for t in net.values()]


def test_faults_a_nan_loss_stops_the_run_naming_the_loss_and_step(dataset_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0")) == 0
    saved = training_state(out / "run" / "latest.pt")
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step",
                        lambda self, x, y: {**step(self, x, y), "cycle_X": torch.tensor(math.nan)})
    code, err = run_cli(cli_args(dataset_root, out, "--epochs", "2", "--epochs-decay", "0", "--resume"), capsys)
    assert code == 1 and re.search("loss cycle_X became nan by step 3", err[-1])
    assert training_state(out / "run" / "latest.pt") == saved  # the resume's start rewrote its options alone
    advice = re.search(r"continue with: python train_gan.py (.*)", err[-1]).group(1).split()
    assert advice[advice.index("--lr") + 1] == "0.0001"  # half the lr
    monkeypatch.undo()
    assert cli(advice) == 0  # the advice, as printed, goes on, with the two epochs the failed resume asked for
    state = torch.load(out / "run" / "latest.pt", weights_only=True)
    assert (state["config"]["lr"], state["config"]["epochs"], state["epoch"]) == (1e-4, 2, 2)


def test_faults_a_nan_in_a_new_runs_first_step_prints_advice_that_works(dataset_root, tmp_path, capsys, monkeypatch):
    """A new run writes latest.pt at step 0, so the --resume its failure advises has a checkpoint to go on from."""
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, x, y: {**step(self, x, y), "D_X": torch.tensor(math.nan)})
    code, err = run_cli(cli_args(dataset_root, tmp_path / "out", "--epochs", "1", "--epochs-decay", "0"), capsys)
    assert code == 1 and re.search("loss D_X became nan by step 1", err[-1]), err
    advice = re.search(r"continue with: python train_gan.py (.*)", err[-1]).group(1).split()
    monkeypatch.undo()
    assert cli(advice) == 0
    state = torch.load(tmp_path / "out" / "run" / "latest.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["config"]["lr"]) == (1, 2, 1e-4)


def test_faults_images_deleted_while_a_run_goes_on_give_way_and_a_domain_left_empty_stops_in_one_line(
        dataset_root, tmp_path, capsys, monkeypatch):
    """A dataset on a shared disk, cleaned up under a running run: the loader's workers still hold the
    old list of files."""
    argv = cli_args(dataset_root, tmp_path / "out", "--workers", "2", "--max-steps", "4", "--epochs", "1",
                    "--epochs-decay", "1")  # 4 steps: every X image, each epoch
    gone = sorted(p for p in (dataset_root / "trainA").rglob("*") if p.is_file())[:2]
    record_epoch = du.RunFolder.record_epoch

    def then_delete(*args, **kw):
        said = record_epoch(*args, **kw)
        for p in gone:
            p.unlink(missing_ok=True)
        return said
    monkeypatch.setattr(du.RunFolder, "record_epoch", then_delete)
    code, err = run_cli(argv, capsys)
    assert code == 0 and "Traceback" not in "".join(err), err
    warned = re.findall(r"^warning: skipping unreadable image (.*): another image of its domain takes its place$",
                        "\n".join(err), flags=re.M)  # each on a line of its own, above the progress bar
    assert sorted(warned) == [str(p) for p in gone]
    gone = [p for p in (dataset_root / "trainB").rglob("*") if p.is_file()]  # now all of Y
    code, err = run_cli(cli_args(dataset_root, tmp_path / "out2", "--workers", "2", "--max-steps", "4", "--epochs",
                                 "2", "--epochs-decay", "0"), capsys)
    assert_error(code, err, r"none of the 3 images listed in .*trainB can be read any more: put them back, then "
                            r"resume", 1)


def one_epoch(root, out, *extra):
    """A run of one epoch of one step (next_epoch: its resume for a second)."""
    return cli_args(root, out, "--epochs", "1", "--epochs-decay", "0", "--max-steps", "1", *extra)


def next_epoch(root, out):
    return one_epoch(root, out, "--epochs-decay", "1", "--resume")


def test_faults_a_resume_from_a_checkpoint_older_than_the_logs_logs_each_step_once(dataset_root, tmp_path):
    """The logs' rows past the checkpoint (its save lost to a crash, a full disk) are trained, and logged, again."""
    run = tmp_path / "run"
    assert cli(one_epoch(dataset_root, tmp_path)) == 0
    older, plotted = (run / "latest.pt").read_bytes(), [(run / p).read_bytes() for p in ("losses.png", "balance.png")]
    assert cli(next_epoch(dataset_root, tmp_path)) == 0
    (run / "latest.pt").write_bytes(older)
    assert cli(one_epoch(dataset_root, tmp_path, "--resume")) == 0  # a start alone: its epoch is done
    assert [(run / p).read_bytes() for p in ("losses.png", "balance.png")] == plotted  # the lost epoch is not drawn
    assert cli(next_epoch(dataset_root, tmp_path) + ["--no-d-map"]) == 0
    assert (run / "epoch_002.png").exists() and not (run / "d_epoch_002.png").exists()  # the lost epoch's, drawn again
    assert [[r[k] for r in du.read_table(run / f)] for f, k in (("losses.csv", "step"), ("epochs.csv", "epoch"))] == \
        [[1, 2], [1, 2]]


def test_faults_an_output_path_that_is_a_file_or_read_only_is_refused_in_one_line(dataset_root, tmp_path, capsys,
                                                                                   monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run_cli(one_epoch(dataset_root, blocker), capsys)
    assert_error(code, err, "cannot be made a folder.*choose another --output-dir")
    assert cli(one_epoch(dataset_root, tmp_path / "out")) == 0
    code, err = run_cli(["--checkpoint", str(tmp_path / "out" / "run" / "latest.pt"), "--input",
                         str(dataset_root / "testA"), "--output", str(blocker / "sub")], capsys, translate_cli)
    assert_error(code, err, "--output .* cannot be made a folder")
    assert blocker.read_text() == "not a folder"
    monkeypatch.setattr(du.os, "access", lambda path, mode: False)  # what a read-only folder answers
    code, err = run_cli(next_epoch(dataset_root, tmp_path / "out"), capsys)
    assert_error(code, err, "--output-dir or --name .*run is read-only: choose another --output-dir or --name")


@pytest.mark.parametrize("where", ["latest.pt", "epoch_002.png"])
def test_faults_a_full_disk_ends_the_run_in_one_line_and_keeps_what_was_saved(dataset_root, tmp_path, capsys,
                                                                              monkeypatch, where):
    """ENOSPC injected into the checkpoint write (torch.save) or into the epoch's grid."""
    out = tmp_path / "out"
    assert cli(one_epoch(dataset_root, out)) == 0
    run = out / "run"
    saved = (run / "latest.pt").read_bytes()

    def full(obj, f):  # as torch.save does it: its own words over the OSError of the file it writes
        f.write(b"the first bytes of a check")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    if where == "latest.pt":
        monkeypatch.setattr(torch, "save", full)
    else:
        def no_space(img, path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        monkeypatch.setattr(du, "save_image", no_space)
    code, err = run_cli(next_epoch(dataset_root, out), capsys)
    assert_error(code, err, rf"could not write {re.escape(str(run / where))} \(No space left on device\): free some "
                            rf"disk space.*"
                            rf"--resume --name run", 1)
    assert_no_temporaries(out)
    if where == "latest.pt":
        assert (run / "latest.pt").read_bytes() == saved  # the previous checkpoint, intact
    else:  # the epoch's checkpoint was written before its grid
        assert torch.load(run / "latest.pt", weights_only=True)["epoch"] == 2
    monkeypatch.undo()
    assert cli(next_epoch(dataset_root, out)) == 0  # the cause fixed, it goes on


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_faults_a_real_full_disk_keeps_the_previous_checkpoint_and_resumes_when_freed(dataset_root, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        assert cli(one_epoch(dataset_root, disk)) == 0
        run = disk / "run"
        saved = (run / "latest.pt").read_bytes()
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - len(saved) // 2))  # room for half a checkpoint
        code, err = run_cli(next_epoch(dataset_root, disk), capsys)
        assert_error(code, err, rf"could not write {re.escape(str(run))}/(latest\.pt|losses\.csv)", 1)
        assert (run / "latest.pt").read_bytes() == saved and not list(run.glob("*.tmp"))
        (disk / "filler").unlink()
        assert cli(next_epoch(dataset_root, disk)) == 0
        assert torch.load(run / "latest.pt", weights_only=True)["epoch"] == 2
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES)
def test_faults_out_of_memory_is_one_line_naming_the_size_and_the_flag(dataset_root, tmp_path, capsys, monkeypatch,
                                                                       device):
    """On a GPU, a real out of memory: the allocator capped to 8 MB, a step at crop 256 needs more. On a
    CPU the allocator's own error is raised in the step (a real one would take the machine's memory)."""
    out = tmp_path / "out"
    assert cli(one_epoch(dataset_root, out, "--device", device)) == 0
    saved = training_state(out / "run" / "latest.pt")
    if device == "cpu":
        oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes.")
        monkeypatch.setattr(Trainer, "train_step", lambda self, x, y: (_ for _ in ()).throw(oom))
    else:
        torch.cuda.empty_cache()  # 8 MB more than what this process's earlier tests still hold
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 8 * 2 ** 20)
                                                   / torch.cuda.get_device_properties(0).total_memory)
    try:
        code, err = run_cli(next_epoch(dataset_root, out) + ["--device", device, "--crop-size", "256",
                                                             "--load-size", "256"], capsys)
    finally:
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    assert_error(code, err, r"out of memory at crop 256x256, batch 1: lower --crop-size or "
                            r"--batch-size, then continue with: python train_gan.py --resume --name run", 1)
    assert training_state(out / "run" / "latest.pt") == saved

    def out_of_memory(net, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(translate, "generate", out_of_memory)
    code, err = run_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input",
                         str(dataset_root / "testA"), "--output", str(tmp_path / "res")], capsys, translate_cli)
    assert_error(code, err, r"out of memory translating img0.jpg \(40x30, batch 1\): pass --max-side", 1)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # another error is not taken for memory
        with du.stop_if_out_of_memory("translating", "lower --size"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x2 and 3x4)")


def test_faults_out_of_memory_outside_a_step_is_one_line_and_the_epochs_checkpoint_is_kept(
        dataset_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli(one_epoch(dataset_root, out)) == 0
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(CycleGAN, "visuals", lambda self, x, y: (_ for _ in ()).throw(oom))  # the epoch's grid
    code, err = run_cli(next_epoch(dataset_root, out), capsys)
    assert_error(code, err, r"out of memory at crop 32x32, batch 1: lower --crop-size or --batch-size, then "
                            r"continue with: python train_gan.py --resume --name run", 1)
    assert torch.load(out / "run" / "latest.pt", weights_only=True)["epoch"] == 2  # saved before the grid
    monkeypatch.setattr(Trainer, "load", classmethod(lambda cls, *args, **kw: (_ for _ in ()).throw(oom)))
    code, err = run_cli(["--resume", "--name", "run", "--output-dir", out, "--device", "cpu"], capsys)
    assert_error(code, err, r"out of memory setting up the run: free the device's memory", 1)  # no sizes known yet
    monkeypatch.setattr(translate, "generator", lambda *a: (_ for _ in ()).throw(oom))
    code, err = run_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input", str(dataset_root / "testA"),
                         "--output", str(tmp_path / "res"), "--device", "cpu"], capsys, translate_cli)
    assert_error(code, err, r"out of memory loading the model\(s\) onto cpu: free its memory, or pass --device cpu", 1)


def test_faults_ctrl_c_inside_a_save_leaves_the_previous_checkpoint_and_no_temporary(dataset_root, tmp_path, capsys,
                                                                                     monkeypatch):
    out = tmp_path / "out"
    assert cli(one_epoch(dataset_root, out)) == 0
    saved = (out / "run" / "latest.pt").read_bytes()

    def interrupted(obj, f):
        f.write(b"half a checkp")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    code, err = run_cli(next_epoch(dataset_root, out), capsys)
    assert code == 130 and "Traceback" not in "".join(err)
    assert (out / "run" / "latest.pt").read_bytes() == saved
    assert_no_temporaries(out)


@pytest.mark.parametrize("delay", [0.1, 0.3, 1.5, 3.0])
def test_faults_ctrl_c_at_start_up_ends_cleanly(dataset_root, tmp_path, delay):
    """SIGINT while torch loads (where an import may swallow SystemExit), while the folders are scanned or the
    workers start, or in the first steps."""
    write_mixed_images(dataset_root / "trainA" / "more", 300)  # a slower scan
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train_gan.py", *cli_args(dataset_root, out, "--workers", "2",
                                                                       "--max-steps", "5")],
                            cwd=Path(__file__).parent, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = ended_after_ctrl_c(proc)
    assert proc.returncode in (0, 130), stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    if out.exists():
        assert_no_temporaries(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_faults_sigint_or_sigterm_saves_a_checkpoint_and_exits_cleanly(dataset_root, tmp_path, sig):
    """Sent to the whole process group: Ctrl-C in a terminal, SIGTERM from systemd or Slurm."""
    write_mixed_images(dataset_root / "trainA" / "more", 600)  # an epoch of 600 steps: the signal lands inside it
    out = tmp_path / "out"
    argv = cli_args(dataset_root, out, "--max-steps", "1000", "--workers", "2")
    proc = subprocess.Popen([sys.executable, "train_gan.py", *argv], cwd=Path(__file__).parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    csv_path = out / "run" / "losses.csv"
    deadline = time.time() + 120
    while not csv_path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, sig)  # to the loader's workers too
    stdout, stderr = ended_after_ctrl_c(proc)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert stderr.count("stopping after this step") == 1, stderr  # the main process alone answers
    assert "stopped at epoch 1, image" in stdout
    state = torch.load(out / "run" / "latest.pt", weights_only=True)
    assert state["epoch"] == 0 and 1 <= state["images"] < 600


# ============================================================================= several GPUs (torchrun)


def test_ddp_is_the_commands_concern_and_no_model_file_names_it():
    """Several GPUs are the command's concern (the Trainer averages gradients over the ranks): a learner of the
    papers meets no all-reduce in them."""
    for path in ("layers.py", "networks.py", "losses.py", "cycle_gan.py", "cut_model.py"):
        text = (Path(__file__).parent / path).read_text()
        assert not re.search(r"DistributedDataParallel|no_sync|all_reduce|local_grads|rank|distributed", text), path


def free_port() -> int:
    """A port no process listens on, for a group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_rank(rank, world, port):
    """The environment torchrun gives a rank; one thread each."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def ddp_worker(rank, world, port, argv, out, stop_after=None):
    """One torchrun-like rank: train, then dump this rank's weights for comparison. FastCUT's
    ranks mirror differently (rank 0 every step, rank 1 never), the case that once hung them.
    With `stop_after`, rank 1 alone is asked to stop after that many steps."""
    CUT.flip_this_step = lambda self: self.config.flip_equivariance and rank == 0
    as_torchrun_rank(rank, world, port)
    stop = StopAfter(stop_after) if stop_after and rank == 1 else None
    model = train_gan.train(argv, stop=stop)
    torch.save({k: v.state_dict() for k, v in model.nets.items()}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def train_two_ranks(argv, tmp_path, stop_after=None) -> list[dict]:
    """Run ddp_worker on 2 processes (gloo on the CPU, nccl with --device cuda); each rank's final
    weights. Fails if the ranks hang."""
    port = free_port()
    procs = mp.spawn(ddp_worker, args=(2, port, argv, str(tmp_path), stop_after), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not procs.join(timeout=2):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the two ranks hung")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for net in ranks[0]:
        for key, tensor in ranks[0][net].items():
            assert torch.equal(tensor, ranks[1][net][key]), (net, key)
    return ranks


@pytest.mark.gpu
@pytest.mark.parametrize("device", [on("cpu"), on("cuda", gpus=2)])
@pytest.mark.parametrize("model", ["cycle_gan", "cut", "fastcut"])
def test_ddp_on_two_processes_keeps_ranks_identical_and_writes_once(dataset_root, tmp_path, model, device):
    argv = cli_args(dataset_root, tmp_path / "out", "--model", model, "--epochs", "1", "--epochs-decay", "0",
                    "--device", device)
    ranks = train_two_ranks(argv, tmp_path)
    run = tmp_path / "out" / "run"
    written = ["epoch_001.png", "d_epoch_001.png", "latest.pt", "losses.csv", "losses.png", "balance.png", "epochs.csv",
               "options.json", "index.html"]
    written += ["nce_epoch_001.png"] if "cut" in model else []
    assert sorted(p.name for p in run.iterdir()) == sorted(written + [".lock"])  # rank 0 alone locked the folder
    assert len((run / "losses.csv").read_text().splitlines()) == 1 + 2  # rank 0's two steps only
    trained = torch.load(run / "latest.pt", weights_only=True)
    assert trained["step"] == 2 and all(torch.equal(t, ranks[0]["G"][k]) for k, t in trained["nets"]["G"].items())


def command_on_a_rank(rank, world, port, argv, out):
    """A torchrun-like rank of the whole command: its exit code and the last line it wrote to stderr."""
    as_torchrun_rank(rank, world, port)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_gan.main(argv)
    (Path(out) / f"rank{rank}.txt").write_text(f"{code} {err.getvalue().strip().splitlines()[-1]}")


def test_ddp_a_refusal_of_rank_0_stops_every_rank_in_one_line_before_any_step(dataset_root, tmp_path):
    argv = cli_args(dataset_root, tmp_path / "out", "--epochs", "1", "--epochs-decay", "0")
    assert cli(argv) == 0  # the run's folder now holds a run: rank 0 alone, which holds folders, can tell
    mp.spawn(command_on_a_rank, args=(2, free_port(), argv, str(tmp_path)), nprocs=2)  # a traceback fails it
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert re.fullmatch("2 error: .* already holds a run: pass --resume to continue it, or a new --name", said[0])
    assert said[1] == f"1 error: rank 0 could not take {tmp_path / 'out' / 'run'}: its error says why", said


def gradients_of_one_step(trainer, x, y) -> dict[str, torch.Tensor]:
    """Each network's gradient (flattened) as its Adam step sees it, in one training step on (x, y)."""
    grads, adam_step = {}, {group: opt.step for group, opt in trainer.optimizers.items()}
    for group, opt in trainer.optimizers.items():
        def seen(*args, group=group, **kw):
            for name in trainer.model.groups[group]:
                grads[name] = torch.cat([p.grad.flatten() for p in trainer.nets[name].parameters()])
            return adam_step[group](*args, **kw)
        opt.step = seen
    trainer.train_step(x, y)
    return grads


def one_step_on_a_rank(rank, world, port, out):
    """A rank of a two-rank gloo group: CycleGAN (no image pool) steps on this rank's own image pair."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    trainer = Trainer(CycleGAN(CycleGANConfig(**TINY, pool_size=0)))
    torch.save(gradients_of_one_step(trainer, *pair(32, seed=rank)), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_ranks_take_the_step_one_process_takes_on_both_ranks_images(tmp_path):
    """The Trainer averages each group's gradients over the ranks before its Adam step: two ranks, each with one
    image pair, step on the gradients one process gets from both pairs as a batch of 2 (the losses are means over
    the batch, instance norm sees each image alone, and without a pool D sees the same fakes)."""
    port = free_port()
    mp.spawn(one_step_on_a_rank, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    batch = [torch.cat(images) for images in zip(pair(32, seed=0), pair(32, seed=1))]
    one = gradients_of_one_step(Trainer(CycleGAN(CycleGANConfig(**TINY, pool_size=0))), *batch)
    assert set(one) == set(ranks[0]) == {"G", "F", "D_X", "D_Y"}
    for name, grad in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank steps on the same average
        assert (ranks[0][name] - grad).norm() <= 1e-5 * grad.norm(), name  # and it is one process's


def test_ddp_ranks_stop_together_after_the_step_one_rank_was_asked_to_stop(dataset_root, tmp_path):
    argv = cli_args(dataset_root, tmp_path / "out", "--model", "fastcut", "--epochs", "3", "--epochs-decay", "0",
                    "--log-every", "10")  # 2 steps an epoch per rank: no logged step but the epochs' ends
    ranks = train_two_ranks(argv, tmp_path, stop_after=3)
    stopped = torch.load(tmp_path / "out" / "run" / "latest.pt", weights_only=True)
    assert (stopped["step"], stopped["epoch"], stopped["images"]) == (3, 1, 2)  # mid-way through epoch 2
    assert all(torch.equal(t, ranks[0]["G"][k]) for k, t in stopped["nets"]["G"].items())


# ============================================================================= what differs on a GPU (-m gpu)


STEP_MODELS = {"cycle_gan": (CycleGAN, CycleGANConfig(**TINY)), "cut": (CUT, CUTConfig(**TINY_CUT)),
               "fastcut": (CUT, CUTConfig(**FASTCUT, **TINY_CUT))}


def step_with_gradients(trainer, x, y, monkeypatch) -> tuple[dict, dict]:
    """One training step: its losses as floats, and each parameter's gradient as its optimiser saw it, by
    network and parameter name ('G.model.1.weight'), on the CPU."""
    grads, step = {}, trainer.step

    def record(group):
        for name in trainer.model.groups[group]:
            grads.update({f"{name}.{k}": p.grad.cpu() for k, p in trainer.nets[name].named_parameters()})
        step(group)
    monkeypatch.setattr(trainer, "step", record)
    return {k: v.item() for k, v in trainer.train_step(x, y).items()}, grads


@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", list(STEP_MODELS))
def test_gpu_float32_step_on_the_device_computes_the_float64_step_of_the_cpu(device, model, monkeypatch, request):
    """One float32 step on the device against the same step in float64 on the CPU: the losses and each network's
    gradients agree to float32 rounding (relative 1e-4; the CPU's are 1e-6 to 4e-6 off, and TF32 arithmetic in
    H's matrix multiplies alone puts CUT's 1e-3 off). So TF32 is off (cuDNN's default turns it on for
    convolutions on Ampere and later GPUs). The pool, the flips and H's patch places come from the CPU generator,
    so both draw the same. A failure names the three parameters whose gradients differ most."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in matrix multiplies either
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(matmul))
    model_cls, config = STEP_MODELS[model]
    torch.manual_seed(0)
    net = model_cls(copy.deepcopy(config))
    reference = copy.deepcopy(net)
    for name in (n for members in model_cls.groups.values() for n in members):
        getattr(reference, name).double()
    x, y = pair(32)
    torch.manual_seed(1)
    losses, grads = step_with_gradients(Trainer(reference), x.double(), y.double(), monkeypatch)
    torch.manual_seed(1)
    on_device, grads_on_device = step_with_gradients(Trainer(net, device), x, y, monkeypatch)
    nets = {net: [n for n in grads if n.split(".")[0] == net] for net in dict.fromkeys(n.split(".")[0] for n in grads)}
    norm = {net: torch.cat([grads[n].flatten() for n in names]).norm().item() for net, names in nets.items()}
    apart = {n: (grads_on_device[n].double() - grads[n]).norm().item() / norm[n.split(".")[0]] for n in grads}
    differences = {net: math.hypot(*(apart[n] for n in names)) for net, names in nets.items()}  # relative, each
    worst = sorted(apart.items(), key=lambda item: -item[1])[:3]  # the parameters where the devices part most
    assert on_device == pytest.approx(losses, rel=1e-4), (on_device, losses, differences, worst)
    assert max(differences.values()) <= 1e-4, (differences, worst)


@pytest.mark.gpu
@pytest.mark.parametrize("device, precision", [on("cpu", "bf16"), on("cpu", "fp16"), on("cuda", "bf16"),
                                               on("cuda", "fp16")])
@pytest.mark.parametrize("model", list(STEP_MODELS))
def test_gpu_mixed_precision_trains_twenty_finite_steps_and_the_content_loss_falls(device, precision, model):
    """fp16's loss scale stays >= 1: with H's MLP in fp16, CUT's gradients overflowed at every scale (found on
    an H200), G never stepped. The command refuses fp16 on a CPU (real-size steps come out NaN); the tiny
    models here step, so the CPU checks the scaling too."""
    model_cls, config = STEP_MODELS[model]
    torch.manual_seed(0)
    trainer = Trainer(model_cls(copy.deepcopy(config)), device, precision)
    x, y = pair(32)
    history = [{k: v.float().item() for k, v in trainer.train_step(x, y).items()} for _ in range(20)]
    assert all(math.isfinite(v) for losses in history for v in losses.values())
    content = "cycle_X" if model == "cycle_gan" else "NCE_X"  # what ties G(x) to x: it falls on one pair
    assert history[-1][content] < history[0][content]
    assert all(math.isfinite(s.get_scale()) and s.get_scale() >= 1 for s in trainer.scalers.values())  # fp16


@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES)
def test_gpu_compiled_run_trains_as_eager_does_and_saves_weights_plain_networks_load(dataset_root, tmp_path, device,
                                                                                     monkeypatch):
    """--compile: every network's forward and backward through torch.compile. On the CPU, through dynamo and AOT
    autograd only (backend aot_eager): inductor's C++ code generation costs minutes there, cold, and is inductor's
    to test; on CUDA, the default backend, inductor's kernels."""
    if device == "cpu":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    rows = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / mode
        try:
            assert cli(cli_args(dataset_root, out, "--model", "fastcut", "--epochs", "1", "--epochs-decay", "0",
                                "--device", device, *(["--compile"] if mode == "compiled" else []))) == 0
        finally:
            torch._dynamo.reset()
        rows[mode] = [{k: float(v) for k, v in r.items()} for r in csv.DictReader((out / "run" / "losses.csv").open())]
    state = torch.load(tmp_path / "compiled" / "run" / "latest.pt", weights_only=True)
    assert state["step"] == 2 and not any("_orig_mod" in k for net in state["nets"].values() for k in net)
    train_gan.load_model(state)  # uncompiled networks take the weights
    # The same seed, the same first step: the compiled kernels compute it as eager does, to rounding.
    assert rows["compiled"][0] == pytest.approx(rows["eager"][0], rel=1e-3)
    assert len(rows["compiled"]) == 2 and all(math.isfinite(v) for v in rows["compiled"][1].values())


@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES)
def test_gpu_run_with_loader_workers_resumes_and_translates_as_the_cpu_does(
        dataset_root, tmp_path, monkeypatch, device):
    pinned, loader_cls = [], torch.utils.data.DataLoader

    class Loader(loader_cls):
        def __init__(self, *args, **kw):
            pinned.append(kw.get("pin_memory"))
            super().__init__(*args, **kw)
    monkeypatch.setattr(torch.utils.data, "DataLoader", Loader)
    out, machine = tmp_path / "out", ["--device", device, "--workers", "2"]
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "0", *machine)) == 0
    assert cli(cli_args(dataset_root, out, "--epochs", "1", "--epochs-decay", "1", "--resume", *machine)) == 0
    state = torch.load(out / "run" / "latest.pt", weights_only=True)
    assert (state["epoch"], state["step"], pinned) == (2, 4, [device == "cuda"] * 2)  # pinned memory feeds a GPU
    for where in (device, "cpu"):
        assert translate_cli(["--checkpoint", str(out / "run" / "latest.pt"), "--input", str(dataset_root / "testA"),
                              "--output", str(tmp_path / f"on_{where}"), "--device", where]) == 0
    for image in (tmp_path / "on_cpu").rglob("*.png"):
        name = image.relative_to(tmp_path / "on_cpu")
        a, b = (np.asarray(Image.open(tmp_path / f"on_{where}" / name), dtype=int) for where in (device, "cpu"))
        assert np.abs(a - b).max() <= 1, name  # within 1/255


@pytest.mark.gpu
@pytest.mark.parametrize("device", DEVICES)
def test_gpu_benchmark_reports_the_step_the_data_wait_and_the_devices_peak_memory(dataset_root, tmp_path, capsys,
                                                                                  device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    assert cli(cli_args(dataset_root, tmp_path / "out", "--device", device, "--benchmark", "2", "--workers", "1")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"].startswith(device) and result["sec_per_iter"] > 0 and result["data_wait_sec"] >= 0
    assert result["workers"] == 1 and not (tmp_path / "out").exists()  # a benchmark writes nothing
    if device == "cuda":  # the CUDA allocator's peak, not the process's resident memory
        assert result["peak_mem_mb"] == round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) > 0
    else:
        import resource
        assert 0 < result["peak_mem_mb"] <= round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ============================================================================= the reading guide


def test_guide_names_real_functions_that_cite_their_equations():
    guide = (Path(__file__).parent / "docs" / "GUIDE.md").read_text()
    rows = [line.split("|")[1:-1] for line in guide.splitlines() if line.startswith("| ") and "`" in line]
    checked = 0
    for paper, _, code in (r[:3] for r in rows if len(r) >= 3):
        for name in re.findall(r"`(\w+)\.([\w.]+)`", code):
            obj = importlib.import_module(name[0])
            for part in name[1].split("."):
                obj = getattr(obj, part)  # fails if the map names something that does not exist
            equation = re.fullmatch(r"\s*(Eq\. \d)\s*", paper)
            if equation and callable(obj) and not isinstance(obj, (tuple, dict)):
                assert equation.group(1) in inspect.getsource(obj), f"{name} does not cite {equation.group(1)}"
            checked += 1
    assert checked >= 20


def shape_text(value) -> str:
    """A tensor's shape as the guide writes it, '(1, 3, 256, 256)'; a list of tensors in brackets."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return "[" + ", ".join(shape_text(v) for v in value) + "]"


def test_guide_traces_show_the_shapes_the_code_produces():
    """Run every traced row of docs/GUIDE.md on the official networks and compare each shape."""
    guide = (Path(__file__).parent / "docs" / "GUIDE.md").read_text()
    sections = {s.split("\n", 1)[0]: s for s in re.split(r"^### ", guide, flags=re.M)}
    torch.manual_seed(0)
    image = {"x": torch.rand(1, 3, 256, 256) * 2 - 1, "y": torch.rand(1, 3, 256, 256) * 2 - 1}
    cg, cut, fast = CycleGAN(), CUT(), CUT(CUTConfig(**FASTCUT))
    namespaces = {
        "One CycleGAN step, traced": (19, dict(model=cg, G=cg.G, F=cg.F, D_X=cg.D_X, D_Y=cg.D_Y, gan=cg.gan_loss)),
        "One CUT step, traced": (24, dict(model=cut, G=cut.G, D=cut.D, H=cut.H, gan=cut.gan_loss, nce=cut.nce_loss,
                                          taps=cut.config.nce_layers)),
        "FastCUT's flip, traced": (8, dict(model=fast, G=fast.G, D=fast.D, H=fast.H, nce=fast.nce_loss,
                                           taps=fast.config.nce_layers))}
    for title, (count, names) in namespaces.items():
        rows = re.findall(r"^\| \d+ \| `([^`]+)` \| ([^|]+?) \|", sections[title], flags=re.M)
        assert len(rows) == count, title
        ns = {"torch": torch, "l1": nn.functional.l1_loss, **image, **names}
        with torch.no_grad():
            for code, written in rows:
                torch.manual_seed(0)  # each row's random draws (H's places) as the check below draws them
                statement = ast.parse(code).body[0]
                if isinstance(statement, ast.Assign):
                    exec(code, ns)
                    target = statement.targets[0]
                    assigned = target.elts if isinstance(target, ast.Tuple) else [target]
                    shape = "; ".join(shape_text(ns[t.id]) for t in assigned)
                else:
                    shape = shape_text(eval(code, ns))
                assert shape == written, f"{title}: {code} gives {shape}, the guide says {written}"
    with torch.no_grad():  # and FastCUT's traced flip computes what the step computes
        fake_y, keys = fast.translate_with_keys(image["x"], flipped=True)
        torch.manual_seed(0)
        nce_x = 10 * fast.patch_nce(keys, fake_y, flipped=True)
    assert torch.equal(fake_y, ns["fake_y"]) and all(torch.equal(a, b) for a, b in zip(keys, ns["keys"]))
    assert nce_x.item() == pytest.approx(ns["NCE_X"].item(), rel=1e-6)


def test_guide_ablation_commands_each_build_their_model(dataset_root):
    """Each row of the guide's ablation table, run on tiny networks: its options parse, the model builds
    with the row's setting, and one step trains."""
    guide = (Path(__file__).parent / "docs" / "GUIDE.md").read_text()
    section = guide.split("## The paper's ablations, one flag each")[1].split("\n## ")[0]
    rows = re.findall(r"^\| ([^|]+) \| (yes|no) \|.*`python train_gan.py ([^`]+)` \|$", section, flags=re.M)
    assert len(rows) == 7
    for what, identity, command in rows:
        argv = command.replace("data/horse2zebra", str(dataset_root)).split()
        trainer, opts = started(argv + ["--ngf", "4", "--ndf", "4", "--crop-size", "32", "--load-size", "36"])
        c = trainer.model.config
        assert c.nce_idt == (identity == "yes"), what
        assert (c.nce_layers, c.num_patches) == ((("res5",) if "last" in what else DEFAULT_TAPS),
                                                 16 if "fewer" in what else 256), what
        assert c.nce_negatives == ("batch" if "internal and" in what else "others" if "only" in what
                                   and "external" in what else "image"), what
        x, y = pair(32)
        trainer.train_step(x.repeat(opts.batch_size, 1, 1, 1), y.repeat(opts.batch_size, 1, 1, 1))
