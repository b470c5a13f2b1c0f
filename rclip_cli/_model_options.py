"""Options shared by commands that load a model and a vocabulary (detect, eval, embed, ...)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click

from rclip_cli._common import err_console


TRUST_HELP = ("Also load weights formats that run code when loaded: pickles that need weights_only=False and "
              "TorchScript archives whose tensors cannot be read as plain data (OpenAI's RN50.pt can: it needs no "
              "flag). Only for files from a source you trust.")


def trust_option(fn: Callable) -> Callable:
    """``--trust-weights`` (``trust_weights`` in the command's keyword arguments)."""
    return click.option("--trust-weights", "trust_weights", is_flag=True, help=TRUST_HELP)(fn)


def model_options(fn: Callable) -> Callable:
    """--weights, --model, --pretrained, --random-init, --rpn-weights and --trust-weights."""
    fn = trust_option(fn)
    opts = [
        click.option("--weights", type=click.Path(dir_okay=False),
                     help="Weights file: an official RegionCLIP/Detectron2 .pth, an OpenAI/open_clip CLIP "
                          "checkpoint, or an rclip .safetensors."),
        click.option("--model", "model_name",
                     help="Architecture (RN50-quickgelu, RN50x4-quickgelu, shapes-tiny, ...) or a named model "
                          "(see `rclip weights list`), downloaded with its checksum."),
        click.option("--pretrained", default=None,
                     help="open_clip pretrained tag for --model (default openai)."),
        click.option("--random-init", is_flag=True,
                     help="Use randomly initialised (UNTRAINED) weights for --model: smoke tests only."),
        click.option("--rpn-weights", type=click.Path(dir_okay=False),
                     help="Offline RPN: rpn_*.pth or a checkpoint with offline_* keys (default: the one inside --weights)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def vocab_options(fn: Callable) -> Callable:
    opts = [
        click.option("--classes", help='Comma-separated class names, e.g. "kite,boy".'),
        click.option("--classes-file", type=click.Path(dir_okay=False), help="Class names, one per line."),
        click.option("--vocabulary", help="Built-in vocabulary: coco, coco-ovd, coco-ovd-base, coco-ovd-novel, lvis, lvis-base."),
        click.option("--class-embeddings", type=click.Path(dir_okay=False),
                     help="Precomputed class embeddings: an official *_emb.pth [K, D] or an rclip .safetensors."),
        click.option("--templates", default="clip81", show_default=True,
                     help="Prompt templates: clip81 (the 81-template ensemble), single, or a file."),
        click.option("--average", type=click.Choice(["raw", "normalized"]), default="raw", show_default=True,
                     help="Template averaging: raw = mean of raw vectors (official released files); "
                          "normalized = normalise, average, renormalise (CLIP paper)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@contextmanager
def show_library_warnings() -> Iterator[None]:
    """Show the library's :class:`UnverifiedDownloadWarning` as one yellow line (no file:line)."""
    import warnings

    from rclip_core.weights.registry import UnverifiedDownloadWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", UnverifiedDownloadWarning)
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, UnverifiedDownloadWarning):
                from rich.markup import escape

                err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", soft_wrap=True, highlight=False)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def resolve_model(kw: dict[str, Any], device):
    """Load the model named by the model options (and attach --rpn-weights)."""
    from rclip_core.errors import InputError
    from rclip_core.weights.loaders import load_model, load_rpn_file

    weights, name, random_init = kw.get("weights"), kw.get("model_name"), kw.get("random_init")
    if weights and random_init:
        raise InputError("--random-init and --weights exclude each other")
    if random_init and not name:
        raise InputError("--random-init needs --model ARCH", "e.g. --model RN50-quickgelu --random-init")
    if not weights and not name:
        raise InputError("no model given", "pass --weights PATH (e.g. regionclip_pretrained-cc_rn50.pth) or --model NAME")
    trust = bool(kw.get("trust_weights"))
    with show_library_warnings():
        model = load_model(weights=weights, model=name, pretrained=kw.get("pretrained"), random_init=bool(random_init),
                           device=device, trust=trust)
    if random_init:
        err_console.print("[bold yellow]warning:[/] the model's weights are random (untrained): its outputs are "
                          "meaningless; use it only to check that the pipeline runs.")
    if kw.get("rpn_weights"):
        load_rpn_file(model, kw["rpn_weights"], trust=trust)
    return model


def resolve_vocabulary_and_embeddings(model, kw: dict[str, Any]):
    """Vocabulary from --classes/--classes-file/--vocabulary (or the class names inside a detector
    or embeddings file), and its [K, D] embeddings (from --class-embeddings, the detector file,
    or computed with the model's text encoder and the prompt ensemble)."""
    from rclip_core.data.vocab import Vocabulary, get_vocabulary, parse_classes, read_classes_file
    from rclip_core.errors import InputError
    from rclip_core.weights.loaders import load_class_embeddings

    given = [k for k in ("classes", "classes_file", "vocabulary") if kw.get(k)]
    if len(given) > 1:
        raise InputError("give only one of --classes, --classes-file and --vocabulary")
    vocab: Vocabulary | None = None
    if kw.get("classes"):
        vocab = parse_classes(kw["classes"])
    elif kw.get("classes_file"):
        vocab = read_classes_file(kw["classes_file"])
    elif kw.get("vocabulary"):
        vocab = get_vocabulary(kw["vocabulary"])

    if kw.get("class_embeddings"):
        emb, names = load_class_embeddings(kw["class_embeddings"], trust=bool(kw.get("trust_weights")))
        if vocab is None:
            if not names:
                raise InputError(f"{kw['class_embeddings']} has {emb.shape[0]} rows but no class names",
                                 "name them with --vocabulary, --classes or --classes-file (in row order)")
            vocab = Vocabulary(name="embeddings", names=tuple(names), display_names=tuple(names),
                               category_ids=tuple(range(1, len(names) + 1)))
        if emb.shape[0] != len(vocab.names):
            raise InputError(f"--class-embeddings has {emb.shape[0]} rows but the vocabulary has {len(vocab.names)} classes",
                             "the rows must be the classes in vocabulary order")
        return vocab, emb
    if vocab is None and model.class_embeddings is not None and model.class_names:
        names = tuple(model.class_names)
        return Vocabulary(name="detector", names=names, display_names=names,
                          category_ids=tuple(range(1, len(names) + 1))), model.class_embeddings
    if vocab is None:
        raise InputError("no classes given", 'pass --classes "kite,boy", --classes-file FILE or --vocabulary coco')
    if not model.has_text:
        raise InputError("these weights have no text encoder, so class names cannot be embedded",
                         "pass --class-embeddings FILE (an official *_emb.pth or `rclip embed` output)")
    from rclip_core.models.text import embed_class_names

    emb = embed_class_names(model, list(vocab.names), kw.get("templates") or "clip81", kw.get("average") or "raw")
    return vocab, emb
