"""Mutation check of the five model files: does a wrong line fail the tests, and its own component's tests?

    python .ci/mutants.py list                                  # every mutant: id, place, component, change
    python .ci/mutants.py run --sample 120 --out own.jsonl      # a seeded draw, each against its component's -k
    python .ci/mutants.py run --whole --ids 3,17 --out whole.jsonl   # ... or against the whole suite
    python .ci/mutants.py run --slips .ci/slips.json --out slips.jsonl   # hand-written slips, each against its -k

A mutant is one small change to one line (an operator, a comparison, a constant, a boolean, a dropped `not`, a
dropped .detach() or .flip()), applied in a scratch copy of the repository; it is killed when the tests fail.
A slip is a mistake a learner makes writing a component from the paper (a residual block without its skip, D not
held fixed while G steps), written by hand in .ci/slips.json as a text to replace; each row of a run also keeps
the first failure's message, to read whether it names the slip.
The whole suite leaves out the compile test (it compiles the mutated networks and compares them with themselves,
and each mutant would cost minutes of compiling). Not run by CI: a development check, whose figures are in
docs/GUIDE.md, "How well the tests catch a wrong line".
"""
import argparse
import ast
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("layers.py", "networks.py", "losses.py", "cycle_gan.py", "cut_model.py")
# Each definition of the model files -> the -k word of its component (test_components.py's index).
COMPONENTS = {
    "layers.py": {"full_precision": "conv_norm_act", "norm_layer": "conv_norm_act", "conv_bias": "conv_norm_act",
                  "activation": "conv_norm_act", "padding": "conv_norm_act", "conv_norm_act": "conv_norm_act",
                  "norm_act": "conv_norm_act", "ResnetBlock": "residual_block", "binomial_filter": "blur",
                  "BlurDownsample": "blur", "BlurUpsample": "blur", "downsample": "resampling",
                  "upsample": "resampling", "init_weights": "init_weights"},
    "networks.py": {"DEFAULT_TAPS": "resnet_generator", "ResnetGenerator": "resnet_generator",
                    "UnetBlock": "unet_generator", "UnetGenerator": "unet_generator", "PatchDiscriminator": "patchgan",
                    "PatchSampleMLP": "patch_sample_mlp",
                    "_STALE_SUFFIXES": "official_weights", "load_official_state_dict": "official_weights",
                    "official_generator": "official_weights", "GENERATORS": "define_g",
                    "define_G": "define_g", "frozen": "frozen"},
    "losses.py": {"GAN_MODES": "gan_loss", "GANLoss": "gan_loss", "NEGATIVES": "patchnce", "PatchNCELoss": "patchnce"},
    "cycle_gan.py": {"CycleGANConfig": "cyclegan", "ImagePool": "image_pool", "CycleGAN": "cyclegan"},
    "cut_model.py": {"CUTConfig": "cut_model", "FASTCUT": "cut_model", "CUT": "cut_model"},
}
SWAPS = {ast.Add: "-", ast.Sub: "+", ast.Mult: "/", ast.Div: "*", ast.FloorDiv: "/", ast.Pow: "*", ast.Mod: "//",
         ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "==", ast.In: "not in",
         ast.NotIn: "in", ast.Is: "is not", ast.IsNot: "is", ast.And: "or", ast.Or: "and"}
SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Pow: "**", ast.Mod: "%",
           ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
           ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or"}
DROPPED_CALLS = ("detach", "flip")


def offset(lines: list[str], line: int, col: int) -> int:
    """The index in the file's text of (line, col), as ast numbers them (line from 1, col in UTF-8 bytes)."""
    return sum(len(x) for x in lines[:line - 1]) + len(lines[line - 1].encode()[:col].decode())


def mutants_of(path: str) -> list[dict]:
    """Every mutant of one file: {file, line, start, end, new, what, component, owner}."""
    text = (ROOT / path).read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)

    def span(node) -> tuple[int, int]:
        return offset(lines, node.lineno, node.col_offset), offset(lines, node.end_lineno, node.end_col_offset)

    def operator(a, b, op) -> tuple[int, int, str] | None:  # the operator's text between two operands, swapped
        start, end = span(a)[1], span(b)[0]
        found = re.search(r"(?<![\w<>=!])" + re.escape(SYMBOLS[op]) + r"(?![\w<>=*/])", text[start:end])
        return (start + found.start(), start + found.end(), SWAPS[op]) if found else None

    def change(node) -> tuple[int, int, str] | None:
        """(start, end, new text) of the one mutant of `node`, or None."""
        if isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
            return operator(node.left, node.right, type(node.op))
        if isinstance(node, ast.AugAssign) and type(node.op) in SWAPS:
            return operator(node.target, node.value, type(node.op))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
            return operator(node.left, node.comparators[0], type(node.ops[0]))
        if isinstance(node, ast.BoolOp):
            return operator(node.values[0], node.values[1], type(node.op))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            return span(node)[0], span(node.operand)[0], ""  # `not x` -> `x`, `-x` -> `x`
        if isinstance(node, ast.Constant) and type(node.value) in (bool, int, float) and id(node) not in docstrings:
            value = node.value
            new = not value if isinstance(value, bool) else value + 1 if isinstance(value, int) else \
                value * 2 if value else 1.0
            return *span(node), repr(new)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DROPPED_CALLS:
            return *span(node), text[slice(*span(node.func.value))]  # x.detach() -> x
        return None

    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef,
                  ast.FunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
    mutants = {}
    for top in tree.body:  # a top-level definition, or a constant: the component that owns it
        names = [t.id for t in getattr(top, "targets", []) if isinstance(t, ast.Name)] + [getattr(top, "name", None)]
        component = COMPONENTS[path].get(next((n for n in names if n), None))
        for node in ast.walk(top):
            if component and (mutant := change(node)):
                start, end, new = mutant
                mutants[(start, end)] = {"file": path, "line": node.lineno, "start": start, "end": end, "new": new,
                                         "what": f"{text[start:end].strip()} -> {new.strip() or '(dropped)'}",
                                         "component": component, "owner": next(n for n in names if n)}
    return [mutants[k] for k in sorted(mutants)]


