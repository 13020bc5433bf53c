"""Data and files for unpaired translation, in the four parts marked below, each name defined before its first use.
The data pairs the two domains' images at random, as the official data/unaligned_dataset.py does.
"""
import argparse
import csv
import html
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import urllib.request
import warnings
import zipfile
from collections import namedtuple
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

# ============================================================================= 1. the words every part uses


class CommandError(Exception):
    """What a command ends with: one line for its user."""

    def __str__(self) -> str:
        text = super().__str__()
        # Raised in a data-loading worker, it comes back wrapped in the worker's traceback: its own last line.
        return text.strip().splitlines()[-1].split(": ", 1)[-1] if "Original Traceback" in text else text


class UsageError(CommandError):
    """A bad option, file or dataset, found before any work (exit code 2)."""


class RunError(CommandError):
    """A started command that cannot go on (exit code 1)."""


def need(ok: bool, message: str) -> None:
    """A UsageError saying `message` unless `ok`."""
    if not ok:
        raise UsageError(message)


def write_atomically(path: Path, write) -> None:
    """Write `path` through a file renamed over it, so a full disk, a crash or Ctrl-C leaves it as it was. Every
    file the commands write goes through here, except the rows appended to a log; a failure is an OSError naming
    `path`."""
    tmp = Path(f"{path}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):  # a folder that cannot hold one (under a file) has none to remove
            tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):  # torch.save's short write
            e = e.__context__
        if isinstance(e, (OSError, RuntimeError)):
            raise OSError(getattr(e, "errno", 0), getattr(e, "strerror", None) or str(e).splitlines()[0],
                          str(path)) from None
        raise


@contextmanager
def stop_if_a_write_fails(where: Path, then: str):
    """A failed write inside the block ends the command in one line: the file, the cause, what to do."""
    try:
        yield
    except OSError as e:
        raise RunError(f"could not write {e.filename or 'a file'} ({e.strerror or e}): free some disk space or "
                       f"fix {where}, then {then}") from None


def make_folder(folder: Path, flag: str) -> Path:
    """Create `folder`, given by option `flag`, or say in one line why it cannot be one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder} cannot be made a folder ({e.strerror}): choose another {flag}") from None
    need(os.access(folder, os.W_OK), f"{flag} {folder} is read-only: choose another {flag}")
    return folder


def save_image(img: Image.Image, path: Path) -> None:
    """Save a picture whole or not at all, in the format its suffix names (.png, .jpg)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    write_atomically(path, lambda tmp: img.save(tmp, format=fmt))


# ============================================================================= 2. the data

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
LAYOUTS = {"trainA/trainB/testA/testB": ("trainA", "trainB", "testA", "testB"),  # train X, Y, test X, Y
           "x_train/y_train/x_test/y_test": ("x_train", "y_train", "x_test", "y_test")}
Image.MAX_IMAGE_PIXELS = 1 << 30  # Pillow's bomb check stops at ~179 MP; a dataset's photos may reach 1 GP
Pick = namedtuple("Pick", "x y seed epoch")  # an item of an epoch: an image of X, one of Y, their jitter's seed, epoch


