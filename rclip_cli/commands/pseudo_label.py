"""``rclip pseudo-label``: teacher region -> concept labels for pretraining, as resumable shards;
``rclip pseudo-label --inspect DIR``: statistics and a few rendered images."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from rclip_cli._common import console, device_option, err_console, progress_bar, rclip_command
from rclip_cli._model_options import trust_option

# Seconds to pause after each finished shard: throttling on shared machines, and how the tests
# reach a run that is killed half-way.
SHARD_DELAY_ENV = "RCLIP_PSEUDO_LABEL_SHARD_DELAY"


@rclip_command("pseudo-label", short_help="Label image regions with a teacher and a concept pool.")
@click.argument("data", required=False)
@click.option("--dataset", default=None,
              help="Label a named data set instead of DATA, by the names of `rclip eval` / `rclip finetune`: "
                   "coco, coco-ovd, lvis (--images: the COCO root or the split's folder), shapes:DIR or PATH.json.")
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True,
              help="With --dataset: the split whose images are labelled (coco-ovd train: the images with a "
                   "base-class box).")
@click.option("--images", "images_dir", type=click.Path(file_okay=False),
              help="Image folder: COCO file_name / caption image paths are relative to it "
                   "(default: the data file's folder).")
@click.option("--format", "fmt", default=None, help="Caption format of DATA (default: from the extension).")
@click.option("--teacher", type=click.Path(dir_okay=False),
              help="Teacher weights: an OpenAI / open_clip CLIP checkpoint, an official RegionCLIP .pth "
                   "or an rclip .safetensors (the paper's teacher is OpenAI CLIP: --model RN50-quickgelu).")
@click.option("--model", "model_name",
              help="Teacher architecture or named model (with --pretrained or --random-init).")
@click.option("--pretrained", default=None, help="open_clip pretrained tag for --model (default openai).")
@click.option("--random-init", is_flag=True, help="Random (UNTRAINED) teacher for --model: smoke tests only.")
@click.option("--rpn-weights", type=click.Path(dir_okay=False),
              help="Offline RPN (rpn_lvis_866.pth); default: the one inside --teacher.")
@click.option("--concepts", "concepts_file", type=click.Path(dir_okay=False),
              help="Concept pool: a noun,count file (coco_nouns_4764.txt, `rclip concepts` output), a COCO "
                   "instances JSON (its category names) or a built-in name (coco-nouns, coco, lvis, ...).")
@click.option("--concept-embeddings", type=click.Path(dir_okay=False),
              help="Precomputed concept embeddings ([N, D] official .pth or `rclip embed` output) instead of "
                   "embedding --concepts with the teacher's text tower.")
@click.option("--templates", default="clip81", show_default=True,
              help="Prompt templates: clip81, single or a file.")
@click.option("--average", type=click.Choice(["raw", "normalized"]), default="raw", show_default=True,
              help="Template averaging (raw = the official concept files).")
@click.option("--proposals", type=click.Choice(["rpn", "random"]), default="rpn", show_default=True,
              help="rpn: offline RPN, NMS 0.5, --rpn-topk kept, N sampled (the official pretraining); "
                   "random: grid-aligned random boxes.")
@click.option("--regions-per-image", type=click.IntRange(min=1), default=100, show_default=True,
              help="Regions labelled per image, drawn at random from the RPN's top proposals.")
@click.option("--rpn-topk", type=click.IntRange(min=1), default=300, show_default=True,
              help="RPN proposals kept after NMS 0.5, before the draw (the official 300 suits COCO-like "
                   "scenes; scale it with the objects per image).")
@click.option("--threshold", type=float, default=0.1, show_default=True,
              help="Keep a region when the teacher's top probability is above this (strict).")
@click.option("--temperature", type=float, default=0.01, show_default=True, help="Teacher softmax temperature.")
@click.option("--topk", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also store the teacher's K best concept logits per region (distillation).")
@click.option("--short-side", type=click.IntRange(min=1), default=800, show_default=True,
              help="Resize the short image side to this; RPN and teacher see this image. 800 = the official "
                   "code (the student's input); a small teacher labels best at its training resolution "
                   "(ShapesWorld: 128).")
@click.option("--max-size", type=click.IntRange(min=1), default=None,
              help="Longest side limit [default: 1333, or --short-side when that is larger].")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Images per shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds each image's proposal draws.")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Label only the first N images.")
@click.option("--save-embeddings", is_flag=True, help="Also store the teacher's region embeddings (float16).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--chunk-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Regions per head call (bounds memory).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Image decoding threads.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output directory (index.json + shards).")
@click.option("--overwrite", is_flag=True, help="Delete the shards in --out and start over.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes (GPUs) on this machine: relaunches itself with torchrun.")
@trust_option
@click.option("--inspect", "inspect_dir", type=click.Path(file_okay=False),
              help="Inspect a pseudo-label directory instead: statistics, and --render K images into "
                   "DIR/inspect/.")
@click.option("--render", type=click.IntRange(min=0), default=4, show_default=True,
              help="With --inspect: images to draw with their kept region labels.")
@device_option
def pseudo_label(data, out_dir, nproc, inspect_dir, render, debug, **opts):
    """Label the regions of the images in DATA with a teacher's best concept (RegionCLIP pretraining).

    DATA is a caption file with image paths (JSONL, COCO captions, CSV/TSV), a COCO instances
    JSON (with --images) or a folder of images; or, instead of DATA, --dataset NAME --split
    train|val with the data-set names of `rclip eval` and `rclip finetune`. For each image: proposals, the teacher's region
    embeddings, p = softmax(cos(region, concept) / T) over the pool, label = argmax, kept when
    max p > --threshold. Writes OUT/index.json and OUT/shard-NNNNN.safetensors (--shard-size
    images each). Rerunning the same command resumes: finished shards are skipped, nothing is
    labelled twice. --nproc N splits the shards over N processes (GPUs).

    \b
    Examples:
      rclip pseudo-label cc3m.jsonl --model RN50-quickgelu --pretrained openai \\
          --rpn-weights rpn_lvis_866.pth --concepts coco_nouns_4764.txt --topk 20 --out cc3m-labels --nproc 8
      rclip pseudo-label shapes/captions_train.jsonl --teacher teacher.safetensors \\
          --concepts shapes_nouns.txt --proposals random --short-side 128 --out shapes-labels
      rclip pseudo-label --dataset coco-ovd --images coco/ --split train --model RN50-quickgelu \\
          --rpn-weights rpn_lvis_866.pth --concepts coco_nouns_4764.txt --out coco-ovd-labels
      rclip pseudo-label --inspect shapes-labels --render 8
    """
    from rclip_core.errors import InputError

    if inspect_dir is not None:
        if data is not None or out_dir is not None or opts["dataset"] is not None:
            raise InputError("--inspect takes only a pseudo-label directory", "drop DATA, --dataset and --out")
        return _inspect(Path(inspect_dir), render)
    if data is not None and opts["dataset"] is not None:
        raise InputError("DATA and --dataset exclude each other", "pass one of them")
    if data is None and opts["dataset"] is None:
        raise InputError("no DATA given", "pass a caption file, a COCO instances file or an image folder, "
                         "or --dataset NAME (coco, coco-ovd, lvis, shapes:DIR, PATH.json)")
    if out_dir is None:
        raise InputError("no --out directory given", "e.g. --out labels/")
    from rclip_cli._torchrun import launch_torchrun
    from rclip_core.dist import launched_by_torchrun

    if nproc > 1 and not launched_by_torchrun():
        _validate_inputs(data, out_dir, opts)
        args = _args_without_nproc(sys.argv[1:])
        err_console.print(f"launching {nproc} processes with torchrun")
        code = launch_torchrun(nproc, args)
        if code != 0:
            from rclip_core.errors import RuntimeFailure

            raise RuntimeFailure(f"torchrun exited with code {code}", "see the workers' messages above")
        return None
    _run(data, out_dir, opts)
    return None


def _args_without_nproc(argv: list[str]) -> list[str]:
    """The command line to relaunch under torchrun: everything from the subcommand on, minus
    ``--nproc N`` / ``--nproc=N``."""
    try:
        start = argv.index("pseudo-label")
    except ValueError:
        start = 0
    out: list[str] = []
    skip = False
    for a in argv[start:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    if not out or out[0] != "pseudo-label":
        out.insert(0, "pseudo-label")
    return out


def _validate_inputs(data: str | None, out_dir: str, o: dict) -> None:
    """The checks that need no model, done before anything is loaded or written."""
    from rclip_core.errors import InputError

    teacher, model_name, random_init = o["teacher"], o["model_name"], o["random_init"]
    concepts_file, concept_embeddings = o["concepts_file"], o["concept_embeddings"]
    if data is not None and not os.path.exists(data):
        raise InputError(f"data not found: {data}")
    if teacher and random_init:
        raise InputError("--random-init and --teacher exclude each other")
    if random_init and not model_name:
        raise InputError("--random-init needs --model ARCH", "e.g. --model RN50-quickgelu --random-init")
    if not teacher and not model_name:
        raise InputError("no teacher given",
                         "pass --teacher PATH, or --model RN50-quickgelu --pretrained openai (the paper's teacher)")
    if teacher and not os.path.isfile(teacher):
        raise InputError(f"teacher weights not found: {teacher}")
    if not concepts_file and not concept_embeddings:
        raise InputError("no concepts given", "pass --concepts pool.txt (e.g. coco_nouns_4764.txt)")
    from rclip_core.data.vocab import VOCABULARIES

    if concepts_file and not os.path.isfile(concepts_file) and concepts_file.strip().lower() not in VOCABULARIES:
        raise InputError(f"--concepts file not found: {concepts_file}",
                         f"a pool file, a COCO instances JSON or a built-in name: {', '.join(VOCABULARIES)}")
    if concept_embeddings and not os.path.isfile(concept_embeddings):
        raise InputError(f"--concept-embeddings file not found: {concept_embeddings}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out {out_dir} exists and is not a directory")


def _load_concepts(model, concepts_file, concept_embeddings, templates, average, show: bool = True,
                   trust: bool = False):
    """(names, [N, D] embeddings, pool sha256, index info)."""
    import hashlib

    from rclip_core.data.concepts import load_concept_pool
    from rclip_core.errors import InputError
    from rclip_core.fileio import sha256_file

    names = load_concept_pool(concepts_file) if concepts_file else None
    if concepts_file and not os.path.isfile(concepts_file):  # a built-in pool: the hash of its names
        pool_sha = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()
    else:
        pool_sha = sha256_file(concepts_file) if concepts_file else None
    if concept_embeddings:
        from rclip_core.weights.loaders import load_class_embeddings

        emb, stored = load_class_embeddings(concept_embeddings, trust=trust)
        if names is None:
            if not stored:
                raise InputError(f"{concept_embeddings} has {emb.shape[0]} rows but no concept names",
                                 "name them with --concepts pool.txt (in row order)")
            names = list(stored)
        if emb.shape[0] != len(names):
            raise InputError(f"--concept-embeddings has {emb.shape[0]} rows but the pool has {len(names)} "
                             "concepts",
                             "the rows must be the concepts in pool order")
        pool_sha = pool_sha or sha256_file(concept_embeddings)
        return list(names), emb, pool_sha, {"templates": None, "average": None,
                                            "concept_embeddings": os.path.abspath(concept_embeddings)}
    if not model.has_text:
        raise InputError("the teacher has no text encoder, so the concepts cannot be embedded",
                         "pass --concept-embeddings FILE (an official *_emb.pth or `rclip embed` output)")
    from rclip_core.models.text import embed_class_names, load_templates

    tmpl = load_templates(templates)
    with progress_bar("embedding concepts", total=len(names), unit="concepts",
                      disable=None if show else True) as advance:
        emb = embed_class_names(model, names, tmpl, average, advance)
    named = templates in ("clip81", "single")
    return list(names), emb, pool_sha, {"templates": templates if named else tmpl, "average": average}


def _run(data: str | None, out_dir: str, o: dict) -> None:
    from rclip_core.dist import cleanup, init_distributed, main_process_first
    from rclip_core.errors import InputError
    from rclip_core.pseudo_label import LabelSettings, PseudoLabeler, collect_label_images, dataset_label_images

    _validate_inputs(data, out_dir, o)
    fields = ("proposals", "regions_per_image", "rpn_topk", "threshold", "temperature", "topk", "short_side",
              "shard_size", "seed", "save_embeddings", "precision", "chunk_size", "workers")
    settings = LabelSettings(max_size=o["max_size"] if o["max_size"] is not None else max(1333, o["short_side"]),
                             **{k: o[k] for k in fields}).validate()
    if o["dataset"] is not None:
        images = dataset_label_images(o["dataset"], o["images_dir"], o["split"], o["max_images"])
    else:
        images = collect_label_images(data, o["images_dir"], o["fmt"], o["max_images"])

    device = o["device"]
    if device not in (None, "auto"):
        from rclip_core.device import resolve_device

        resolve_device(device)  # a bad --device name is one line, before any process group exists
    info = init_distributed(device=None if device in (None, "auto") else device)
    try:
        from rclip_core.device import resolve_device

        dev = info.device if info.distributed else resolve_device(device)
        from rclip_cli._model_options import resolve_model

        teacher = os.path.abspath(o["teacher"]) if o["teacher"] else None  # the index records it
        model = resolve_model({"weights": teacher, "model_name": o["model_name"], "pretrained": o["pretrained"],
                               "random_init": o["random_init"], "rpn_weights": o["rpn_weights"],
                               "trust_weights": o["trust_weights"]}, dev)
        if settings.proposals == "rpn" and model.rpn is None:
            raise InputError("--proposals rpn needs an offline RPN, and the teacher carries none",
                             "pass --rpn-weights rpn_lvis_866.pth, or use --proposals random")
        with main_process_first():  # the others then read the concept embeddings from its cache
            names, emb, pool_sha, extra = _load_concepts(model, o["concepts_file"], o["concept_embeddings"],
                                                         o["templates"], o["average"], show=info.is_main,
                                                         trust=o["trust_weights"])
        from rclip_core.fileio import ensure_output_dir, first_missing_dir, remove_empty_dirs

        created = first_missing_dir(Path(out_dir)) if info.is_main else None
        out = ensure_output_dir(out_dir) if info.is_main else Path(out_dir)
        try:
            labeler = PseudoLabeler(model, names, emb, images, out, settings, concept_pool_sha256=pool_sha,
                                    info=extra, rank=info.rank, world_size=info.world_size)
            plan = labeler.prepare(overwrite=o["overwrite"])
        except BaseException:
            remove_empty_dirs(out, created)
            raise
        if info.is_main:
            console.print(f"{len(images)} images in {plan.shards_total} shards; {plan.shards_done} already done"
                          + (f"; {len(plan.invalid)} unreadable shard file(s) will be rewritten"
                             if plan.invalid else "")
                          + (f"; {info.world_size} processes" if info.distributed else ""))
            if images.missing:
                err_console.print(f"[yellow]{images.missing} image(s) of the data set are not under "
                                  f"{images.data_root}: not labelled[/]", soft_wrap=True)
        delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)
        on_shard = (lambda i: time.sleep(delay)) if delay > 0 else None
        with progress_bar("pseudo-label", total=plan.images, unit="img",
                          disable=None if info.is_main else True) as adv:
            summary = labeler.run(plan, progress=adv, on_shard=on_shard)
    finally:
        cleanup()
    if not info.is_main:
        return
    _report(summary, out)


def _report(summary, out: Path) -> None:
    from rich.markup import escape

    idx = summary.index
    console.print(f"labelled {summary.images} images in {summary.seconds:.1f} s "
                  f"({summary.images_per_second:.2f} images/s on this process): {summary.regions} regions, "
                  f"{summary.kept} kept (max p > {idx['threshold']})")
    state = ("complete" if idx.get("complete")
             else f"INCOMPLETE ({len(idx['shards'])} of {idx['num_shards']} shards)")
    console.print(f"wrote {out / 'index.json'} ({state}; {idx.get('images_done', 0)} images, "
                  f"{idx.get('regions_total', 0)} regions in {len(idx['shards'])} shards)")
    if summary.failed:
        err_console.print(f"[yellow]{len(summary.failed)} image(s) could not be read (stored without regions):[/]")
        for key, msg in summary.failed[:10]:
            err_console.print(f"  {escape(key)}: {escape(msg)}", soft_wrap=True)
    if not idx.get("complete"):
        from rclip_core.errors import RuntimeFailure

        raise RuntimeFailure(f"{out} is incomplete: some shards were not written",
                             "rerun the same command to finish the missing shards")


def _inspect(path: Path, render: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    from rclip_core.errors import InputError, RclipError
    from rclip_core.fileio import atomic_write
    from rclip_core.data.shards import PseudoLabelShards, shard_statistics
    from rclip_core.viz import render_image_labels

    shards = PseudoLabelShards(path, require_complete=False)
    stats = shard_statistics(shards)
    idx = shards.index
    console.print(f"[bold]{escape(str(path))}[/]: teacher {escape(str(idx.get('teacher')))} "
                  f"({idx.get('architecture')}), {len(shards.concepts)} concepts, "
                  f"proposals {idx.get('proposals')}, "
                  f"threshold {idx.get('threshold')}, "
                  f"T {idx.get('temperature')}, top-k {idx.get('topk')}")
    state = "complete" if stats["complete"] else f"INCOMPLETE: {stats['shards']} of {stats['num_shards']} shards"
    rpi = stats["regions_per_image"]
    summary = Table(title=f"pseudo labels ({state})", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("images", f"{stats['images']} ({stats['images_failed']} unreadable)")
    summary.add_row("regions per image", f"{rpi['mean']:.1f} (min {rpi['min']}, max {rpi['max']})")
    summary.add_row("kept regions",
                    f"{stats['kept']} of {stats['regions']} ({100 * stats['kept_fraction']:.1f} %)")
    summary.add_row("mean top probability",
                    f"{stats['mean_max_prob']:.3f} (kept: {stats['mean_max_prob_kept']:.3f})")
    summary.add_row("images with no region above the threshold (all kept)", str(stats["images_all_kept_fallback"]))
    summary.add_row("concepts used", f"{stats['concepts_used']} of {stats['concepts_total']}")
    console.print(summary)
    table = Table(title="most frequent concepts (kept regions)", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("concept")
    table.add_column("regions", justify="right")
    table.add_column("share", justify="right")
    for i, (name, n) in enumerate(stats["top_concepts"], 1):
        table.add_row(str(i), escape(name), str(n), f"{100 * n / max(stats['kept'], 1):.1f} %")
    console.print(table)
    if render <= 0:
        return
    keys = [k for k in shards.keys if k not in shards.failed][:render]
    from rclip_core.fileio import ensure_output_dir

    ensure_output_dir(path / "inspect")
    written, problems = [], []
    for key in keys:
        try:
            img = render_image_labels(shards, key)
        except RclipError as e:
            problems.append(f"{key}: {e}")
            continue
        name = key.replace("/", "_").replace("\\", "_")
        dest = path / "inspect" / (os.path.splitext(name)[0] + ".jpg")
        written.append(atomic_write(dest, lambda p, im=img: im.save(p, format="JPEG", quality=92)))
    if written:
        console.print(f"rendered {len(written)} image(s) with their kept region labels into {path / 'inspect'}")
    for p in problems:
        err_console.print(f"[yellow]cannot render[/] {escape(p)}", soft_wrap=True)
    if keys and not written:
        raise InputError(f"none of the images could be read under the data root {idx.get('data_root')}",
                         "the images moved since labelling; --render 0 shows the statistics only")
