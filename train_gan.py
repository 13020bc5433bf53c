"""Train CycleGAN, CUT or FastCUT on unpaired images (the README's Usage); translate.py then uses what a run trained.

Top to bottom: the options, decided in `resolve_options` alone; the Trainer, all that training adds to a model's
step, and the checkpoint; train(), set-up then the epoch loop, then what it calls; the benchmark; main. Runs go
to output/NAME/ (its index.html).
"""
import os
import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch loads ends quietly too (at once: an import may catch SystemExit)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import argparse
import dataclasses
import functools
import itertools
import json
import math
import shlex
import statistics
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from tqdm import tqdm

from cut_model import CUT, CUTConfig
from cycle_gan import CycleGAN, CycleGANConfig
from data_utility import (PairSampler, Parser, RunError, RunFolder, StopFlag, UnpairedDataset, UsageError, at_least,
                          batches, cpu_has_native_bf16, data_loader, download_command, find_domains, load_fixed_images,
                          load_torch, memory_or_stopped, need, peak_memory_mb, pick_device, run_command, smallest_side)
from layers import NORMS
from losses import GAN_MODES, NEGATIVES
from networks import GENERATORS

# ----------------------------------------------------------------------------- options

BUNDLED = Path(__file__).resolve().parent / "data" / "apple2orange_small"


@runtime_checkable
class Model(Protocol):
    """What the commands use of a model (cycle_gan.CycleGAN, cut_model.CUT), and all they use of it; optional:
    `similarity_maps(source, target, points)` (where a model with PatchNCE finds each output patch's input patch,
    drawn each epoch), and `extra_state()` / `load_extra_state(state, device)` (the image pools, for a resume)."""
    name: str  # 'cycle_gan', 'cut', 'fastcut': as the CLI and the checkpoint call it
    config: object  # the dataclass that built it, with its paper's defaults (lr, beta1, epochs, channels, ...)
    groups: dict  # one Adam per group: {'G': ('G', 'F'), ...}, the networks by attribute name
    directions: dict  # 'x2y' (and 'y2x'): the network that translates that way
    resize_crop_in_decay: bool  # False: in the lr-decay epochs the images are resized to the crop size
    def train_step(self, x, y, trainer) -> dict: ...  # a step of the objective through the trainer: its losses
    def visuals(self, x, y) -> list: ...  # the rows of an epoch's grid of the fixed test images
    def visuals_caption(self) -> str: ...  # what each of those rows shows
    def verdicts(self, x, y) -> dict: ...  # for each D: a real image, a translation, and its verdicts on both


# Model name -> (model, its config, config values the name fixes). Each model's defaults live in its config alone.
MODELS = {"cycle_gan": (CycleGAN, CycleGANConfig, {}), "cut": (CUT, CUTConfig, {"mode": "cut"}),
          "fastcut": (CUT, CUTConfig, {"mode": "fastcut"})}
DEFAULT_MODEL = "fastcut"  # the one whose first grid comes within minutes on a CPU (docs/RESULTS.md)
# Without a GPU the official 256x256 setting takes weeks; this shows results in minutes. Crop 128 with 6 residual
# blocks is the CycleGAN paper's setting for 128x128; images load in the main process, as a worker would compete.
CPU_PRESET = dict(crop_size=128, load_size=143, max_steps=150, netG="resnet_6blocks", workers=0)
GPU_PRESET = dict(crop_size=256, load_size=286)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a --resume may change: the schedule (more epochs; a lower lr after a divergence), the machine, the
# size of a step (after running out of memory), what is written, where the dataset now lies. Any other option
# given that differs from the run's is refused: the networks, objective, seed and domains are the run's.
RESUME_MAY_CHANGE = {"epochs", "epochs_decay", "lr", "device", "workers", "precision", "compile", "crop_size",
                     "load_size", "batch_size", "max_steps", "log_every", "save_every", "nce_map", "d_map", "dataroot"}
MACHINE_OPTIONS = {"device", "workers", "compile"}  # this machine's: a resume never takes them from the run
NOT_OF_THE_RUN = {"resume", "name", "output_dir", "benchmark", "given", "command"}  # how this command is called
# The options some models alone read (--help groups them): another model's run refuses them and keeps none of them.
ONLY_FOR = {("cycle_gan",): {"lambda_cycle", "lambda_identity", "pool_size"},
            ("cut", "fastcut"): {"lambda_gan", "lambda_nce", "nce_idt", "flip_equivariance", "nce_layers",
                                 "num_patches", "nce_negatives", "nce_temperature", "nce_map", "antialias",
                                 "antialias_up"}}
NOT_FOR = {model: set().union(*(own for models, own in ONLY_FOR.items() if model not in models)) for model in MODELS}
OPTION_OF = {"channels_x": "input_nc", "channels_y": "output_nc"}  # a config field an option of another name sets


