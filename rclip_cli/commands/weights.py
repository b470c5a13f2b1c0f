"""``rclip weights``: list the named models, inspect any weights file, convert official /
open_clip checkpoints to rclip's safetensors, and download named models with their checksum."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from rclip_cli._common import RclipGroup, console, err_console, rclip_command
from rclip_cli._model_options import trust_option
from rclip_core.errors import InputError

MB = 1e6


@click.group(cls=RclipGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def weights() -> None:
    """Inspect, convert and download model weights.

    \b
    Examples:
      rclip weights list
      rclip weights info regionclip_pretrained-cc_rn50.pth
      rclip weights info model.safetensors --json
      rclip weights convert regionclip_finetuned-coco_rn50.pth coco_rn50.safetensors
      rclip weights download regionclip-rn50-cc --out checkpoints/
      rclip weights push runs/shapes_regionclip hf://me/rclip-shapes-student
    """


# ------------------------------------------------------------------------------------------
# list
# ------------------------------------------------------------------------------------------

def _cached_path(model: Any) -> Path:
    from rclip_core.weights.io import cache_dir

    return cache_dir() / "models" / Path(model.file).name


def _is_cached(model: Any) -> bool:
    # Size only: hashing every cached file (up to 1.4 GB) would make `list` slow; `download`
    # verifies the checksum before it reuses a file.
    p = _cached_path(model)
    return p.is_file() and p.stat().st_size == model.size


@rclip_command("list", short_help="Table of the named models (kind, architecture, size, cached).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(as_json: bool, debug: bool) -> None:
    """List the named models that `rclip weights download NAME` and `--model NAME` know.

    Sizes are those of the official files; "cached" means the file is in the rclip cache
    ($RCLIP_CACHE, default ~/.cache/rclip, under models/).

    \b
    Examples:
      rclip weights list
      rclip weights list --json
    """
    from rich.table import Table

    from rclip_core.weights.registry import list_named_models

    models = list_named_models()
    if as_json:
        click.echo(json.dumps([{"name": m.name, "kind": m.kind, "architecture": m.architecture or None,
                                "size_bytes": m.size, "sha256": m.sha256, "url": m.url, "cached": _is_cached(m),
                                "description": m.description} for m in models], indent=1))
        return
    from rich import box
    from rich.console import Console

    # Piped output has no width limit to respect: print the full table instead of rich's
    # 80-column default (which would cut the names). A narrow terminal drops the descriptions.
    out = console if console.is_terminal else Console(width=200, highlight=False)
    with_description = out.width >= 120
    table = Table(title=f"{len(models)} named models", box=box.SIMPLE_HEAD, show_lines=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("kind", no_wrap=True)
    table.add_column("architecture", no_wrap=True)
    table.add_column("size MB", justify="right", no_wrap=True)
    table.add_column("cached", no_wrap=True)
    if with_description:
        table.add_column("description", overflow="fold")
    for m in models:
        row = [m.name, m.kind, m.architecture or "-", f"{m.size / MB:.1f}", "[green]yes[/]" if _is_cached(m) else "no"]
        table.add_row(*row, *([m.description] if with_description else []))
    out.print(table)
    out.print("[dim]download one with: rclip weights download NAME"
              + ("" if with_description else "; --json shows the descriptions") + "[/]")
    _print_open_clip_tags(out)


def _print_open_clip_tags(out: Any) -> None:
    """The open_clip tags of the registry's architectures, and how a download of each is verified."""
    from rich import box
    from rich.table import Table

    from rclip_core.weights.registry import list_open_clip_tags

    tags = Table(title="open_clip pretrained tags (--model ARCH --pretrained TAG)", box=box.SIMPLE_HEAD)
    tags.add_column("architecture", no_wrap=True, style="bold")
    tags.add_column("tag", no_wrap=True)
    tags.add_column("checksum of the download", no_wrap=True)
    tags.add_column("format", no_wrap=True)
    for arch, tag, check in list_open_clip_tags():
        text = check.describe()
        fmt = "TorchScript (tensors read as data)" if "openaipublic" in check.url else "pickle"
        tags.add_row(arch, tag, f"[yellow]{text}[/]" if check.kind != "sha256" else text, fmt)
    out.print(tags)
    out.print("[dim]other tags: the full sha256 of an OpenAI URL or open_clip's 8-digit prefix; a tag with "
              "neither is downloaded with a warning that it is unverified[/]")