def list_images(folder: Path) -> list[Path]:
    """Every image below `folder`, sorted; none, or no folder, is a UsageError."""
    need(Path(folder).is_dir(), f"image folder {folder} " + ("is a file: pass the folder that holds it"
                                                            if Path(folder).exists() else "does not exist"))
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    need(files, f"no images ({' '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def find_domains(root: Path, direction: str = "AtoB") -> dict[str, Path | None]:
    """A dataset's folders: train_x, train_y, test_x, test_y (None where there is no test folder)."""
    root = Path(root)
    need(root.is_dir(), f"dataroot {root} {'is a file' if root.exists() else 'does not exist'}: pass --dataroot with "
         f"a folder holding trainA/ and trainB/ (or x_train/ and y_train/)")
    for names in LAYOUTS.values():
        if (root / names[0]).is_dir() and (root / names[1]).is_dir():
            folders = [root / n if (root / n).is_dir() else None for n in names]
            order = (1, 0, 3, 2) if direction == "BtoA" else (0, 1, 2, 3)
            return dict(zip(("train_x", "train_y", "test_x", "test_y"), (folders[i] for i in order)))
    found = ", ".join(sorted(p.name + "/" for p in root.iterdir() if p.is_dir())) or "no folders"
    raise UsageError(f"dataroot {root} has neither layout {' nor '.join(LAYOUTS)}; found {found}")


def load_image(path: Path, channels: int = 3, min_side: int | None = None) -> Image.Image | None:
    """Any image as 8-bit RGB (channels 3) or gray (1), upright as its EXIF says, a 16-bit one scaled to 8 bits and a
    float one stretched to its range (Pillow would clip them); None for a file broken or gone. With `min_side`, a
    JPEG decodes at a reduced scale."""
    try:
        with Image.open(path) as opened:  # closed even when the file turns out broken
            if min_side:
                opened.draft(opened.mode, (min_side, min_side))
            opened.load()
            img = ImageOps.exif_transpose(opened)
    except Exception:  # Pillow raises many types for a broken file
        return None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16 bits a pixel (a PNG's "I" too) scaled to 8; a float image, of no set range, stretched to its own
        a = np.asarray(img, dtype=np.float64)
        a = a / 257 if img.mode != "F" else (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255
        img = Image.fromarray(a.clip(0, 255).round().astype(np.uint8), "L")
    return img.convert("RGB" if channels == 3 else "L")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (C, H, W) float tensor in [-1, 1]."""
    a = np.atleast_3d(np.asarray(img, dtype=np.float32))  # gray: (H, W, 1)
    return torch.from_numpy(a.transpose(2, 0, 1).copy()) / 127.5 - 1


def to_image(t: torch.Tensor) -> Image.Image:
    """(C, H, W) tensor in [-1, 1] -> 8-bit PIL image (RGB or L)."""
    a = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def jitter(img: Image.Image, load_size: int, crop_size: int, rng: np.random.Generator) -> Image.Image:
    """Random jitter: bicubic resize to load_size x load_size, random crop, random h-flip."""
    img = img.resize((load_size, load_size), Image.BICUBIC)
    left, top = rng.integers(0, load_size - crop_size + 1, size=2)
    img = img.crop((left, top, left + crop_size, top + crop_size))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


class UnpairedDataset(torch.utils.data.Dataset):
    """The training images of X and Y: item `pick` is (x, y), each (C, crop, crop) in [-1, 1], jittered as the pick
    says (from epoch `no_crop_from_epoch` only resized and flipped, as the official CUT dataset in the decay epochs).
    An image that no longer reads gives way to the next and is marked in `unreadable`: 1 found, 2 named (workers
    share it)."""

    def __init__(self, folder_x: Path, folder_y: Path, load_size: int, crop_size: int, channels_x: int = 3,
                 channels_y: int = 3, no_crop_from_epoch: int | None = None):
        self.folders, self.channels = (folder_x, folder_y), (channels_x, channels_y)
        self.files = [list_images(folder) for folder in self.folders]
        for folder, files, channels in zip(self.folders, self.files, self.channels):
            need(any(load_image(f, channels, 64) for f in files),
                 f"no readable images in {folder}: put .jpg/.png/.bmp/.webp files there")
        self.load_size, self.crop_size, self.no_crop_from_epoch = load_size, crop_size, no_crop_from_epoch
        self.unreadable = [torch.zeros(len(files), dtype=torch.int8).share_memory_() for files in self.files]

    def __len__(self) -> int:
        return max(len(f) for f in self.files)

    def __getitem__(self, pick: Pick) -> tuple[torch.Tensor, torch.Tensor]:
        i_x, i_y, seed, epoch = pick
        rng = np.random.default_rng(seed)
        no_crop = self.no_crop_from_epoch is not None and epoch >= self.no_crop_from_epoch
        load = self.crop_size if no_crop else self.load_size
        return tuple(to_tensor(jitter(self.readable(domain, i, load), load, self.crop_size, rng))
                     for domain, i in enumerate((i_x, i_y)))

    def readable(self, domain: int, i: int, load_size: int) -> Image.Image:
        """Image i of a domain (0: X, 1: Y), or the next one that reads."""
        files = self.files[domain]
        for k in ((i + j) % len(files) for j in range(len(files))):
            img = load_image(files[k], self.channels[domain], load_size)
            if img is not None:
                return img
            self.unreadable[domain][k].clamp_(min=1)  # found, unless already named
        raise RunError(f"none of the {len(files)} images listed in {self.folders[domain]} can be read any more: put "
                       f"them back, then resume")


class PairSampler(torch.utils.data.Sampler):
    """An epoch's picks, from (seed, epoch) alone: X's images shuffled to the larger domain's count (the length of
    the official data/unaligned_dataset.py), a random y each, at most `limit`; after the first `start`, every
    world-th is this rank's."""

    def __init__(self, n_x: int, n_y: int, seed: int = 0, rank: int = 0, world: int = 1, limit: int | None = None):
        self.n_x, self.n_y, self.seed, self.rank, self.world = n_x, n_y, seed, rank, world
        self.size = min(max(n_x, n_y), limit or max(n_x, n_y))  # picks in an epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g, n = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch), max(self.n_x, self.n_y)
        order = torch.randperm(n, generator=g) % self.n_x
        partners = torch.randint(0, self.n_y, (n,), generator=g)
        seeds = torch.randint(0, 2 ** 31 - 1, (n,), generator=g)
        picks = [Pick(*p, self.epoch) for p in zip(order.tolist(), partners.tolist(), seeds.tolist())]
        return iter(picks[self.start + self.rank:self.size:self.world][:len(self)])

    def __len__(self) -> int:
        return max(0, self.size - self.start) // self.world


def quiet_worker(_: int) -> None:
    """A loader's worker ignores Ctrl-C: the main process takes its step, saves, then stops the workers. For SIGTERM
    it replaces torch's handler, under which a worker dies of a SIGTERM its parent did not send, and torch then
    raises in the main process, mid-step. Told SIGTERM with its process group (systemd, Slurm), a worker goes on
    10 s, to make a batch the step may wait for (a slower one still fails the run), then exits with code 0. It
    cannot ignore SIGTERM: at exit, multiprocessing ends its workers with one, then waits for them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "alarm"):  # POSIX
        signal.signal(signal.SIGTERM, lambda *_: signal.alarm(10))
        signal.signal(signal.SIGALRM, lambda *_: os._exit(0))


def data_loader(data: UnpairedDataset, sampler: PairSampler, batch_size: int, workers: int, pin_memory: bool,
                drop_last: bool) -> torch.utils.data.DataLoader:
    """A loader of `workers` persistent processes (0: the main one); with `drop_last`, no short last batch."""
    return torch.utils.data.DataLoader(data, batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                                       drop_last=drop_last, persistent_workers=workers > 0, worker_init_fn=quiet_worker,
                                       generator=torch.Generator())


def batches(loader: torch.utils.data.DataLoader, rank0: bool = True):
    """A loader's (x, y, seconds waited for them); rank 0 names each image found unreadable, once."""
    start, data = time.perf_counter(), loader.dataset
    for x, y in loader:
        waited = time.perf_counter() - start
        for files, marked in zip(data.files, data.unreadable) if rank0 else ():
            for k in (marked == 1).nonzero().flatten().tolist():
                marked[k] = 2
                warnings.warn(f"skipping unreadable image {files[k]}: another image of its domain takes its place")
        yield x, y, waited
        start = time.perf_counter()  # the step is done: from here, waiting for the next batch


def load_fixed_images(folder: Path, n: int, size: int, channels: int = 3) -> torch.Tensor:
    """(n, C, size, size): a folder's first n readable images; a warning names each one passed over."""
    images = []
    for path in list_images(folder):
        if len(images) == n:
            break
        img = load_image(path, channels)
        if img is None:
            warnings.warn(f"skipping unreadable image {path}")
        else:
            images.append(to_tensor(img.resize((size, size), Image.BICUBIC)))
    need(images, f"no readable images in {folder}: put .jpg/.png/.bmp/.webp files there")
    return torch.stack(images)


# ============================================================================= 3. the run folder


def save_grid(rows: list[list[torch.Tensor | Image.Image]], path: Path, pad: int = 2) -> None:
    """Rows of images (PIL, or (C, H, W) in [-1, 1]) in one picture, `pad` pixels apart."""
    rows = [[(to_image(img) if isinstance(img, torch.Tensor) else img).convert("RGB") for img in row] for row in rows]
    w, h = rows[0][0].size
    grid = Image.new("RGB", (max(map(len, rows)) * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    save_image(grid, path)


def write_rows(path: Path, rows: list[list]) -> None:
    """A CSV log written whole, its header first."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    write_atomically(path, lambda tmp: tmp.write_text(text.getvalue(), encoding="utf-8", newline=""))


def append_row(path: Path, row: dict[str, float]) -> None:
    """Append a row to a CSV log in the columns of its header. A value without a column (a map a resume turned on, a
    column a user deleted) adds its column at the end, and the file is rewritten whole."""
    with open(path, "a+", newline="", encoding="utf-8", errors="replace") as f:  # read from the start; write at the end
        f.seek(0)
        if f.read(1) != "\ufeff":  # a BOM, from a spreadsheet's 'CSV UTF-8': not part of the first name
            f.seek(0)
        header = next(csv.reader(f), [])
        names = header + [k for k in row if k not in header]
        cells = [(str(row[k]) if isinstance(row[k], int) else f"{row[k]:.5g}") if k in row else "" for k in names]
        if names == header:
            csv.writer(f).writerow(cells)
            return
        rows = [names, *csv.reader(f), cells]
    write_rows(path, rows)


def drop_rows_after(path: Path, column: str, last: int) -> None:
    """Drop a CSV log's rows whose `column` is past `last`: those a resume from an older checkpoint trains again."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            header, *rows = csv.reader(f)
        at = header.index(column)
    except (OSError, csv.Error, ValueError):  # no log yet, or none of this column
        return
    kept = [row for row in rows if not (len(row) > at and row[at].isdigit() and int(row[at]) > last)]
    if len(kept) < len(rows):
        write_rows(path, [header, *kept])


def read_table(path: Path) -> list[dict[str, float]]:
    """A CSV log's rows as {column: number}, without the cells that are not finite numbers (a user may edit a log)."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error):  # none yet, or no longer a CSV
        return []
    table = []
    for row in rows:
        table.append({})
        for name, value in row.items():
            with suppress(TypeError, ValueError):  # an empty cell, a word, a cell beyond the header
                number = float(value)
                if math.isfinite(number):  # a typed 'NaN' or 'inf' is a word too
                    table[-1][name] = number
    return table


def plot(table: list[dict[str, float]], x: str, panels: dict[str, list[str]], path: Path,
         level: float | None = None) -> None:
    """Plot each panel's columns of a log against column `x`, a dashed line at `level`; none to plot, no picture."""
    table = [row for row in table if x in row]
    panels = {title: names for title, names in panels.items() if any(n in row for row in table for n in names)}
    if not panels:  # nothing to draw: no picture, not an earlier one
        Path(path).unlink(missing_ok=True)
        return
    from matplotlib.figure import Figure  # without pyplot: no display, no figure to close
    fig = Figure(figsize=(7 if level is None else 4.5, max(1.6 * len(panels), 2.4)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for ax, (title, names) in zip(axes[:, 0], panels.items()):
        for name in names:
            points = [(row[x], row[name]) for row in table if name in row]
            ax.plot(*zip(*points), lw=0.8, marker="." if len(points) < 30 else None,  # a few rows show as dots
                    label=name.removeprefix(f"{title}_"))
        if level is not None:  # in the middle of the scale shown, from 0 at least
            ax.axhline(level, color="gray", ls="--", lw=0.8)
            ax.set_ylim(min(ax.get_ylim()[0], 0), max(ax.get_ylim()[1], 2 * level))
            ax.legend(fontsize=7)
        ax.set_ylabel(title, rotation=0, ha="right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x)
    axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)  # steps and epochs are whole numbers
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


def heat_over(image: torch.Tensor, heat: torch.Tensor) -> Image.Image:
    """`image` (C, H, W) in gray under `heat` (h, w), coloured from 0 dark to 1 bright."""
    import matplotlib
    heat = torch.nn.functional.interpolate(heat[None, None].float().cpu(), size=tuple(image.shape[-2:]),
                                           mode="bilinear", align_corners=False)[0, 0]
    hot = Image.fromarray((matplotlib.colormaps["inferno"](heat.clamp(0, 1).numpy())[..., :3] * 255).astype(np.uint8))
    return Image.blend(to_image(image).convert("L").convert("RGB"), hot, 0.7)


def save_similarity_grid(x: torch.Tensor, fake: torch.Tensor, maps: torch.Tensor, points, path: Path) -> None:
    """A row per image: x and G(x) (B, C, H, W) with the query `points` ((row, col) fractions) marked, then each
    point's similarity map (B, Q, h, w) as heat over x."""
    marks = ("red", "lime", "cyan", "yellow", "magenta")

    def marked(img: Image.Image, which) -> Image.Image:
        draw, (w, h) = ImageDraw.Draw(img), img.size
        for q in which:
            r, c = points[q]
            draw.rectangle((c * w - 3, r * h - 3, c * w + 3, r * h + 3), outline=marks[q % len(marks)], width=2)
        return img

    peak = maps.float().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)  # each map's peak is 1
    save_grid([[marked(to_image(t[b]).convert("RGB"), range(len(points))) for t in (x, fake)]
               + [marked(heat_over(x[b], maps[b, q] / peak[b, q]), [q]) for q in range(len(points))]
               for b in range(len(x))], path)


class RunFolder:
    """OUTPUT/NAME/, a run's files (the README's "What a run writes"), each written here alone, whole or not at
    all (a log: a row at a time); a failure is an OSError (train_gan.py ends the run in one line, with
    `resume_hint`)."""
    TIMING = {"seconds": "{:.0f} s", "images_per_sec": "{:.2f} img/s", "data_wait": "{:.0%} of it waiting for data"}
    STYLE = ("body { font: 15px/1.45 sans-serif; margin: 2em auto; max-width: 1100px; } .caption { color: #555; } "
             "img { max-width: 100%; display: block; image-rendering: pixelated; } .plots { display: flex; gap: 1em; }")

    def __init__(self, path: Path, resume_hint: str = ""):
        self.path, self.resume_hint, self.latest = Path(path), resume_hint, Path(path) / "latest.pt"
        self.heading, self.done, self.total, self.runs = "", 0, 0, []
        self.captions = {"epoch": "", "nce_epoch": "where PatchNCE finds each output patch's input patch: x, G(x) "
                         "with query points, then each point's similarity over x (bright: taken for it)",
                         "d_epoch": "D's verdict on each patch of a real image and of a translation: bright real "
                         "(1), dark fake (0), red at 0.5"}  # an epoch's pictures, in page order

    def picture(self, kind: str, epoch: int) -> Path:
        """An epoch's picture of a kind of `captions`, as epoch_NNN.png."""
        return self.path / f"{kind}_{epoch:03d}.png"

    @contextmanager
    def held(self, new: bool):
        """The folder, made and locked (.lock: an OS lock, which dies with the process) against a second run, and
        a `new` run refused where one stands; the page's last word is written as the block ends."""
        with open(make_folder(self.path, "--output-dir or --name") / ".lock", "a+") as handle:
            handle.seek(0)
            try:
                if os.name == "nt":  # Windows: a lock on the file's first byte
                    import msvcrt
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = "unknown"
                with suppress(OSError):  # Windows does not let a locked byte be read
                    holder = handle.read().strip() or holder
                raise UsageError(f"{self.path} is in use by another run (process {holder}): wait for it to end, or "
                                 f"pass another --name") from None
            need(not new or all(p.name == ".lock" for p in self.path.iterdir()),
                 f"{self.path} already holds a run: pass --resume to continue it, or a new --name")
            handle.truncate(0)
            print(os.getpid(), file=handle, flush=True)
            try:
                yield self
            finally:
                if self.heading:  # the page's last word; one that cannot be written costs nothing more
                    with suppress(OSError):
                        self.write_page(running=False)

    def start(self, options: dict, command: list[str], epoch: int, step: int, images: int, heading: str,
              caption: str, total: int) -> None:
        """A start at `images` into `epoch` of `total`, after `step` steps: the logs lose their rows past these, are
        plotted again, and the pictures of later epochs go (a resume trains them again); options.json gets the run's
        `options` and this command among its starts; then the page."""
        self.heading, self.captions["epoch"], self.done, self.total = heading, caption, epoch, total
        drop_rows_after(self.path / "losses.csv", "step", step)
        drop_rows_after(self.path / "epochs.csv", "epoch", epoch)
        self.plot_logs()
        for kind in self.captions:
            for picture in self.path.glob(f"{kind}_[0-9][0-9][0-9].png"):
                if int(picture.stem[-3:]) > epoch:
                    picture.unlink()
        path = self.path / "options.json"
        try:
            self.runs = list(json.loads(path.read_text())["runs"])
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or edited out of shape
            self.runs = []
        self.runs.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command, "epoch": epoch,
                          "images": images})
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps({**options, "runs": self.runs}, indent=1)))
        self.write_page(running=True)

    def save_checkpoint(self, state: dict, keep: bool = False) -> None:
        """latest.pt, and with `keep` a copy of it as epoch_NNN.pt (N: the epochs `state` has finished)."""
        def save(tmp: Path) -> None:  # through a Python file: torch's error then keeps the file's (a full disk's)
            with open(tmp, "wb") as f:
                torch.save(state, f)
        write_atomically(self.latest, save)
        if keep:
            copy = self.path / f"epoch_{state['epoch']:03d}.pt"
            write_atomically(copy, lambda tmp: shutil.copyfile(self.latest, tmp))

    def log_losses(self, step: int, epoch: int, losses: dict[str, float]) -> None:
        """A row of losses.csv: each loss's mean over the steps up to `step`."""
        append_row(self.path / "losses.csv", {"step": step, "epoch": epoch, **losses})

    def record_epoch(self, epoch: int, row: dict[str, float], grid: list[list], nce: tuple | None = None,
                     verdicts: dict | None = None) -> str:
        """An epoch (from 1) ended: its row of epochs.csv with D's balance, its pictures, the plots, the page.
        Returns the row in words."""
        judged = [(f"{name}_{side}", image, verdict) for name, (real, fake, *said) in (verdicts or {}).items()
                  for side, image, verdict in zip(("real", "fake"), (real, fake), said)]
        self.done, row = epoch, {"epoch": epoch, **row, **{k: v.float().mean().item() for k, _, v in judged}}
        append_row(self.path / "epochs.csv", row)
        save_grid(grid, self.picture("epoch", epoch))
        if nce is not None:
            save_similarity_grid(*nce, self.picture("nce_epoch", epoch))
        if judged:  # a row per image: for each D, its real image and a translation, each under its verdict
            save_grid([[heat_over(image[b], verdict[b, 0]) for _, image, verdict in judged]
                       for b in range(min(len(image) for _, image, _ in judged))], self.picture("d_epoch", epoch))
        self.plot_logs()
        self.write_page(running=True)
        return self.summary(row)

    def plot_logs(self) -> None:
        """losses.png and balance.png, from the logs as they stand."""
        log, per_epoch = read_table(self.path / "losses.csv"), read_table(self.path / "epochs.csv")
        plot(log, "step", {k: [k] for r in log for k in r if k not in ("step", "epoch")}, self.path / "losses.png")
        judges = dict.fromkeys(k.removesuffix("_real") for r in per_epoch for k in r if k.endswith("_real"))
        plot(per_epoch, "epoch", {d: [f"{d}_real", f"{d}_fake"] for d in judges}, self.path / "balance.png", 0.5)

    @classmethod
    def summary(cls, row: dict[str, float]) -> str:
        """A row of epochs.csv in words."""
        losses = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in {"epoch", *cls.TIMING})
        return f"{losses}; " + ", ".join(text.format(row[k]) for k, text in cls.TIMING.items() if k in row)

    def write_page(self, running: bool) -> None:
        """index.html, the official web/index.html: options, plots, epochs newest first; reloading while `running`."""
        def image(path: Path) -> str:  # the file's time in the address, so a browser shows a rewritten one
            return f'<img src="{path.name}?t={path.stat().st_mtime_ns}" alt="{path.name}">' if path.exists() else ""
        epochs = sorted({int(r["epoch"]): r for r in read_table(self.path / "epochs.csv") if "epoch" in r}.items())
        sections = "".join(f'<section id="epoch-{epoch}"><h2>epoch {epoch}</h2><p>{html.escape(self.summary(row))}'
                           + "".join(f'<p class="caption">{html.escape(text)}</p>{image(self.picture(kind, epoch))}'
                                     for kind, text in self.captions.items() if self.picture(kind, epoch).exists())
                           + "</section>" for epoch, row in reversed(epochs))
        status = (f"training: {self.done} of {self.total} epochs done; this page reloads every minute" if running
                  else f"finished: {self.total} of {self.total} epochs done" if self.done >= self.total
                  else f"stopped with {self.done} of {self.total} epochs done; {self.resume_hint}")
        starts = "".join(f"<li>{r.get('started')}: {html.escape(' '.join(map(str, r.get('command', []))))}</li>"
                         for r in self.runs if isinstance(r, dict))
        plots = image(self.path / "losses.png") + image(self.path / "balance.png") or "<p>plotted as epochs end</p>"
        page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.heading)}'
                "</title>" + ('<meta http-equiv="refresh" content="60">' if running else "") + f"<style>{self.STYLE}"
                f'</style></head><body><h1>{html.escape(self.heading)}</h1><p class="status">{html.escape(status)}'
                f'</p><h2>options</h2><ul>{starts}</ul><p class="caption">as each start asked; every option: '
                f'<a href="options.json">options.json</a></p><h2>losses, and the balance of D and G</h2><div '
                f'class="plots">{plots}</div><p class="caption">each loss term by step; each epoch, D\'s mean verdict '
                "on real test images and on their translations, 1 real and 0 fake; dashed, 0.5, where the two meet "
                f"when neither network wins</p>{sections or '<p>no epoch finished yet</p>'}</body></html>\n")
        write_atomically(self.path / "index.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))


# ============================================================================= 4. the machine and the downloads


def as_typed(value) -> str:
    """An option's value as it is typed: a tuple comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line, and --help gives the defaults."""

    def __init__(self, **kw):
        super().__init__(**{"formatter_class": argparse.ArgumentDefaultsHelpFormatter, "allow_abbrev": False, **kw})

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def at_least(low: float, kind: type = int, strict: bool = False):
    """An option's type: a finite `kind` >= low (strict: > low)."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < low or strict and value == low:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's message for a bad number: 'invalid int value'
    return parse


DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str) -> torch.device:
    """--device: 'auto' is CUDA, then MPS, then the CPU; under torchrun CUDA is this process's GPU."""
    there = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}  # auto's order
    name = next(n for n, ok in there.items() if ok) if name == "auto" else name
    need(there[name], f"--device {name} is not available on this machine: use --device auto or cpu")
    return torch.device(name, int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def peak_memory_mb(device: torch.device) -> float | None:
    """The peak of CUDA's memory, or of this process's (None on Windows)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    try:
        import resource
    except ImportError:
        return None
    per_mb = 2 ** 20 if sys.platform == "darwin" else 2 ** 10  # ru_maxrss: bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb, 1)


def input_channels(net: torch.nn.Module) -> int:
    """The channels of the images a network takes."""
    return next(net.parameters()).shape[1]


def smallest_side(nets: list[torch.nn.Module], multiple: int, largest: int = 4096) -> int:
    """The smallest side, a multiple of `multiple`, of a square image that each of `nets` taking images can take,
    tried on meta copies of its tensors: shapes alone, which costs nothing."""
    for side in range(multiple, largest + 1, multiple):
        try:
            for net in (net for net in nets if next(net.parameters()).dim() == 4):
                shapes = {k: t.to("meta") for k, t in [*net.named_parameters(), *net.named_buffers()]}
                torch.func.functional_call(net, shapes, torch.empty(1, input_channels(net), side, side, device="meta"))
            return side
        except (RuntimeError, ValueError):  # a layer's map is too small: torch says so in one of the two
            continue
    raise ValueError(f"no side up to {largest} fits these networks")


@contextmanager
def stop_if_out_of_memory(what: str, advice: str):
    """Running out of memory inside the block ends the command in one line."""
    try:
        yield
    except RuntimeError as e:
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):  # CUDA's, MPS's; the CPU's
            raise
        raise RunError(f"out of memory {what}: {advice}") from None


def run_command(command) -> int:
    """A command's exit code; one line, no traceback, for a UsageError (2), RunError (1) or Ctrl-C (130)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C from here on: KeyboardInterrupt, below
    # A warning gets a line of its own, above a progress bar if one is drawn.
    warnings.showwarning = lambda message, *rest, **kw: tqdm.write(f"warning: {message}", file=sys.stderr)
    try:
        command()
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C; every write is atomic
        print("\ninterrupted: nothing half-written was left", file=sys.stderr)
        return 130
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0


class StopFlag:
    """Set by Ctrl-C or SIGTERM: training saves and stops after the step. A second one quits at once, unsaved, but
    under torchrun, whose launcher passes a Ctrl-C on to ranks already signalled."""

    def __init__(self, world: int = 1, rank0: bool = True):
        self.requested, self.world, self.rank0, self.pid = False, world, rank0, os.getpid()
        self.agreed = False  # every rank stops: training's vote on `requested`, after each step
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a data-loading worker, forked with this handler, before quiet_worker runs
            return
        if self.requested and self.world == 1:  # asked twice: stop now, without the save
            raise KeyboardInterrupt
        if not self.requested and self.rank0:
            print("\nstopping after this step" + (" (again to quit without saving)" if self.world == 1 else ""),
                  file=sys.stderr)
        self.requested = True


def load_torch(path: Path, if_missing: str = "check --checkpoint"):
    """What a .pt or .pth file holds, on the CPU, tensors only; a file that is not there ends in `if_missing`."""
    need(Path(path).is_file(), f"checkpoint {path} " + ("is a folder: pass the latest.pt in it" if Path(path).is_dir()
                                                         else f"does not exist: {if_missing}"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for foreign or broken files
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}): pass a latest.pt or "
                         f"epoch_NNN.pt written by train_gan.py, or an official generator .pth") from None