def model_defaults() -> dict[str, dict]:
    """Each model's defaults, read from its config: {model: {option name: value}}."""
    return {model: {OPTION_OF.get(k, k): v for k, v in dataclasses.asdict(config_cls(**fixed)).items()}
            for model, (_, config_cls, fixed) in MODELS.items()}


def default_text(dest: str, defaults: dict[str, dict]) -> str:
    """' (default: ...)' for --help: the value of each model that takes the option, then the devices' presets."""
    def text(value):
        return ",".join(value) if isinstance(value, tuple) else f"{value:g}" if type(value) is float else str(value)
    by_model = {m: text(d[dest]) for m, d in defaults.items() if dest in d and dest not in NOT_FOR[m]}
    said = [next(iter(by_model.values()))] if len(set(by_model.values())) == 1 else \
        [f"{m} {v}" for m, v in by_model.items()]
    said += [f"on a {name} {text(preset[dest])}" for name, preset in (("GPU", GPU_PRESET), ("CPU", CPU_PRESET))
             if dest in preset]
    return f" (default: {'; '.join(said)})" if said else ""


def train_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The options (defaults=False: only those given); a model's have no default here, resolve_options reads them."""
    p = Parser(prog="train_gan.py", description="Train CycleGAN, CUT or FastCUT on unpaired images. Also: "
               "'train_gan.py download NAME' (an official dataset); translating and comparing models: translate.py.")
    groups = {models: p.add_argument_group(f"{' and '.join(models)} only") for models in ONLY_FOR}
    model_values = model_defaults()

    def a(*names, **kw):
        dest = names[0][2:].replace("-", "_")
        where = next((groups[models] for models, own in ONLY_FOR.items() if dest in own), p)
        kw["help"] += default_text(dest, model_values) if kw.get("default") is None else ""
        where.add_argument(*names, **kw if defaults else {**kw, "default": argparse.SUPPRESS})
    on_off = dict(action=argparse.BooleanOptionalAction)
    a("--model", choices=tuple(MODELS), help=f"what to train (default {DEFAULT_MODEL}; with --resume, the run's)")
    a("--dataroot", type=Path, default=BUNDLED, help="dataset folder: trainA/ trainB/ [testA/ testB/], or x_train/ ...")
    a("--name", help="run name: outputs go to OUTPUT_DIR/NAME (default: MODEL_DATASET)")
    a("--output-dir", type=Path, default=Path("output"), help="where runs are written")
    a("--resume", action="store_true", help="continue the run OUTPUT_DIR/NAME from its latest.pt, with its options")
    a("--direction", choices=("AtoB", "BtoA"), default="AtoB", help="BtoA learns B -> A: X is the B folder")
    a("--epochs", type=at_least(0), help="epochs at the initial lr")
    a("--epochs-decay", type=at_least(0), help="then epochs of linear decay, to lr / (decay + 1)")
    a("--max-steps", type=at_least(1), help="cap on steps per epoch, else whole epochs")
    a("--batch-size", type=at_least(1), default=1, help="images per domain per step (the papers use 1)")
    a("--lr", type=at_least(0, float, strict=True), help="Adam learning rate")
    a("--load-size", type=int, help="images are resized to this square size ...")
    a("--crop-size", type=int, help="... then randomly cropped to this size")
    a("--input-nc", type=int, choices=(1, 3), help="channels of domain X images (1 = grayscale)")
    a("--output-nc", type=int, choices=(1, 3), help="channels of domain Y images")
    a("--netG", choices=GENERATORS, help="generator")
    a("--ngf", type=at_least(1), help="filters of the generator's first layer")
    a("--ndf", type=at_least(1), help="filters of the discriminator's first layer")
    a("--norm", choices=NORMS, help="normalisation layers")
    a("--gan-mode", choices=GAN_MODES, help="least squares (official); vanilla: Eq. 1's log-likelihood for D, "
      "non-saturating -log D(G(x)) for G; nonsaturating: the same, written with softplus")
    a("--lambda-cycle", type=at_least(0, float), help="weight of the cycle loss, each way")
    a("--lambda-identity", type=at_least(0, float), help="identity loss weight, x lambda-cycle")
    a("--pool-size", type=at_least(0), help="history of fakes shown to D (0 = none)")
    a("--lambda-gan", type=at_least(0, float), help="weight of the adversarial loss")
    a("--lambda-nce", type=at_least(0, float), help="weight of PatchNCE")
    a("--nce-idt", **on_off, help="add the identity PatchNCE term on Y")
    a("--flip-equivariance", **on_off, help="mirror G's input half the time")
    a("--nce-layers", type=lambda text: tuple(int(t) if t.isdigit() else t for t in text.replace(" ", "").split(",")),
      help="encoder taps by name or official index (0,4,8,12,16 are the same layers with blur-pool only; "
           "with --no-antialias the names keep those layers, the indices would not)")
    a("--num-patches", type=at_least(1), help="patches sampled per layer (P - 1 negatives per query)")
    a("--nce-negatives", choices=NEGATIVES, help="negatives from a query's image (the paper's), the batch (official "
      "--nce_includes_all_negatives_from_minibatch), or the other images (batch > 1)")
    a("--nce-temperature", type=at_least(0, float, strict=True), help="temperature tau of Eq. 2")
    a("--nce-map", **on_off, default=True, help="write nce_epoch_NNN.png, where PatchNCE finds the patches")
    a("--antialias", **on_off, help="blur-pool down-sampling in G and D (the official --no_antialias turns it off)")
    a("--antialias-up", **on_off, help="blur up-sampling in G (the official --no_antialias_up turns it off)")
    a("--d-map", **on_off, default=True, help="write d_epoch_NNN.png, D's verdict on each patch of real and "
      "translated test images, and the balance, its mean verdicts, to epochs.csv")
    a("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    a("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda, then mps, then cpu")
    a("--workers", type=at_least(0), help="data-loading processes (0: in the main process; on a GPU, half this "
      "process's CPU cores, 1 to 8, where the official code has 4)")
    a("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast of the forward passes (fp16 adds "
      "loss scaling); fp32 is the official math; a resume keeps the run's unless given")
    a("--compile", action="store_true", help="torch.compile the networks (slow first steps, faster later)")
    a("--benchmark", type=at_least(1), metavar="N", help="time N steps after 3 warm-up ones, print JSON, write nothing")
    a("--log-every", type=at_least(1), default=10, help="steps averaged into each row of losses.csv")
    a("--save-every", type=at_least(0), default=10, help="also keep epoch_NNN.pt every this many epochs (0 = never)")
    return p


def parse_options(argv: list[str]) -> argparse.Namespace:
    """The options as asked (None where resolve_options decides), with `given`, the names set, and the command."""
    args = train_parser().parse_args(argv)
    args.given = set(vars(train_parser(defaults=False).parse_args(argv)))
    args.command = ["python", "train_gan.py", *argv]
    return args


def resolve_options(args: argparse.Namespace, device: torch.device) -> tuple[argparse.Namespace, dict | None]:
    """The run's options, each decided here and nowhere else (`args`, as parsed, is left as it is), in this order:
    the model (given, the run's on a resume, else DEFAULT_MODEL) and the run's name (given, else MODEL_DATASET); then
    each option of a new run: given, else the device's preset, else the model's config default; of a resume: the
    run's own, as its checkpoint keeps them, but for MACHINE_OPTIONS and the RESUME_MAY_CHANGE given (a flag given
    that would change anything else is refused); last, `validate`. Returns (options, the checkpoint a resume goes
    on from, else None)."""
    opts = argparse.Namespace(**vars(args))
    opts.name = args.name or f"{args.model or DEFAULT_MODEL}_{args.dataroot.name}"
    checkpoint = None
    if not args.resume:
        opts.model = args.model or DEFAULT_MODEL
        vars(opts).update({k: v for k, v in presets(device).items() if k not in args.given})
        vars(opts).update({k: v for k, v in model_defaults()[opts.model].items() if getattr(opts, k, 0) is None})
    else:
        source = RunFolder(opts.output_dir / opts.name).latest
        checkpoint = load_torch(source)
        run = run_options(checkpoint, source)
        opts.model = args.model or run["model"]  # (one given that differs is refused below)
        asked = saved_options(opts)  # the options asked, as the run's are kept
        for key, value in run.items():
            if key not in args.given and key not in MACHINE_OPTIONS:  # as parsed: a path, a tuple
                setattr(opts, key, Path(value) if key == "dataroot" else
                        tuple(value) if isinstance(value, list) else value)
            elif key in args.given and key not in RESUME_MAY_CHANGE and asked[key] != value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"this run was started with {flag} {value}; {flag} {asked[key]} would change it: "
                                 f"drop {flag}, or start a new --name")
        opts.workers = presets(device)["workers"] if opts.workers is None else opts.workers
    validate(opts, device)
    return opts, checkpoint