# ------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------

def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def _arch_line(a: dict | None) -> str:
    if not a:
        return "-"
    name = a.get("name") or "custom ResNet"
    return (f"{name}: layers {a['layers']}, width {a['width']}, embed dim {a['embed_dim']}, "
            f"input {a['image_size']} px, attnpool grid {a['attnpool_grid']}x{a['attnpool_grid']}, "
            f"pooler resolution {a['pooler_resolution']}")


def _render_info(info: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(Path(info["path"]).name), show_header=False, show_lines=False)
    t.add_column("field", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("format", f"{info['format']} ({info['container']}), kind {info['kind']}")
    t.add_row("file size", f"{info['file_size_bytes'] / MB:.1f} MB")
    t.add_row("architecture", escape(_arch_line(info["architecture"])))
    tt = info["text_tower"]
    t.add_row("text tower", "no" if not tt else
              f"yes: {tt['layers']} layer{'s' if tt['layers'] != 1 else ''}, width {tt['width']}, "
              f"context {tt['context_length']}")
    t.add_row("teacher", "no" if info["teacher"] is None else "yes: " + escape(_arch_line(info["teacher"])))
    t.add_row("offline RPN", "no" if not info["offline_rpn"] else f"yes: {escape(info['offline_rpn']['kind'])}")
    bp = info["box_predictor"]
    if bp:
        bits = [f"{bp['train_classes']} training classes" if "train_classes" in bp else None,
                f"{bp['test_classes']} test classes" if "test_classes" in bp else None,
                f"{bp['box_regression']} box regression" if "box_regression" in bp else None]
        t.add_row("box predictor", "yes: " + ", ".join(b for b in bits if b))
    else:
        t.add_row("box predictor", "no")
    mh = info["mask_head"]
    t.add_row("mask head", "no" if not mh else f"yes: {mh['in_channels']} input channels")
    emb = info["embeddings"]
    if emb:
        s = f"{emb['rows']} x {emb['dim']}" + (" (L2-normalised)" if emb["normalised"] else " (unnormalised)")
        if emb["names"]:
            s += ", names: " + escape(", ".join(emb["names"])) + (", ..." if emb["rows"] > len(emb["names"]) else "")
        t.add_row("embeddings", s)
    t.add_row("tensors", f"{info['tensors']:,}")
    t.add_row("parameters", _fmt_params(info["parameters"]))
    t.add_row("parts", ", ".join(f"{k} {_fmt_params(v['parameters'])}" for k, v in info["parts"].items()) or "-")
    ig = info["ignored_keys"]
    t.add_row("ignored keys", "none" if not ig else
              f"{len(ig)}: " + escape(", ".join(ig[:5])) + (", ..." if len(ig) > 5 else ""))
    if "rclip_metadata" in info:
        t.add_row("rclip metadata", escape(json.dumps(info["rclip_metadata"])))
    console.print(t)


@rclip_command("info", short_help="Format, architecture and contents of any weights file.")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@trust_option
def info_cmd(path: str, as_json: bool, trust_weights: bool, debug: bool) -> None:
    """Describe a weights file: its format, the architecture read from tensor shapes, and what
    it carries (text tower, teacher, offline RPN, box predictor, mask head, embeddings).

    PATH can be an official RegionCLIP/Detectron2 .pth, an OpenAI/open_clip CLIP checkpoint,
    an rpn_*.pth, an official *_emb.pth embedding file, or an rclip .safetensors. The file is
    read with torch.load(weights_only=True) and TorchScript archives as data (their tensors, never
    their code): pickles that would run code and TorchScript that cannot be read as data are
    refused unless --trust-weights is given.

    \b
    Examples:
      rclip weights info regionclip_finetuned-lvis_rn50.pth
      rclip weights info coco_65_cls_emb.pth --json
    """
    from rclip_core.weights.inspect import describe_weights

    from rclip_core.weights.hub import resolve_weights_path

    info = describe_weights(resolve_weights_path(path), trust=trust_weights)
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        _render_info(info)


# ------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------

def _check_output_file(out: Path) -> None:
    """Refuse an unusable output path before any work (so nothing is left behind)."""
    if out.is_dir():
        raise InputError(f"output path {out} is a directory", "give a file name ending in .safetensors")
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"output {out} must end in .safetensors", "e.g. rclip weights convert SRC model.safetensors")
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists():  # the nearest existing ancestor must be a writable directory
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {out}: {existing} is not writable")


