"""CycleGAN: Zhu, Park, Isola, Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial
Networks", ICCV 2017, arXiv 1703.10593. Mirrors models/cycle_gan_model.py of junyanz/pytorch-CycleGAN-and-pix2pix.

Names: the paper's G: X->Y is the official G_A, F: Y->X is G_B, D_Y is D_A and D_X is D_B.

Objective (Eq. 3), minimised by G and F, maximised by D_X and D_Y (Eq. 4):
    L = L_GAN(G, D_Y, X, Y) + L_GAN(F, D_X, Y, X) + lambda * L_cyc(G, F)
    L_GAN (Eq. 1): least squares, as Sec. 4 trains it (Eq. 1 is written as the log-likelihood)
    L_cyc (Eq. 2): ||F(G(x)) - x||_1 + ||G(F(y)) - y||_1, each a per-pixel mean, as both official codes
        (nn.L1Loss) take it, where Eq. 2's norm sums over the pixels
G and F also minimise Sec. 5.2's identity loss, ||G(y) - y||_1 + ||F(x) - x||_1, not part of Eq. 3, on by default
in junyanz's code. D's loss is halved (appendix 7.1); D_X and D_Y are held fixed while G and F step (junyanz's
code). CycleGANConfig gives each value and its source. This file is the paper only: train_gan.py's `Trainer`,
handed to `train_step`, optimises.
"""
from dataclasses import dataclass, field

import torch
from torch.nn.functional import l1_loss

from layers import NORMS, init_weights
from losses import GAN_MODES, GANLoss
from networks import GENERATORS, PatchDiscriminator, define_G, frozen


@dataclass
class CycleGANConfig:
    """CycleGAN's options, junyanz's defaults (not those of the CUT repository's copy: xavier init, blur-pool,
    200 + 200 epochs), each with its source: --model cycle_gan's flags."""
    lambda_cycle: float = field(default=10.0, metadata=dict(help="lambda of Eq. 3 (Sec. 4)", at_least=0))
    lambda_identity: float = field(default=0.5, metadata=dict(help="Sec. 5.2's loss, x lambda (appendix 7.1)",
                                                              at_least=0))
    pool_size: int = field(default=50, metadata=dict(help="fakes in D's history (Sec. 4)", at_least=0))
    gan_mode: str = field(default="lsgan", metadata=dict(help="least squares, as Sec. 4 trains", choices=GAN_MODES))
    real_label: float = field(default=1.0, metadata=dict(help="D's target for real images, at most 1 (< 1: label "
                                                         "smoothing)", above=0))
    netG: str = field(default="resnet_9blocks", metadata=dict(help="G and F: junyanz's; the paper's at 128: 6 blocks",
                                                              choices=GENERATORS))
    ngf: int = field(default=64, metadata=dict(help="G's first filters (appendix 7.2)", at_least=1))
    ndf: int = field(default=64, metadata=dict(help="D's first filters (appendix 7.2)", at_least=1))
    n_layers_D: int = field(default=3, metadata=dict(help="3: the 70x70 PatchGAN", at_least=1))
    norm: str = field(default="instance", metadata=dict(help="the norms (appendix 7.2)", choices=NORMS))
    dropout: bool = field(default=False, metadata=dict(help="in G's blocks (junyanz's: off)"))
    channels_x: int = field(default=3, metadata=dict(help="X's channels (the official --input_nc)", choices=(1, 3)))
    channels_y: int = field(default=3, metadata=dict(help="Y's channels (--output_nc)", choices=(1, 3)))
    init_gain: float = field(default=0.02, metadata=dict(help="the init's N(0, gain) (appendix 7.1)", above=0))
    lr: float = field(default=2e-4, metadata=dict(help="Adam's (Sec. 4)", above=0, resume="changeable"))
    beta1: float = field(default=0.5, metadata=dict(help="Adam's (junyanz's)"))
    epochs: int = field(default=100, metadata=dict(help="at the initial lr (Sec. 4)", at_least=0, resume="changeable"))
    epochs_decay: int = field(default=100, metadata=dict(help="then decaying linearly (Sec. 4), stepped as the CUT "
                                                         "repository does", at_least=0, resume="changeable"))


class ImagePool:
    """History of generated images (Sec. 4, after Shrivastava et al. 2017), so D does not forget old fakes:
    query(fakes) (B, C, H, W) -> (B, C, H, W). The paper keeps 50; how D draws is the official util/image_pool.py's:
    until the pool is full each fake is stored and returned, then swapped, with probability 1/2, for a stored one."""

    def __init__(self, size: int = 50):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        fakes = fakes.detach()
        if self.size == 0:
            return fakes
        if self.images and self.images[0].shape[1:] != fakes.shape[1:]:  # resumed at another crop: history anew
            self.images = []
        out = []
        for img in fakes.split(1):
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif torch.rand(()) < 0.5:
                i = int(torch.randint(self.size, ()))
                out.append(self.images[i])
                self.images[i] = img
            else:
                out.append(img)
        return torch.cat(out)