def config_of(opts: argparse.Namespace):
    """The config of the options' model: each field as its option sets it, or where that is None its default."""
    _, config_cls, fixed = MODELS[opts.model]
    values = {f.name: getattr(opts, OPTION_OF.get(f.name, f.name), None) for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in values.items() if v is not None}, **fixed)


def saved_options(opts: argparse.Namespace) -> dict:
    """Every option of the run's model as the checkpoint and options.json keep them (paths as text, tuples as lists)."""
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in vars(opts).items() if k not in NOT_OF_THE_RUN | NOT_FOR[opts.model]}


def presets(device: torch.device) -> dict:
    """The device's defaults: CPU_PRESET, or GPU_PRESET with workers, half this process's CPU cores (1 to 8)."""
    if device.type == "cpu":
        return CPU_PRESET
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {**GPU_PRESET, "workers": max(1, min(8, cores // (2 * int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))}


def validate(opts: argparse.Namespace, device: torch.device) -> None:
    """Reject impossible options before any work starts; warn of a slow one."""
    foreign = " ".join("--" + name.replace("_", "-") for name in sorted(opts.given & NOT_FOR[opts.model]))
    need(not foreign, f"{opts.model} does not take {foreign}: drop it, or pick the --model it is for")
    need(opts.nce_negatives != "others" or opts.batch_size > 1,
         "--nce-negatives others draws negatives from the other images of a batch: pass --batch-size 2 or more")
    need(opts.precision != "fp16" or device.type == "cuda",
         f"--precision fp16 is for CUDA GPUs (on {device.type} G's gradients come out NaN, so G never learns): "
         f"use fp32, or bf16")
    if opts.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 autocast runs far slower "
                      "than fp32 here (about 40x on an AVX2 CPU); use --precision fp32")
    try:
        with torch.device("meta"):  # shapes only: nothing is computed or allocated
            model = MODELS[opts.model][0](config_of(opts))
    except ValueError as e:  # an option combination the model cannot be built with
        raise UsageError(str(e)) from None
    multiple = getattr(model, model.directions["x2y"]).side_multiple
    smallest = smallest_side([getattr(model, name) for name in model_networks(model)], multiple)
    need(opts.crop_size >= smallest and opts.crop_size % multiple == 0,
         f"--model {opts.model} with --netG {opts.netG} trains on crops of at least {smallest} pixels, a multiple of "
         f"{multiple}; got --crop-size {opts.crop_size}: use --crop-size "
         f"{max(smallest, -(-opts.crop_size // multiple) * multiple)}" + (" or a resnet generator" if multiple > 4
                                                                          else ""))


def model_networks(model) -> list[str]:
    """The names of a model's networks, group by group."""
    return [name for members in model.groups.values() for name in members]


# ----------------------------------------------------------------------------- the Trainer

def lr_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """The official 'linear' policy, as the CUT repository sets it after each epoch: 1 for `epochs` epochs (counted
    from 0), then down by 1/(epochs_decay+1) each, the last at 1/(epochs_decay+1) (docs/GUIDE.md: the departures)."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


def adam(params: list[torch.nn.Parameter], config) -> torch.optim.Adam:
    """Adam with the official lr and betas (beta1, 0.999), one fused kernel where torch has it for the device."""
    try:
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, 0.999), fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, 0.999))


class Trainer:
    """All of training that is not the paper: the model's networks on the device (`nets`, unwrapped), one Adam per
    group (`model.groups`), the lr schedule, precision, the ranks' gradient average under torchrun, compile, the
    checkpoint. `model.train_step(x, y, trainer)` calls autocast, backward and step."""

    def __init__(self, model: Model, device: torch.device | str = "cpu", precision: str = "fp32",
                 compiled: bool = False):
        self.model, self.device, self.precision = model, torch.device(device), precision
        self.nets = {name: getattr(model, name).to(self.device).train() for name in model_networks(model)}
        if compiled:  # the step calls torch.compile's wrappers; `nets` keeps the plain networks
            for name, net in self.nets.items():
                setattr(model, name, torch.compile(net))
        self.optimizers = {group: adam([p for n in members for p in self.nets[n].parameters()], model.config)
                           for group, members in model.groups.items()}
        # fp16 needs loss scaling to keep small gradients from flushing to zero; for bf16 and fp32 the scalers are off.
        self.scalers = {group: torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
                        for group in model.groups}
        self.epoch = 0  # epochs finished
        self.global_step = 0  # optimisation steps taken in all
        # Ranks under torchrun: each starts from the same weights and steps on their averaged gradients.
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def autocast(self):
        """Mixed-precision context for forward passes and losses (fp32: none)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype) if dtype else nullcontext()

    def backward(self, loss: torch.Tensor, group: str) -> None:
        """Back-propagate `loss` into the gradients of `group`; several calls add up (fp16: scaled)."""
        self.scalers[group].scale(loss).backward()

    def step(self, group: str) -> None:
        """One Adam step of `group` on the gradients summed so far (under torchrun, first averaged over the ranks),
        which are then freed: kept until the next backward, they would fill memory through the next forward passes."""
        optimizer = self.optimizers[group]
        if self.world > 1:
            self.average_over_ranks(optimizer)
        self.scalers[group].step(optimizer)
        self.scalers[group].update()
        optimizer.zero_grad(set_to_none=True)

    def average_over_ranks(self, optimizer: torch.optim.Optimizer) -> None:
        """Each gradient of the optimiser's parameters becomes its mean over the ranks, in one all-reduce (none counts
        as zero): every rank takes the step one process takes on all their images, and their weights stay identical."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        for p, grad in zip(params, flat.split([p.numel() for p in params])):
            p.grad = grad.view_as(p)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step on x (B, C_x, H, W) and y (B, C_y, H, W): each loss a 0-dim device tensor, out of the graph."""
        losses = self.model.train_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                                       self)
        self.global_step += 1
        return {k: v.detach() for k, v in losses.items()}

    @contextmanager
    def evaluating(self):
        """The model with its plain networks (not compiled wrappers), in eval mode, without gradients: for pictures."""
        wrapped = {name: getattr(self.model, name) for name in self.nets}
        for name, net in self.nets.items():
            setattr(self.model, name, net.eval())
        try:
            with torch.no_grad():
                yield self.model
        finally:
            for name, net in wrapped.items():
                setattr(self.model, name, net.train())

    @property
    def total_epochs(self) -> int:
        """The epochs of the whole schedule: at the initial lr, then of its decay."""
        return self.model.config.epochs + self.model.config.epochs_decay

    def end_epoch(self) -> None:
        """Count a finished epoch and set the lr of the next one."""
        self.epoch += 1
        self.set_schedule()

    def set_schedule(self, **changes) -> None:
        """Change the config's epochs, epochs_decay or lr (at a resume), then set this epoch's lr from the schedule."""
        c = self.model.config
        for key, value in changes.items():
            setattr(c, key, value)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = c.lr * lr_factor(self.epoch, c.epochs, c.epochs_decay)

    def state(self, epoch_step: int = 0, options: dict | None = None) -> dict:
        """The checkpoint, which `load` reads: the model's name and config, the run's options, the position (epochs,
        steps, steps into this epoch), weights, optimisers, the model's own state (image pools), torch's RNG states."""
        return {"model": self.model.name, "config": dataclasses.asdict(self.model.config),
                "options": options or {}, "epoch": self.epoch, "step": self.global_step, "epoch_step": epoch_step,
                "nets": {k: v.state_dict() for k, v in self.nets.items()},
                "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
                "extra": getattr(self.model, "extra_state", dict)(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}}

    @classmethod
    def load(cls, state, device: torch.device | str = "cpu", precision: str | None = None,
             source: Path | None = None, compiled: bool = False) -> tuple["Trainer", int]:
        """(trainer, steps into its epoch) of a checkpoint `state` wrote: its model, optimisers, position and random
        states, at the run's precision unless given. A file of another kind is a UsageError naming `source`."""
        options = run_options(state, source)
        trainer = cls(load_model(state, source), device, precision or options.get("precision", "fp32"), compiled)
        with refused_unless_it_fits(state, source):
            for k, opt in trainer.optimizers.items():
                kernel = {key: opt.defaults[key] for key in ("fused", "foreach")}
                opt.load_state_dict(state["optimizers"][k])
                for group in opt.param_groups:  # a checkpoint carries its machine's Adam kernel: use this one's
                    group.update(kernel)
        trainer.epoch, trainer.global_step, rng = state["epoch"], state["step"], state["rng"]
        if state["extra"]:
            trainer.model.load_extra_state(state["extra"], trainer.device)
        torch.set_rng_state(rng["torch"])
        if trainer.device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        return trainer, state["epoch_step"]