@rclip_command("convert", short_help="Official / open_clip checkpoint -> rclip .safetensors.")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rpn-weights", type=click.Path(),
              help="Also store this offline RPN (an rpn_*.pth, or a checkpoint with offline_* keys).")
@click.option("--trust-weights", "--trust", "trust", is_flag=True,
              help="Load SRC (and --rpn-weights) even if it runs code when loaded: a pickle with objects "
                   "(Detectron2 files with config objects), a TorchScript archive that defines __setstate__. Only for "
                   "files from a source you trust. (--trust is the old spelling.)")
def convert_cmd(src: str, out: Path, rpn_weights: str | None, trust: bool, debug: bool) -> None:
    """Convert an official RegionCLIP / OpenAI / open_clip checkpoint SRC to an rclip
    .safetensors file OUT (architecture in its metadata, loads without pickle).

    Kept: the visual tower, the text tower and the offline RPN if SRC has them (or the RPN of
    --rpn-weights), and a detector's box predictor. Not kept: the pretraining teacher and the
    LVIS mask head (inference does not use them).

    \b
    Examples:
      rclip weights convert regionclip_pretrained-cc_rn50.pth rn50_cc.safetensors
      rclip weights convert regionclip_finetuned-coco_rn50.pth coco.safetensors --rpn-weights rpn_coco_48.pth
      rclip weights convert RN50.pt rn50_openai.safetensors --trust-weights
    """

    _check_output_file(out)
    if rpn_weights is not None:
        rp = Path(rpn_weights)
        if not rp.exists():
            raise InputError(f"RPN weights file not found: {rp}")
        if rp.is_dir():
            raise InputError(f"RPN weights path {rp} is a directory, expected a file")
    _convert(src, out, rpn_weights, trust)


