"""Exemplar (visual) prompts: class embeddings from example boxes instead of names.

A RegionCLIP region embedding lives in the space of the concept text embeddings (the paper's
region-concept alignment, Eq. 1-2), so the embedding of a box showing a "red star" can stand in
for the text embedding of "red star". Each exemplar goes through the very region path of
detection (:class:`rclip_core.inference.ZeroShotPipeline` with given boxes: test resize ->
trunk once per image -> RoIAlign -> res5 + attention pool, official ``clip_rcnn.py:
CLIPFastRCNN.inference`` with ``MODEL.CLIP.CROP_REGION_TYPE "GT"``); each region embedding is
L2-normalised, the unit vectors of one name are averaged, and the mean is L2-normalised again
(the classifier is a cosine one, so only the direction counts).

Example::

    from rclip_core.exemplars import exemplar_embeddings
    emb, names = exemplar_embeddings(model, [("ref.jpg", (10, 20, 110, 90), "red star"),
                                             ("ref2.jpg", (0, 0, 64, 64), "red star")])
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rclip_core.data.exemplars import Exemplar, check_exemplar_images
from rclip_core.data.images import MAX_SIZE, TEST_SHORT_SIDE, load_image, resize_image
from rclip_core.errors import InputError
from rclip_core.models.regionclip import RegionCLIP

__all__ = ["Exemplar", "exemplar_embeddings", "exemplar_region_embeddings", "average_per_name", "as_exemplars"]


def as_exemplars(items: Sequence[Exemplar | tuple[Any, Sequence[float], str]]) -> list[Exemplar | tuple]:
    """``(image, box, name)`` tuples (image: a path or a PIL image) or :class:`Exemplar` rows,
    with the boxes and names checked; paths are kept as :class:`Exemplar`."""
    from PIL import Image

    from rclip_core.data.exemplars import _make

    out: list[Exemplar | tuple] = []
    for i, it in enumerate(items):
        if isinstance(it, Exemplar):
            out.append(it)
            continue
        if not isinstance(it, (tuple, list)) or len(it) != 3:
            raise InputError(f"exemplar {i} is not (image, box, name)")
        image, box, name = it
        if isinstance(image, Image.Image):
            e = _make("<image>", list(box), name, f"exemplar {i}")
            w, h = image.size
            x1, y1, x2, y2 = e.box
            if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                raise InputError(f"exemplar {e.name!r}: box {list(e.box)} reaches outside the {w}x{h} image")
            out.append((image.convert("RGB"), e.box, e.name))
        else:
            out.append(_make(os.fspath(image), list(box), name, f"exemplar {i}"))
    return out


def exemplar_region_embeddings(model: RegionCLIP, exemplars: Sequence[Exemplar | tuple[Any, Sequence[float], str]],
                               *, short_side: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE,
                               precision: str = "fp32", progress: Callable[[int], None] | None = None
                               ) -> tuple[Tensor, list[str]]:
    """One L2-normalised region embedding per exemplar, in input order: ``([N, D] on the CPU,
    names)``. Every image is decoded and its trunk run once, however many boxes it has.

    ``short_side`` / ``max_size``: the test resize; use the one detection will use (a region
    embedding depends on the scale it is pooled at). Every image is opened and every box checked
    (inside its image) before the model runs."""
    from rclip_core.inference import DetectOptions, ZeroShotPipeline

    rows = as_exemplars(exemplars)
    if not rows:
        raise InputError("no exemplars given", "pass (image, box, name) rows")
    check_exemplar_images([r for r in rows if isinstance(r, Exemplar)])
    pipe = ZeroShotPipeline(model, None, DetectOptions(proposals="boxes", short_side=short_side,
                                                       max_size=max(max_size, short_side), precision=precision))
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(rows):
        key = r.image if isinstance(r, Exemplar) else id(r[0])
        groups.setdefault(key, []).append(i)
    out = torch.zeros(len(rows), model.embed_dim)
    for idx in groups.values():
        first = rows[idx[0]]
        if isinstance(first, Exemplar):
            prep, path = load_image(first.image, short_side, max(max_size, short_side)), first.image
        else:
            prep, path = resize_image(first[0], short_side, max(max_size, short_side)), "<image>"
        boxes = torch.tensor([list(rows[i].box if isinstance(rows[i], Exemplar) else rows[i][1]) for i in idx],
                             dtype=torch.float64).numpy()
        res = pipe.run(prep, path, boxes)
        out[idx] = F.normalize(res.embeddings.float(), dim=1)
        if progress is not None:
            progress(len(idx))
    names = [r.name if isinstance(r, Exemplar) else r[2] for r in rows]
    return out, names


def average_per_name(unit_rows: Tensor, names: Sequence[str]) -> tuple[Tensor, list[str]]:
    """Mean of the unit rows of each name, renormalised: ``([K, D], K names in first-seen order)``."""
    order: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        order.setdefault(n, []).append(i)
    means = torch.stack([unit_rows[idx].mean(0) for idx in order.values()])
    return F.normalize(means, dim=1), list(order)


def exemplar_embeddings(model: RegionCLIP, exemplars: Sequence[Exemplar | tuple[Any, Sequence[float], str]],
                        *, short_side: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE, precision: str = "fp32",
                        progress: Callable[[int], None] | None = None) -> tuple[Tensor, list[str]]:
    """Class embeddings from example boxes: ``(embeddings [K, D] unit rows, K names)``, one row
    per distinct name in first-seen order, the renormalised mean of its exemplars' unit region
    embeddings (module docstring). ``exemplars``: ``(image, (x1, y1, x2, y2), name)`` tuples,
    image a path or a PIL image, box XYXY in its original pixels (or :class:`Exemplar` rows).
    The result goes wherever class embeddings go (``ZeroShotPipeline``, ``rclip detect
    --class-embeddings`` once saved)."""
    rows, names = exemplar_region_embeddings(model, exemplars, short_side=short_side, max_size=max_size,
                                             precision=precision, progress=progress)
    return average_per_name(rows, names)
