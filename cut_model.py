"""CUT and FastCUT: Park, Efros, Zhang, Zhu, "Contrastive Learning for Unpaired Image-to-Image
Translation", ECCV 2020, arXiv 2007.15651. Mirrors models/cut_model.py of
taesungp/contrastive-unpaired-translation.

One generator G: X->Y, one discriminator D, and H, an MLP on patches of G's encoder features.
Objective (Eq. 5): L_GAN(G, D, X, Y) + lambda_X * L_PatchNCE(G, H, X) + lambda_Y * L_PatchNCE(G, H, Y)
    L_GAN (Eq. 1): least squares, as the paper's training details and the official --gan_mode lsgan train it
        (Eq. 1 is written as the log-likelihood), times lambda_GAN = 1 (the official --lambda_GAN: Eq. 5 puts
        no weight on L_GAN).
    L_PatchNCE (Eq. 3): at each tapped layer l, each sampled output patch of G(x) must pick out
        the input patch of x at the same place among the other patches of x (Eq. 2). The paper
        sums over places and layers; the official code averages over both (losses.PatchNCELoss).
    CUT: lambda_X = lambda_Y = 1 (Sec. 3.3); the Y term is the identity loss (G(y) against y) and
        the official code averages the two terms. FastCUT: lambda_X = 10, lambda_Y = 0 (Sec. 3.3),
        and flip-equivariance (the paper's appendix, training details): half the time G sees the
        input mirrored and its features are mirrored back before they are compared with the input's.
Official details kept: anti-aliased G and D (blur-pool down, blur up: two switches, as officially),
xavier init with gain 0.02, Adam lr 2e-4 with betas (0.5, 0.999) for G, D and H, 256 patches per
layer (also the appendix's), temperature 0.07; 200 + 200 epochs for CUT, 150 + 50 for FastCUT; each
step updates D first, then G and H together, with D fixed; in the lr-decay epochs the training images
are resized to the crop size, not cropped (flips stay).

This file is the paper only: the optimisation (Adam, the lr schedule, precision) is train_gan.py's `Trainer`,
handed to `train_step`.
"""
from dataclasses import dataclass

import torch

from layers import init_weights
from losses import GANLoss, PatchNCELoss
from networks import DEFAULT_TAPS, PatchDiscriminator, PatchSampleMLP, ResnetGenerator, define_G, frozen

# The official presets of each mode: FastCUT's from modify_commandline_options, schedule included; CUT's schedule,
# 200 + 200, is the official TrainOptions' default.
MODES = {"cut": dict(lambda_nce=1.0, nce_idt=True, flip_equivariance=False, epochs=200, epochs_decay=200),
         "fastcut": dict(lambda_nce=10.0, nce_idt=False, flip_equivariance=True, epochs=150, epochs_decay=50)}


@dataclass
class CUTConfig:
    mode: str = "cut"  # 'cut' or 'fastcut': sets the options left None (MODES)
    lambda_nce: float | None = None  # lambda_X of Eq. 5: CUT 1, FastCUT 10 (Sec. 3.3)
    nce_idt: bool | None = None  # the lambda_Y identity term: CUT yes, FastCUT no
    flip_equivariance: bool | None = None  # CUT no, FastCUT yes
    netG: str = "resnet_9blocks"
    ngf: int = 64
    ndf: int = 64
    n_layers_D: int = 3
    norm: str = "instance"
    dropout: bool = False
    antialias: bool = True  # blur-pool down-sampling in G and D (official --no_antialias turns it off)
    antialias_up: bool = True  # blur up-sampling in G (official --no_antialias_up turns it off)
    channels_x: int = 3
    channels_y: int = 3
    gan_mode: str = "lsgan"
    real_label: float = 1.0
    lambda_gan: float = 1.0  # the official --lambda_GAN: Eq. 5 has no weight on L_GAN
    nce_layers: tuple = DEFAULT_TAPS  # the appendix's layers; official indices 0, 4, 8, 12, 16 when antialiased
    num_patches: int = 256
    nce_temperature: float = 0.07
    nce_negatives: str = "image"  # internal negatives, the paper's; 'batch', 'others': see losses.PatchNCELoss
    netF_nc: int = 256  # H's output width
    lr: float = 2e-4
    beta1: float = 0.5
    epochs: int | None = None  # at the initial lr: CUT 200, FastCUT 150
    epochs_decay: int | None = None  # then linearly down to lr / (epochs_decay + 1): CUT 200, FastCUT 50
    init_gain: float = 0.02

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown CUT mode {self.mode!r}: use 'cut' or 'fastcut'")
        for key, value in MODES[self.mode].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.nce_layers = tuple(self.nce_layers)