def _convert(src: str, out: Path, rpn_weights: str | None, trust: bool) -> None:
    """Convert SRC (read with code allowed under --trust-weights) and report on it."""
    import gc

    from rclip_core.weights.inspect import describe_weights
    from rclip_core.weights.loaders import load_model, load_rpn_file
    from rclip_core.weights.native import save_model

    # Describe first: it validates SRC and says what the conversion will drop.
    src_info = describe_weights(src, trust=trust)
    gc.collect()
    if src_info["format"] == "embeddings" or src_info["kind"] == "embeddings":
        raise InputError(f"{src} holds class embeddings, not a model", "embedding files need no conversion")
    if src_info["format"] == "rpn":
        raise InputError(f"{src} is an offline RPN checkpoint, not a CLIP model",
                         "pass it as --rpn-weights together with a model SRC")
    if src_info["offline_rpn"] and src_info["offline_rpn"]["kind"].startswith("unsupported") and not rpn_weights:
        raise InputError(f"{src} carries an offline RPN rclip cannot run: {src_info['offline_rpn']['kind']}")
    model = load_model(weights=src, with_rpn=rpn_weights is None, device="cpu", trust=trust)
    if rpn_weights is not None:
        load_rpn_file(model, rpn_weights, trust=trust)
    if src_info["format"] == "rclip":
        kind = src_info.get("rclip_metadata", {}).get("kind", "regionclip")
    elif src_info["format"] in ("oai_clip", "open_clip"):
        kind = "clip"
    else:
        kind = "detector" if model.box_predictor else "regionclip"
    extra = {"converted_from": Path(src).name, "source_format": src_info["format"]}
    if rpn_weights is not None:
        extra["rpn_source"] = Path(rpn_weights).name
    written = save_model(model, out, kind=kind, include_text=True, extra=extra)

    kept = [f"visual {model.arch.name}"]
    if model.has_text:
        kept.append("text tower")
    if model.rpn is not None:
        kept.append(f"offline RPN {model.info.rpn_kind}")
    if model.box_predictor:
        kept.append("box predictor")
    dropped = []
    if src_info["teacher"]:
        dropped.append("teacher visual tower")
    if src_info["mask_head"]:
        dropped.append("mask head")
    if src_info["offline_rpn"] and rpn_weights is not None:
        dropped.append("SRC's own offline RPN (replaced by --rpn-weights)")
    if src_info["ignored_keys"]:
        dropped.append(f"{len(src_info['ignored_keys'])} unused keys")
    size = written.stat().st_size / MB
    console.print(f"[green]wrote[/] {written} ({size:.1f} MB, kind {kind}): " + ", ".join(kept),
                  soft_wrap=True, highlight=False)
    if dropped:
        console.print("[dim]not kept: " + ", ".join(dropped) + "[/]", soft_wrap=True)


# ------------------------------------------------------------------------------------------
# download
# ------------------------------------------------------------------------------------------

@rclip_command("download", short_help="Download a named model, checking its sha256.")
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Directory to save into (default: the rclip cache, $RCLIP_CACHE or ~/.cache/rclip, under models/).")
def download_cmd(name: str, out_dir: Path | None, debug: bool) -> None:
    """Download the named model NAME (see `rclip weights list`), verifying its sha256.

    A file already present with the right checksum is reused. Without a network connection the
    command fails within seconds.

    \b
    Examples:
      rclip weights download regionclip-rn50-cc
      rclip weights download emb-coco-65-cls-emb --out checkpoints/
    """
    import difflib

    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from rclip_core.weights.registry import REGISTRY
    from rclip_core.weights.io import download

    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        raise InputError(f"unknown model name {name!r}",
                         ("did you mean " + ", ".join(close) + "? " if close else "") + "see `rclip weights list`")
    m = REGISTRY[name]
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a directory")
    dest = (out_dir if out_dir is not None else _cached_path(m).parent) / Path(m.file).name
    already = dest.is_file() and dest.stat().st_size == m.size

    show = console.is_terminal or os.environ.get("RCLIP_PROGRESS") == "1"
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, disable=not show, transient=False) as prog:
        task = prog.add_task(name, total=m.size)

        def progress(done: int, total: int | None) -> None:
            prog.update(task, completed=done, total=total or m.size)

        path = download(m.url, dest, sha256=m.sha256, progress=progress)
    verb = "already present" if already else "downloaded"
    console.print(f"[green]{verb}[/] {path} ({m.size / MB:.1f} MB, sha256 verified)", soft_wrap=True, highlight=False)


# ------------------------------------------------------------------------------------------
# push
# ------------------------------------------------------------------------------------------