def is_checkpoint(state) -> bool:
    """Whether what a file holds is a checkpoint of this repository (not an official network file)."""
    return isinstance(state, dict) and state.get("model") in MODELS and {"config", "nets"} <= set(state)


def need_checkpoint(state, source: Path | None) -> None:
    """A UsageError naming `source` unless what it holds is a checkpoint of a run."""
    need(is_checkpoint(state), f"{source} is not a checkpoint of a train_gan.py run (an official generator .pth "
         f"can be used with translate.py, not resumed): pass a latest.pt of train_gan.py")


def run_options(state, source: Path | None) -> dict:
    """The options a checkpoint keeps of its run; a UsageError naming `source` if it cannot be resumed."""
    need_checkpoint(state, source)
    missing = {"options", "epoch", "step", "epoch_step", "optimizers", "extra", "rng"} - set(state)
    need(not missing, f"{source} lacks {', '.join(sorted(missing))}, which a resume needs: train it again with "
         f"this train_gan.py")
    return state["options"]


@contextmanager
def refused_unless_it_fits(state, source: Path | None):
    """A checkpoint's tensor that does not fit the model its own config builds: a UsageError naming it and `source`."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"{source} does not match a {state['model']} of its own config: "
                         f"{str(e).strip().splitlines()[-1].strip()}") from None


def load_model(state, source: Path | None = None) -> Model:
    """The model a checkpoint holds, to use: built from its own config, its weights loaded, in eval mode; no optimiser,
    and the global random state left as it was. A file of another kind is a UsageError naming `source`."""
    need_checkpoint(state, source)
    model_cls, config_cls, _ = MODELS[state["model"]]
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config_cls(**state["config"]))
    with refused_unless_it_fits(state, source):
        for name in model_networks(model):
            getattr(model, name).eval().load_state_dict(state["nets"][name])
    return model


# ----------------------------------------------------------------------------- the run

def train(args: argparse.Namespace, stop: StopFlag | None = None) -> Trainer:
    """Train as `args` (parse_options') ask: the set-up, what a run needs in order, then the epoch loop. Under torchrun
    every rank trains; rank 0 alone prints and writes the run's folder, held for the whole run. Returns the trainer."""
    rank, world, device = init_distributed(pick_device(args.device))
    opts, checkpoint = resolve_options(args, device)
    folder = RunFolder(opts.output_dir / opts.name, f"continue with: {resume_command(opts)}")  # works as printed
    with guarded(folder, opts, lead=rank == 0):
        trainer, epoch_step = trainer_for(opts, device, checkpoint, folder.latest)
        folders = find_domains(opts.dataroot, opts.direction)
        data, sampler, loader, steps = make_loader(opts, trainer, folders, rank, world)
        fixed = fixed_images(folders, opts.crop_size, trainer.model.config)
        stop, lead = stop or StopFlag(world, rank == 0).install(), rank == 0
        if lead:
            record_start(opts, trainer, folder, data, steps, epoch_step, f"{device} x {world}")
        halt = False  # asked to stop, on every rank
        for epoch in range(trainer.epoch, trainer.total_epochs):
            sampler.set_epoch(epoch, epoch_step * opts.batch_size, steps * opts.batch_size)
            with EpochMeter(steps, epoch_step, f"epoch {epoch + 1}/{trainer.total_epochs}", lead) as meter:
                for x, y, waited in batches(loader, warn=lead):
                    meter.add(trainer.train_step(x, y), waited)  # the losses stay on the device: nothing waits
                    epoch_step += 1
                    halt = any_rank(stop.requested)  # every rank stops after the same step
                    if epoch_step % opts.log_every == 0 or epoch_step == steps or halt:
                        losses = meter.read(trainer.global_step)  # waits for the device; a NaN stops the run
                        if lead:
                            folder.log_losses(trainer.global_step, epoch + 1, losses)
                    if halt:
                        break
            done = epoch_step >= steps  # asked to stop on an epoch's last step, the epoch is finished first
            if done:
                trainer.end_epoch()
                epoch_step = 0
            if lead:  # the checkpoint first: a picture that cannot be written costs no training
                folder.save_checkpoint(trainer.state(epoch_step, saved_options(opts)),
                                       keep=done and opts.save_every > 0 and trainer.epoch % opts.save_every == 0)
                if done:
                    print(f"epoch {trainer.epoch}/{trainer.total_epochs}: " + folder.end_epoch(
                        trainer.epoch, meter.means(), *pictures(opts, trainer, fixed),
                        **meter.timing(opts.batch_size * world)))  # the images of all ranks
                if halt:
                    print(f"stopped at epoch {trainer.epoch + 1}, step {epoch_step}: saved {folder.latest}; "
                          f"{folder.how_to_continue}")
            if halt:
                break
    return trainer


def trainer_for(opts: argparse.Namespace, device: torch.device, checkpoint: dict | None = None,
                source: Path | None = None) -> tuple[Trainer, int]:
    """(trainer on `device`, steps into its epoch): a resume's as its checkpoint (from `source`) left it, with its
    options' precision and schedule; else a new one, the weights drawn on the CPU after seeding with --seed."""
    with memory_or_stopped("setting up the run", "free the device's memory, or pass --device cpu"):
        if checkpoint is None:
            torch.manual_seed(opts.seed)
            trainer, epoch_step = Trainer(MODELS[opts.model][0](config_of(opts)), device, opts.precision,
                                          opts.compile), 0
        else:
            trainer, epoch_step = Trainer.load(checkpoint, device, opts.precision, source, opts.compile)
            trainer.set_schedule(epochs=opts.epochs, epochs_decay=opts.epochs_decay, lr=opts.lr)
    if dist.is_initialized():  # same weights on every rank; from here each rank its own draws (pools, patches, flips)
        torch.manual_seed(opts.seed + 1_000 * dist.get_rank() + trainer.global_step)
    return trainer, epoch_step


def make_loader(opts: argparse.Namespace, trainer: Trainer, folders: dict, rank: int = 0, world: int = 1):
    """(dataset, sampler, loader, steps an epoch, up to --max-steps) over the training folders, a share each rank."""
    model, cfg = trainer.model, trainer.model.config
    data = UnpairedDataset(folders["train_x"], folders["train_y"], opts.load_size, opts.crop_size,
                           cfg.channels_x, cfg.channels_y,
                           no_crop_from_epoch=None if model.resize_crop_in_decay else cfg.epochs)
    sampler = PairSampler(len(data.files[0]), len(data.files[1]), opts.seed, rank, world)
    loader = data_loader(data, sampler, opts.batch_size, opts.workers, trainer.device.type == "cuda")
    return data, sampler, loader, min(math.ceil(sampler.epoch_size() / opts.batch_size), opts.max_steps or math.inf)


def fixed_images(folders: dict, size: int, config) -> list[torch.Tensor]:
    """The x and the y every epoch's pictures show: each domain's first 4 test (else training) images, size x size."""
    return [load_fixed_images(folders[f"test_{d}"] or folders[f"train_{d}"], 4, size, channels)
            for d, channels in (("x", config.channels_x), ("y", config.channels_y))]


def resume_command(opts: argparse.Namespace, **changes) -> str:
    """The command that continues this run: --resume, its name and folder, and the options this command
    was given that a resume may change (the checkpoint keeps the rest), with `changes`."""
    words = ["python", "train_gan.py", "--resume", "--name", opts.name] + \
        (["--output-dir", str(opts.output_dir)] if opts.output_dir != Path("output") else [])
    for key in sorted((opts.given & RESUME_MAY_CHANGE) | set(changes)):
        value, flag = changes.get(key, getattr(opts, key)), "--" + key.replace("_", "-")
        text = f"{value:g}" if isinstance(value, float) else str(value)
        words += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, text]
    return shlex.join(words)