class CUT:
    """G: X->Y (ResNet, anti-aliased), D (PatchGAN), H (PatchSampleMLP over G's encoder taps)."""
    groups = {"D": ("D",), "G": ("G", "H")}  # officially H has an Adam of its own, the same steps: Adam is per weight
    directions = {"x2y": "G"}  # CUT learns one direction only
    # The official CUT dataset stops the resize-and-crop jitter once the lr decays (load size = crop
    # size in those epochs); flips stay.
    resize_crop_in_decay = False

    def __init__(self, config: CUTConfig | None = None):
        c = self.config = config or CUTConfig()
        self.name = c.mode  # 'cut' or 'fastcut', as checkpoints and the CLI call it
        if c.channels_x != c.channels_y:
            raise ValueError(f"CUT encodes G(x) with G's own encoder, so X and Y need the same number of channels "
                             f"(got {c.channels_x} and {c.channels_y}): give both domains the same --input-nc and "
                             f"--output-nc, or use --model cycle_gan --lambda-identity 0")
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
        """One step of Eq. 5 on x (B, C, H, W) from X and y (B, C, H, W) from Y. Returns each loss term as
        it enters the objective: G_gan + NCE_X (+ NCE_Y) is Eq. 5 as the official code weighs it, D is D's.

        `trainer` optimises: autocast() sets the precision, backward(loss, group) adds gradients,
        step(group) takes an Adam step. D steps first, then G and H, as officially. G(x)'s terms
        and, for CUT, the identity term of G(y) are on separate graphs: each is back-propagated
        as soon as it is built, so one graph is in memory at a time and the gradients add up to
        those of the whole sum. (The official code runs G once on x and y together.)
        """
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
        """G(real) (B, C, H, W), of real mirrored when `flipped`, and the keys: real's features at the
        NCE taps. Unflipped, one pass of G gives both; flipped, the keys need a pass of their own."""
        fake, keys = self.G(real.flip(3) if flipped else real, self.config.nce_layers)
        if flipped:
            with torch.no_grad():
                keys = self.G(real, self.config.nce_layers, encode_only=True)
        return fake, keys

    def patch_nce(self, keys: list[torch.Tensor], output: torch.Tensor, flipped: bool) -> torch.Tensor:
        """Eq. 3: multilayer PatchNCE between the input's features `keys` and G's encoding of
        `output` (B, C, H, W), at the same sampled locations; averaged over the tapped layers, as
        officially, where Eq. 3 sums.

        Keys are detached inside the loss, so their projection needs no graph.
        """
        queries = self.G(output, self.config.nce_layers, encode_only=True)
        if flipped:
            queries = [q.flip(3) for q in queries]
        with torch.no_grad():
            k, ids = self.H([f.detach() for f in keys], self.config.num_patches)
        q, _ = self.H(queries, self.config.num_patches, ids)
        return sum(self.nce_loss(qi, ki) for qi, ki in zip(q, k)) / len(q)

    @torch.no_grad()
    def similarity_maps(self, source: torch.Tensor, target: torch.Tensor, points, layer: int = -1) -> torch.Tensor:
        """The learned similarity PatchNCE trains (the CUT paper's visualisation of it): for each query
        point of `source` (B, C, H, W), as (row, col) fractions of its height and width, the
        probability that each patch of `target` (B, C, H, W) is its positive: the softmax over all of
        target's patches of similarity / tau, at one tapped layer (default the deepest), through G's
        encoder and H. Returns (B, Q, h, w), each map summing to 1.

        With source = G(x) and target = x: where each output patch finds its input patch.
        """
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
        """What D decides, patch by patch, of real images y (B, C, H, W) and of translations G(x):
        {"D": (y, G(x), D's verdict on y, on G(x))}, each verdict (B, 1, h, w), one value per overlapping patch
        of the image (84x84 pixels with blur-pool, 30x30 of them at 256), 1 real and 0 fake (GANLoss.verdict)."""
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
