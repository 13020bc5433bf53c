"""The one command: train CycleGAN / CUT / FastCUT, translate a folder, compare runs, or download a dataset.

    python train_gan.py                                  # bundled apples -> oranges, any device
    python train_gan.py --dataroot data/horse2zebra --name h2z --crop-size 256
    python train_gan.py --resume --name h2z              # continue exactly where it stopped
    python train_gan.py translate --checkpoint output/h2z/latest.pt --input photos --output out
    python train_gan.py compare --checkpoints output/h2z/latest.pt output/h2z_cut/latest.pt \
        --input data/horse2zebra/testA --output h2z.jpg          # the same test images, one row each
    python train_gan.py download horse2zebra
    python train_gan.py download --pretrained horse2zebra    # an official CycleGAN generator, then translate

Each epoch writes to output/NAME/: epoch_NNN.png (a grid of fixed test images), for CUT and FastCUT
nce_epoch_NNN.png (where G(x)'s patches find their input patches), losses.csv, losses.png and
latest.pt (everything needed to resume), plus epoch_NNN.pt every --save-every epochs.
"""
import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch loads ends quietly too, as one at any later moment
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import dataclasses
import fcntl
import json
import math
import os
import random
import resource
import shutil
import statistics
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cut_model import CUT, CUTConfig
from cycle_gan import CycleGAN, CycleGANConfig
from data_utility import (DataError, PairSampler, UnpairedDataset, append_losses, download, download_pretrained,
                          find_domains, fit_within, list_images, load_image, load_fixed_images, plot_losses, save_image,
                          save_image_grid, save_similarity_grid, to_image, to_tensor, write_atomically)
from networks import GENERATORS, official_generator, size_multiple

BUNDLED = Path(__file__).resolve().parent / "data" / "apple2orange_small"
MODELS = {"cycle_gan": (CycleGAN, CycleGANConfig), "cut": (CUT, CUTConfig), "fastcut": (CUT, CUTConfig)}
# Defaults per model, the official ones; any flag given on the command line wins.
PRESETS = {
    "cycle_gan": dict(netG="resnet_9blocks", epochs=100, epochs_decay=100),
    "cut": dict(netG="resnet_9blocks", epochs=200, epochs_decay=200),
    "fastcut": dict(netG="resnet_9blocks", epochs=150, epochs_decay=50),
}
# Without a GPU the official 256x256 setting takes weeks; this shows results within minutes
# (a FastCUT epoch of 150 steps takes about 4 minutes on 2 cores). Crop 128 with 6 residual
# blocks is the CycleGAN paper's own setting for 128x128 images.
CPU_PRESET = dict(crop_size=128, load_size=143, max_steps=150, netG="resnet_6blocks")
GPU_PRESET = dict(crop_size=256, load_size=286, max_steps=None)