def record_start(opts, trainer: Trainer, folder: RunFolder, data: UnpairedDataset, steps: int, epoch_step: int,
                 where: str) -> None:
    """Rank 0's start: what runs where and how long, and the presets it took; the run folder's record (options.json)
    and page; a new run's checkpoint at step 0, so that the --resume a failure advises works from the first step."""
    print(("resuming " if epoch_step or trainer.global_step else "") + f"{opts.model} on {where} | data "
          f"{opts.dataroot} ({len(data.files[0])} X, {len(data.files[1])} Y) | crop {opts.crop_size} (load "
          f"{opts.load_size}) | batch {opts.batch_size} | {steps} steps/epoch x {trainer.total_epochs} epochs | at "
          f"epoch {trainer.epoch + 1} step {epoch_step} | out {folder.path}")
    filled = [f"{k}={v}" for k, v in presets(trainer.device).items() if not opts.resume and k not in opts.given]
    if filled:
        print(f"defaults for {trainer.device.type}: {', '.join(filled)}")
    if trainer.epoch >= trainer.total_epochs:
        print("this run has trained all its epochs: to train on, resume with more --epochs or --epochs-decay")
    folder.start(saved_options(opts), opts.given - NOT_OF_THE_RUN, opts.command, trainer.epoch, epoch_step,
                 f"{opts.name}: {opts.model} on {opts.dataroot.name}", trainer.model.visuals_caption(),
                 trainer.total_epochs)
    if not opts.resume:
        folder.save_checkpoint(trainer.state(0, saved_options(opts)))


