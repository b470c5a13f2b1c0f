"""``rclip embed``: class / concept names -> prompt-ensemble text embeddings, written as an rclip
safetensors file (names inside) or as the official float32 [N, D] ``.pth`` (the ``*_cls_emb.pth`` files
of ``tools/extract_concept_features.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rclip_cli._common import console, device_option, progress_bar, rclip_command
from rclip_cli._model_options import trust_option

FORMATS = ("rclip", "official")
_OFFICIAL_SUFFIXES = (".pth", ".pt")


def resolve_names(names_or_pool: str | None, vocabulary: str | None):
    """NAMES_OR_POOL (a class / concept-pool file, or a comma-separated list) or --vocabulary ->
    a Vocabulary. Files: one name per line, only the part before the first comma counts, so
    ``noun,count`` pools (coco_nouns_4764.txt) load as they are."""
    from rclip_core.data.vocab import get_vocabulary, parse_classes, read_classes_file
    from rclip_core.errors import InputError

    if names_or_pool and vocabulary:
        raise InputError("give either NAMES_OR_POOL or --vocabulary, not both")
    if vocabulary:
        return get_vocabulary(vocabulary)
    if not names_or_pool or not names_or_pool.strip():
        raise InputError("no names given",
                         'pass a class / concept-pool file, a list such as "kite,boy", or --vocabulary coco')
    p = Path(names_or_pool).expanduser()
    if p.exists():
        return read_classes_file(p)
    if "," not in names_or_pool and (os.sep in names_or_pool or p.suffix.lower() in (".txt", ".csv", ".json")):
        raise InputError(f"names file not found: {names_or_pool}",
                         "check the path (a comma-separated list of names is also accepted)")
    return parse_classes(names_or_pool)


def output_format(out: str, fmt: str | None) -> str:
    """--format, or from the file name (.pth / .pt = official, else rclip); a contradiction is
    refused so that a .pth never holds safetensors bytes and vice versa."""
    from rclip_core.errors import InputError

    official_name = Path(out).suffix.lower() in _OFFICIAL_SUFFIXES
    if fmt is None:
        return "official" if official_name else "rclip"
    if fmt == "official" and Path(out).suffix.lower() == ".safetensors":
        raise InputError("--format official writes a torch .pth file, but --out ends in .safetensors",
                         "name it e.g. coco_80_cls_emb.pth, or use --format rclip")
    if fmt == "rclip" and official_name:
        raise InputError(f"--format rclip writes safetensors, but --out ends in {Path(out).suffix}",
                         "name it e.g. classes.safetensors, or use --format official")
    return fmt


def _check_out_file(out: str) -> Path:
    from rclip_core.errors import InputError

    p = Path(out)
    if p.is_dir():
        raise InputError(f"--out {p} is a directory, expected a file name", "e.g. --out classes.safetensors")
    ancestor = p.parent if str(p.parent) else Path(".")
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write --out {p}: {ancestor} is not a writable directory", "choose another --out")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"cannot write --out {p}: the file is read-only", "choose another --out")
    return p


@rclip_command("embed", short_help="Embed class / concept names with prompt templates.")
@click.argument("names_or_pool", required=False, metavar="NAMES_OR_POOL")
@click.option("--vocabulary", help="Built-in list instead: coco, coco-ovd, coco-ovd-base, coco-ovd-novel, lvis, "
                                   "lvis-base, coco-nouns, googlecc-nouns.")
@click.option("--weights", type=click.Path(dir_okay=False),
              help="Weights with a text tower: an OpenAI / open_clip CLIP checkpoint, the teacher "
                   "*_OAI_CLIP.pth, or an rclip .safetensors.")
@click.option("--model", "model_name", help="Architecture or named model (RN50-quickgelu, shapes-tiny, ...).")
@click.option("--pretrained", default=None, help="open_clip pretrained tag for --model (default openai).")
@click.option("--random-init", is_flag=True, help="Random (UNTRAINED) weights for --model: smoke tests only.")
@click.option("--templates", default="clip81", show_default=True,
              help="Prompt templates: clip81 (the 81-template ensemble), single, or a file.")
@click.option("--average", type=click.Choice(["raw", "normalized"]), default="raw", show_default=True,
              help="raw = mean of raw vectors (the released files); normalized = normalise, average, renormalise.")
@click.option("--out", "-o", required=True, help="Output file (.safetensors = rclip format, .pth = official).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="rclip: safetensors with names and settings inside; official: torch float32 [N, D] .pth "
                   "[default: from the --out suffix].")
@click.option("--squeeze", is_flag=True, help="Official format, one name: write [D] like the official tool "
                                              "(default keeps [1, D]).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompts per forward.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the text-embedding cache.")
@click.option("--exemplars", "exemplars_file", type=click.Path(dir_okay=False),
              help="Embed example boxes instead of names: a CSV (image,x1,y1,x2,y2,name rows) or JSON file; "
                   "region embeddings averaged per name (image paths relative to the file).")
@click.option("--short-side", type=click.IntRange(min=16), default=800, show_default=True,
              help="--exemplars: test resize of the exemplar images; use the one of `rclip detect` (ShapesWorld: 256).")
@click.option("--max-size", type=click.IntRange(min=16), default=1333, show_default=True,
              help="--exemplars: longest image side at most this after resizing.")
@trust_option
@device_option
def embed(names_or_pool, vocabulary, weights, model_name, pretrained, random_init, templates, average, out, fmt,
          squeeze, batch_size, no_cache, exemplars_file, short_side, max_size, trust_weights, device, debug):
    """Embed class or concept names with a CLIP text tower and a prompt ensemble.

    NAMES_OR_POOL is a class list / concept pool file (one name per line; `noun,count` pools
    such as coco_nouns_4764.txt work as they are) or a comma-separated list. Each name fills
    every template; the prompt vectors are averaged (unnormalised, like the released
    *_cls_emb.pth files). The rclip format keeps the names, templates and model inside; the
    official format is the bare float32 [N, D] tensor the official code and `rclip detect
    --class-embeddings` read.

    \b
    Examples:
      rclip embed coco_nouns_4764.txt --model RN50-quickgelu --out coco_nouns_4764_emb.pth
      rclip embed --vocabulary coco-ovd --weights teacher.safetensors --out coco_65.safetensors
      rclip embed "kite,boy,surfboard" --model RN50-quickgelu --templates single --out mine.safetensors
      rclip embed --exemplars refs.csv --weights student.safetensors --short-side 256 --out refs.safetensors

    With --exemplars FILE, each row's box goes through the region path of `rclip detect`
    (trunk, RoIAlign, res5, attention pool); the region embeddings are L2-normalised and
    averaged per name, and the result is what --class-embeddings takes. No text tower needed.
    """
    from rich.table import Table

    from rclip_core.device import resolve_device
    from rclip_core.errors import InputError
    from rclip_core.models.text import embed_class_names, load_templates

    if exemplars_file:
        return _embed_exemplars(names_or_pool, vocabulary, exemplars_file, weights, model_name, pretrained,
                                random_init, out, fmt, squeeze, short_side, max_size, trust_weights, device)
    vocab = resolve_names(names_or_pool, vocabulary)
    form = output_format(out, fmt)
    if squeeze and form != "official":
        raise InputError("--squeeze applies to --format official only")
    out_path = _check_out_file(out)
    tmpl = load_templates(templates)
    dev = resolve_device(device)
    if weights and random_init:
        raise InputError("--random-init and --weights exclude each other")
    from rclip_cli._model_options import resolve_model

    model = resolve_model({"weights": weights, "model_name": model_name, "pretrained": pretrained,
                           "random_init": random_init, "trust_weights": trust_weights}, dev)
    if not model.has_text:
        raise InputError(f"{weights or model_name} has no text encoder, so names cannot be embedded",
                         "use CLIP weights with a text tower (e.g. --model RN50-quickgelu, or the teacher "
                         "*_OAI_CLIP.pth)")
    names = list(vocab.names)
    with progress_bar("embedding", total=len(names), unit="names") as advance:
        emb = embed_class_names(model, names, tmpl, average, advance, use_cache=not no_cache, batch_size=batch_size)
    if form == "official":
        from rclip_core.weights.io import save_official_embeddings

        save_official_embeddings(out_path, emb, squeeze)
    else:
        from rclip_core.weights.io import save_safetensors

        meta = {"kind": "embeddings", "names": names, "templates": templates if templates in ("clip81", "single")
                else tmpl, "average": average, "model": model.info.source, "architecture": model.arch.name,
                "embed_dim": int(emb.shape[1])}
        if vocabulary:
            meta.update({"vocabulary": vocab.name, "display_names": list(vocab.display_names),
                         "category_ids": list(vocab.category_ids)})
        save_safetensors(out_path, {"embeddings": emb}, meta)
    norms = emb.norm(dim=1)
    table = Table(title=f"rclip embed: {len(names)} names", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value")
    squeezed = " (saved as [D])" if squeeze and len(names) == 1 else ""
    table.add_row("shape", f"[{emb.shape[0]}, {emb.shape[1]}]{squeezed}")
    named = templates in ("clip81", "single")
    table.add_row("templates", f"{templates} ({len(tmpl)})" if named else f"{len(tmpl)} from {templates}")
    table.add_row("averaging", average + (" (unnormalised rows)" if average == "raw" else " (unit rows)"))
    table.add_row("row norms", f"{float(norms.min()):.3f} .. {float(norms.max()):.3f}")
    table.add_row("model", f"{model.info.source} ({model.arch.name})")
    console.print(table)
    console.print(f"wrote {out_path} ({form} format" + (", names inside)" if form == "rclip" else
                                                         "; row i = name i of the input)"))


def _embed_exemplars(names_or_pool, vocabulary, exemplars_file, weights, model_name, pretrained, random_init, out,
                     fmt, squeeze, short_side, max_size, trust_weights, device) -> None:
    """``rclip embed --exemplars FILE``: every row checked (file, images, boxes) before the model loads."""
    from collections import Counter

    from rich.table import Table

    from rclip_core.data.exemplars import check_exemplar_images, read_exemplars_file
    from rclip_core.device import resolve_device
    from rclip_core.errors import InputError

    if names_or_pool or vocabulary:
        raise InputError("--exemplars takes the class names from its rows: drop NAMES_OR_POOL / --vocabulary")
    form = output_format(out, fmt)
    if squeeze and form != "official":
        raise InputError("--squeeze applies to --format official only")
    out_path = _check_out_file(out)
    rows = read_exemplars_file(exemplars_file)
    check_exemplar_images(rows)
    dev = resolve_device(device)
    from rclip_cli._model_options import resolve_model
    from rclip_core.exemplars import average_per_name, exemplar_region_embeddings

    model = resolve_model({"weights": weights, "model_name": model_name, "pretrained": pretrained,
                           "random_init": random_init, "trust_weights": trust_weights}, dev)
    with progress_bar("exemplars", total=len(rows), unit="boxes") as advance:
        unit, row_names = exemplar_region_embeddings(model, rows, short_side=short_side, max_size=max_size,
                                                     progress=advance)
    emb, names = average_per_name(unit, row_names)
    counts = Counter(row_names)
    if form == "official":
        from rclip_core.weights.io import save_official_embeddings

        save_official_embeddings(out_path, emb, squeeze)
    else:
        from rclip_core.weights.io import save_safetensors

        meta = {"kind": "embeddings", "names": names, "source": "exemplars", "exemplars": [counts[n] for n in names],
                "average": "normalized", "short_side": short_side, "max_size": max(max_size, short_side),
                "model": model.info.source, "architecture": model.arch.name, "embed_dim": int(emb.shape[1])}
        save_safetensors(out_path, {"embeddings": emb}, meta)
    table = Table(title=f"rclip embed --exemplars: {len(rows)} boxes, {len(names)} names", title_justify="left")
    table.add_column("name")
    table.add_column("exemplars", justify="right")
    for n in names[:30]:
        table.add_row(n, str(counts[n]))
    console.print(table)
    if len(names) > 30:
        console.print(f"... and {len(names) - 30} more names")
    console.print(f"wrote {out_path} ([{emb.shape[0]}, {emb.shape[1]}] unit rows, {form} format, model "
                  f"{model.info.source} ({model.arch.name}), test resize {short_side})")