def all_mutants() -> list[dict]:
    mutants = [m for path in FILES for m in mutants_of(path)]
    for i, m in enumerate(mutants):
        m["id"] = i
    return mutants


def slips(path: Path) -> list[dict]:
    """The slips of a JSON list of {component, file, old, new, what}: `old`, found once in the file, becomes `new`."""
    found = []
    for i, slip in enumerate(json.loads(path.read_text())):
        text = (ROOT / slip["file"]).read_text()
        if text.count(slip["old"]) != 1:
            sys.exit(f"slip {i} ({slip['what']}): its old text stands {text.count(slip['old'])} times in "
                     f"{slip['file']}")
        start = text.index(slip["old"])
        found.append({**slip, "id": i, "line": text[:start].count("\n") + 1, "start": start,
                      "end": start + len(slip["old"]), "owner": "slip"})
    return found


def run(mutants: list[dict], whole: bool, tests: Path, out: Path, keyword: dict | None, timeout: int) -> None:
    """Each mutant in a scratch copy: the file changed, the tests run (its component's -k, or the whole suite)."""
    scratch = Path(f"/tmp/cyclecut_mutants_{out.stem}")
    shutil.rmtree(scratch, ignore_errors=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, scratch / name)
    shutil.copy2(tests, scratch / "test_components.py")
    with open(out, "a") as log:
        for m in mutants:
            path = scratch / m["file"]
            original = path.read_text()
            path.write_text(original[:m["start"]] + m["new"] + original[m["end"]:])
            select = "not compiled_run" if whole else (keyword or {}).get(m["component"], m["component"])
            argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "test_components.py",
                    "-k", select]
            began = time.time()
            try:
                done = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=timeout)
                outcome = {0: "survived", 5: "no tests"}.get(done.returncode, "killed")
                first = re.search(r"^FAILED test_components.py::(\S+)", done.stdout, flags=re.M)
                by = first.group(1) if first else ("error: " + done.stdout.strip().splitlines()[-1]
                                                   if outcome == "killed" and done.stdout.strip() else None)
                said = re.findall(r"^E\s+((?:\w*(?:Error|Exception)|Failed)\b.*)$", done.stdout, flags=re.M)
                message = said[-1] if said else None  # the last: pytest shows a chained exception's cause first
            except subprocess.TimeoutExpired:  # neither: run it again on a quieter machine, or a longer --timeout
                outcome, by, message = "timeout", None, None
            finally:
                path.write_text(original)
            row = {**{k: m[k] for k in ("id", "file", "line", "component", "owner", "what")}, "suite": select,
                   "outcome": outcome, "by": by, "message": message, "seconds": round(time.time() - began, 1)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{m['id']:4d} {m['file']}:{m['line']} {m['component']:17s} {outcome:9s} {row['seconds']:6.1f}s "
                  f"{m['what'][:60]}  {by or ''}" + (f"\n     {message}" if message else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("list", "run"))
    p.add_argument("--whole", action="store_true", help="the whole suite, not the mutant's component")
    p.add_argument("--ids", help="comma-separated mutant ids (default: all)")
    p.add_argument("--sample", type=int, help="a seeded draw of about this many, in proportion to each component")
    p.add_argument("--tests", type=Path, default=ROOT / "test_components.py", help="the test file to run")
    p.add_argument("--keywords", type=Path, help="JSON {component: -k expression}, for a test file of other names")
    p.add_argument("--slips", type=Path, help="JSON list of hand-written slips to run in place of the mutants")
    p.add_argument("--out", type=Path, default=Path("mutants.jsonl"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds a run may take")
    args = p.parse_args()
    mutants = slips(args.slips) if args.slips else all_mutants()
    if args.ids:
        wanted = {int(i) for i in args.ids.split(",")}
        mutants = [m for m in mutants if m["id"] in wanted]
    if args.sample:
        draw, by_component = random.Random(0), {}
        for m in mutants:
            by_component.setdefault(m["component"], []).append(m)
        mutants = sorted((m for group in by_component.values() for m in draw.sample(
            group, min(len(group), max(2, math.ceil(len(group) * args.sample / len(mutants)))))), key=lambda m: m["id"])
    if args.action == "list":
        for m in mutants:
            print(f"{m['id']:4d} {m['file']}:{m['line']} {m['component']:17s} {m['what']}")
        return
    keywords = json.loads(args.keywords.read_text()) if args.keywords else None
    run(mutants, args.whole, args.tests, args.out, keywords, args.timeout)


if __name__ == "__main__":
    main()
