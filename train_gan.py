"""Train CycleGAN, CUT or FastCUT on unpaired images (the README's Usage), in the parts marked below, top to bottom.
"""
import os
import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch loads ends quietly too (at once: an import may catch SystemExit)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import argparse
import itertools
import json
import math
import shlex
import statistics
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from cut_model import CUT, FASTCUT, CUTConfig
from cycle_gan import CycleGAN, CycleGANConfig
from data_utility import (DEVICES, CommandError, PairSampler, Parser, RunError, RunFolder, StopFlag, UnpairedDataset,
                          UsageError, as_typed, at_least, batches, cpu_has_native_bf16, data_loader, download_command,
                          find_domains, load_fixed_images, load_torch, need, peak_memory_mb, pick_device, run_command,
                          smallest_side, stop_if_a_write_fails, stop_if_out_of_memory)

# ----------------------------------------------------------------------------- the run record, decided once


# Each model by name: its class, its config, what the name changes in the config's defaults. What the commands use
# of a model, cycle_gan.CycleGAN shows; similarity_maps is CUT's alone, extra_state and load_extra_state CycleGAN's.
MODELS = {"cycle_gan": (CycleGAN, CycleGANConfig, {}), "cut": (CUT, CUTConfig, {}),
          "fastcut": (CUT, CUTConfig, FASTCUT)}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BUNDLED = Path(__file__).resolve().parent / "data" / "apple2orange_small"


def option(default, help: str, resume: str = "changeable", **argparse_kw):
    """A field of Run. On a --resume it is 'changeable', 'fixed' (a flag changing it is refused) or 'this_call' (the
    call's own, never saved)."""
    return field(default=default, metadata=dict(help=help, resume=resume, **argparse_kw))


@dataclass
class Run:
    """Every option of a run that is not its model's: what to train, on what data and machine, what to write."""
    model: str = option("fastcut", "what to train (with --resume, the run's)", "fixed", choices=tuple(MODELS))
    dataroot: Path = option(BUNDLED, "dataset folder: trainA/ trainB/ [testA/ testB/], or x_train/ ...")
    name: str = option("", "run name (MODEL_DATASET unless given): OUTPUT_DIR/NAME", "this_call")
    output_dir: Path = option(Path("output"), "where runs are written", "this_call")
    resume: bool = option(False, "go on with the run OUTPUT_DIR/NAME from its latest.pt", "this_call",
                          action="store_true")
    direction: str = option("AtoB", "BtoA learns B -> A: X is the B folder", "fixed", choices=("AtoB", "BtoA"))
    seed: int = option(0, "seed of weights, data order and augmentation", "fixed")
    batch_size: int = option(1, "images per domain per step (the papers use 1)", at_least=1)
    load_size: int = option(286, "images are resized to this square size ...", at_least=1)
    crop_size: int = option(256, "... then randomly cropped to this size", at_least=1)
    max_steps: int = option(0, "cap on steps per epoch (0: whole epochs)", at_least=0)
    precision: str = option("fp32", "fp32, the official math, or autocast (fp16: CUDA only)", choices=tuple(PRECISIONS))
    device: str = option("auto", "auto: cuda, then mps, then cpu", "this_call", choices=DEVICES)
    workers: int = option(0, "data-loading processes (0: the main one)", "this_call", at_least=0)
    compile: bool = option(False, "torch.compile the networks (slow first steps, faster later)", "this_call",
                           action="store_true")
    benchmark: int = option(0, "time N steps, print JSON, write nothing", "this_call", at_least=0, metavar="N")
    log_every: int = option(10, "steps averaged into each row of losses.csv", at_least=1)
    save_every: int = option(10, "also keep epoch_NNN.pt every N epochs (0: never)", at_least=0)
    nce_map: bool = option(True, "write nce_epoch_NNN.png, PatchNCE's matches (CUT, FastCUT)")
    d_map: bool = option(True, "write d_epoch_NNN.png, D's verdict on each patch, and its balance")