def lr_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """The official 'linear' policy: 1 for the first `epochs`, then down by 1/(epochs_decay+1) per epoch,
    so the last epoch trains at lr / (epochs_decay + 1), not at 0."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def adam(params: list[torch.nn.Parameter], config) -> torch.optim.Adam:
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


class Trainer:
    """Everything of training that is not the paper: a model's networks on the device, one Adam per
    group of networks (`model.groups`), the lr schedule, precision and loss scaling, DDP and
    torch.compile wrappers, and the state for an exact resume.

    The model's `train_step(x, y, trainer)` calls back `autocast()`, `backward(loss, group)` and
    `step(group)`. `nets` holds the plain modules; the model's attributes may be wrapped (`wrap`).
    """

    def __init__(self, model, device: torch.device | str = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.model, self.device, self.precision = model, torch.device(device), precision
        self.nets = {name: getattr(model, name).to(self.device)
                     for members in model.groups.values() for name in members}
        self.optimizers = {group: adam([p for n in members for p in self.nets[n].parameters()], model.config)
                           for group, members in model.groups.items()}
        # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not.
        self.scalers = {group: torch.amp.GradScaler(self.device.type) for group in model.groups} \
            if precision == "fp16" else {}
        self.epoch = 0  # epochs finished
        self.global_step = 0  # optimisation steps taken in all

    def autocast(self):
        """Mixed-precision context for forward passes and losses (fp32: none)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype) if dtype else nullcontext()

    def backward(self, loss: torch.Tensor, group: str) -> None:
        """Back-propagate `loss` into the gradients of `group`; several calls add up (fp16: scaled)."""
        (self.scalers[group].scale(loss) if group in self.scalers else loss).backward()

    def step(self, group: str) -> None:
        """One Adam step of `group` on the gradients summed so far.

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

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepLosses:
        """One step of the model's objective on a batch x (B, C_x, H, W) and y (B, C_y, H, W)."""
        losses = self.model.train_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                                       self)
        self.global_step += 1
        return StepLosses(losses)

    def wrap(self, fn) -> None:
        """Replace the networks the step calls by fn(network), e.g. a DDP wrapper or torch.compile."""
        for name in self.nets:
            setattr(self.model, name, fn(getattr(self.model, name)))

    @contextmanager
    def evaluating(self):
        """The model with its plain networks (not their DDP or compiled wrappers), in eval mode and
        without gradients: for the grids and CUT's similarity maps, which rank 0 alone draws."""
        wrapped = {name: getattr(self.model, name) for name in self.nets}
        for name, net in self.nets.items():
            setattr(self.model, name, net.eval())
        try:
            with torch.no_grad():
                yield self.model
        finally:
            for name, net in wrapped.items():
                setattr(self.model, name, net.train())

    def translator(self, direction: str = "x2y") -> "Translator":
        """The generator that translates `direction` ('x2y' or 'y2x'), ready for images of any size."""
        names, c = self.model.directions, self.model.config
        if direction not in names:
            raise ValueError(f"a {self.model.name} model translates {' and '.join(names)} only, not {direction}")
        return Translator(self.nets[names[direction]], c.channels_x if direction == "x2y" else c.channels_y,
                          self.device)

    def visuals(self, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
        """The model's grid rows for fixed images x and y (B, C, H, W)."""
        with self.evaluating() as model:
            return model.visuals(x.to(self.device), y.to(self.device))

    def end_epoch(self) -> None:
        """Count a finished epoch and set the lr of the next one."""
        self.epoch += 1
        config = self.model.config
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_factor(self.epoch, config.epochs, config.epochs_decay)

    def state_dict(self) -> dict:
        """Everything a resume needs: model name and config, networks, optimisers, counters, model extras."""
        extra = getattr(self.model, "extra_state", dict)()
        return {"model": self.model.name, "config": dataclasses.asdict(self.model.config), "epoch": self.epoch,
                "step": self.global_step, "nets": {k: v.state_dict() for k, v in self.nets.items()},
                "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()}, "extra": extra}

    def load_state_dict(self, state: dict) -> None:
        for k, net in self.nets.items():
            net.load_state_dict(state["nets"][k])
        for k, opt in self.optimizers.items():
            kernel = {key: opt.defaults[key] for key in ("fused", "foreach")}
            opt.load_state_dict(state["optimizers"][k])
            for group in opt.param_groups:  # a checkpoint carries its machine's Adam kernel: use this one's
                group.update(kernel)
        self.epoch, self.global_step = state["epoch"], state["step"]
        if state["extra"]:
            self.model.load_extra_state(state["extra"], self.device)


class Translator:
    """A generator that translates (B, C, H, W) images in [-1, 1] of any size, in eval mode and without
    gradients: the sides are reflect-padded to the generator's multiple and the result cropped back."""

    def __init__(self, net: torch.nn.Module, channels: int, device: torch.device):
        self.net, self.channels, self.device = net.to(device), channels, device  # channels: of the input

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        training = self.net.training
        self.net.eval()
        y = self.net(pad_to_multiple(x.to(self.device), self.net.side_multiple))
        self.net.train(training)
        return y[..., :x.shape[-2], :x.shape[-1]].cpu()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: X)' only where there is a fixed default (presets fill the others)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class UsageError(Exception):
    """A bad option or file: the CLI prints the message and exits with code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line ('error: ... (see --help)'), not the whole usage."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


class RunError(Exception):
    """The command cannot go on (a loss diverged, a write failed, memory ran out): one line, exit 1."""


def train_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The train options; with defaults=False, parsing yields only the options given."""
    p = Parser(prog="train_gan.py", formatter_class=HelpFormatter,
               description="Train CycleGAN, CUT or FastCUT on unpaired images. Other commands: "
                           "'translate' (run a checkpoint on a folder), 'download' (get a dataset).")

    def a(*names, **kw):
        p.add_argument(*names, **kw if defaults else {**kw, "default": argparse.SUPPRESS})
    a("--model", choices=tuple(MODELS), default="fastcut",
      help="what to train; fastcut, the default, shows apples turning orange soonest on a CPU")
    a("--dataroot", type=Path, default=BUNDLED,
      help="dataset folder with trainA/ trainB/ [testA/ testB/] or x_train/ y_train/ [x_test/ y_test/]")
    a("--name", help="run name: outputs go to OUTPUT_DIR/NAME (default: MODEL_DATASET)")
    a("--output-dir", type=Path, default=Path("output"), help="where runs are written")
    a("--resume", action="store_true", help="continue the run OUTPUT_DIR/NAME from its latest.pt")
    a("--direction", choices=("AtoB", "BtoA"), default="AtoB", help="BtoA swaps the domains X and Y")
    a("--epochs", type=int, help="epochs at the initial lr (official: 100 cycle_gan, 200 cut, 150 fastcut)")
    a("--epochs-decay", type=int, help="epochs of linear lr decay to 0 (official: 100, 200, 50)")
    a("--max-steps", type=int, help="cap on steps per epoch (CPU default 150; GPU default: whole epoch)")
    a("--batch-size", type=int, default=1, help="images per domain per step (the papers use 1)")
    a("--lr", type=float, default=2e-4, help="Adam learning rate")
    a("--load-size", type=int, help="images are resized to this square size ... (GPU 286, CPU 143)")
    a("--crop-size", type=int, help="... then randomly cropped to this size (GPU 256, CPU 128)")
    a("--input-nc", type=int, choices=(1, 3), default=3, help="channels of domain X images (1 = grayscale)")
    a("--output-nc", type=int, choices=(1, 3), default=3, help="channels of domain Y images")
    a("--netG", choices=GENERATORS, help="generator (GPU default resnet_9blocks, CPU resnet_6blocks)")
    a("--ngf", type=int, default=64, help="filters of the generator's first layer")
    a("--ndf", type=int, default=64, help="filters of the discriminator's first layer")
    a("--norm", choices=("instance", "batch", "none"), default="instance", help="normalisation layers")
    a("--gan-mode", choices=("lsgan", "vanilla", "nonsaturating"), default="lsgan",
      help="adversarial loss: least squares (official), log-likelihood (the papers' Eq. 1), or softplus")
    a("--lambda-cycle", type=float, default=10.0, help="CycleGAN: weight of the cycle loss, each way")
    a("--lambda-identity", type=float, default=0.5, help="CycleGAN: identity loss weight, x lambda-cycle")
    a("--pool-size", type=int, default=50, help="CycleGAN: history of fakes shown to D (0 = none)")
    a("--lambda-gan", type=float, default=1.0, help="CUT: weight of the adversarial loss")
    a("--lambda-nce", type=float, help="CUT: weight of PatchNCE (cut 1, fastcut 10)")
    a("--nce-idt", action=argparse.BooleanOptionalAction, help="CUT: add the identity PatchNCE term on Y "
                                                                "(cut on, fastcut off)")
    a("--flip-equivariance", action=argparse.BooleanOptionalAction,
      help="CUT: mirror G's input half the time (cut off, fastcut on)")
    a("--nce-layers", type=parse_taps, help="CUT: encoder taps, by name or official index (default: the "
                                            "paper's layers input,down1,down2,res1,res5, official 0,4,8,12,16; "
                                            "with --no-antialias the names keep those layers, while the "
                                            "official indices would name others)")
    a("--num-patches", type=int, default=256, help="CUT: patches sampled per layer")
    a("--nce-temperature", type=float, default=0.07, help="CUT: temperature tau of Eq. 2")
    a("--nce-map", action=argparse.BooleanOptionalAction, default=True,
      help="CUT: write nce_epoch_NNN.png each epoch, where G(x)'s patches find their input patches")
    a("--antialias", action=argparse.BooleanOptionalAction,
      help="CUT: blur-pool down/up-sampling in G and D (default on, as officially)")
    a("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    a("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda, then mps, then cpu")
    a("--workers", type=int, default=2, help="data-loading processes (0 = load in the main process)")
    a("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
      help="autocast precision of the forward passes (fp16 adds loss scaling); fp32 is the official math")
    a("--compile", action="store_true", help="torch.compile the networks (slow first steps, faster later)")
    a("--benchmark", type=int, metavar="N", help="time N training steps after 3 warm-up ones, print one "
                                                "JSON line and write nothing")
    a("--log-every", type=int, default=10, help="steps averaged into each row of losses.csv")
    a("--save-every", type=int, default=10, help="also keep epoch_NNN.pt every this many epochs (0 = never)")
    return p


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    """The train options, with `given`: the names of those set on the command line."""
    args = train_parser().parse_args(argv)
    args.given = set(vars(train_parser(defaults=False).parse_args(argv)))
    return args


def parse_taps(text: str) -> tuple:
    """'0,4,8,12,16' or 'input,down1,res1' -> a tuple of indices / names."""
    return tuple(int(t) if t.strip().isdigit() else t.strip() for t in text.split(",") if t.strip())


def translate_parser(compare: bool = False) -> argparse.ArgumentParser:
    """The options of `translate` (a folder at full size) or `compare` (several checkpoints in one grid)."""
    if compare:
        p = Parser(prog="train_gan.py compare",
                   description="Translate the first --count images of a folder with each checkpoint and write "
                               "one grid, a row per image: the input, then each checkpoint's result.")
        p.add_argument("--checkpoints", type=Path, nargs="+", required=True, help="latest.pt files of the runs")
        p.add_argument("--output", type=Path, required=True, help="the grid image, .png or .jpg")
        p.add_argument("--count", type=int, default=6, help="images, the first ones of --input by name")
        p.add_argument("--size", type=int, default=128, help="images are resized to size x size")
    else:
        p = Parser(prog="train_gan.py translate",
                   description="Translate every image of a folder at its own size; "
                               "PNGs with the same names are written to --output.")
        p.add_argument("--checkpoint", type=Path, required=True, help="a latest.pt or epoch_NNN.pt of a run")
        p.add_argument("--output", type=Path, required=True, help="folder for the results (not the input folder)")
        p.add_argument("--max-side", type=int, help="scale each image down so its longer side is at most this "
                                                    "(aspect ratio kept) before translating; default: full size")
    p.add_argument("--input", type=Path, required=True, help="folder of images to translate")
    p.add_argument("--direction", choices=("x2y", "y2x"), default="x2y", help="y2x needs a CycleGAN checkpoint")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name} is not available on this machine: use --device auto or cpu")
    return torch.device(name)


def apply_presets(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Fill the options left unset from the model's and the device's presets; return what was filled."""
    filled = []
    for key, value in {**PRESETS[args.model], **(GPU_PRESET if device.type != "cpu" else CPU_PRESET)}.items():
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)
            filled.append(f"{key}={value}")
    return filled


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX), where bf16 is the fast option."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def validate(args: argparse.Namespace, device: torch.device) -> None:
    """Reject impossible options before any work starts; warn of a slow one."""
    def need(ok: bool, message: str):
        if not ok:
            raise UsageError(message)
    for flag in ("batch_size", "epochs_decay", "ngf", "ndf", "log_every"):
        need(getattr(args, flag) >= (0 if flag == "epochs_decay" else 1),
             f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    need(args.epochs >= 0, f"--epochs must be >= 0, got {args.epochs}")
    need(args.benchmark is None or args.benchmark >= 1, f"--benchmark must be >= 1, got {args.benchmark}")
    need(args.max_steps is None or args.max_steps >= 1, f"--max-steps must be >= 1, got {args.max_steps}")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(args.num_patches >= 1 and args.nce_temperature > 0, "--num-patches must be >= 1 and --nce-temperature > 0")
    need(args.workers >= 0 and args.pool_size >= 0 and args.save_every >= 0,
         "--workers, --pool-size and --save-every must be >= 0")
    for flag in ("lambda_cycle", "lambda_identity", "lambda_gan", "lambda_nce"):
        need((getattr(args, flag) or 0) >= 0, f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    need(args.precision != "fp16" or device.type == "cuda",
         f"--precision fp16 is for CUDA GPUs (on {device.type} G's gradients come out NaN, so G never learns): "
         f"use fp32, or bf16")
    if args.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 autocast runs far slower "
                      "than fp32 here (about 40x on an AVX2 CPU); use --precision fp32")
    need(args.crop_size <= args.load_size,
         f"--crop-size {args.crop_size} is larger than --load-size {args.load_size}: lower one or raise the other")
    side = size_multiple(args.netG)
    need(args.crop_size >= 16 and args.crop_size % side == 0,
         f"--netG {args.netG} needs a crop size that is a multiple of {side} (and at least 16), got "
         f"{args.crop_size}: use --crop-size {max(side, 16)}" + (" or a resnet generator" if side > 4 else ""))


def model_config(args: argparse.Namespace, config_cls):
    """The model's config dataclass, from the options of the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
              if getattr(args, f.name, None) is not None}
    if config_cls is CUTConfig:
        values["mode"] = args.model
    return config_cls(**values, channels_x=args.input_nc, channels_y=args.output_nc)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a full disk, a crash or Ctrl-C mid-save leaves the previous file intact and no
    temporary file. A failed write raises OSError naming `path`."""
    def save(tmp: Path) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch.save reports a short write (a full disk) as a RuntimeError
            free = shutil.disk_usage(tmp.parent).free / 2 ** 20
            raise OSError(0, f"the write stopped short, {free:.0f} MB free on that disk: {str(e).splitlines()[0]}",
                          str(tmp)) from None
    write_atomically(path, save)


@contextmanager
def written_or_stopped(what_to_do: str):
    """An OSError of a write inside the block (full disk, read-only or missing folder) ends the command
    with one line: the file, the cause, and `what_to_do`."""
    try:
        yield
    except OSError as e:
        raise RunError(f"could not write {e.filename or 'a file'} ({e.strerror or e}): {what_to_do}") from None


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure: CUDA's or MPS's out of memory, or the CPU allocator's."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


LOCK_FILE = ".lock"  # in a run's folder: the lock of the run that holds it, and its process id


def lock_run_folder(run_dir: Path):
    """Make `run_dir` and hold an OS lock on it (its .lock file, which names this process) for this
    process's life: a second run or resume into the same folder is refused. The lock dies with its
    process (kill -9, power loss), so a lock left behind never blocks. Returns the held file."""
    try:
        handle = open(output_folder(run_dir, "--output-dir") / LOCK_FILE, "a+")
    except OSError as e:
        raise UsageError(f"cannot use {run_dir} as the run's folder ({e.strerror}): pass another --output-dir "
                         f"or --name") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UsageError(f"{run_dir} is in use by another run (process {holder}): wait for it to end, or pass "
                         f"another --name") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def read_checkpoint(path: Path):
    """What a checkpoint file holds (ours or an official one), read on the CPU with weights only."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist: check --name / --output-dir or --checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for foreign or broken files
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}): pass a latest.pt or "
                         f"epoch_NNN.pt written by train_gan.py, or an official generator .pth") from None


