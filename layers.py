"""Building blocks shared by every network: conv-norm-activation, the residual block,
anti-aliased (blur-pool) down/up-sampling, and weight init.

Mirrors the helpers of junyanz/pytorch-CycleGAN-and-pix2pix and
taesungp/contrastive-unpaired-translation (models/networks.py). Blur-pool is
"Making Convolutional Networks Shift-Invariant Again" (Zhang 2019, arXiv 1904.11486).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("instance", "batch", "none")


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """t in float32 when it is fp16/bf16 (autocast), unchanged in float32 or float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Instance norm without affine or running stats (the official CycleGAN/CUT choice),
    batch norm with both, or nothing."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use one of {', '.join(NORMS)}")


def conv_bias(norm: str) -> bool:
    """A conv has a bias only before instance norm, as officially: batch norm has its own shift, and with norm
    'none' the official conv has none either (a quirk kept so that official checkpoints load)."""
    return norm == "instance"


def activation(kind: str) -> nn.Module:
    """ReLU and LeakyReLU(0.2) run in place to save memory, as in the official code."""
    layers = {"relu": lambda: nn.ReLU(inplace=True), "lrelu": lambda: nn.LeakyReLU(0.2, inplace=True),
              "tanh": nn.Tanh, "none": nn.Identity}
    if kind not in layers:
        raise ValueError(f"unknown activation {kind!r}: use one of {', '.join(layers)}")
    return layers[kind]()


def padding(mode: str, size: int) -> nn.Module:
    pads = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d, "zeros": nn.ZeroPad2d}
    if mode not in pads:
        raise ValueError(f"unknown padding {mode!r}: use one of {', '.join(pads)}")
    return pads[mode](size)


def conv_norm_act(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, pad: int = 0,
                  pad_mode: str = "zeros", norm: str = "instance", act: str = "relu",
                  bias: bool | None = None) -> list[nn.Module]:
    """[pad] -> Conv2d -> norm -> activation as a flat list, so each layer has the index the official checkpoints
    name (`model.1.weight`) and CUT taps. Reflect and replicate padding get their own layer, as officially."""
    layers: list[nn.Module] = []
    if pad and pad_mode != "zeros":
        layers.append(padding(pad_mode, pad))
        pad = 0
    layers.append(nn.Conv2d(in_ch, out_ch, kernel_size, stride, pad,
                            bias=conv_bias(norm) if bias is None else bias))
    return layers + norm_act(out_ch, norm, act)


def norm_act(channels: int, norm: str, act: str) -> list[nn.Module]:
    """The norm and activation after a conv. Norm 'none' is an Identity layer, as officially, so layer indices (CUT's
    taps) do not move; activation 'none' adds nothing."""
    return [norm_layer(norm, channels)] + ([activation(act)] if act != "none" else [])


class ResnetBlock(nn.Module):
    """CycleGAN appendix 7.2's Rk, x + [pad, conv3x3, norm, ReLU, (dropout), pad, conv3x3, norm](x): (B, C, H, W) ->
    same. No ReLU after the sum, as officially (He et al.'s block has one); `conv_block` is the official name."""

    def __init__(self, channels: int, norm: str = "instance", dropout: bool = False,
                 pad_mode: str = "reflect"):
        super().__init__()
        first = conv_norm_act(channels, channels, 3, pad=1, pad_mode=pad_mode, norm=norm, act="relu")
        second = conv_norm_act(channels, channels, 3, pad=1, pad_mode=pad_mode, norm=norm, act="none")
        self.conv_block = nn.Sequential(*first, *([nn.Dropout(0.5)] if dropout else []), *second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


def binomial_filter(size: int) -> torch.Tensor:
    """Normalised 2-D binomial kernel: size 3 -> [1,2,1] x [1,2,1] / 16."""
    row = torch.tensor([float(math.comb(size - 1, k)) for k in range(size)])
    kernel = row[:, None] * row[None, :]
    return kernel / kernel.sum()


class BlurDownsample(nn.Module):
    """Anti-aliased stride-2 down-sampling: reflect pad 1, blur [1,2,1]^2/16, subsample. (B, C, H, W) -> (B, C,
    ceil(H/2), ceil(W/2)). The filter is a buffer named `filt`, as in the official checkpoints."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", binomial_filter(3)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class BlurUpsample(nn.Module):
    """Anti-aliased x2 up-sampling: replicate pad 1, transposed blur [1,3,3,1]^2/64 * 4, crop. (B, C, H, W) ->
    (B, C, 2H, 2W). The x4 gain keeps the mean intensity after zero-insertion."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", (binomial_filter(4) * 4)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Replicate-pad by 1 with cat: the values of F.pad(mode="replicate"), whose backward inductor cannot compile.
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], 2)
        x = torch.cat([x[..., :1], x, x[..., -1:]], 3)
        y = F.conv_transpose2d(x, self.filt, stride=2, padding=2, groups=x.shape[1])  # (B, C, 2H+2, 2W+2)
        return y[:, :, 1:-1, 1:-1]


def downsample(in_ch: int, out_ch: int, norm: str, antialias: bool) -> list[nn.Module]:
    """Halve H and W while mapping in_ch -> out_ch channels. CycleGAN: conv3x3 stride 2. CUT: conv3x3 stride 1, norm,
    ReLU, then blur-pool. The conv is always the first layer (CUT taps its output)."""
    if antialias:
        return conv_norm_act(in_ch, out_ch, 3, 1, 1, norm=norm) + [BlurDownsample(out_ch)]
    return conv_norm_act(in_ch, out_ch, 3, 2, 1, norm=norm)


def upsample(in_ch: int, out_ch: int, norm: str, antialias: bool) -> list[nn.Module]:
    """Double H and W: transposed conv3x3 stride 2 (CycleGAN), or blur-upsample + conv3x3 (CUT)."""
    if antialias:
        return [BlurUpsample(in_ch)] + conv_norm_act(in_ch, out_ch, 3, 1, 1, norm=norm)
    layers = [nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1, bias=conv_bias(norm))]
    return layers + norm_act(out_ch, norm, "relu")


def init_weights(net: nn.Module, kind: str = "normal", gain: float = 0.02) -> nn.Module:
    """Initialise conv and linear weights in place, biases to 0: normal is N(0, gain), CycleGAN's (appendix 7.1:
    N(0, 0.02)); xavier is xavier_normal with `gain`, the CUT repository's (its paper names none). Batch-norm scales
    get N(1, gain)."""
    if kind not in ("normal", "xavier"):
        raise ValueError(f"unknown init {kind!r}: use 'normal' or 'xavier'")
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if kind == "normal":
                nn.init.normal_(m.weight, 0.0, gain)
            else:
                nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net