# The ranks under torchrun: each process trains on its share of the images, with the same weights.

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


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank, by a vote on a CPU group, which never waits for a GPU (alone: `flag`)."""
    if not dist.is_initialized():
        return flag
    votes = torch.tensor([int(flag)])
    dist.all_reduce(votes, dist.ReduceOp.MAX, group=vote_group(dist.group.WORLD))
    return bool(votes)


@functools.cache
def vote_group(world) -> dist.ProcessGroup:
    """The ranks' gloo group for their votes, made by every rank at its first vote in the process group `world`."""
    return dist.new_group(backend="gloo")


class Diverged(Exception):
    """A loss that stopped being finite, here or on another rank: the command ends the run in one line (`guarded`)."""


class EpochMeter(tqdm):
    """An epoch's progress bar (`show`: rank 0's) and bookkeeping: time, wait for data, losses summed on the device."""

    def __init__(self, steps: int, first: int, title: str, show: bool):
        super().__init__(total=steps, initial=first, desc=title, leave=False, dynamic_ncols=True, disable=not show)
        self.began, self.waited = time.time(), 0.0
        self.window, self.count, self.sums, self.steps = {}, 0, {}, 0

    def add(self, losses: dict[str, torch.Tensor], waited: float) -> None:
        """A step's losses, still on the device, and the seconds it waited for its batch."""
        self.window = {k: self.window.get(k, 0.0) + v for k, v in losses.items()}
        self.count, self.waited = self.count + 1, self.waited + waited
        self.update()

    def read(self, step: int) -> dict[str, float]:
        """Each loss's mean over the window, read to the host in one copy; one not finite on a rank raises Diverged."""
        mean = dict(zip(self.window, (torch.stack([v.float() for v in self.window.values()]) / self.count).tolist()))
        bad = [k for k, v in mean.items() if not math.isfinite(v)]
        if any_rank(bool(bad)):
            raise Diverged((f"loss {bad[0]} became {mean[bad[0]]}" if bad else "a loss on another rank diverged")
                           + f" by step {step}")
        self.sums = {k: self.sums.get(k, 0.0) + v * self.count for k, v in mean.items()}
        self.steps, self.window, self.count = self.steps + self.count, {}, 0
        self.set_postfix({k: f"{v:.3f}" for k, v in mean.items()}, refresh=False)
        return mean

    def means(self) -> dict[str, float]:
        return {k: v / self.steps for k, v in self.sums.items()}

    def timing(self, images_per_step: int) -> dict[str, float]:
        """Seconds so far, the share of them spent waiting for data, and the images trained per second."""
        seconds = max(time.time() - self.began, 1e-6)
        return {"seconds": round(seconds, 1), "data_wait": self.waited / seconds,
                "images_per_sec": self.steps * images_per_step / seconds}


