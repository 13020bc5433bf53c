"""CUT and FastCUT: Park, Efros, Zhang, Zhu, "Contrastive Learning for Unpaired Image-to-Image Translation", ECCV
2020, arXiv 2007.15651. Mirrors models/cut_model.py of taesungp/contrastive-unpaired-translation.

One generator G: X->Y, one discriminator D, and H, an MLP on patches of G's encoder features.
Objective (Eq. 5): L_GAN(G, D, X, Y) + lambda_X * L_PatchNCE(G, H, X) + lambda_Y * L_PatchNCE(G, H, Y)
    L_GAN (Eq. 1): least squares, as the paper's training details and the official --gan_mode lsgan train it
        (Eq. 1 is written as the log-likelihood), times the official --lambda_GAN (Eq. 5 has no weight there).
    L_PatchNCE (Eq. 3): at each tapped layer, each sampled output patch of G(x) must pick out the input patch of
        x at the same place among the other patches of x (Eq. 2). The paper sums over places and layers; the
        official code averages over both (losses.PatchNCELoss).
    CUT: lambda_X = lambda_Y = 1 (Sec. 3.3); the Y term is the identity loss (G(y) against y), and the official
        code averages the two terms. FastCUT: lambda_X = 10, lambda_Y = 0 (Sec. 3.3), and flip-equivariance (the
        appendix's training details): half the time G sees the input mirrored, and its features are mirrored
        back before they are compared with the input's.
Each step updates D first, then G and H together, with D fixed, as officially; CUTConfig gives each value and
its source. This file is the paper only: train_gan.py's `Trainer`, handed to `train_step`, optimises.
"""
from dataclasses import dataclass, field

import torch

from layers import NORMS, init_weights
from losses import GAN_MODES, NEGATIVES, GANLoss, PatchNCELoss
from networks import DEFAULT_TAPS, GENERATORS, PatchDiscriminator, PatchSampleMLP, ResnetGenerator, define_G, frozen


@dataclass
class CUTConfig:
    """CUT's options, the CUT repository's defaults, each with its source: --model cut's flags."""
    lambda_nce: float = field(default=1.0, metadata=dict(help="lambda_X of Eq. 5 (Sec. 3.3)", at_least=0))
    nce_idt: bool = field(default=True, metadata=dict(help="Eq. 5's lambda_Y term, on G(y) and y (Sec. 3.3)"))
    flip_equivariance: bool = field(default=False, metadata=dict(help="mirror G's input half the time (appendix)"))
    nce_layers: tuple = field(default=DEFAULT_TAPS, metadata=dict(help="encoder taps by name or official index "
                                                                  "(the appendix's)"))
    num_patches: int = field(default=256, metadata=dict(help="places sampled per layer (appendix)", at_least=1))
    nce_temperature: float = field(default=0.07, metadata=dict(help="tau of Eq. 2", above=0))
    nce_negatives: str = field(default="image", metadata=dict(help="a query's negatives: its image's (the "
                                                              "paper's), the batch's, the others'", choices=NEGATIVES))
    lambda_gan: float = field(default=1.0, metadata=dict(help="L_GAN's weight (the official --lambda_GAN)",
                                                         at_least=0))
    gan_mode: str = field(default="lsgan", metadata=dict(help="least squares, as the paper trains",
                                                         choices=GAN_MODES))
    real_label: float = field(default=1.0, metadata=dict(help="D's target for real images, at most 1 (< 1: label "
                                                         "smoothing)", above=0))
    netG: str = field(default="resnet_9blocks", metadata=dict(help="a ResNet, whose encoder PatchNCE taps",
                                                              choices=GENERATORS))
    antialias: bool = field(default=True, metadata=dict(help="blur-pool down-sampling in G, D (--no_antialias)"))
    antialias_up: bool = field(default=True, metadata=dict(help="blur up-sampling in G (--no_antialias_up)"))
    ngf: int = field(default=64, metadata=dict(help="G's first filters", at_least=1))
    ndf: int = field(default=64, metadata=dict(help="D's first filters", at_least=1))
    n_layers_D: int = field(default=3, metadata=dict(help="3: the PatchGAN", at_least=1))
    netF_nc: int = field(default=256, metadata=dict(help="H's width (appendix)", at_least=1))
    norm: str = field(default="instance", metadata=dict(help="the norms", choices=NORMS))
    dropout: bool = field(default=False, metadata=dict(help="in G's blocks"))
    channels_x: int = field(default=3, metadata=dict(help="X's channels, as many as Y's", choices=(1, 3)))
    channels_y: int = field(default=3, metadata=dict(help="Y's channels", choices=(1, 3)))
    init_gain: float = field(default=0.02, metadata=dict(help="the xavier init's gain", above=0))
    lr: float = field(default=2e-4, metadata=dict(help="Adam's", above=0, resume="changeable"))
    beta1: float = field(default=0.5, metadata=dict(help="Adam's"))
    epochs: int = field(default=200, metadata=dict(help="at the initial lr (TrainOptions')", at_least=0,
                                                   resume="changeable"))
    epochs_decay: int = field(default=200, metadata=dict(help="then decaying linearly", at_least=0,
                                                         resume="changeable"))

    def __post_init__(self):  # a list, as a checkpoint may keep it
        self.nce_layers = tuple(self.nce_layers)


