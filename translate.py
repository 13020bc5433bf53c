"""Use a model (the README's Usage): translate a folder of images at full size, compare models in one picture, or
try an official pretrained CycleGAN. Mirrors the official test.py (and nanoGPT's sample.py). A model is a run's
checkpoint, an official generator file (its architecture read from it) or a zoo name, downloaded once.
"""
import os
import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch loads ends quietly too (at once: an import may catch SystemExit)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import argparse
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from data_utility import (DEVICES, Parser, RunError, UsageError, at_least, fetch, input_channels, list_images,
                          load_fixed_images, load_image, load_torch, make_folder, need, pick_device, run_command,
                          save_grid, save_image, smallest_side, stop_if_a_write_fails, stop_if_out_of_memory, to_image,
                          to_tensor, write_atomically)
from networks import official_generator
from train_gan import load_model, run_record

CACHE = Path(__file__).resolve().parent / "pretrained"
# The official CycleGAN model zoo (junyanz's scripts/download_cyclegan_model.sh): ResNet generators, 9 blocks.
PRETRAINED_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/{}.pth"
OFFICIAL_PRETRAINED = ("apple2orange", "orange2apple", "summer2winter_yosemite", "winter2summer_yosemite",
                       "horse2zebra", "zebra2horse", "monet2photo", "style_monet", "style_cezanne", "style_ukiyoe",
                       "style_vangogh", "sat2map", "map2sat", "cityscapes_photo2label", "cityscapes_label2photo",
                       "facades_photo2label", "facades_label2photo", "iphone2dslr_flower")