def _run_metrics(run_dir: Path, limit: int = 40) -> dict[str, Any]:
    """Numbers of the run's JSON files (an `rclip eval --json` file's "metrics", or the numeric
    leaves of e.g. a pretraining run's eval.json), keyed file/path when there are several files."""
    files = sorted(run_dir.glob("*.json"))
    out: dict[str, Any] = {}

    def leaves(prefix: str, obj: Any) -> None:
        if isinstance(obj, bool):
            return
        if isinstance(obj, (int, float)) and len(out) < limit:
            out[prefix] = round(obj, 4) if isinstance(obj, float) else obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                leaves(f"{prefix}/{k}" if prefix else str(k), v)

    for j in files:
        try:
            data = json.loads(j.read_text())
        except (ValueError, OSError):
            continue
        if isinstance(data, dict):
            leaves("" if len(files) == 1 else j.stem, data.get("metrics", data))
    return out


@rclip_command("push", short_help="Upload a run's weights to the Hugging Face Hub (hf://OWNER/REPO).")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dest")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--message", default=None, help="Commit message (default: rclip weights push).")
def push_cmd(src: Path, dest: str, private: bool, message: str | None, debug: bool) -> None:
    """Upload SRC (a run directory with final.safetensors, or one rclip .safetensors file) to DEST,
    hf://OWNER/REPO[@BRANCH], with huggingface_hub's API (its token: HF_TOKEN or `hf auth login`).

    Uploads model.safetensors, config.json (kind, architecture, class names), README.md (a model
    card: architecture, vocabulary, the run's recipe.yaml, the metrics of any `rclip eval --json`
    file in SRC) and recipe.yaml. Load it back anywhere with --weights hf://OWNER/REPO.

    \b
    Examples:
      rclip weights push runs/shapes_regionclip hf://me/rclip-shapes-student
      rclip weights push detector.safetensors hf://me/my-detector@dev --private
    """
    import shutil
    import tempfile

    from rclip_core.models.clip import get_architecture
    from rclip_core.weights.hub import DEFAULT_FILE, hub_config, is_hub_path, model_card, parse_hub_path, upload_folder
    from rclip_core.weights.io import read_safetensors_metadata

    if not is_hub_path(dest):
        raise InputError(f"DEST {dest!r} is not hf://OWNER/REPO", "e.g. hf://me/rclip-shapes-student")
    ref = parse_hub_path(dest)
    if ref.filename:
        raise InputError(f"DEST {dest} names a file; push writes {DEFAULT_FILE} at the repository root",
                         "give hf://OWNER/REPO[@BRANCH]")
    if not src.exists():
        raise InputError(f"no such directory or file: {src}")
    run_dir = src if src.is_dir() else src.parent
    weights_file = src / "final.safetensors" if src.is_dir() else src
    if not weights_file.is_file():
        raise InputError(f"{src} has no final.safetensors", "pass a run directory of `rclip pretrain` / "
                                                            "`rclip finetune`, or an rclip .safetensors file")
    meta = read_safetensors_metadata(weights_file)
    if meta is None or meta.get("format") != "rclip" or "architecture" not in meta:
        raise InputError(f"{weights_file} is not an rclip model file",
                         "convert it first: rclip weights convert SRC model.safetensors")
    config = hub_config(meta, get_architecture(meta["architecture"]).config)
    recipe = run_dir / "recipe.yaml" if src.is_dir() else None
    recipe_text = recipe.read_text() if recipe is not None and recipe.is_file() else None
    metrics = _run_metrics(run_dir) if src.is_dir() else {}
    with tempfile.TemporaryDirectory(prefix="rclip-push-") as tmp:
        stage = Path(tmp)
        shutil.copyfile(weights_file, stage / DEFAULT_FILE)
        (stage / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        (stage / "README.md").write_text(model_card(ref.repo_id, config, recipe_text, metrics))
        if recipe_text is not None:
            (stage / "recipe.yaml").write_text(recipe_text)
        url = upload_folder(stage, ref, private=private, message=message)
    console.print(f"[green]pushed[/] {weights_file} to {dest} ({url}); load it with --weights hf://{ref.repo_id}",
                  soft_wrap=True, highlight=False)


for _cmd in (list_cmd, info_cmd, convert_cmd, download_cmd, push_cmd):
    weights.add_command(_cmd)