# FastCUT (Sec. 3.3) is CUT with these defaults: PatchNCE on X alone, weighed 10, and flip-equivariance (the
# appendix's training details), for 150 + 50 epochs (the official FastCUT preset, modify_commandline_options).
FASTCUT = dict(lambda_nce=10.0, nce_idt=False, flip_equivariance=True, epochs=150, epochs_decay=50)


class CUT:
    """G: X->Y (ResNet, anti-aliased), D (PatchGAN), H (PatchSampleMLP over G's encoder taps)."""
    groups = {"D": ("D",), "G": ("G", "H")}  # officially H has an Adam of its own, the same steps: Adam is per weight
    directions = {"x2y": "G"}  # CUT learns one direction only
    # The official CUT dataset stops the resize-and-crop jitter once the lr decays (load size = crop
    # size in those epochs); flips stay. Its loader (data/__init__.py) drops an epoch's last batch when it is short.
    resize_crop_in_decay, drop_last = False, True

    def __init__(self, config: CUTConfig | None = None):
        c = self.config = config or CUTConfig()
        if c.channels_x != c.channels_y:
            raise ValueError(f"CUT encodes G(x) with G's own encoder, so X and Y need the same number of channels "
                             f"(got {c.channels_x} and {c.channels_y}): give both domains the same --channels-x and "
                             f"--channels-y, or use --model cycle_gan --lambda-identity 0")
        self.G = define_G(c.netG, c.channels_x, c.channels_y, c.ngf, c.norm, c.dropout, c.antialias,
                          c.antialias_up)
        if not isinstance(self.G, ResnetGenerator):
            raise ValueError(f"CUT samples patches from the encoder taps of a ResNet generator; --netG {c.netG} "
                             f"has none: use --netG resnet_9blocks or resnet_6blocks")
        self.D = PatchDiscriminator(c.channels_y, c.ndf, c.n_layers_D, c.norm, c.antialias)
        self.H = PatchSampleMLP(self.G.tap_channels(c.nce_layers), c.netF_nc)  # built eagerly
        for net in (self.G, self.D, self.H):
            init_weights(net, "xavier", c.init_gain)
        self.gan_loss = GANLoss(c.gan_mode, c.real_label)
        self.nce_loss = PatchNCELoss(c.nce_temperature, c.nce_negatives)

    def flip_this_step(self) -> bool:
        return self.config.flip_equivariance and bool(torch.rand(()) < 0.5)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, trainer) -> dict[str, torch.Tensor]:
        """One step of Eq. 5 on x (B, C, H, W) from X and y (B, C, H, W) from Y, with `trainer` as in
        CycleGAN.train_step; each loss term as it enters the objective (G_gan + NCE_X (+ NCE_Y) is Eq. 5 as
        officially weighed). G(x)'s terms and CUT's identity term of G(y) are back-propagated each as soon as built,
        so one graph is in memory at a time; the official code runs G once on x and y together."""
        c, gan = self.config, self.gan_loss
        flipped = self.flip_this_step()
        nce_weight = 0.5 if c.nce_idt else 1.0  # the official code averages the X and Y terms
        with trainer.autocast():
            fake_y, keys = self.translate_with_keys(x, flipped)
            # 1. D tells real y from G(x) (Eq. 1); the official code halves D's loss.
            loss = {"D": 0.5 * (gan(self.D(fake_y.detach()), False) + gan(self.D(y), True))}
        trainer.backward(loss["D"], "D")
        trainer.step("D")

        # 2. G and H, with D fixed (the official set_requires_grad): the terms of G(x).
        with frozen(self.D), trainer.autocast():
            loss["G_gan"] = c.lambda_gan * gan(self.D(fake_y), True)  # Eq. 1: G fools D (weight: official)
            if c.lambda_nce > 0:  # Eq. 5's lambda_X term: G(x) keeps the patches of x (Eq. 3)
                loss["NCE_X"] = nce_weight * c.lambda_nce * self.patch_nce(keys, fake_y, flipped)
        trainer.backward(loss["G_gan"] + loss.get("NCE_X", 0), "G")
        if c.nce_idt and c.lambda_nce > 0:  # Eq. 5's lambda_Y term: G(y) keeps the patches of y
            with trainer.autocast():
                idt, keys = self.translate_with_keys(y, flipped)
                loss["NCE_Y"] = nce_weight * c.lambda_nce * self.patch_nce(keys, idt, flipped)
            trainer.backward(loss["NCE_Y"], "G")
        trainer.step("G")
        return loss

    def translate_with_keys(self, real: torch.Tensor, flipped: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """G(real) (B, C, H, W), of real mirrored when `flipped`, and the keys, real's features at the NCE taps: from
        the same pass of G unless flipped."""
        fake, keys = self.G(real.flip(3) if flipped else real, self.config.nce_layers)
        if flipped:
            with torch.no_grad():
                keys = self.G(real, self.config.nce_layers, encode_only=True)
        return fake, keys

    def patch_nce(self, keys: list[torch.Tensor], output: torch.Tensor, flipped: bool) -> torch.Tensor:
        """Eq. 3: multilayer PatchNCE between the input's features `keys` and G's encoding of `output` (B, C, H, W),
        at the same sampled places; averaged over the layers, as officially, where Eq. 3 sums."""
        queries = self.G(output, self.config.nce_layers, encode_only=True)
        if flipped:
            queries = [q.flip(3) for q in queries]
        with torch.no_grad():
            k, ids = self.H([f.detach() for f in keys], self.config.num_patches)
        q, _ = self.H(queries, self.config.num_patches, ids)
        return sum(self.nce_loss(qi, ki) for qi, ki in zip(q, k)) / len(q)

    @torch.no_grad()
    def similarity_maps(self, source: torch.Tensor, target: torch.Tensor, points, layer: int = -1) -> torch.Tensor:
        """The similarity PatchNCE learns (as the CUT paper shows it): for each query point of `source` (B, C, H, W),
        (row, col) fractions, the softmax over the patches of `target` (B, C, H, W) of similarity / tau at one tapped
        layer (the deepest): (B, Q, h, w), each map summing to 1. From G(x) to x: where an output patch finds its
        input patch."""
        c = self.config
        layer = layer % len(c.nce_layers)  # H's MLP for that tap
        tap = c.nce_layers[layer]
        feat_q, feat_k = (self.G(img, [tap], encode_only=True)[0] for img in (source, target))  # (B, C_l, h, w)
        h, w = feat_k.shape[-2:]
        ids = torch.tensor([min(int(r * h), h - 1) * w + min(int(col * w), w - 1) for r, col in points],
                           device=source.device)
        q = self.H.project(layer, feat_q, ids)  # (B, Q, nc): the queries
        k = self.H.project(layer, feat_k, torch.arange(h * w, device=target.device))  # (B, h*w, nc): every key
        logits = q @ k.transpose(1, 2) / c.nce_temperature  # (B, Q, h*w), as in Eq. 2
        return logits.softmax(-1).view(*q.shape[:2], h, w)

    @torch.no_grad()
    def verdicts(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        """D's verdict per patch, 1 real and 0 fake (GANLoss.verdict), on real images y (B, C, H, W) and on G(x):
        {"D": (y, G(x), its verdict on y, on G(x))}, each verdict (B, 1, h, w)."""
        fake = self.G(x)
        return {"D": (y, fake, self.gan_loss.verdict(self.D(y)), self.gan_loss.verdict(self.D(fake)))}

    @torch.no_grad()
    def visuals(self, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
        """Grid rows: x | G(x), and | y | G(y) when the identity term is on."""
        rows = [list(r) for r in zip(x, self.G(x))]
        if self.config.nce_idt:
            rows = [r + [yi, gy] for r, yi, gy in zip(rows, y, self.G(y))]
        return rows

    def visuals_caption(self) -> str:
        return "each row: a test image x, G(x)" + (", then a test image y and G(y), the identity path"
                                                   if self.config.nce_idt else "")