def is_run_checkpoint(state) -> bool:
    """Whether `state` is a latest.pt / epoch_NNN.pt of train_gan.py (not an official network file)."""
    return isinstance(state, dict) and state.get("model") in MODELS and "nets" in state


def load_checkpoint(path: Path) -> dict:
    """A run's checkpoint, for a resume."""
    state = read_checkpoint(path)
    if not is_run_checkpoint(state):
        raise UsageError(f"{path} is not a checkpoint of a train_gan.py run (an official generator .pth can be "
                         f"used with 'translate', not resumed): pass a latest.pt of train_gan.py")
    return state


def build_trainer(state: dict, device: torch.device, precision: str = "fp32") -> Trainer:
    """The model a checkpoint describes (its own config), with its weights and optimiser state."""
    model_cls, config_cls = MODELS[state["model"]]
    trainer = Trainer(model_cls(config_cls(**state["config"])), device, precision)
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"checkpoint does not match a {state['model']} of its own config: "
                         f"{str(e).splitlines()[0]}") from None
    return trainer


class StopFlag:
    """Set by SIGINT / SIGTERM; the loop saves and stops after the current step.

    A second signal quits at once, without the save, except under torchrun: its launcher passes a
    Ctrl-C on to ranks that the terminal has already signalled (and kills them if they linger).
    """

    def __init__(self, world: int = 1, lead: bool = True):
        self.requested, self.world, self.lead, self.pid = False, world, lead, os.getpid()

    def install(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a data-loading worker, forked with this handler, before quiet_worker runs
            return
        if self.requested and self.world == 1:  # asked twice: stop now, without the save
            raise KeyboardInterrupt
        if not self.requested and self.lead:
            print("\nstopping after this step" + (" (again to quit without saving)" if self.world == 1 else ""),
                  file=sys.stderr)
        self.requested = True


def any_rank(flag: bool, group) -> bool:
    """Whether `flag` is set on any rank, by an all-reduce over a CPU (gloo) group: it never waits for a GPU.
    Without a group (one process), `flag` itself."""
    if group is None:
        return flag
    votes = torch.tensor([int(flag)])
    dist.all_reduce(votes, dist.ReduceOp.MAX, group=group)
    return bool(votes)


# Data options a run keeps: a resume reuses them unless given again (seed: never, it fixes the order).
RUN_OPTIONS = ("dataroot", "direction", "load_size", "crop_size", "batch_size", "max_steps", "log_every",
               "save_every")


def option_for(config_key: str) -> str:
    """The train option that sets a config field (input_nc sets channels_x)."""
    return {"channels_x": "input_nc", "channels_y": "output_nc"}.get(config_key, config_key)


def restore_run_options(args: argparse.Namespace, state: dict) -> None:
    """On resume: take the run's data options and network config unless given; refuse a given
    option that would change the network, since the weights fit only the network they came from."""
    given = getattr(args, "given", set())
    if state["model"] != args.model:
        raise UsageError(f"this run is a {state['model']} run: resume it with --model {state['model']}")
    for key, value in state["run"].items():
        if key == "seed" or key not in given:
            setattr(args, key, Path(value) if key == "dataroot" else value)
    for key, value in state["config"].items():
        flag = option_for(key)
        if flag in given and key not in ("epochs", "epochs_decay") and getattr(args, flag) != value:
            raise UsageError(f"this run was trained with {key}={value!r}; --{flag.replace('_', '-')} "
                             f"{getattr(args, flag)} asks for another network: drop it, or start a new --name")
        if hasattr(args, flag) and flag not in given:
            setattr(args, flag, value)


def rng_state(device: torch.device) -> dict:
    return {"python": random.getstate(), "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy(), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device) under torchrun; (0, 1, device) without it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def run_folder(args: argparse.Namespace) -> Path:
    """OUTPUT_DIR/NAME, the run's folder; NAME defaults to MODEL_DATASET."""
    args.name = args.name or f"{args.model}_{args.dataroot.name}"
    return args.output_dir / args.name


def prepare(args: argparse.Namespace, device: torch.device, fresh: bool = False):
    """Options checked and completed, the dataset folders, and the model (resumed or new).

    Returns (trainer, epoch_step, folders, filled presets). `fresh` ignores output folders (benchmark).
    """
    run_dir = run_folder(args)
    state = None if fresh or not args.resume else load_checkpoint(run_dir / "latest.pt")
    if state:
        restore_run_options(args, state)
    elif not fresh and run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it, or a new --name")
    filled = apply_presets(args, device)
    validate(args, device)
    folders = find_domains(args.dataroot, args.direction)
    if state:
        state["config"].update(epochs=args.epochs, epochs_decay=args.epochs_decay)  # a schedule may grow
        trainer = build_trainer(state, device, args.precision)
        set_rng_state(state["rng"], device)
        return trainer, state["epoch_step"], folders, filled
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        model = MODELS[args.model][0](model_config(args, MODELS[args.model][1]))
    except ValueError as e:  # an option combination the model cannot build
        raise UsageError(str(e)) from None
    return Trainer(model, device, args.precision), 0, folders, filled


def quiet_worker(_: int) -> None:
    """A data-loading worker leaves Ctrl-C to the main process, which saves and then stops the workers
    (a terminal sends SIGINT to every process of the group), and dies on SIGTERM as usual."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def make_loader(args, trainer: Trainer, folders, rank: int = 0, world: int = 1):
    """(dataset, sampler, loader) over the training folders; each rank gets its share of every epoch."""
    model, cfg = trainer.model, trainer.model.config
    data = UnpairedDataset(folders["train_x"], folders["train_y"], args.load_size, args.crop_size,
                           cfg.channels_x, cfg.channels_y,
                           no_crop_from_epoch=None if model.resize_crop_in_decay else cfg.epochs)
    sampler = PairSampler(len(data.files[0]), len(data.files[1]), args.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        data, args.batch_size, sampler=sampler, num_workers=args.workers, pin_memory=trainer.device.type == "cuda",
        persistent_workers=args.workers > 0, worker_init_fn=quiet_worker,
        generator=torch.Generator())  # own generator: global RNG untouched
    return data, sampler, loader


def speed_up(args, trainer: Trainer, rank: int, world: int) -> None:
    """DDP across ranks, then torch.compile, as asked."""
    if world > 1:
        ids = [trainer.device.index] if trainer.device.type == "cuda" else None
        # No buffer broadcast: the buffers are fixed blur filters (or batch-norm statistics, which
        # only rank 0 saves), and a broadcast in a forward that one rank runs alone (FastCUT's
        # mirrored key pass, drawn per rank) would unpair the ranks' collectives and hang them.
        trainer.wrap(lambda net: DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False))
        torch.manual_seed(args.seed + 1_000 * rank + trainer.global_step)  # each rank its own pools, patches, flips
    if args.compile:
        trainer.wrap(torch.compile)


def benchmark(args: argparse.Namespace) -> dict:
    """Time --benchmark N training steps (after 3 warm-up ones) on the real data and step; rank 0
    prints one JSON line. Under torchrun every rank steps, and images/s counts all of them."""
    rank, world, device = init_distributed(pick_device(args.device))
    trainer, _, folders, _ = prepare(args, device, fresh=True)
    _, sampler, loader = make_loader(args, trainer, folders, rank, world)
    speed_up(args, trainer, rank, world)
    warmup, times, batches = 3, [], iter(())
    for i in range(warmup + args.benchmark):
        try:
            x, y = next(batches)
        except StopIteration:  # a new epoch of the same loader
            sampler.set_epoch(i)
            batches = iter(loader)
            x, y = next(batches)
        start = time.perf_counter()
        trainer.train_step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels have run
        elif device.type == "mps":
            torch.mps.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux reports KiB
    result = {"model": args.model, "device": str(device), "processes": world, "precision": args.precision,
              "compile": args.compile, "crop_size": args.crop_size, "batch_size": args.batch_size,
              "netG": trainer.model.config.netG, "sec_per_iter": round(sec, 4),
              "images_per_sec": round(args.batch_size * world / sec, 3), "peak_mem_mb": round(peak, 1),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if rank == 0:
        print(json.dumps(result))
    return result


# The query points of nce_epoch_NNN.png, as (row, col) fractions: the centre, upper right, lower left.
NCE_POINTS = ((0.5, 0.5), (0.3, 0.7), (0.8, 0.2))


def save_nce_maps(trainer: Trainer, x: torch.Tensor, path: Path) -> None:
    """CUT's learned similarity on fixed test images x (B, C, H, W): for each of NCE_POINTS on G(x),
    a heat map over x of the patches PatchNCE takes for its positive (CUT.similarity_maps)."""
    with trainer.evaluating() as model:
        x = x.to(trainer.device)
        fake = model.G(x)
        maps = model.similarity_maps(fake, x, NCE_POINTS)
    save_similarity_grid(x, fake, maps, NCE_POINTS, path)


def mean_losses(window: dict[str, torch.Tensor], count: int, control, where: str) -> dict[str, float]:
    """Each loss summed over a log window of `count` steps, averaged and read to the host in one copy.
    Raises RunError, naming the loss and `where`, when one is not finite here or on another rank."""
    mean = dict(StepLosses({k: v / count for k, v in window.items()}))
    bad = [k for k, v in mean.items() if not math.isfinite(v)]
    if any_rank(bool(bad), control):
        what = f"loss {bad[0]} became {mean[bad[0]]}" if bad else "a loss on another rank diverged"
        raise RunError(f"{what} {where}: resume with a lower --lr")
    return mean


def train(args: argparse.Namespace, stop: StopFlag | None = None) -> Trainer:
    """Train per the options (under torchrun: on every rank), rank 0 holding the run's folder for the
    whole run; returns the trainer."""
    rank, world, device = init_distributed(pick_device(args.device))
    with lock_run_folder(run_folder(args)) if rank == 0 else nullcontext():
        return run_training(args, stop, rank, world, device)


def run_training(args: argparse.Namespace, stop: StopFlag | None, rank: int, world: int,
                 device: torch.device) -> Trainer:
    """The training loop: steps, logged losses, and after each epoch the checkpoint, then the pictures."""
    lead = rank == 0  # only rank 0 prints and writes
    trainer, epoch_step, folders, filled = prepare(args, device)
    run_dir = run_folder(args)
    ckpt = run_dir / "latest.pt"
    resume = f"continue with --resume --name {args.name} ({ckpt} keeps the last saved state)"
    advice = f"free some disk space or fix {run_dir}, then {resume}"
    step_memory = (f"in a training step at crop {args.crop_size}x{args.crop_size}, batch {args.batch_size}",
                   f"lower --crop-size or --batch-size, then {resume}")
    data, sampler, loader = make_loader(args, trainer, folders, rank, world)
    speed_up(args, trainer, rank, world)
    cfg = trainer.model.config
    fixed = [load_fixed_images(folders[f"test_{d}"] or folders[f"train_{d}"], 4, args.crop_size, c)
             for d, c in (("x", cfg.channels_x), ("y", cfg.channels_y))]
    steps = min(math.ceil(sampler.epoch_size() / args.batch_size), args.max_steps or math.inf)
    total_epochs = cfg.epochs + cfg.epochs_decay
    if lead:
        print(("resuming " if epoch_step or trainer.global_step else "") +
              f"{args.model} on {device} x {world} | data {args.dataroot} ({len(data.files[0])} X, "
              f"{len(data.files[1])} Y) | crop {args.crop_size} (load {args.load_size}) | batch {args.batch_size} | "
              f"{steps} steps/epoch x {total_epochs} epochs | at epoch {trainer.epoch + 1} step {epoch_step} | "
              f"out {run_dir}" + (f"\ndefaults for {device.type}: {', '.join(filled)}" if filled else ""))
    stop = stop or StopFlag(world, lead).install()
    control = dist.new_group(backend="gloo") if world > 1 else None  # for the ranks' stop votes
    run = {key: str(getattr(args, key)) if key == "dataroot" else getattr(args, key) for key in RUN_OPTIONS}

    def save(path: Path, step_in_epoch: int) -> None:
        if lead:
            save_checkpoint(path, {**trainer.state_dict(), "epoch_step": step_in_epoch, "rng": rng_state(device),
                                   "run": {**run, "seed": args.seed}})

    for epoch in range(trainer.epoch, total_epochs):
        sampler.set_epoch(epoch, epoch_step * args.batch_size, steps * args.batch_size)
        start, first, window, count, mean, halt = time.time(), epoch_step, {}, 0, {}, False
        with tqdm(total=steps, initial=epoch_step, desc=f"epoch {epoch + 1}/{total_epochs}", leave=False,
                  dynamic_ncols=True, disable=not lead) as bar:
            for x, y in loader:
                with memory_or_stopped(*step_memory):
                    losses = trainer.train_step(x, y).tensors  # still on the device: nothing waits here
                epoch_step += 1
                bar.update()
                window = {k: window.get(k, 0.0) + v for k, v in losses.items()}
                count += 1
                # Every rank stops after the same step, or the collectives would hang.
                halt = any_rank(stop.requested, control)
                # The host reads the losses only at logged steps (a GPU runs on until then).
                if not (epoch_step % args.log_every == 0 or epoch_step == steps or halt):
                    continue
                mean = mean_losses(window, count, control,
                                   f"by step {trainer.global_step}; {ckpt} keeps the last good state")
                if lead:
                    with written_or_stopped(advice):
                        append_losses(run_dir / "losses.csv", trainer.global_step, epoch + 1, mean)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in mean.items()}, refresh=False)
                window, count = {}, 0
                if halt and epoch_step < steps:  # on an epoch's last step, finish the epoch first
                    with written_or_stopped(advice):
                        save(ckpt, epoch_step)
                    if lead:
                        print(f"\nstopped at epoch {epoch + 1}, step {epoch_step}: saved {ckpt}; "
                              f"continue with --resume --name {args.name}")
                    return trainer
        seconds = time.time() - start
        rate = (epoch_step - first) * args.batch_size * world / max(seconds, 1e-6)  # steps run now, all ranks
        trainer.end_epoch()
        epoch_step = 0
        if lead:
            with written_or_stopped(advice):
                save(ckpt, 0)  # first: a picture that cannot be written loses no training
                if args.save_every and trainer.epoch % args.save_every == 0:
                    save(run_dir / f"epoch_{trainer.epoch:03d}.pt", 0)
                save_epoch_pictures(args, trainer, fixed, run_dir)
            last = ", ".join(f"{k} {v:.3f}" for k, v in mean.items())
            print(f"epoch {trainer.epoch}/{total_epochs}  {last}  {seconds:.0f} s  "
                  f"{rate:.2f} img/s")
            if halt:
                print(f"stopped after epoch {trainer.epoch}: saved {ckpt}; continue with --resume --name {args.name}")
        if halt:
            return trainer
    return trainer


def save_epoch_pictures(args: argparse.Namespace, trainer: Trainer, fixed: list[torch.Tensor], run_dir: Path) -> None:
    """The epoch's grid of the fixed test images, CUT's similarity maps, and the loss plot."""
    save_image_grid(trainer.visuals(*fixed), run_dir / f"epoch_{trainer.epoch:03d}.png")
    if args.nce_map and isinstance(trainer.model, CUT):
        save_nce_maps(trainer, fixed[0][:2], run_dir / f"nce_epoch_{trainer.epoch:03d}.png")
    plot_losses(run_dir / "losses.csv", run_dir / "losses.png")


@contextmanager
def memory_or_stopped(what: str, advice: str):
    """Running out of memory inside the block ends the command with one line: `what` ran out, and `advice`."""
    try:
        yield
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        raise RunError(f"out of memory {what}: {advice}") from None


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad (B, C, H, W) at the bottom/right so H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs pad < side
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)


def input_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"input folder {folder} does not exist")
    files = list_images(folder)
    if not files:
        raise UsageError(f"no images (.jpg .jpeg .png .bmp .webp) in {folder}")
    return files


def load_translator(checkpoint: Path, device: torch.device, direction: str) -> Translator:
    """The generator of a checkpoint that translates `direction`: from a run's latest.pt, or from an official
    generator file (CycleGAN's zoo, a latest_net_G_A.pth, a CUT latest_net_G.pth), whose architecture
    the file itself tells."""
    state = read_checkpoint(checkpoint)
    if is_run_checkpoint(state):
        trainer = build_trainer(state, device)
        if direction not in trainer.model.directions:
            raise UsageError(f"{checkpoint} is a {trainer.model.name} model, which translates x2y only: "
                             f"drop --direction {direction}")
        return trainer.translator(direction)
    try:
        net = official_generator(state)
    except ValueError as e:
        raise UsageError(f"{checkpoint} is neither a checkpoint of train_gan.py nor an official generator: "
                         f"{str(e).splitlines()[0]}") from None
    if direction != "x2y":
        raise UsageError(f"{checkpoint} holds one generator, which translates its own way: drop --direction "
                         f"{direction}")
    return Translator(net, next(net.parameters()).shape[1], device)


def translate(args: argparse.Namespace) -> int:
    """Translate every image of --input with a checkpoint; returns how many were written."""
    if args.output.resolve() == args.input.resolve():
        raise UsageError("--output is the --input folder: choose another folder so no input is overwritten")
    if args.max_side is not None and args.max_side < 1:
        raise UsageError(f"--max-side must be >= 1, got {args.max_side}")
    files = input_images(args.input)
    translator = load_translator(args.checkpoint, pick_device(args.device), args.direction)
    output = output_folder(args.output, "--output")
    for f in tqdm(files, desc="translate", leave=False):
        img = fit_within(load_image(f, translator.channels), args.max_side)
        with memory_or_stopped(f"translating {f.name} ({img.width}x{img.height}, batch 1)",
                               "pass --max-side N to scale images down first (e.g. --max-side 1024)"):
            y = translator(to_tensor(img)[None])
        with written_or_stopped("free some disk space or choose another --output; the images written before it "
                                "are complete"):
            save_image(to_image(y[0]), output / f"{f.stem}.png")
    print(f"translated {len(files)} images into {args.output}")
    return len(files)


def output_folder(folder: Path, flag: str) -> Path:
    """Make `folder`, given by option `flag`, or end with one line saying why it cannot be one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder} cannot be made a folder ({e.strerror}): choose another {flag}") from None
    return folder


def compare(args: argparse.Namespace) -> Path:
    """One grid: a row per input image, the input then every checkpoint's translation of it."""
    if args.output.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"--output {args.output} must end in .png or .jpg")
    if args.count < 1 or args.size < 1:
        raise UsageError(f"--count and --size must be >= 1, got {args.count} and {args.size}")
    input_images(args.input)
    device = pick_device(args.device)
    translators = [load_translator(c, device, args.direction) for c in args.checkpoints]
    channels = [t.channels for t in translators]
    if len(set(channels)) > 1:
        raise UsageError(f"the checkpoints take {' and '.join(map(str, sorted(set(channels))))}-channel inputs: "
                         f"compare checkpoints of the same domains")
    x = load_fixed_images(args.input, args.count, args.size, channels[0])
    with memory_or_stopped(f"translating {len(x)} images of {args.size}x{args.size} at once (batch {len(x)})",
                           "lower --count or --size"):
        outputs = [translate(x) for translate in translators]
    output_folder(args.output.parent, "--output")
    with written_or_stopped("free some disk space or choose another --output"):
        save_image_grid([[x[i], *(y[i] for y in outputs)] for i in range(len(x))], args.output)
    print(f"wrote {args.output}: {len(x)} rows of the input and {len(translators)} translation(s)")
    return args.output


def download_command(argv: list[str]) -> Path:
    """`download NAME`: an official dataset into data/NAME; `download --pretrained NAME`: an official
    CycleGAN generator into pretrained/NAME.pth, then the translate command to try it with."""
    p = Parser(prog="train_gan.py download",
               description="Download an official CycleGAN dataset, or with --pretrained an official generator.")
    p.add_argument("name", nargs="?", help="a dataset, e.g. apple2orange, horse2zebra, monet2photo")
    p.add_argument("--pretrained", metavar="NAME", help="an official CycleGAN generator, e.g. horse2zebra, "
                                                        "style_monet (an unknown name lists them all)")
    p.add_argument("--root", type=Path, help="where it goes (default: data/ for datasets, pretrained/ for models)")
    args = p.parse_args(argv)
    if (args.name is None) == (args.pretrained is None):
        raise UsageError("name a dataset, or a model with --pretrained NAME, not both (see train_gan.py download "
                         "--help)")
    if args.name:
        path = download(args.name, args.root or Path("data"))
        print(path)
        return path
    path = download_pretrained(args.pretrained, args.root or Path("pretrained"))
    print(f"{path} is ready; translate a folder of your photos with it:\n"
          f"  python train_gan.py translate --checkpoint {path} --input photos/ --output translated/")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C from here on: KeyboardInterrupt, below
    warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}", file=sys.stderr)
    try:
        if argv[:1] == ["translate"]:
            translate(translate_parser().parse_args(argv[1:]))
        elif argv[:1] == ["compare"]:
            compare(translate_parser(compare=True).parse_args(argv[1:]))
        elif argv[:1] == ["download"]:
            download_command(argv[1:])
        else:
            args = parse_train_args(argv)
            benchmark(args) if args.benchmark else train(args)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C; every write is atomic
        print("\ninterrupted: nothing half-written was left", file=sys.stderr)
        return 130
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
