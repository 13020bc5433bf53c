"""CycleGAN: Zhu, Park, Isola, Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", ICCV 2017, arXiv 1703.10593. Mirrors models/cycle_gan_model.py of
junyanz/pytorch-CycleGAN-and-pix2pix.

Names: the paper's G: X->Y is the official G_A, F: Y->X is G_B, D_Y is D_A and D_X is D_B.

Objective (Eq. 3), minimised by G and F, maximised by D_X and D_Y:
    L = L_GAN(G, D_Y, X, Y) + L_GAN(F, D_X, Y, X) + lambda * L_cyc(G, F)
    L_GAN (Eq. 1): least squares, as the official code does (more stable than log-likelihood)
    L_cyc (Eq. 2): ||F(G(x)) - x||_1 + ||G(F(y)) - y||_1, lambda = 10
    + the identity loss of Sec. 5.2, ||G(y) - y||_1 + ||F(x) - x||_1, weighted 0.5 * lambda.
Official details kept: D's loss is halved, D sees a 50-image history of fakes, Adam lr 2e-4 with
betas (0.5, 0.999), lr constant for `epochs` then linear to 0 over `epochs_decay`, N(0, 0.02) init.

This file also holds what CUT (cut_model.py) shares: `TranslationModel`, the training plumbing.
"""
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.functional import l1_loss

from layers import init_weights
from losses import GANLoss
from networks import PatchDiscriminator, define_G


@contextmanager
def local_grads(*nets: nn.Module):
    """Under DDP, gradients reaching `nets` inside the block stay on this rank: no all-reduce.
    A later backward outside the block all-reduces what has been summed by then."""
    with ExitStack() as stack:
        for net in nets:
            inner = getattr(net, "_orig_mod", net)  # under torch.compile
            if isinstance(inner, DistributedDataParallel):
                stack.enter_context(inner.no_sync())
        yield


@contextmanager
def frozen(*nets: nn.Module):
    """Freeze the parameters of `nets` (D stays fixed while G steps). Under DDP they also skip
    the gradient all-reduce, since they get no gradients that step."""
    with local_grads(*nets):
        for net in nets:
            net.requires_grad_(False)
        try:
            yield
        finally:
            for net in nets:
                net.requires_grad_(True)


def lr_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """The official 'linear' policy: 1 for the first `epochs`, then down by 1/(epochs_decay+1) per epoch."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def adam(params: list[nn.Parameter], config) -> torch.optim.Adam:
    """Adam with the official lr and betas (beta1, 0.999), as one fused kernel where this torch has
    one for the device (CUDA; CPU since torch 2.4): the same update, 3x faster than the per-tensor
    loop on a CPU, without the multi-tensor version's temporary copy of every parameter."""
    try:
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, 0.999), fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, 0.999))


