"""The networks of CycleGAN (arXiv 1703.10593) and CUT (arXiv 2007.15651), parameter for parameter: Johnson et al.'s
ResNet generator (CycleGAN's G and F, CUT's G), the pix2pix U-Net (arXiv 1611.07004), the PatchGAN (D_X, D_Y; CUT's
D), CUT's patch-sampling MLP H; the loaders of official files; `frozen`, D held fixed while G steps.

Mirrors models/networks.py of junyanz/pytorch-CycleGAN-and-pix2pix and taesungp/contrastive-unpaired-translation,
module layout included, so checkpoint keys and CUT's tap indices (nce_layers 0,4,8,12,16) line up.
"""
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from itertools import zip_longest

import torch
import torch.nn as nn

from layers import (BlurDownsample, ResnetBlock, activation, conv_bias, conv_norm_act, downsample,
                    full_precision, norm_act, padding, upsample)

# CUT's default encoder taps; the official indices (antialiased G) are 0, 4, 8, 12, 16.
DEFAULT_TAPS = ("input", "down1", "down2", "res1", "res5")


class ResnetGenerator(nn.Module):
    """c7s1-ngf, d(2ngf), d(4ngf), n_blocks x R(4ngf), u(2ngf), u(ngf), c7s1-out, tanh (CycleGAN appendix 7.2):
    (B, in_channels, H, W) -> (B, out_channels, H, W), H and W multiples of 4. CycleGAN's resamples with strided and
    transposed convs; CUT's blur-pools down (antialias) and blurs up (antialias_up; None: as antialias), as
    officially."""
    side_multiple = 4  # two stride-2 levels

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9,
                 norm: str = "instance", antialias: bool = False, dropout: bool = False,
                 antialias_up: bool | None = None):
        super().__init__()
        # Named encoder taps: name -> (index into self.model, channels of that layer's output).
        self.taps: dict[str, tuple[int, int]] = {"input": (0, in_channels)}
        layers = conv_norm_act(in_channels, ngf, 7, pad=3, pad_mode="reflect", norm=norm)
        ch = ngf
        for i in (1, 2):
            self.taps[f"down{i}"] = (len(layers), 2 * ch)  # the conv's output, before its norm
            layers += downsample(ch, 2 * ch, norm, antialias)
            ch *= 2
        for i in range(1, n_blocks + 1):
            self.taps[f"res{i}"] = (len(layers), ch)
            layers.append(ResnetBlock(ch, norm, dropout))
        for _ in range(2):
            layers += upsample(ch, ch // 2, norm, antialias if antialias_up is None else antialias_up)
            ch //= 2
        layers += [padding("reflect", 3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def tap(self, tap: str | int) -> tuple[int, int]:
        """(layer index, channels) of a tap given by name ('res1') or official index (12)."""
        for name, (index, channels) in self.taps.items():
            if tap in (name, index):
                return index, channels
        raise ValueError(f"unknown encoder tap {tap!r}: use one of "
                         + ", ".join(f"{name} ({index})" for name, (index, _) in self.taps.items()))

    def tap_channels(self, taps: Sequence[str | int] = DEFAULT_TAPS) -> list[int]:
        """Channels of each tapped feature map (what H's MLPs take in)."""
        return [self.tap(t)[1] for t in taps]

    def forward(self, x: torch.Tensor, taps: Sequence[str | int] | None = None, encode_only: bool = False):
        """(B, C, H, W) -> (B, out, H, W). With `taps`, (output, the features at the taps, the layers l of CUT's Eq. 3)
        from one pass; with encode_only, the features alone, run only as deep as the deepest tap."""
        if taps is None:
            return self.model(x)
        wanted = [self.tap(t)[0] for t in taps]
        last = max(wanted) if encode_only else len(self.model) - 1
        feats = {}
        for i, layer in enumerate(self.model[:last + 1]):
            x = layer(x)
            if i in wanted:
                feats[i] = x
        feats = [feats[i] for i in wanted]
        return feats if encode_only else (x, feats)


class UnetBlock(nn.Module):
    """One level of the U-Net: down-conv, the inner levels, up-conv, then the skip concat: (B, outer_ch, H, W) ->
    (B, 2*outer_ch, H, W) (the outermost level returns the image itself)."""

    def __init__(self, outer_ch: int, inner_ch: int, in_ch: int | None = None, inner: nn.Module | None = None,
                 outermost: bool = False, norm: str = "instance", dropout: bool = False):
        super().__init__()
        self.outermost = outermost
        bias = conv_bias(norm)
        down = nn.Conv2d(in_ch or outer_ch, inner_ch, 4, 2, 1, bias=bias)
        up_in = inner_ch if inner is None else 2 * inner_ch  # inner levels return their skip concat
        if outermost:
            layers = [down, inner, nn.ReLU(True), nn.ConvTranspose2d(up_in, outer_ch, 4, 2, 1), nn.Tanh()]
        elif inner is None:  # innermost: no norm on the 1x1 bottleneck
            layers = [activation("lrelu"), down, nn.ReLU(True), nn.ConvTranspose2d(up_in, outer_ch, 4, 2, 1, bias=bias),
                      *norm_act(outer_ch, norm, "none")]
        else:
            layers = [activation("lrelu"), down, *norm_act(inner_ch, norm, "none"), inner, nn.ReLU(True),
                      nn.ConvTranspose2d(up_in, outer_ch, 4, 2, 1, bias=bias), *norm_act(outer_ch, norm, "none"),
                      *([nn.Dropout(0.5)] if dropout else [])]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], 1)


class UnetGenerator(nn.Module):
    """The pix2pix U-Net: num_downs stride-2 levels with skips, 8 for 256x256, 7 for 128x128: (B, in_channels, H, W)
    -> (B, out_channels, H, W), H and W multiples of 2**num_downs."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, num_downs: int = 8, ngf: int = 64,
                 norm: str = "instance", dropout: bool = False):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"UnetGenerator needs num_downs >= 5, got {num_downs}")
        self.num_downs = num_downs
        self.side_multiple = 2 ** num_downs
        block = UnetBlock(ngf * 8, ngf * 8, norm=norm)
        for _ in range(num_downs - 5):
            block = UnetBlock(ngf * 8, ngf * 8, inner=block, norm=norm, dropout=dropout)
        for mult in (4, 2, 1):
            block = UnetBlock(ngf * mult, ngf * mult * 2, inner=block, norm=norm)
        self.model = UnetBlock(out_channels, ngf, in_ch=in_channels, inner=block, outermost=True, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.side_multiple
        if x.shape[-2] % side or x.shape[-1] % side:
            raise ValueError(f"a U-Net with {self.num_downs} downs needs sides that are multiples of {side}, "
                             f"got {tuple(x.shape[-2:])}: change the crop size or use a ResNet generator")
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """The PatchGAN: (B, C, H, W) -> (B, 1, H/8 - 2, W/8 - 2) logits, one per overlapping 70x70 patch (84x84 with
    blur-pool). C64-C128-C256-C512 (no norm on C64) then a 1-channel conv, 4x4 convs, LeakyReLU 0.2 (CycleGAN
    appendix 7.2), with C512 at stride 1 as officially (the appendix's stride 2 would see 94x94). With antialias (CUT)
    each stride-2 conv becomes stride 1 plus blur-pool."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "instance",
                 antialias: bool = False):
        super().__init__()
        stride = 1 if antialias else 2
        blur = (lambda ch: [BlurDownsample(ch)]) if antialias else (lambda ch: [])
        layers = [nn.Conv2d(in_channels, ndf, 4, stride, 1), activation("lrelu"), *blur(ndf)]
        ch = ndf
        for n in range(1, n_layers):
            out = ndf * min(2 ** n, 8)
            layers += conv_norm_act(ch, out, 4, stride, 1, norm=norm, act="lrelu") + blur(out)
            ch = out
        out = ndf * min(2 ** n_layers, 8)
        layers += conv_norm_act(ch, out, 4, 1, 1, norm=norm, act="lrelu")
        layers.append(nn.Conv2d(out, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchSampleMLP(nn.Module):
    """CUT's H (Sec. 3.2): at each tapped layer, the same sampled locations in every image, through a 2-layer MLP,
    L2-normalised. Built from the tap channels, where the official PatchSampleF waits for the first batch; its
    `mlp_N` are our `mlps.N`, loaded in order."""

    def __init__(self, in_channels: Sequence[int], nc: int = 256):
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)) for c in in_channels)

    def forward(self, feats: Sequence[torch.Tensor], num_patches: int = 256,
                patch_ids: Sequence[torch.Tensor] | None = None):
        """feats[l]: (B, C_l, H_l, W_l) -> (features, ids): features[l] (B, P, nc), the z_l^s of CUT's Eq. 3, at
        ids[l] (P,), P = min(num_patches, H_l * W_l); pass an earlier call's ids to sample the same places."""
        if len(feats) != len(self.mlps):
            raise ValueError(f"H has {len(self.mlps)} MLPs but got {len(feats)} feature maps")
        out, ids_out = [], []
        for layer, feat in enumerate(feats):
            if patch_ids is None:  # drawn by the CPU generator, as officially (numpy): the same on every device
                ids = torch.randperm(feat.shape[-2] * feat.shape[-1])[:num_patches].to(feat.device)
            else:
                ids = patch_ids[layer]
            out.append(self.project(layer, feat, ids))
            ids_out.append(ids)
        return out, ids_out

    def project(self, layer: int, feat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """feat (B, C, H, W) of tapped layer `layer` at flat locations ids (P,) -> (B, P, nc), in fp32 at any
        precision: the MLP's outputs start tiny (gain 0.02, twice), so the normalisation's gradient overflows fp16."""
        with torch.autocast(feat.device.type, enabled=False):
            x = self.mlps[layer](full_precision(feat.flatten(2).transpose(1, 2)[:, ids]))  # (B, P, nc)
        return x / (x.norm(dim=-1, keepdim=True) + 1e-7)


# Official checkpoints saved before PyTorch 0.4 stored running stats of instance norms, which have none.
_STALE_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def load_official_state_dict(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load an official `latest_net_*.pth` into `net`, tensor by tensor in registration order (the official one);
    the first name or shape that does not fit is named, on the first line of the ValueError."""
    ours = net.state_dict()
    theirs = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if not any(k.endswith(_STALE_SUFFIXES) for k in ours):
        theirs = {k: v for k, v in theirs.items() if not k.endswith(_STALE_SUFFIXES)}
    if not any(k.endswith("num_batches_tracked") for k in theirs):  # saved before PyTorch 0.4.1: torch keeps ours
        ours = {k: v for k, v in ours.items() if not k.endswith("num_batches_tracked")}
    mapped, rebuild = {}, "\nBuild the network with the options it was trained with (netG, ngf, n_blocks, norm, ...)"
    for (our_key, our_t), (their_key, their_t) in zip_longest(ours.items(), theirs.items(), fillvalue=(None, None)):
        if our_key is None or their_key is None:
            raise ValueError(f"checkpoint has {len(theirs)} tensors but {type(net).__name__} has {len(ours)}; "
                             f"first unmatched: {our_key or their_key!r}{rebuild}")
        if their_key.rsplit(".", 1)[-1] != our_key.rsplit(".", 1)[-1] or their_t.shape != our_t.shape:
            raise ValueError(f"checkpoint tensor {their_key!r} {tuple(their_t.shape)} does not fit "
                             f"{type(net).__name__}.{our_key} {tuple(our_t.shape)}{rebuild}")
        mapped[our_key] = their_t
    net.load_state_dict(mapped)
    return net


def official_generator(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """The generator an official file (`latest_net_G.pth`, `horse2zebra.pth`, ...) holds, built from the names and
    shapes of its tensors alone, its weights loaded; a file with none is a ValueError saying what it holds."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"it holds a {type(state_dict).__name__}, not a state_dict of named tensors")
    tensors = {k.removeprefix("module."): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(state_dict):
        raise ValueError(f"it holds {len(state_dict)} entries, not all of them tensors, so it is no network's "
                         f"weights; expected a generator's state_dict")
    first = tensors.get("model.1.weight")
    if first is not None and first.dim() == 4 and first.shape[-2:] == (7, 7):  # ResNet: c7s1-ngf
        ngf, c_in = first.shape[:2]
        blocks = {k.split(".")[1] for k in tensors if ".conv_block." in k}
        last = max((k for k in tensors if k.endswith(".weight") and tensors[k].dim() == 4),
                   key=lambda k: int(k.split(".")[1]))
        norm = "instance" if "model.1.bias" in tensors else "batch" if "model.2.weight" in tensors else "none"
        blur = {tuple(t.shape[-2:]) for k, t in tensors.items() if k.endswith(".filt")}
        net = ResnetGenerator(c_in, tensors[last].shape[0], ngf, len(blocks), norm, antialias=(3, 3) in blur,
                              dropout=any(".conv_block.6." in k for k in tensors), antialias_up=(4, 4) in blur)
    elif "model.model.0.weight" in tensors and "model.model.3.weight" in tensors:  # U-Net: outermost level
        ngf, c_in = tensors["model.model.0.weight"].shape[:2]
        norm = ("instance" if "model.model.0.bias" in tensors else
                "batch" if "model.model.1.model.2.weight" in tensors else "none")
        depth = max(k.count("model.") for k in tensors) - 1
        net = UnetGenerator(c_in, tensors["model.model.3.weight"].shape[1], depth, ngf, norm)
    else:
        key, t = next(iter(tensors.items()))
        kind = " (a PatchGAN discriminator's first layer)" if key == "model.0.weight" and t.shape[-2:] == (4, 4) else ""
        raise ValueError(f"it holds {len(tensors)} tensors, the first {key!r} {tuple(t.shape)}{kind}; expected a "
                         f"ResNet generator (model.1.weight, a 7x7 conv) or a U-Net (model.model.0.weight)")
    return load_official_state_dict(net, state_dict)


GENERATORS = ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128")


def define_G(netG: str, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, norm: str = "instance",
             dropout: bool = False, antialias: bool = False, antialias_up: bool | None = None) -> nn.Module:
    """A generator by its official name: resnet_9blocks, resnet_6blocks, unet_256 or unet_128."""
    if netG.startswith("resnet_") and netG.endswith("blocks") and netG[7:-6].isdigit():
        return ResnetGenerator(in_channels, out_channels, ngf, int(netG[7:-6]), norm, antialias, dropout,
                               antialias_up)
    if netG in ("unet_256", "unet_128"):
        return UnetGenerator(in_channels, out_channels, 8 if netG == "unet_256" else 7, ngf, norm, dropout)
    raise ValueError(f"unknown generator {netG!r}: use one of {', '.join(GENERATORS)}")


@contextmanager
def frozen(*nets: nn.Module):
    """Freeze the parameters of `nets` inside the block: D stays fixed while G steps (the official
    set_requires_grad), so G's losses give D no gradients."""
    for net in nets:
        net.requires_grad_(False)
    try:
        yield
    finally:
        for net in nets:
            net.requires_grad_(True)
