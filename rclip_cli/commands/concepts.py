"""``rclip concepts``: caption files -> concept pool (``noun,count`` lines, RegionCLIP format)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from rich.table import Table

from rclip_cli._common import console, progress_bar, rclip_command
from rclip_core.data.concepts import (ATTRIBUTE_SETS, DEFAULT_SPACY_MODEL, DEFAULT_STOPLIST, PARTITIVE_NOUNS,
                                      count_concepts, load_spacy_model, select_concepts, write_concept_pool)
from rclip_core.data.captions import CAPTION_FORMATS, iter_captions, resolve_sources
from rclip_core.errors import InputError


def _check_out_path(out: str) -> Path:
    """Fail before any work when ``--out`` cannot be written; create nothing."""
    p = Path(out)
    if p.is_dir():
        raise InputError(f"--out {p} is a directory, expected a file name", "e.g. --out pool.txt")
    parent = p.parent if str(p.parent) else Path(".")
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot write --out {p}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write --out {p}: {ancestor} is not writable", "choose another --out")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"cannot write --out {p}: the file is read-only", "choose another --out")
    return p


@rclip_command(name="concepts")
@click.argument("captions", nargs=-1, required=True, metavar="CAPTIONS...")
@click.option("--out", "-o", required=True, help="Concept pool file to write (noun,count lines).")
@click.option("--min-freq", type=click.IntRange(min=1), default=100, show_default=True,
              help="Keep concepts mentioned at least this many times.")
@click.option("--top", type=click.IntRange(min=1), default=None,
              help="Keep only the N most frequent concepts.")
@click.option("--spacy-model", default=DEFAULT_SPACY_MODEL, show_default=True,
              help="spaCy pipeline: installed package name or folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Captions per spaCy batch.")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes for parsing.")
@click.option("--max-captions", type=click.IntRange(min=1), default=None,
              help="Stop after this many captions.")
@click.option("--format", "fmt", type=click.Choice(sorted(CAPTION_FORMATS)), default=None,
              help="Caption format of every input (default: from the extension).")
@click.option("--keep-all-nouns", is_flag=True,
              help="No stoplist: keep 'picture', 'group of', colour nouns, ... (like the official pools).")
@click.option("--attributes", type=click.Choice(sorted(ATTRIBUTE_SETS)), default="none", show_default=True,
              help="Keep these adjectives in front of the noun as part of the concept "
                   "(colour: 'two red circles' -> 'red circle'), for classes that are attribute-object pairs.")
def concepts(captions: tuple[str, ...], out: str, min_freq: int, top: int | None, spacy_model: str,
             batch_size: int, processes: int, max_captions: int | None, fmt: str | None,
             keep_all_nouns: bool, attributes: str, debug: bool) -> None:
    """Extract a concept pool (object nouns and noun compounds with their counts) from captions.

    CAPTIONS are caption files or shards: .jsonl, .json (COCO captions), .csv/.tsv (image,caption
    or filepath,title), .txt (one caption per line), webdataset .tar shards (brace patterns
    such as 'shards/{00000..00009}.tar' are expanded). Nouns are lemmatised ("kites" -> kite),
    compounds kept ("pizza box"), and non-object nouns dropped ("a group of people" -> people).
    The pool is sorted by count; its format is RegionCLIP's coco_nouns_4764.txt.

    \b
    Examples:
      rclip concepts annotations/captions_train2017.json --min-freq 11 --out coco_nouns.txt
      rclip concepts 'cc3m/{00000..00331}.tar' --min-freq 100 --processes 2 --out cc_nouns.txt
      rclip concepts shapes/captions_train.jsonl --min-freq 100 --out shapes_nouns.txt
      rclip concepts shapes/captions_train.jsonl --attributes colour --min-freq 100 --out shapes_classes.txt
    """
    sources = resolve_sources(captions, fmt)
    out_path = _check_out_path(out)
    with console.status(f"loading spaCy pipeline {spacy_model}"):
        nlp = load_spacy_model(spacy_model)

    stoplist = () if keep_all_nouns else DEFAULT_STOPLIST
    partitive = () if keep_all_nouns else PARTITIVE_NOUNS
    t0 = time.perf_counter()
    with progress_bar("parsing captions", total=max_captions, unit="captions") as advance:
        counts, n_captions = count_concepts(iter_captions(sources), nlp,
                                            batch_size=batch_size, n_process=processes, progress=advance,
                                            stoplist=stoplist, partitive_nouns=partitive,
                                            max_captions=max_captions,
                                            attributes=ATTRIBUTE_SETS[attributes])
    seconds = time.perf_counter() - t0
    if n_captions == 0:
        raise InputError(f"no captions found in {', '.join(s.path for s in sources[:3])}"
                         + (" ..." if len(sources) > 3 else ""), "the caption files are empty")
    kept = select_concepts(counts, min_freq, top)
    if not kept:
        best = max(counts.items(), key=lambda cn: cn[1], default=None)
        raise InputError(f"no concept occurs at least {min_freq} times in {n_captions} captions",
                         f"lower --min-freq (the most frequent, {best[0]!r}, occurs {best[1]}x)" if best
                         else "the captions contain no nouns")
    write_concept_pool(out_path, kept)

    rate = n_captions / max(seconds, 1e-9)
    console.print(f"parsed [bold]{n_captions}[/] captions in {seconds:.1f} s ({rate:.0f} captions/s); "
                  f"{len(counts)} unique concepts, [bold]{len(kept)}[/] kept (count >= {min_freq}"
                  + (f", top {top}" if top else "") + ")")
    table = Table(title="most frequent concepts", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("concept")
    table.add_column("count", justify="right")
    for i, (name, count) in enumerate(kept[:10], 1):
        table.add_row(str(i), name, str(count))
    console.print(table)
    console.print(f"wrote {out_path}")