DATASET_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{}.zip"
OFFICIAL_DATASETS = ("apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo", "cezanne2photo",
                     "ukiyoe2photo", "vangogh2photo", "maps", "cityscapes", "facades", "iphone2dslr_flower",
                     "ae_photos", "grumpifycat")


def fetch(url: str, dest: Path, offline_hint: str, timeout: float = 30) -> None:
    """Stream `url` into `dest`, all of it; a failure is a UsageError ending in `offline_hint`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            with tqdm.wrapattr(out, "write", total=total or None, desc=url.rsplit("/", 1)[-1], leave=False) as f:
                shutil.copyfileobj(response, f)
            if total and out.tell() != total:  # the server closed the connection early
                raise OSError(f"cut short at {out.tell()} of {total} bytes")
    except OSError as e:  # urllib's URLError is one
        raise UsageError(f"could not download {url} ({getattr(e, 'reason', e)}): try again; if this machine is "
                         f"offline, {offline_hint}") from None


def download(name: str, root: Path = Path("data"), timeout: float = 30) -> Path:
    """An official CycleGAN dataset, unzipped into root/name once."""
    need(name in OFFICIAL_DATASETS, f"unknown dataset {name!r}: choose one of {', '.join(OFFICIAL_DATASETS)}")
    target, url = Path(root) / name, DATASET_URL.format(name)
    if target.is_dir():
        return target
    make_folder(Path(root), "--root")
    part, unzipped = Path(root) / f"{name}.zip.part", Path(root) / f"{name}.unzip.part"
    advice = f"fetch the zip elsewhere and unzip it in {root}: it holds {name}/"  # as the official zips are laid out
    try:  # unzipped beside the target and renamed, so a half-unzipped dataset never stands as one
        fetch(url, part, advice, timeout)
        with zipfile.ZipFile(part) as z:
            z.extractall(unzipped)
        os.replace(unzipped / name, target)
    except (OSError, zipfile.BadZipFile) as e:
        raise UsageError(f"could not unzip {url} ({e}): {advice}") from None
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(unzipped, ignore_errors=True)
    return target


def download_command(argv: list[str]) -> None:
    """`train_gan.py download NAME [--root DIR]`."""
    p = Parser(prog="train_gan.py download", description="Download an official CycleGAN dataset.")
    p.add_argument("name", help="e.g. apple2orange, horse2zebra, monet2photo (an unknown name lists them)")
    p.add_argument("--root", type=Path, default=Path("data"), help="it goes to ROOT/NAME")
    print(download(**vars(p.parse_args(argv))))
