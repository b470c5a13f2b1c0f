"""Prompt templates and class / concept text embeddings (the detector's classifier weights).

RegionCLIP classifies a region by the cosine similarity between its embedding and one text
embedding per class (``fast_rcnn.py: FastRCNNOutputLayers``, ``TEXT_EMB_PATH``). Those class
embeddings are prompt ensembles computed with the frozen CLIP text encoder
(``tools/extract_concept_features.py``, templates of ``get_prompt_templates``):

1. clean the class name (LVIS: ``_`` -> space, drop ``(`` and ``)``; COCO names as-is),
2. fill each of the 81 templates with it (:func:`fill_template`),
3. tokenise with the CLIP BPE (:func:`get_tokenizer`),
4. encode each prompt: EOT-token feature @ ``text_projection`` (``model.encode_text``),
5. average over the templates (:func:`class_embeddings`, ``average="raw"`` or
   ``"normalized"``).

The results are unnormalised ``[K, D]`` float32 tensors, exactly like the released
``*_cls_emb.pth`` files; consumers L2-normalise them at use time.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from rclip_core.errors import InputError
from rclip_core.fileio import atomic_write, read_text

__all__ = [
    "TEMPLATE_SETS",
    "SINGLE_TEMPLATE",
    "AVERAGE_MODES",
    "load_templates",
    "fill_template",
    "clean_class_name",
    "clean_lvis_name",
    "get_tokenizer",
    "encode_prompts",
    "class_embeddings",
    "embed_class_names",
    "EmbeddingCache",
    "default_cache_root",
]

_ASSETS = Path(__file__).resolve().parents[1] / "assets"
_TEMPLATES_FILE = _ASSETS / "prompt_templates.json"

SINGLE_TEMPLATE = "a photo of a {}."
TEMPLATE_SETS = ("clip81", "single")
AVERAGE_MODES = ("raw", "normalized")
NAME_STYLES = ("lvis", "coco", "none")

AverageMode = Literal["raw", "normalized"]
Progress = Callable[[int], None]


# --------------------------------------------------------------------------- templates


@lru_cache(maxsize=1)
def _clip81() -> tuple[str, ...]:
    with open(_TEMPLATES_FILE, "r", encoding="utf-8") as f:
        return tuple(json.load(f))


def _check_templates(templates: Sequence[object], source: str) -> list[str]:
    out: list[str] = []
    for i, t in enumerate(templates, start=1):
        if not isinstance(t, str):
            raise InputError(f"template {i} of {source} is not a string: {t!r}")
        n = t.count("{}")
        if n != 1:
            what = "has no" if n == 0 else f"has {n}"
            raise InputError(f"template {i} of {source} {what} '{{}}' placeholders: {t!r}",
                             hint="every template needs exactly one '{}' where the class name goes")
        out.append(t)
    if not out:
        raise InputError(f"no templates in {source}", hint="give at least one template with a '{}'")
    return out


def _read_template_file(path: Path) -> list[str]:
    text = read_text(path, "template file")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"template file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(items, list):
            raise InputError(f"template file {path} must hold a JSON list of strings")
        return _check_templates(items, f"template file {path}")
    # Plain text: one template per line. '#' is not a comment marker here because
    # hashtag-style prompts ("#{}") are legitimate templates.
    lines = [ln.strip() for ln in text.splitlines()]
    return _check_templates([ln for ln in lines if ln], f"template file {path}")


def load_templates(spec: str | os.PathLike | Sequence[str] | None = None) -> list[str]:
    """Resolve a template specification to a list of templates, each with one ``{}``.

    ``spec`` is one of:

    - ``None`` or ``"clip81"``: the 81 templates of RegionCLIP's ``get_prompt_templates()``
      (the CLIP ImageNet ensemble, in RegionCLIP's order), shipped as
      ``rclip_core/assets/prompt_templates.json``;
    - ``"single"``: ``["a photo of a {}."]``;
    - a path to a file: a JSON list of strings, or plain text with one template per line
      (surrounding whitespace stripped, blank lines skipped);
    - a list/tuple of strings given in Python.

    Raises InputError (one line) for an unknown name, an unreadable file, or a template without
    exactly one ``{}``.
    """
    if spec is None:
        return list(_clip81())
    if isinstance(spec, (list, tuple)):
        return _check_templates(list(spec), "the template list")
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s in TEMPLATE_SETS:
            return list(_clip81()) if s == "clip81" else [SINGLE_TEMPLATE]
        p = Path(s).expanduser()
        if p.exists():
            return _read_template_file(p)
        raise InputError(f"unknown template set {s!r} (and no such file)",
                         hint=f"use one of {', '.join(TEMPLATE_SETS)} or a path to a template file")
    raise InputError(f"templates must be a name, a path or a list of strings, got {type(spec).__name__}")


def fill_template(template: str, name: str) -> str:
    """Fill ``template`` with ``name`` exactly like RegionCLIP's ``prompt_engineering``.

    The official function is
    ``template.replace('{}', classnames.replace(',', '').replace('+', ' '))``
    (``detectron2/data/datasets/clip_prompt_utils.py``, main branch): the edits apply to the
    **name only**, never to the template text. Commas are *deleted* (``"a,b"`` -> ``"ab"``, not
    ``"a b"``) and every ``+`` becomes a space; whitespace is left alone (the tokenizer collapses
    it). Example: ``fill_template("a photo of a {}.", "salt+pepper, shaker")`` ->
    ``"a photo of a salt pepper shaker."``.
    """
    return template.replace("{}", name.replace(",", "").replace("+", " "))


def clean_lvis_name(name: str) -> str:
    """RegionCLIP's LVIS name cleanup (``get_cls_names``): ``_`` -> space, drop ``(`` ``)``."""
    return name.replace("_", " ").replace("(", "").replace(")", "")


def clean_class_name(name: str, style: str = "lvis") -> str:
    """Turn a dataset category name into the name that is put into the prompts.

    - ``"lvis"``: RegionCLIP's ``get_cls_names`` cleanup: ``_`` -> space, ``(`` and ``)``
      removed, nothing else (``window_box_(for_plants)`` -> ``window box for plants``);
    - ``"coco"`` / ``"none"``: unchanged (COCO names such as ``tv`` or ``hair drier`` are used
      as-is).
    """
    if style == "lvis":
        return clean_lvis_name(name)
    if style in ("coco", "none"):
        return name
    raise InputError(f"unknown class-name style {style!r}", hint=f"use one of {', '.join(NAME_STYLES)}")


# --------------------------------------------------------------------------- encoding


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77):
    """open_clip's CLIP BPE ``SimpleTokenizer`` (cached; building it takes ~1 s).

    Calling it on a list of ``P`` strings returns ``LongTensor [P, context_length]``:
    SOT 49406, BPE ids, EOT 49407, zero padding. Cleaning (ftfy, double html-unescape,
    whitespace collapse, lower-case) and the vocabulary are the same as RegionCLIP's
    tokenizer. The one difference that changes ids is truncation: for prompts longer than
    ``context_length`` tokens open_clip cuts and then overwrites the last slot with EOT, while
    RegionCLIP cuts without re-adding EOT (``convert_example_to_features_bpe``). Because the
    text encoder pools at the argmax token id (EOT), this only matters for texts over 77 tokens,
    which no class-name prompt reaches. (The special-token *spellings* also differ,
    ``<start_of_text>`` vs ``<|startoftext|>``, which only matters if a class name literally
    contains them.)
    """
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def encode_prompts(model, tokenizer, prompts: Sequence[str], batch_size: int = 256,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Encode prompts with the CLIP text tower: returns float32 ``[P, D]`` on the CPU.

    ``model`` is an open_clip ``CLIP`` (anything with ``encode_text(tokens [B, L]) -> [B, D]``
    works); each row is the unnormalised EOT-token feature @ ``text_projection``, i.e.
    RegionCLIP's ``lang_encoder.encode_text``. ``tokenizer`` maps a list of strings to
    ``LongTensor [B, L]`` (``None``: :func:`get_tokenizer`). Prompts are tokenised and encoded
    ``batch_size`` at a time under ``torch.inference_mode`` on ``device`` (default: the
    model's device). The model's train/eval mode is not touched: the CLIP text tower has no
    dropout or batch norm, so it gives the same result in either mode.

    The result is an ordinary tensor (not an inference-mode one), so it can be used as frozen
    classifier weights in a training graph.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    prompts = list(prompts)
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    dev = torch.device(device) if device is not None else _model_device(model)
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(dev)
            chunks.append(model.encode_text(tokens).float().cpu())
    if not chunks:
        raise InputError("no prompts to encode")
    # clone() outside inference mode turns the inference tensor into a normal one.
    return torch.cat(chunks, 0).clone()


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise InputError("class names must be a list of strings, not one string",
                         hint="split it first, e.g. with rclip_core.data.vocab.parse_classes")
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, n in enumerate(names, start=1):
        if not isinstance(n, str):
            raise InputError(f"class name {i} is not a string: {n!r}")
        n = n.strip()
        if not n:
            raise InputError(f"class name {i} is empty")
        if n in seen:
            raise InputError(f"duplicate class name {n!r} (entries {seen[n]} and {i})")
        seen[n] = i
        out.append(n)
    if not out:
        raise InputError("no class names given")
    return out


def _average(feats: torch.Tensor, average: str) -> torch.Tensor:
    """``[K, T, D] -> [K, D]``."""
    if average == "raw":
        return feats.mean(1)
    return F.normalize(F.normalize(feats, dim=-1).mean(1), dim=-1)


def class_embeddings(model, tokenizer, names: Sequence[str],
                     templates: str | os.PathLike | Sequence[str] | None = "clip81",
                     average: AverageMode = "raw", batch_size: int = 256,
                     device: str | torch.device | None = None, progress: Progress | None = None,
                     cache: "EmbeddingCache | str | os.PathLike | None" = None,
                     model_id: str | None = None) -> torch.Tensor:
    """Prompt-ensemble text embeddings, one row per name: float32 ``[K, D]`` on the CPU.

    ``names`` are used verbatim in the prompts after stripping surrounding whitespace (clean
    LVIS names with :func:`clean_class_name` first); they must be non-empty and unique.
    Every name is put into every template with :func:`fill_template`, encoded with
    :func:`encode_prompts`, and the ``T`` vectors of a name are averaged:

    - ``average="raw"``: arithmetic mean of the raw, unnormalised per-template vectors, not
      renormalised. This is the main-branch ``tools/extract_concept_features.py`` recipe and
      reproduces the released ``*_cls_emb.pth`` / concept-pool files (documented as
      unnormalised in the official README).
    - ``average="normalized"``: L2-normalise each prompt vector, average, renormalise: the
      CLIP-paper recipe used by the ``zero-shot`` branch's extractor. Rows have unit norm.

    With one template both modes agree up to scale. The row order follows ``names``.

    ``progress(n)`` is called with the number of names finished since the last call (they sum
    to ``K``). With ``cache`` (an :class:`EmbeddingCache` or a cache directory) and
    ``model_id`` (a string that identifies the text weights, e.g. ``"RN50-quickgelu:openai"``
    or a checkpoint's sha256), a stored result is returned without running the model, and new
    results are stored. ``model_id`` is required with a cache, because the cache cannot tell
    two checkpoints of the same architecture apart.
    """
    names = _check_names(names)
    tmpl = load_templates(templates)
    if average not in AVERAGE_MODES:
        raise InputError(f"unknown averaging mode {average!r}", hint=f"use one of {', '.join(AVERAGE_MODES)}")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")

    key = None
    if cache is not None:
        if not model_id:
            raise InputError("a text-embedding cache needs a model_id",
                             hint="pass model_id= naming the text weights (e.g. their sha256)")
        if not isinstance(cache, EmbeddingCache):
            cache = EmbeddingCache(cache)
        key = cache.key(model_id, tmpl, average, names)
        hit = cache.get(key, names)
        if hit is not None:
            if progress is not None:
                progress(len(names))
            return hit

    tokenizer = tokenizer if tokenizer is not None else get_tokenizer()
    # Whole names per chunk so that progress counts names; about batch_size prompts per chunk.
    per_chunk = max(1, batch_size // len(tmpl))
    rows: list[torch.Tensor] = []
    for start in range(0, len(names), per_chunk):
        chunk = names[start:start + per_chunk]
        prompts = [fill_template(t, n) for n in chunk for t in tmpl]
        feats = encode_prompts(model, tokenizer, prompts, batch_size=batch_size, device=device)
        rows.append(_average(feats.view(len(chunk), len(tmpl), -1), average))
        if progress is not None:
            progress(len(chunk))
    emb = torch.cat(rows, 0).contiguous()

    if cache is not None and key is not None:
        cache.put(key, emb, names, model_id=model_id, templates=tmpl, average=average)
    return emb


def embed_class_names(model, names: Sequence[str], templates: str | os.PathLike | Sequence[str] | None = "clip81",
                      average: AverageMode = "raw", progress: Progress | None = None, *, use_cache: bool = True,
                      batch_size: int = 256) -> torch.Tensor:
    """THE rule for embedding class names with a :class:`~rclip_core.models.regionclip.RegionCLIP`:
    :func:`class_embeddings` with its text tower and tokenizer, through the on-disk
    :class:`EmbeddingCache` (keyed by ``model.identity()``) unless the weights are random
    (``model.info.source_format == "random"``: two random models share an identity).

    Returns float32 ``[K, D]`` on the CPU, rows in ``names`` order. Raises InputError when the
    model has no text tower (hint: ``--class-embeddings``). ``use_cache=False`` skips the cache
    (``rclip embed --no-cache``); ``batch_size``: prompts per text-tower call.
    """
    if not model.has_text:
        raise InputError("these weights have no text encoder, so the class names cannot be embedded",
                         "pass --class-embeddings FILE (an official *_emb.pth or `rclip embed` output)")
    cache = None if (not use_cache or model.info.source_format == "random") else EmbeddingCache()
    return class_embeddings(model.clip, get_tokenizer(model.arch.context_length), list(names),
                            templates=templates if templates is not None else "clip81", average=average,
                            batch_size=batch_size, progress=progress, cache=cache,
                            model_id=model.identity() if cache else None)


# --------------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    """``$RCLIP_CACHE/text`` if ``RCLIP_CACHE`` is set, else ``~/.cache/rclip/text``."""
    env = os.environ.get("RCLIP_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "rclip"
    return base / "text"


class EmbeddingCache:
    """On-disk store of class-embedding tensors, one safetensors file per key.

    The key is the sha256 of (format version, model identity, templates, averaging mode,
    names), so changing any of them is a miss. Files hold one tensor ``"embeddings"``
    ``[K, D]`` float32 and the names (JSON) plus the other inputs in the safetensors metadata.
    A hit is only returned if the stored names equal the requested ones; an unreadable file is
    treated as a miss and overwritten. Writes are atomic, so an interrupted run never leaves a
    half-written entry.
    """

    FORMAT = "rclip-text-embeddings-v1"

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    @classmethod
    def key(cls, model_id: str, templates: Sequence[str], average: str, names: Sequence[str]) -> str:
        payload = json.dumps({"format": cls.FORMAT, "model": model_id, "templates": list(templates),
                              "average": average, "names": list(names)},
                             ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str, names: Sequence[str] | None = None) -> torch.Tensor | None:
        """The stored ``[K, D]`` tensor, or None on a miss (absent, unreadable, other names)."""
        p = self.path(key)
        if not p.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings")
        except Exception:  # corrupt or foreign file: recompute rather than fail
            return None
        if meta.get("format") != self.FORMAT:
            return None
        if names is not None:
            try:
                stored = json.loads(meta.get("names", "null"))
            except json.JSONDecodeError:
                return None
            if stored != list(names) or emb.shape[0] != len(stored):
                return None
        return emb

    def put(self, key: str, embeddings: torch.Tensor, names: Sequence[str], **info: object) -> Path | None:
        """Store ``embeddings`` ``[K, D]`` under ``key``; returns the path, or None if the
        cache directory is not writable (the cache is an optimisation, never a reason to fail).
        """
        from safetensors.torch import save_file

        meta = {"format": self.FORMAT, "names": json.dumps(list(names), ensure_ascii=False)}
        for k, v in info.items():
            meta[k] = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        tensor = embeddings.detach().to("cpu", torch.float32).contiguous()
        try:
            return atomic_write(self.path(key),
                                lambda tmp: save_file({"embeddings": tensor}, str(tmp), metadata=meta))
        except OSError:
            return None