# Where the picture of a model's similarity maps asks: (row, col) fractions of G(x), centre, upper right, lower left.
QUERY_POINTS = ((0.5, 0.5), (0.3, 0.7), (0.8, 0.2))


def pictures(opts: argparse.Namespace, trainer: Trainer, fixed: list[torch.Tensor]) -> tuple:
    """What the networks make of the fixed images (x, y): the grid's rows; a model's similarity maps (CUT's: x, G(x),
    the maps, QUERY_POINTS); and D's verdicts on each patch of real and translated images (the model's `verdicts`)."""
    with trainer.evaluating() as model:
        x, y = (t.to(trainer.device) for t in fixed)
        maps = None
        if opts.nce_map and hasattr(model, "similarity_maps"):
            fake = getattr(model, model.directions["x2y"])(x[:2])
            maps = x[:2], fake, model.similarity_maps(fake, x[:2], QUERY_POINTS), QUERY_POINTS
        return model.visuals(x, y), maps, model.verdicts(x, y) if opts.d_map else None


# ----------------------------------------------------------------------------- benchmark, main

def benchmark(args: argparse.Namespace) -> dict:
    """Time --benchmark N steps after 3 warm-up ones; rank 0 prints a JSON line: the median step, the median wait for
    its batch, the peak memory (under torchrun every rank steps, and images/s counts them all)."""
    rank, world, device = init_distributed(pick_device(args.device))
    opts, _ = resolve_options(args, device)
    trainer, _ = trainer_for(opts, device)
    _, sampler, loader, _ = make_loader(opts, trainer, find_domains(opts.dataroot, opts.direction), rank, world)

    def epochs():  # the loader's batches, epoch after epoch
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from batches(loader, warn=rank == 0)
    warmup, times, waits = 3, [], []
    with memory_or_stopped(f"at crop {opts.crop_size}x{opts.crop_size}, batch {opts.batch_size}",
                           "lower --crop-size or --batch-size"):
        for i, (x, y, waited) in zip(range(warmup + opts.benchmark), epochs()):
            start = time.perf_counter()
            trainer.train_step(x, y)
            if device.type in ("cuda", "mps"):
                getattr(torch, device.type).synchronize()  # the step's kernels have run
            if i >= warmup:
                times.append(time.perf_counter() - start)
                waits.append(waited)
    sec = statistics.median(times)
    result = {"model": opts.model, "device": str(device), "processes": world,
              **{k: getattr(opts, k) for k in ("precision", "compile", "crop_size", "batch_size", "netG", "workers")},
              "sec_per_iter": round(sec, 4), "data_wait_sec": round(statistics.median(waits), 4),
              "images_per_sec": round(opts.batch_size * world / sec, 3), "peak_mem_mb": peak_memory_mb(device),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if rank == 0:
        print(json.dumps(result))
    return result


@contextmanager
def guarded(folder: RunFolder, opts: argparse.Namespace, lead: bool):
    """Around a run: its folder locked (rank 0); out of memory or a diverged loss ended in one line; the page's end."""
    with ExitStack() as held:
        if lead:
            held.enter_context(folder.hold(new=not opts.resume))
            held.callback(folder.finish)
        held.enter_context(memory_or_stopped(f"at crop {opts.crop_size}x{opts.crop_size}, batch {opts.batch_size}",
                                             f"lower --crop-size or --batch-size, then {folder.how_to_continue}"))
        try:
            yield
        except Diverged as e:
            raise RunError(f"{e}: {folder.latest} keeps the last good state; continue with: "
                           f"{resume_command(opts, lr=opts.lr / 2)}") from None


def main(argv: list[str] | None = None) -> int:
    """`train_gan.py [options]` trains (or benchmarks); `train_gan.py download NAME` fetches a dataset."""
    argv = sys.argv[1:] if argv is None else argv

    def command():
        if argv[:1] == ["download"]:
            return download_command(argv[1:])
        args = parse_options(argv)
        try:
            benchmark(args) if args.benchmark else train(args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