class StepLosses(Mapping):
    """What a training step returns: loss name -> float.

    The floats are read from the device on first access, all with one copy; on a GPU that waits
    for the step to finish. `tensors` holds the same losses as 0-dim device tensors, which the
    training loop sums and reads only every --log-every steps, so the GPU never waits between steps.
    """

    def __init__(self, losses: dict[str, torch.Tensor]):
        self.tensors = {k: v.detach() for k, v in losses.items()}
        self._floats: dict[str, float] | None = None

    def __getitem__(self, name: str) -> float:
        if self._floats is None:
            values = torch.stack([v.float() for v in self.tensors.values()]).tolist()
            self._floats = dict(zip(self.tensors, values))
        return self._floats[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class TranslationModel:
    """Networks, Adam optimisers, the lr schedule and precision, with state for an exact resume.

    A subclass builds its networks and calls `setup`; then `self.nets[name]` is the plain
    module and `self.<name>` what the step calls (the same module, or it wrapped for DDP or
    torch.compile). It writes `train_step(x, y) -> StepLosses`, `generators()` and `visuals(x, y)`.
    """
    name = ""

    def __init__(self, config, device: torch.device | str = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.config, self.device, self.precision = config, torch.device(device), precision
        self.epoch = 0  # epochs finished
        self.step = 0  # optimisation steps taken in all

    def setup(self, nets: dict[str, nn.Module], init: str, groups: dict[str, tuple[str, ...]]) -> None:
        """Initialise (`normal` or `xavier`) and place `nets`; one Adam per group of nets."""
        self.nets = nets
        for name, net in nets.items():
            setattr(self, name, init_weights(net, init, self.config.init_gain).to(self.device))
        self.optimizers = {group: adam([p for n in members for p in nets[n].parameters()], self.config)
                           for group, members in groups.items()}
        # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not.
        self.scalers = {group: torch.amp.GradScaler(self.device.type) for group in groups} \
            if self.precision == "fp16" else {}

    def wrap(self, fn) -> None:
        """Replace what the step calls by fn(module), e.g. a DDP wrapper or torch.compile."""
        for name in self.nets:
            setattr(self, name, fn(getattr(self, name)))

    def backward(self, loss: torch.Tensor, group: str) -> None:
        """Back-propagate `loss` into the gradients of `group`; several calls add up (fp16: scaled)."""
        (self.scalers[group].scale(loss) if group in self.scalers else loss).backward()

    def step_optimizer(self, group: str) -> None:
        """One gradient step of the optimiser of `group` on the gradients summed so far.

        The gradients are freed right after the step, not before the next backward: kept, they
        would sit in memory through the next step's forward passes (91 MB for CycleGAN's G and F).
        """
        optimizer = self.optimizers[group]
        if group in self.scalers:
            self.scalers[group].step(optimizer)
            self.scalers[group].update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def update(self, loss: torch.Tensor, group: str) -> None:
        """One gradient step of the optimiser of `group` on `loss`."""
        self.backward(loss, group)
        self.step_optimizer(group)

    def autocast(self):
        """Mixed-precision context for forward passes and losses (fp32: none)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype) if dtype else nullcontext()

    def end_epoch(self) -> None:
        """Count a finished epoch and set the lr of the next one."""
        self.epoch += 1
        factor = lr_factor(self.epoch, self.config.epochs, self.config.epochs_decay)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = self.config.lr * factor

    def generators(self) -> dict[str, str]:
        """direction ('x2y', 'y2x') -> the name of the generator that translates that way."""
        raise NotImplementedError

    @torch.no_grad()
    def translate(self, images: torch.Tensor, direction: str = "x2y") -> torch.Tensor:
        """Translate (B, C, H, W) images one way, in eval mode, without gradients."""
        names = self.generators()
        if direction not in names:
            raise ValueError(f"a {self.name} model translates {' and '.join(names)} only, not {direction}")
        net = self.nets[names[direction]]
        net.eval()
        out = net(images.to(self.device))
        net.train()
        return out

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """Everything a resume needs: config, networks, optimisers, counters, model extras."""
        return {"model": self.name, "config": asdict(self.config), "epoch": self.epoch, "step": self.step,
                "nets": {k: v.state_dict() for k, v in self.nets.items()},
                "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
                "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        for k, net in self.nets.items():
            net.load_state_dict(state["nets"][k])
        for k, opt in self.optimizers.items():
            kernel = {key: opt.defaults[key] for key in ("fused", "foreach")}
            opt.load_state_dict(state["optimizers"][k])
            for group in opt.param_groups:  # a checkpoint carries its machine's Adam kernel: use this one's
                group.update(kernel)
        self.epoch, self.step = state["epoch"], state["step"]
        self.load_extra_state(state["extra"])


class ImagePool:
    """History of generated images (Shrivastava et al. 2017), so D does not forget old fakes.

    query(fakes): (B, C, H, W) -> (B, C, H, W). Until the pool is full each fake is stored and
    returned; then each fake is, with probability 1/2, swapped for a random stored one.
    """

    def __init__(self, size: int = 50):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        fakes = fakes.detach()
        if self.size == 0:
            return fakes
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


@dataclass
class CycleGANConfig:
    netG: str = "resnet_9blocks"  # the paper: 6 blocks at 128x128, 9 at 256x256
    ngf: int = 64
    ndf: int = 64
    n_layers_D: int = 3
    norm: str = "instance"
    dropout: bool = False
    channels_x: int = 3
    channels_y: int = 3
    gan_mode: str = "lsgan"  # the official default; Eq. 1 is the log-likelihood ('vanilla')
    real_label: float = 1.0  # < 1 for one-sided label smoothing
    lambda_cycle: float = 10.0  # lambda of Eq. 3, both directions
    lambda_identity: float = 0.5  # identity loss weight, as a fraction of lambda_cycle
    pool_size: int = 50
    lr: float = 2e-4
    beta1: float = 0.5
    epochs: int = 100  # at the initial lr
    epochs_decay: int = 100  # then linearly to 0
    init_gain: float = 0.02


class CycleGAN(TranslationModel):
    """G: X->Y, F: Y->X (generators), D_X, D_Y (PatchGAN discriminators)."""
    name = "cycle_gan"

    def __init__(self, config: CycleGANConfig | None = None, device="cpu", precision: str = "fp32"):
        super().__init__(config or CycleGANConfig(), device, precision)
        c = self.config
        if c.lambda_identity > 0 and c.channels_x != c.channels_y:
            raise ValueError(f"the identity loss compares G(y) with y, which needs as many channels in X as in Y "
                             f"(got {c.channels_x} and {c.channels_y}): pass --lambda-identity 0")
        self.setup({"G": define_G(c.netG, c.channels_x, c.channels_y, c.ngf, c.norm, c.dropout),
                    "F": define_G(c.netG, c.channels_y, c.channels_x, c.ngf, c.norm, c.dropout),
                    "D_X": PatchDiscriminator(c.channels_x, c.ndf, c.n_layers_D, c.norm),
                    "D_Y": PatchDiscriminator(c.channels_y, c.ndf, c.n_layers_D, c.norm)},
                   init="normal", groups={"G": ("G", "F"), "D": ("D_X", "D_Y")})
        self.gan_loss = GANLoss(c.gan_mode, c.real_label)
        self.pool_X, self.pool_Y = ImagePool(c.pool_size), ImagePool(c.pool_size)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepLosses:
        """One step of Eq. 3 on a batch x (B, C_x, H, W) from X and y (B, C_y, H, W) from Y.

        The min-max of Eq. 4 is solved by alternating: a step of G and F, then one of D_X and D_Y.
        """
        gan = self.gan_loss
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

        # 1. G and F: minimise Eq. 3 with D_X, D_Y fixed. Its terms fall into two parts with separate
        # graphs, those that start from x and those that start from y. Each part is back-propagated
        # as soon as it is built, so one part's graph is in memory at a time; the gradients add up
        # to those of the whole sum. Under DDP the second backward all-reduces the sum.
        with frozen(self.D_X, self.D_Y):
            with local_grads(self.G, self.F):
                loss, fake_y = self.cycle_part(x, "X", "G", "F", "D_Y")
            loss_y, fake_x = self.cycle_part(y, "Y", "F", "G", "D_X")
            self.step_optimizer("G")
        loss.update(loss_y)

        # 2. D_Y, then D_X: maximise Eq. 1, telling real from (pooled) fake; the official code halves D's loss.
        for name, real, fake, pool in (("D_Y", y, fake_y, self.pool_Y), ("D_X", x, fake_x, self.pool_X)):
            D = getattr(self, name)
            with self.autocast():
                loss[name] = 0.5 * (gan(D(real), True) + gan(D(pool.query(fake)), False))
            self.backward(loss[name], "D")
        self.step_optimizer("D")
        self.step += 1
        return StepLosses(loss)

    def cycle_part(self, real: torch.Tensor, domain: str, to: str, back: str, D: str):
        """The terms of Eq. 3 that start from `real` images of `domain` (X for x, Y for y), and their
        backward pass into `to` and `back` (G and F, or F and G). Returns them and to(real), detached.

        For x: D_Y(G(x)) ~ real (Eq. 1), F(G(x)) ~ x (Eq. 2), and F(x) ~ x (identity, Sec. 5.2).
        """
        c = self.config
        to_net, back_net = getattr(self, to), getattr(self, back)
        with self.autocast():
            fake = to_net(real)
            loss = {f"{to}_gan": self.gan_loss(getattr(self, D)(fake), True),  # Eq. 1: `to` fools D (G, D_Y for x)
                    f"cycle_{domain}": c.lambda_cycle * l1_loss(back_net(fake), real)}  # Eq. 2
            if c.lambda_identity > 0:  # Sec. 5.2: F leaves real X images alone (G real Y images)
                loss[f"idt_{domain}"] = c.lambda_cycle * c.lambda_identity * l1_loss(back_net(real), real)
        self.backward(sum(loss.values()), "G")
        return loss, fake.detach()

    def generators(self) -> dict[str, str]:
        return {"x2y": "G", "y2x": "F"}

    def visuals(self, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
        """Grid rows: x | G(x) | F(G(x)) for each x, then y | F(y) | G(F(y)) for each y."""
        fake_y, fake_x = self.translate(x, "x2y"), self.translate(y, "y2x")
        rec_x, rec_y = self.translate(fake_y, "y2x"), self.translate(fake_x, "x2y")
        return [list(r) for r in zip(x, fake_y.cpu(), rec_x.cpu())] + \
               [list(r) for r in zip(y, fake_x.cpu(), rec_y.cpu())]

    def extra_state(self) -> dict:
        return {"pool_X": [t.cpu() for t in self.pool_X.images], "pool_Y": [t.cpu() for t in self.pool_Y.images]}

    def load_extra_state(self, state: dict) -> None:
        self.pool_X.images = [t.to(self.device) for t in state["pool_X"]]
        self.pool_Y.images = [t.to(self.device) for t in state["pool_Y"]]