def device_defaults(device: torch.device) -> dict:
    """The one place the device changes a default. On a CPU, crop 128 with 6 residual blocks (CycleGAN appendix 7.2's
    setting at 128), 150 steps an epoch; on a GPU, half the cores load data (1 to 8)."""
    if device.type == "cpu":
        return dict(crop_size=128, load_size=143, max_steps=150, netG="resnet_6blocks")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return dict(workers=max(1, min(8, cores // (2 * int(os.environ.get("LOCAL_WORLD_SIZE", 1))))))


def decide(argv: list[str]) -> tuple[Run, object, torch.device, dict | None]:
    """The run record, the model's config, the device and a resume's checkpoint, checked: every option's value is
    decided here. A flag given wins; else a resume's saved value, device_defaults, the model's preset, the field's."""
    given = asdict(Run()) | vars(parser(Run).parse_known_args(argv)[0])  # a first look: the run's options
    device, model = pick_device(given["device"]), given["model"]
    dataroot = Path(given["dataroot"]).resolve()  # kept whole, so a resume finds it from any folder
    name = given["name"] or f"{model}_{dataroot.name}"
    checkpoint = read_checkpoint(RunFolder(Path(given["output_dir"]) / name).latest) if given["resume"] else None
    saved = {**checkpoint["run"], **checkpoint["config"]} if checkpoint else {}
    model_cls, config_cls, preset = MODELS[saved.get("model", model)]
    resumes = {f.name: f.metadata.get("resume", "fixed") for f in fields(Run) + fields(config_cls)}  # model: fixed
    saved = {k: v for k, v in saved.items() if resumes.get(k, "this_call") != "this_call"}
    defaults = {**record(Run(model=model, name=name)), **record(config_cls(**preset)), **saved,
                **{k: v for k, v in device_defaults(device).items() if not saved or resumes[k] == "this_call"}}
    values = vars(parser(Run, config_cls, defaults=defaults).parse_args(argv))
    for key in (k for k in saved if resumes[k] == "fixed" and values[k] != saved[k]):
        typed = as_flag(key, values[key])
        raise UsageError(f"this run was started with {as_flag(key, saved[key])}; {typed} would change it: drop "
                         f"{typed.split()[0]}, or start a new --name")
    run = Run(**{f.name: values[f.name] for f in fields(Run)} | dict(device=device.type, name=name,
                                                                       dataroot=Path(values["dataroot"]).resolve()))
    try:
        config = config_cls(**{f.name: values[f.name] for f in fields(config_cls)})
        with torch.device("meta"):  # shapes only: nothing is computed or allocated
            check(run, config, model_cls(config), device)
    except ValueError as e:  # an option the model cannot be built with
        raise UsageError(str(e)) from None
    done = checkpoint["epoch"] if checkpoint else 0
    need(config.epochs + config.epochs_decay >= done, f"this run has finished epoch {done}: --epochs {config.epochs} "
         f"--epochs-decay {config.epochs_decay} would end it before that; ask for {done} or more in all")
    return run, config, device, checkpoint


def parser(*records, defaults: dict | None = None) -> Parser:
    """The flags of the fields of `records`, with `defaults` (none: a first look at what was given)."""
    model = defaults["model"] if defaults else None
    p = Parser(prog="train_gan.py" + (f" --model {model}" if model else ""), usage="%(prog)s [options]",
               add_help=defaults is not None,
               description="Train CycleGAN, CUT or FastCUT with the defaults shown (this machine's; a resume's are its "
               "run's). --model cut --help lists CUT's options. 'train_gan.py download NAME' fetches a dataset; to use "
               "a model: translate.py.")
    for title, record_cls in zip(("the run", f"--model {model}"), records):
        group = p.add_argument_group(title)
        for f in fields(record_cls):
            kw = {k: v for k, v in f.metadata.items() if k in ("help", "choices", "metavar", "action")}
            kind, low = type(f.default), f.metadata.get("at_least", f.metadata.get("above"))
            default = defaults[f.name] if defaults else argparse.SUPPRESS
            if kind is bool:
                kw.setdefault("action", argparse.BooleanOptionalAction)
            elif kind is tuple:  # typed comma-separated, its default too: argparse reads a text default by `type`
                kw["type"] = lambda text: tuple(int(t) if t.isdigit() else t for t in text.replace(" ", "").split(","))
                default = as_typed(default) if defaults else default
            else:
                kw["type"] = kind if low is None else at_least(low, kind, strict="above" in f.metadata)
            group.add_argument("--" + f.name.replace("_", "-"), **kw, default=default)
    return p


def read_checkpoint(source: Path) -> dict:
    """The checkpoint a resume goes on from; another kind of file is a UsageError naming it."""
    state = load_torch(source, "no run to resume there; check --name and --output-dir")
    need(run_record(state), f"{source} is not a checkpoint of a train_gan.py run (translate.py uses an official "
         f".pth): pass a latest.pt of train_gan.py")
    need({"run", "epoch", "step", "images", "optimizers", "extra", "rng"} <= set(state), f"{source} cannot be resumed"
         f": an earlier train_gan.py wrote it, or it holds weights only; translate.py uses it as it is; to train on, "
         f"start a new --name")
    return state


def run_record(state) -> dict | None:
    """The run record a checkpoint of train_gan.py keeps (an earlier version's: its model and options), else None."""
    if not (isinstance(state, dict) and {"config", "nets"} <= set(state)):
        return None
    return state.get("run") or ({"model": state["model"], **state.get("options", {})}
                                if state.get("model") in MODELS else None)


def record(options) -> dict:
    """A run record or a config as the checkpoint and options.json keep it."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}


def as_flag(key: str, value) -> str:
    """An option as it is typed: --ngf 64, --nce-layers 0,4; a yes-or-no one --nce-idt or --no-nce-idt."""
    flag = "--" + key.replace("_", "-")
    return (flag if value else f"--no-{flag[2:]}") if isinstance(value, bool) else f"{flag} {as_typed(value)}"


def check(run: Run, config, model, device: torch.device) -> None:
    """Refuse options that cannot work together; warn of a slow one."""
    need(run.crop_size <= run.load_size, f"--crop-size {run.crop_size} is larger than --load-size {run.load_size}: "
         f"lower one or raise the other")
    if isinstance(config, CUTConfig):  # Eq. 2 contrasts each query with its negatives: it needs one at least
        p, b, source = config.num_patches, run.batch_size, config.nce_negatives
        fix = "--batch-size" if source == "others" else "--num-patches"
        need(not config.lambda_nce or {"image": p - 1, "batch": b * p - 1, "others": (b - 1) * p}[source] > 0,
             f"--nce-negatives {source} with "
             f"--num-patches {p} and --batch-size {b} leaves a query no negatives: pass {fix} 2 or more")
    need(0 <= config.beta1 < 1, f"--beta1 {config.beta1} is outside [0, 1), which torch.optim.Adam refuses: use 0.5")
    need(run.precision != "fp16" or device.type == "cuda", f"--precision fp16 is for CUDA GPUs (on {device.type} "
         f"G's gradients come out NaN): use fp32, or bf16")
    if run.precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 runs far slower than fp32 here "
                      "(about 40x on an AVX2 CPU); use --precision fp32")
    multiple = getattr(model, model.directions["x2y"]).side_multiple
    smallest = smallest_side([getattr(model, name) for name in networks(model)], multiple)
    fits = max(smallest, -(-run.crop_size // multiple) * multiple)
    need(run.crop_size >= smallest and run.crop_size % multiple == 0,
         f"--model {run.model} with --netG {config.netG} trains on crops of at least {smallest} pixels, a multiple of "
         f"{multiple}; got --crop-size {run.crop_size}: use --crop-size {fits}"
         + " or a resnet generator" * (multiple > 4))


def networks(model) -> list[str]:
    """The names of a model's networks, group by group."""
    return [name for members in model.groups.values() for name in members]


# ----------------------------------------------------------------------------- the Trainer and the checkpoint

def lr_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """The official 'linear' policy, as the CUT repository sets it after each epoch (docs/GUIDE.md: departures)."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1)


def adam(params: list[torch.nn.Parameter], config) -> torch.optim.Adam:
    """Adam with the official lr and betas, fused where torch has the kernel."""
    try:
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, 0.999), fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, 0.999))


class Trainer:
    """What training needs beyond the paper, handed to a model's train_step: an Adam per group, the lr schedule,
    precision, the gradients' mean over ranks, where training stands."""

    def __init__(self, model, device: torch.device | str = "cpu", precision: str = Run.precision,
                 compiled: bool = Run.compile):
        self.model, self.device, self.precision = model, torch.device(device), precision
        self.nets = torch.nn.ModuleDict({name: getattr(model, name) for name in networks(model)}).to(device).train()
        if compiled:  # in place: the weights keep their names
            for net in self.nets.values():
                net.compile()
        self.optimizers = {group: adam([p for n in members for p in self.nets[n].parameters()], model.config)
                           for group, members in model.groups.items()}
        # fp16 needs loss scaling, or small gradients flush to zero; bf16 and fp32 do not.
        self.scalers = {group: torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
                        for group in model.groups}
        self.epoch, self.global_step, self.seen = 0, 0, 0  # epochs finished, steps taken, images of this epoch
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.epochs = model.config.epochs + model.config.epochs_decay
        self.set_lr()

    def autocast(self):
        """The precision of forward passes and losses (fp32: as they are)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype) if dtype else nullcontext()

    def backward(self, loss: torch.Tensor, group: str) -> None:
        """Add `loss`'s gradients to those of `group`."""
        self.scalers[group].scale(loss).backward()

    def step(self, group: str) -> None:
        """One Adam step of `group` on its gradients, then freed. Under torchrun each gradient is first its mean over
        the ranks, in one all-reduce."""
        optimizer = self.optimizers[group]
        if self.world > 1:
            params = [p for members in optimizer.param_groups for p in members["params"]]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            dist.all_reduce(flat)
            for p, grad in zip(params, (flat / self.world).split([p.numel() for p in params])):
                p.grad = grad.view_as(p)
        self.scalers[group].step(optimizer)
        self.scalers[group].update()
        optimizer.zero_grad(set_to_none=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step on x (B, C_x, H, W) and y (B, C_y, H, W); its losses, 0-dim tensors out of the graph."""
        losses = self.model.train_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                                       self)
        self.global_step, self.seen = self.global_step + 1, self.seen + len(x) * self.world
        return {k: v.detach().float() for k, v in losses.items()}

    def finish_epoch(self) -> None:
        """Count a finished epoch and set the lr of the next."""
        self.epoch, self.seen = self.epoch + 1, 0
        self.set_lr()

    def set_lr(self) -> None:
        """This epoch's lr, as the config's schedule says."""
        c = self.model.config
        for group in (g for opt in self.optimizers.values() for g in opt.param_groups):
            group["lr"] = c.lr * lr_factor(self.epoch, c.epochs, c.epochs_decay)

    def state(self, run: Run) -> dict:
        """The checkpoint: everything a resume needs."""
        return {"run": record(run), "config": record(self.model.config), "epoch": self.epoch,
                "step": self.global_step, "images": self.seen,
                "nets": {k: v.state_dict() for k, v in self.nets.items()},
                "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
                "extra": getattr(self.model, "extra_state", dict)(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}}

    def load(self, state: dict, source: Path | None = None) -> None:
        """Go on from a checkpoint of the same model, with this machine's Adam kernel."""
        with checkpoint_must_fit(state, source):
            for name, net in self.nets.items():
                net.load_state_dict(state["nets"][name])
            for k, opt in self.optimizers.items():
                kernel = {key: opt.defaults[key] for key in ("fused", "foreach")}
                opt.load_state_dict(state["optimizers"][k])
                for group in opt.param_groups:
                    group.update(kernel)
        self.epoch, self.global_step, self.seen = state["epoch"], state["step"], state["images"]
        self.set_lr()
        if state["extra"]:
            self.model.load_extra_state(state["extra"], self.device)
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])


@contextmanager
def checkpoint_must_fit(state, source: Path | None):
    """A checkpoint that does not fit the model of its own config: a UsageError naming it."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"{source} does not match a {run_record(state)['model']} of its own config: "
                         f"{str(e).strip().splitlines()[-1].strip()}") from None


def load_model(state, source: Path | None = None):
    """The model a checkpoint holds, in eval mode, the random state left as it was."""
    model_cls, config_cls, _ = MODELS[run_record(state)["model"]]
    known = {f.name for f in fields(config_cls)}  # an earlier version's CUT kept a 'mode'
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config_cls(**{k: v for k, v in state["config"].items() if k in known}))
    with checkpoint_must_fit(state, source):
        for name in networks(model):
            getattr(model, name).eval().load_state_dict(state["nets"][name])
    return model


# ----------------------------------------------------------------------------- the run

def train(argv: list[str], stop: StopFlag | None = None) -> Trainer | None:
    """Train as `argv` asks (with --benchmark, time steps instead): the set-up, then the epoch loop. Under torchrun
    every rank trains; rank 0 alone prints and writes the run's folder."""
    run, config, device, checkpoint = decide(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: this process joins its group
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")  # any_rank's votes: gloo
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if run.benchmark:
        return benchmark(run, config, device, rank, world)
    folders = find_domains(run.dataroot, run.direction)  # the data first: a refusal leaves no run folder
    loader = training_loader(run, config, folders, device, rank, world)
    fixed = [load_fixed_images(folders[f"test_{d}"] or folders[f"train_{d}"], 4, run.crop_size, c)
             for d, c in (("x", config.channels_x), ("y", config.channels_y))]  # every epoch's pictures show
    folder = RunFolder(run.output_dir / run.name, f"continue with: {continue_with(run)}")  # works as printed
    with held_on_rank0(folder, not run.resume, rank), \
            stop_if_a_write_fails(folder.path, folder.resume_hint), \
            stop_if_out_of_memory(f"at crop {run.crop_size}x{run.crop_size}, batch {run.batch_size}",
                                  f"lower --crop-size or --batch-size, then {folder.resume_hint}"):
        trainer = make_trainer(run, config, device, checkpoint, rank)
        stop = stop or StopFlag(world, rank == 0)
        if rank == 0:
            print(start_line(run, trainer, loader))
            folder.start({"run": record(run), "config": record(config)}, ["python", "train_gan.py", *argv],
                         trainer.epoch, trainer.global_step, trainer.seen,
                         f"{run.name}: {run.model} on {run.dataroot.name}", trainer.model.visuals_caption(),
                         trainer.epochs)
            folder.save_checkpoint(trainer.state(run))  # at every start: the --resume advised always works
        for _ in range(trainer.epoch, trainer.epochs):
            row = train_epoch(trainer, loader, run, folder, stop)  # None: stopped inside it; else counted
            if rank == 0:  # the checkpoint first: a picture that cannot be written costs no training
                keep = row and run.save_every and trainer.epoch % run.save_every == 0  # a copy too, epoch_NNN.pt
                folder.save_checkpoint(trainer.state(run), keep)
            if rank == 0 and row:
                line = folder.record_epoch(trainer.epoch, row, *fixed_image_views(trainer, fixed, run))
                print(f"epoch {trainer.epoch}/{trainer.epochs}: {line}")
            if stop.agreed:
                if rank == 0 and trainer.epoch < trainer.epochs:  # after the last epoch it finished
                    print(f"stopped at epoch {trainer.epoch + 1}, image {trainer.seen} of it: saved {folder.latest}; "
                          f"{folder.resume_hint}")
                break
    return trainer


def continue_with(run: Run, **changes) -> str:
    """The command that continues this run, quoted for a shell: its name, this machine's options a resume would not
    pick, `changes`."""
    words = ["python", "train_gan.py", "--resume", "--name", run.name]
    words += ["--output-dir", str(run.output_dir)] if run.output_dir != Run.output_dir else []
    words += ["--device", run.device] if run.device != pick_device(Run.device).type else []
    workers = device_defaults(pick_device(run.device)).get("workers", 0)
    words += ["--workers", str(run.workers)] if run.workers != workers else []
    words += ["--compile"] if run.compile else []
    return shlex.join(words + [w for k, v in changes.items() for w in (f"--{k.replace('_', '-')}", f"{v:g}")])


@contextmanager
def held_on_rank0(folder: RunFolder, new: bool, rank: int):
    """The run's folder, held by rank 0 (RunFolder.held); where rank 0 cannot hold it, every rank stops in one line,
    before any step."""
    with ExitStack() as stack:
        refusal = None
        if rank == 0:
            try:
                stack.enter_context(folder.held(new))
            except CommandError as e:
                refusal = e
        if any_rank(refusal is not None):
            raise refusal or RunError(f"rank 0 could not take {folder.path}: its error says why")
        yield


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank: a vote on the CPU, through gloo, which never waits for a GPU."""
    if not dist.is_initialized():
        return flag
    votes = torch.tensor([int(flag)])
    dist.all_reduce(votes, dist.ReduceOp.MAX)
    return bool(votes)


def make_trainer(run: Run, config, device: torch.device, checkpoint: dict | None, rank: int = 0) -> Trainer:
    """The trainer: a new run's weights drawn from --seed, a resume's from its checkpoint; then each rank's draws."""
    with stop_if_out_of_memory("setting up the run", "free the device's memory, or pass --device cpu"):
        torch.manual_seed(run.seed)
        trainer = Trainer(MODELS[run.model][0](config), device, run.precision, run.compile)
        if checkpoint:
            trainer.load(checkpoint, RunFolder(run.output_dir / run.name).latest)
    if dist.is_initialized():  # every rank has the same weights; from here its own random draws
        torch.manual_seed(run.seed + 1_000 * rank + trainer.global_step)
    return trainer


def training_loader(run: Run, config, folders: dict, device: torch.device, rank: int = 0, world: int = 1):
    """The loader of this rank's share of the training images, with its `.dataset` and `.sampler`."""
    data = UnpairedDataset(folders["train_x"], folders["train_y"], run.load_size, run.crop_size, config.channels_x,
                           config.channels_y, None if MODELS[run.model][0].resize_crop_in_decay else config.epochs)
    sampler = PairSampler(len(data.files[0]), len(data.files[1]), run.seed, rank, world,
                          run.max_steps * run.batch_size * world)
    loader = data_loader(data, sampler, run.batch_size, run.workers, device.type == "cuda",
                         MODELS[run.model][0].drop_last)
    need(len(loader), f"an epoch here has {len(sampler)} pairs of images, too few for one batch of --batch-size "
         f"{run.batch_size} ({run.model} drops a short last batch): lower --batch-size to {len(sampler)}")
    return loader


def start_line(run: Run, trainer: Trainer, loader) -> str:
    """What runs where, on what, for how long."""
    data, steps = loader.dataset, len(loader)  # a whole epoch's: the sampler has not been set to a place in one
    defaults = ", ".join(f"{k}={v}" for k, v in device_defaults(trainer.device).items())
    return (("resuming " if run.resume else "") + f"{run.model} on {trainer.device} x {trainer.world} | data "
            f"{run.dataroot} ({len(data.files[0])} X, {len(data.files[1])} Y) | crop {run.crop_size} (load "
            f"{run.load_size}) | batch {run.batch_size} | {steps} steps/epoch x {trainer.epochs} epochs | at epoch "
            f"{trainer.epoch + 1}, image {trainer.seen} | out {run.output_dir / run.name}"
            + ("" if run.resume else f"\ndefaults on {trainer.device.type} (a flag given wins): {defaults}")
            + ("\nthis run has trained all its epochs: to train on, resume with more --epochs or --epochs-decay"
               if trainer.epoch >= trainer.epochs else ""))


def train_epoch(trainer: Trainer, loader, run: Run, folder: RunFolder, stop: StopFlag) -> dict | None:
    """Train the rest of this epoch and count it finished: its row of epochs.csv (each loss's mean over these steps,
    the seconds, images per second, the share spent waiting for data); None when a rank asked to stop before its end."""
    loader.sampler.set_epoch(trainer.epoch, trainer.seen)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    done, left = math.ceil(trainer.seen / (run.batch_size * trainer.world)), len(loader)  # steps, at this batch size
    if_diverged = (f"{folder.latest} keeps the last good state; continue with: "
                   f"{continue_with(run, lr=trainer.model.config.lr / 2)}")
    began, data_wait = time.perf_counter(), 0.0
    window_sums, window_steps, epoch_sums, epoch_steps = {}, 0, {}, 0  # window: the steps of one row of losses.csv
    with tqdm(total=done + left, initial=done, desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}", leave=False,
              dynamic_ncols=True, disable=not rank0) as bar:
        for x, y, waited in batches(loader, rank0):
            losses = trainer.train_step(x, y)
            window_sums = {k: window_sums.get(k, 0.0) + v for k, v in losses.items()}  # on the device
            window_steps, data_wait, left = window_steps + 1, data_wait + waited, left - 1
            bar.update()
            stop.agreed = any_rank(stop.requested)  # asked on an epoch's last step, the epoch ends first
            if window_steps == run.log_every or not left or stop.agreed:
                means = finite_means(window_sums, window_steps, f"by step {trainer.global_step}: {if_diverged}")
                epoch_sums = {k: epoch_sums.get(k, 0.0) + v * window_steps for k, v in means.items()}
                epoch_steps, window_sums, window_steps = epoch_steps + window_steps, {}, 0
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
                if rank0:
                    folder.log_losses(trainer.global_step, trainer.epoch + 1, means)
            if stop.agreed and left:
                return None
    seconds = max(time.perf_counter() - began, 1e-6)
    trainer.finish_epoch()
    return {**{k: v / epoch_steps for k, v in epoch_sums.items()}, "seconds": round(seconds, 1),
            "images_per_sec": epoch_steps * run.batch_size * trainer.world / seconds, "data_wait": data_wait / seconds}


def finite_means(sums: dict[str, torch.Tensor], steps: int, if_diverged: str) -> dict[str, float]:
    """Each loss's mean over `steps`, in one copy from the device; one not finite on any rank ends the run."""
    means = dict(zip(sums, (torch.stack([v.float() for v in sums.values()]) / steps).tolist()))
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if any_rank(bool(bad)):
        raise RunError(("loss " + ", ".join(f"{k} became {means[k]}" for k in bad) if bad else
                        "a loss on another rank diverged")
                       + f" {if_diverged}")
    return means


def fixed_image_views(trainer: Trainer, fixed: list[torch.Tensor], run: Run) -> tuple:
    """The networks, in eval mode, on the fixed images: the grid, PatchNCE's similarity maps (x, G(x), maps, points),
    D's verdicts."""
    model, (x, y), maps = trainer.model, (t.to(trainer.device) for t in fixed), None
    points = ((0.5, 0.5), (0.3, 0.7), (0.8, 0.2))  # (row, col) fractions of G(x): centre, upper right, lower left
    trainer.nets.eval()
    with torch.no_grad():
        if run.nce_map and hasattr(model, "similarity_maps"):
            fake = getattr(model, model.directions["x2y"])(x[:2])
            maps = x[:2], fake, model.similarity_maps(fake, x[:2], points), points
        views = model.visuals(x, y), maps, model.verdicts(x, y) if run.d_map else None
    trainer.nets.train()
    return views


# ----------------------------------------------------------------------------- benchmark, main

def benchmark(run: Run, config, device: torch.device, rank: int, world: int) -> None:
    """Time N steps after 3 warm-up ones; print the median step, its wait for data, the peak memory, as JSON."""
    trainer = make_trainer(run, config, device, None, rank)
    loader = training_loader(run, config, find_domains(run.dataroot, run.direction), device, rank, world)
    steps = (batch for _ in itertools.count() for batch in batches(loader, rank == 0))  # epoch after epoch
    times = []  # each step's (seconds, seconds waited for its data)
    with stop_if_out_of_memory(f"at crop {run.crop_size}x{run.crop_size}, batch {run.batch_size}",
                               "lower --crop-size or --batch-size"):
        for x, y, waited in itertools.islice(steps, 3 + run.benchmark):
            start = time.perf_counter()
            trainer.train_step(x, y)
            if device.type in ("cuda", "mps"):
                getattr(torch, device.type).synchronize()  # the step's kernels have run
            times.append((time.perf_counter() - start, waited))
    sec, wait = (statistics.median(column) for column in zip(*times[3:]))
    result = {"model": run.model, "device": str(device), "processes": world, "netG": config.netG,
              **{k: getattr(run, k) for k in ("precision", "compile", "crop_size", "batch_size", "workers")},
              "sec_per_iter": round(sec, 4), "data_wait_sec": round(wait, 4),
              "images_per_sec": round(run.batch_size * world / sec, 3), "peak_mem_mb": peak_memory_mb(device),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if rank == 0:
        print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    """`train_gan.py [options]` trains (or benchmarks); `train_gan.py download NAME` fetches a dataset."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["download"]:
        return run_command(lambda: download_command(argv[1:]))
    try:
        return run_command(lambda: train(argv))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