class CycleGAN:
    """G: X->Y and F: Y->X (generators), D_X and D_Y (PatchGAN discriminators)."""
    groups = {"G": ("G", "F"), "D": ("D_X", "D_Y")}  # one Adam per group, as junyanz's code
    directions = {"x2y": "G", "y2x": "F"}
    resize_crop_in_decay = True  # the random resize-and-crop jitter stays on for the whole run
    drop_last = False  # junyanz's loader (data/__init__.py) trains an epoch's last batch, however short

    def __init__(self, config: CycleGANConfig | None = None):
        c = self.config = config or CycleGANConfig()
        if c.lambda_identity > 0 and c.channels_x != c.channels_y:
            raise ValueError(f"the identity loss compares G(y) with y, which needs as many channels in X as in Y "
                             f"(got {c.channels_x} and {c.channels_y}): pass --lambda-identity 0")
        self.G = define_G(c.netG, c.channels_x, c.channels_y, c.ngf, c.norm, c.dropout)
        self.F = define_G(c.netG, c.channels_y, c.channels_x, c.ngf, c.norm, c.dropout)
        self.D_X = PatchDiscriminator(c.channels_x, c.ndf, c.n_layers_D, c.norm)
        self.D_Y = PatchDiscriminator(c.channels_y, c.ndf, c.n_layers_D, c.norm)
        for net in (self.G, self.F, self.D_X, self.D_Y):
            init_weights(net, "normal", c.init_gain)
        self.gan_loss = GANLoss(c.gan_mode, c.real_label)
        self.pool_X, self.pool_Y = ImagePool(c.pool_size), ImagePool(c.pool_size)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, trainer) -> dict[str, torch.Tensor]:
        """One step on x (B, C_x, H, W) from X and y (B, C_y, H, W) from Y; each loss term as it enters the objective
        (G's and F's sum to Eq. 3 plus the identity loss). `trainer` optimises: autocast() sets the precision,
        backward(loss, group) adds gradients, step(group) takes an Adam step. Eq. 4's min-max alternates, as
        junyanz's code does: G and F step with D_X and D_Y fixed, then D_X and D_Y step."""
        # 1. G and F minimise Eq. 3 and the identity loss, with D_X and D_Y fixed (the official set_requires_grad).
        # The terms from x and those from y have separate graphs: each half is back-propagated as soon as it is
        # built, so one half's graph is in memory at a time, and the gradients add up to those of the whole sum.
        with frozen(self.D_X, self.D_Y):
            terms_x, fake_y = self.generator_half(x, translate=self.G, back=self.F, judge=self.D_Y, trainer=trainer)
            terms_y, fake_x = self.generator_half(y, translate=self.F, back=self.G, judge=self.D_X, trainer=trainer)
            trainer.step("G")
        loss = {**dict(zip(("G_gan", "cycle_X", "idt_X"), terms_x)),
                **dict(zip(("F_gan", "cycle_Y", "idt_Y"), terms_y))}

        # 2. D_Y, then D_X, maximise Eq. 1: real images against (pooled) fakes; D's loss halved (appendix 7.1).
        for name, D, real, fake, pool in (("D_Y", self.D_Y, y, fake_y, self.pool_Y),
                                          ("D_X", self.D_X, x, fake_x, self.pool_X)):
            with trainer.autocast():
                loss[name] = 0.5 * (self.gan_loss(D(real), True) + self.gan_loss(D(pool.query(fake)), False))
            trainer.backward(loss[name], "D")
        trainer.step("D")
        return loss

    def generator_half(self, real: torch.Tensor, translate, back, judge,
                       trainer) -> tuple[list[torch.Tensor], torch.Tensor]:
        """G's and F's terms that start from `real`, back-propagated: from x, `translate` is G, `back` F and `judge`
        D_Y; from y, F, G and D_X. Returns [GAN, cycle, (identity)] and translate(real) (B, C, H, W), detached."""
        c = self.config
        with trainer.autocast():
            fake = translate(real)
            terms = [self.gan_loss(judge(fake), True),  # Eq. 1: G(x) fools D_Y; from y, F(y) fools D_X
                     c.lambda_cycle * l1_loss(back(fake), real)]  # Eq. 2: F(G(x)) ~ x; from y, G(F(y)) ~ y
            if c.lambda_identity > 0:  # Sec. 5.2: a generator leaves its own output domain alone: F(x) ~ x, G(y) ~ y
                terms.append(c.lambda_cycle * c.lambda_identity * l1_loss(back(real), real))
        trainer.backward(sum(terms), "G")
        return terms, fake.detach()

    @torch.no_grad()
    def verdicts(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        """Each D's verdict per patch, 1 real and 0 fake (GANLoss.verdict), on real images of its domain and on
        translations into it: {"D_Y": (y, G(x), D_Y(y), D_Y(G(x))), "D_X": (x, F(y), D_X(x), D_X(F(y)))}."""
        verdict = self.gan_loss.verdict
        return {name: (real, fake, verdict(D(real)), verdict(D(fake)))
                for name, D, real, fake in (("D_Y", self.D_Y, y, self.G(x)), ("D_X", self.D_X, x, self.F(y)))}

    @torch.no_grad()
    def visuals(self, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
        """Grid rows: x | G(x) | F(G(x)) for each x, then y | F(y) | G(F(y)) for each y."""
        fake_y, fake_x = self.G(x), self.F(y)
        return [list(r) for r in zip(x, fake_y, self.F(fake_y))] + [list(r) for r in zip(y, fake_x, self.G(fake_x))]

    def visuals_caption(self) -> str:
        return "rows of a test image x: x, G(x), F(G(x)); then rows of a test image y: y, F(y), G(F(y))"

    def extra_state(self) -> dict:
        """The image pools, for an exact resume."""
        return {"pool_X": [t.cpu() for t in self.pool_X.images], "pool_Y": [t.cpu() for t in self.pool_Y.images]}

    def load_extra_state(self, state: dict, device: torch.device) -> None:
        self.pool_X.images = [t.to(device) for t in state["pool_X"]]
        self.pool_Y.images = [t.to(device) for t in state["pool_Y"]]