def parser() -> Parser:
    p = Parser(prog="translate.py", formatter_class=argparse.HelpFormatter, description="Translate every image of "
               "--input with a model into --output; or with --grid, compare models in one picture.")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=[], metavar="FILE",
                   help="a run's latest.pt or epoch_NNN.pt, or an official generator .pth")
    p.add_argument("--pretrained", nargs="+", default=[], metavar="NAME",
                   help=f"an official CycleGAN generator, downloaded on first use: {', '.join(OFFICIAL_PRETRAINED)}")
    p.add_argument("--input", type=Path, required=True, help="folder of images to translate")
    p.add_argument("--output", type=Path, help="folder for the results, PNGs of the same names, in the same "
                   "subfolders (outside --input)")
    p.add_argument("--direction", choices=("AtoB", "BtoA"),
                   help="which way, named as in training: a run's own way by default; the other needs CycleGAN")
    p.add_argument("--max-side", type=at_least(1), help="scale each image down to this longer side first")
    p.add_argument("--size", type=at_least(1), help="resize each image to size x size first, as the official "
                   "test.py (256: the papers' FID protocol); with --grid, 256 by default")
    p.add_argument("--grid", type=Path, metavar="FILE", help="instead: one .png/.jpg, a row per image (the "
                   "first --count of --input), then each model's result")
    p.add_argument("--count", type=at_least(1), help="--grid: the first COUNT images of --input (6)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda, then mps, then cpu")
    p.add_argument("--cache", type=Path, default=CACHE, help="where --pretrained generators are kept (pretrained/)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: use_models(parser().parse_args(sys.argv[1:] if argv is None else argv)))


def use_models(args) -> None:
    """Check the options, load every model, then write the translations or the grid."""
    models = [*args.checkpoint, *args.pretrained]
    need(models, "name a model: --checkpoint FILE or --pretrained NAME")
    need(args.grid or len(models) == 1 and args.output, "translating a folder takes one model and an --output "
         "folder; to compare models, pass --grid FILE")
    need(not (args.grid and args.output), "--grid writes one picture and --output a folder of them: pass one")
    need(not args.grid or args.grid.suffix.lower() in (".png", ".jpg", ".jpeg"), f"--grid {args.grid} must end in "
         ".png or .jpg")
    flag, place, kind = ("--grid", args.grid, "file") if args.grid else ("--output", args.output, "folder")
    need(not place.resolve().is_relative_to(args.input.resolve()), f"{flag} is --input or inside it: choose a "
         f"{kind} outside it, so no input is overwritten")
    need(not (args.grid and args.grid.is_dir()), f"--grid {args.grid} is a folder: name a file, e.g. {args.grid}"
         f"{os.sep}grid.jpg")
    need(not (args.size and args.max_side), "--size and --max-side both set the size: pass one")
    need(not (args.grid and args.max_side), "--grid resizes each image to --size (256 by default): drop --max-side")
    need(args.grid or not args.count, "--count picks the images of a --grid; --output translates them all: drop it")
    files = list_images(args.input)
    device = pick_device(args.device)
    paths = [*args.checkpoint, *(download_pretrained(name, args.cache) for name in args.pretrained)]
    with stop_if_out_of_memory(f"loading the model(s) onto {device}", "free its memory, or pass --device cpu"):
        generators = [generator(path, device, args.direction) for path in paths]
    # The smallest side an image can have: once padded to its generator's multiple, what that network runs on.
    smallest = max(smallest_side([net], net.side_multiple) - net.side_multiple + 1 for net in generators)
    for flag, side in (("--size", args.size), ("--max-side", args.max_side)):
        need(not side or side >= smallest, f"{flag} {side} makes images smaller than the {smallest} pixels a side "
             f"the model needs: pass {flag} {smallest} or more")
    if args.grid:
        write_grid(generators, args)
    else:
        write_translations(generators[0], files, args, smallest)


def download_pretrained(name: str, root: Path = Path("pretrained"), timeout: float = 30) -> Path:
    """An official generator's file, root/NAME.pth, downloaded the first time."""
    need(name in OFFICIAL_PRETRAINED, f"unknown pretrained model {name!r}: choose one of "
         f"{', '.join(OFFICIAL_PRETRAINED)}")
    target = Path(root) / f"{name}.pth"
    if not target.is_file():
        make_folder(Path(root), "--cache")
        print(f"downloading the official {name} generator into {root} (once)", file=sys.stderr)
        try:
            write_atomically(target, lambda tmp: fetch(PRETRAINED_URL.format(name), tmp,
                                                       f"fetch it elsewhere and save it as {target}", timeout))
        except OSError as e:
            raise UsageError(f"could not save {target} ({e.strerror}): choose another folder for it") from None
    return target


def generator(path: Path, device: torch.device, direction: str | None) -> torch.nn.Module:
    """The generator of a checkpoint or an official file that translates `direction` (None: its own way)."""
    state = load_torch(path)
    run = run_record(state)
    if not run:
        try:
            net = official_generator(state)
        except ValueError as e:
            raise UsageError(f"{path} is neither a checkpoint of train_gan.py nor an official generator: "
                             f"{str(e).splitlines()[0]}") from None
        need(not direction, f"{path} holds one generator, which translates its own way: drop --direction")
        return net.to(device).eval()
    model, trained = load_model(state, path), run.get("direction", "AtoB")
    way = "x2y" if direction in (None, trained) else "y2x"  # the run's X is the folder it trained from
    need(way in model.directions, f"{path} is a {run['model']} model, which translates its own way only "
         f"({trained}): drop --direction {direction}")
    return getattr(model, model.directions[way]).to(device)  # in eval mode, as load_model returns it


@torch.no_grad()
def generate(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """net(x) for (B, C, H, W) images of any size it takes, padded to its multiple and cropped back; the result on
    the CPU."""
    y = net(pad_to_multiple(x.to(next(net.parameters()).device), net.side_multiple))
    return y[..., :x.shape[-2], :x.shape[-1]].cpu()


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad (B, C, H, W) at the bottom/right so H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs pad < side
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)


def write_translations(net: torch.nn.Module, files: list[Path], args, smallest: int) -> None:
    """Each image at its own size (or --max-side's, --size's) as a PNG of its name in OUTPUT, in the subfolder it
    has in INPUT; one under `smallest` skipped."""
    targets = [args.output / f.relative_to(args.input).with_suffix(".png") for f in files]
    twin = next((t for t, n in Counter(targets).items() if n > 1), None)
    need(not twin, f"two images of --input would both be written as {twin}: rename one")
    output, written, channels = make_folder(args.output, "--output"), 0, input_channels(net)
    for f, target in tqdm(zip(files, targets), total=len(files), desc="translate", leave=False):
        img = load_image(f, channels, args.max_side)  # a JPEG decoded at the scale --max-side needs: less memory
        if img is None:
            warnings.warn(f"skipping unreadable image {f}")
            continue
        fix = "raise --max-side" if min(img.size) >= smallest else "scale it up first" + \
            ("" if args.max_side else f", or pass --size {max(smallest, 256)}")
        img = img.resize((args.size, args.size), Image.BICUBIC) if args.size else fit_within(img, args.max_side)
        if min(img.size) < smallest:
            warnings.warn(f"skipping {f} ({img.width}x{img.height}): the generator needs at least {smallest} pixels "
                          f"a side; {fix}")
            continue
        with stop_if_out_of_memory(f"translating {f.name} ({img.width}x{img.height}, batch 1)",
                                   "pass --max-side N to scale images down first (e.g. --max-side 1024)"):
            y = generate(net, to_tensor(img)[None])
        with stop_if_a_write_fails(output, "run the same command again; the images written before it are complete"):
            target.parent.mkdir(parents=True, exist_ok=True)
            save_image(to_image(y[0]), target)
        written += 1
    if not written:
        raise RunError(f"none of the images of {args.input} could be translated: see the warnings above")
    print(f"translated {written} images into {output}")


def fit_within(img: Image.Image, max_side: int | None) -> Image.Image:
    """`img` scaled down, its aspect kept, so its longer side is at most max_side."""
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)


def write_grid(generators: list[torch.nn.Module], args) -> None:
    """One picture: a row per input image, then each model's translation of it."""
    channels = {input_channels(net) for net in generators}
    need(len(channels) == 1, f"the models take {' and '.join(map(str, sorted(channels)))}-channel inputs: compare "
         f"models of the same domains")
    size = args.size or 256
    x = load_fixed_images(args.input, args.count or 6, size, channels.pop())
    with stop_if_out_of_memory(f"translating {len(x)} images of {size}x{size} at once (batch {len(x)})",
                               "lower --count or --size"):
        outputs = [generate(net, x) for net in generators]
    make_folder(args.grid.parent, "--grid")
    with stop_if_a_write_fails(args.grid.parent, "run the same command again"):
        save_grid([[x[i], *(y[i] for y in outputs)] for i in range(len(x))], args.grid)
    print(f"wrote {args.grid}: {len(x)} rows of the input and {len(generators)} translation(s)")


if __name__ == "__main__":
    sys.exit(main())
