"""``rclip data``: make and inspect data sets (ShapesWorld, the synthetic offline world)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import fields
from pathlib import Path

import click
from rich.table import Table

from rclip_cli._common import RclipGroup, console, parse_key_values, progress_bar, rclip_command
from rclip_core.errors import InputError


@click.group(cls=RclipGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def data() -> None:
    """Make and inspect data sets.

    \b
    Examples:
      rclip data shapes shapes/ --train 5000 --val 1000 --seed 0
      rclip data inspect shapes/
    """


def _coerce_settings(pairs: tuple[str, ...]) -> dict:
    """``--set key=value`` pairs -> ShapesConfig overrides, typed like the field defaults."""
    from rclip_core.data.shapes import ShapesConfig

    defaults = {f.name: f.default for f in fields(ShapesConfig)}
    out: dict = {}
    for key, raw in parse_key_values(pairs).items():
        key = key.replace("-", "_")
        if key not in defaults:
            raise InputError(f"unknown ShapesWorld setting {key!r}",
                             f"known settings: {', '.join(sorted(defaults))}")
        d = defaults[key]
        try:
            if isinstance(d, tuple):
                out[key] = tuple(v.strip() for v in raw.split(",") if v.strip())
            elif isinstance(d, bool):
                out[key] = raw.lower() in ("1", "true", "yes")
            elif isinstance(d, int):
                out[key] = int(raw)
            elif isinstance(d, float):
                out[key] = float(raw)
            else:
                out[key] = raw
        except ValueError:
            raise InputError(f"--set {key}={raw}: expected a {type(d).__name__}") from None
    return out


@rclip_command("shapes", short_help="Generate a ShapesWorld: images, COCO boxes, base/novel split, captions.")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--train", "n_train", type=int, default=2000, show_default=True, help="Training images.")
@click.option("--val", "n_val", type=int, default=500, show_default=True, help="Validation images.")
@click.option("--seed", type=int, default=0, show_default=True, help="World seed (images, captions, split).")
@click.option("--image-size", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--closeup-frac", type=float, default=0.2, show_default=True,
              help="Fraction of training images showing one large centred object (helps a CLIP teacher).")
@click.option("--min-objects", type=int, default=1, show_default=True, help="Fewest shapes per scene.")
@click.option("--max-objects", type=int, default=4, show_default=True, help="Most shapes per scene.")
@click.option("--captions-per-image", type=int, default=2, show_default=True)
@click.option("--format", "image_format", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any other generator setting, e.g. --set shapes=circle,square,hexagon "
                   "--set noise_level=0.08.")
@click.option("--workers", type=int, default=None, help="Processes (default: usable CPUs, at most 8).")
def shapes(out: Path, n_train: int, n_val: int, seed: int, image_size: int, closeup_frac: float,
           min_objects: int, max_objects: int, captions_per_image: int, image_format: str,
           settings: tuple[str, ...], workers: int | None, debug: bool) -> None:
    """Generate a ShapesWorld: coloured shapes on noisy backgrounds, COCO boxes, a base/novel
    split and partial captions, written to OUT. The same arguments give byte-identical files.

    \b
    Writes OUT/train/, OUT/val/, instances_{train,val}.json (COCO), split.json,
    captions_{train,val}.jsonl and world.json (the settings; written last).
    An existing ShapesWorld in OUT is regenerated; any other non-empty OUT is refused.

    \b
    Examples:
      rclip data shapes shapes/ --train 5000 --val 1000 --seed 0
      rclip data shapes shapes256/ --image-size 256 --closeup-frac 0.3 --workers 2
      rclip data shapes tiny/ --train 100 --val 20 --set shapes=circle,square,star,hexagon
    """
    from rclip_core.data.shapes import generate_shapes_world

    options = dict(image_size=image_size, closeup_frac=closeup_frac, min_objects=min_objects,
                   max_objects=max_objects, captions_per_image=captions_per_image, image_format=image_format)
    options.update(_coerce_settings(settings))
    total = max(n_train, 0) + max(n_val, 0)
    with progress_bar("ShapesWorld", total=total, unit="img") as advance:
        summary = generate_shapes_world(out, train=n_train, val=n_val, seed=seed, workers=workers,
                                        progress=advance, **options)
    table = Table(title=f"ShapesWorld in {out}", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    table.add_row("images", str(summary["images"]["train"]), str(summary["images"]["val"]))
    table.add_row("  close-ups", str(summary["closeups"]), "0")
    table.add_row("objects", str(summary["objects"]["train"]), str(summary["objects"]["val"]))
    table.add_row("captions", str(summary["captions"]["train"]), str(summary["captions"]["val"]))
    console.print(table)
    console.print(f"classes {summary['classes']} ({summary['base']} base, {summary['novel']} novel); "
                  f"{summary['hidden_objects']} occluded objects left unlabelled; "
                  f"{summary['seconds']:.1f} s ({summary['images_per_second']:.0f} images/s, "
                  f"{summary['workers']} worker(s))")


@rclip_command("inspect", short_help="Per-class counts of a ShapesWorld directory.")
@click.argument("directory", type=click.Path(path_type=Path))
def inspect_cmd(directory: Path, debug: bool) -> None:
    """Print per-class counts of a ShapesWorld: objects per split, base/novel, caption mentions.

    \b
    Example:
      rclip data inspect shapes/
    """
    from rclip_core.data.shapes import SHAPE_NOUNS, read_shapes_world
    from rclip_core.fileio import read_json

    world = read_shapes_world(directory)
    root = Path(world["root"])
    split_path = root / world["files"]["split"]
    split = read_json(split_path, "split file")
    if not (isinstance(split, dict) and all(isinstance(split.get(k), list) for k in ("base", "novel"))):
        raise InputError(f"{split_path} is not a ShapesWorld split file (no 'base' and 'novel' lists)",
                         "regenerate it with: rclip data shapes DIR")
    try:
        split_of = {c["id"]: "base" for c in split["base"]} | {c["id"]: "novel" for c in split["novel"]}
    except (TypeError, KeyError):
        raise InputError(f"{split_path}: every class of 'base' and 'novel' needs an 'id'") from None
    objects: dict[str, Counter] = {}
    mentions: dict[str, Counter] = {}
    images: dict[str, int] = {}
    captions: dict[str, int] = {}
    synonym_nouns = Counter()
    for s in ("train", "val"):
        coco = _instances(root / world["files"]["instances"][s], s)
        images[s] = len(coco["images"])
        objects[s] = Counter(a["category_id"] for a in coco["annotations"])
        mentions[s] = Counter()
        captions[s] = 0
        cap_path = root / world["files"]["captions"][s]
        with open(cap_path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ids, nouns = rec["category_ids"], rec["nouns"]
                    mentions[s].update(ids)
                    synonym_nouns.update(n for n in nouns if n not in SHAPE_NOUNS)
                except (ValueError, TypeError, KeyError):
                    raise InputError(f"{cap_path} line {lineno} is not a ShapesWorld caption record "
                                     "(JSON with 'category_ids' and 'nouns')",
                                     "regenerate it with: rclip data shapes DIR") from None
                captions[s] += 1
    cats = coco["categories"]
    table = Table(title=f"ShapesWorld {root} (seed {world['seed']}, {world['config'].image_size} px)",
                  header_style="bold")
    for col, just in (("id", "right"), ("class", "left"), ("split", "left"), ("train objects", "right"),
                      ("val objects", "right"), ("train mentions", "right")):
        table.add_column(col, justify=just)
    for c in cats:
        table.add_row(str(c["id"]), c["name"], split_of.get(c["id"], "?"), str(objects["train"][c["id"]]),
                      str(objects["val"][c["id"]]), str(mentions["train"][c["id"]]))
    table.add_section()
    table.add_row("", "total", f"{len(split['base'])}/{len(split['novel'])}",
                  str(sum(objects["train"].values())), str(sum(objects["val"].values())),
                  str(sum(mentions["train"].values())))
    console.print(table)
    console.print(f"images: train {images['train']}, val {images['val']}; "
                  f"captions: train {captions['train']}, val {captions['val']}; "
                  f"synonym nouns used {sum(synonym_nouns.values())} times")


def _instances(path: Path, split: str) -> dict:
    """A ShapesWorld instances file, checked as far as ``inspect`` reads it (one-line errors)."""
    from rclip_core.fileio import read_json

    coco = read_json(path, f"{split} instances")
    if not (isinstance(coco, dict) and all(isinstance(coco.get(k), list) for k in ("images", "annotations",
                                                                                   "categories"))):
        raise InputError(f"{path} is not a COCO instances file (no 'images', 'annotations' and 'categories' lists)",
                         "regenerate it with: rclip data shapes DIR")
    for i, a in enumerate(coco["annotations"]):
        if not isinstance(a, dict) or "category_id" not in a:
            raise InputError(f"{path}: annotation #{i} has no 'category_id'")
    for i, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise InputError(f"{path}: category #{i} needs 'id' and 'name'")
    return coco


data.add_command(shapes)
data.add_command(inspect_cmd)
