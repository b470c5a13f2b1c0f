"""ShapesWorld captions: partial, truthful descriptions of a scene (counts, synonyms, size words,
spatial relations), with what each caption mentions."""

from __future__ import annotations

import numpy as np

from rclip_core.data.shapes.config import (SHAPE_NOUNS, SHAPE_SYNONYMS, STREAM_CAPTIONS, Scene, ShapeObject,
                                           ShapesConfig, image_rng)

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                 9: "nine", 10: "ten"}


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _relation(a: ShapeObject, b: ShapeObject, image_size: int, rng: np.random.Generator) -> str | None:
    """A spatial phrase that is true of ``a`` relative to ``b``, or None when none is clear."""
    if b.order in a.occluded_by:
        return str(rng.choice(["behind", "partly hidden by"]))
    if a.order in b.occluded_by:
        return str(rng.choice(["in front of", "partly covering", "overlapping"]))
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay
    options = []
    if abs(dy) > 1.5 * abs(dx):
        options.append("above" if dy > 0 else "below")
    elif abs(dx) > 1.5 * abs(dy):
        options.append("to the left of" if dx > 0 else "to the right of")
    gap_x = max(a.bbox[0], b.bbox[0]) - min(a.bbox[0] + a.bbox[2], b.bbox[0] + b.bbox[2])
    gap_y = max(a.bbox[1], b.bbox[1]) - min(a.bbox[1] + a.bbox[3], b.bbox[1] + b.bbox[3])
    if max(gap_x, gap_y) < 0.15 * image_size:
        options.append("next to")
    return str(rng.choice(options)) if options else None


_TEMPLATES = (
    "{np}", "a picture of {np}", "an image of {np}", "a photo of {np}", "a drawing of {np}",
    "{np} on a {bg} background", "an image of {np} on a {bg} background", "{np} against a {bg} backdrop",
    "{there} {np} in this picture", "{np} in the scene", "we can see {np}", "a synthetic scene with {np}",
    "a {bg} background with {np}",
)


def make_captions(scene: Scene, config: ShapesConfig, rng: np.random.Generator) -> list[dict]:
    """``config.captions_per_image`` caption records for a scene (``image`` not filled in).

    Each record: ``caption`` (text), ``concepts`` (canonical shape nouns and colour words
    mentioned, in order), ``classes`` / ``category_ids`` (classes of the objects referred to),
    ``nouns`` (the surface nouns used, e.g. "disc" for a circle). Only labelled objects are
    mentioned; each class present is mentioned with probability ``mention_prob`` (at least one)
    and with its exact count.
    """
    cfg = config
    size = cfg.image_size
    groups: dict[int, list[ShapeObject]] = {}
    for o in scene.objects:
        groups.setdefault(o.category_id, []).append(o)
    if not groups:
        return []
    bg_words = ["noisy", "grainy"] + {"plain": ["plain", "smooth"], "stripes": ["striped"],
                                      "blotches": ["blotchy", "mottled"],
                                      "stripes+blotches": ["striped", "mottled"]}[scene.background]
    lo_third = cfg.min_size + (cfg.max_size - cfg.min_size) / 3
    hi_third = cfg.max_size - (cfg.max_size - cfg.min_size) / 3
    records = []
    for _ in range(cfg.captions_per_image):
        ids = list(groups)
        rng.shuffle(ids)
        chosen = [cid for cid in ids if rng.random() < cfg.mention_prob] or [ids[int(rng.integers(len(ids)))]]
        phrases, concepts, nouns, plural_first = [], [], [], False
        for j, cid in enumerate(chosen):
            objs = groups[cid]
            shape, colour, n = objs[0].shape, objs[0].colour, len(objs)
            if rng.random() < cfg.synonym_prob:
                syns = SHAPE_SYNONYMS[shape]
                noun_sg, noun_pl = syns[int(rng.integers(len(syns)))]
            else:
                noun_sg, noun_pl = SHAPE_NOUNS[shape]
            words = []
            if rng.random() < cfg.size_word_prob:
                if scene.closeup or all(o.size >= hi_third for o in objs):
                    words.append(str(rng.choice(["large", "big"])))
                elif all(o.size <= lo_third for o in objs):
                    words.append(str(rng.choice(["small", "tiny"])))
            # the colour may go only when no other class shares the shape, so counts stay true
            shape_unique = sum(g[0].shape == shape for g in groups.values()) == 1
            with_colour = not shape_unique or rng.random() >= cfg.colour_drop_prob
            if with_colour:
                words.append(colour)
            words.append(noun_sg if n == 1 else noun_pl)
            body = " ".join(words)
            if n == 1:
                det = "one" if rng.random() < 0.1 else _article(body)
            else:
                det = "several" if n >= 3 and rng.random() < 0.1 else _NUMBER_WORDS.get(n, str(n))
            phrases.append(f"{det} {body}")
            concepts += [shape] + ([colour] if with_colour else [])
            nouns.append(noun_sg)
            if j == 0:
                plural_first = n > 1
        text = None
        if len(chosen) >= 2 and len(groups[chosen[0]]) == 1 and len(groups[chosen[1]]) == 1 \
                and rng.random() < cfg.relation_prob:
            rel = _relation(groups[chosen[0]][0], groups[chosen[1]][0], size, rng)
            if rel is not None:
                rest = phrases[2:]
                text = f"{phrases[0]} {rel} {phrases[1]}" + ("".join(f", {p}" for p in rest[:-1])
                                                             + (f" and {rest[-1]}" if rest else ""))
        if text is None:
            text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        caption = template.format(np=text, bg=str(rng.choice(bg_words)),
                                  there="there are" if plural_first else "there is")
        if rng.random() < 0.7:
            caption = caption[0].upper() + caption[1:] + "."
        records.append({
            "caption": caption,
            "concepts": list(dict.fromkeys(concepts)),
            "classes": [groups[cid][0].name for cid in chosen],
            "category_ids": [int(cid) for cid in chosen],
            "nouns": nouns,
        })
    return records


def scene_captions(scene: Scene, config: ShapesConfig | None = None, seed: int = 0, split: str = "train",
                   index: int = 0) -> list[dict]:
    """The captions :func:`generate_shapes_world` writes for image ``index`` of ``split``."""
    cfg = config or ShapesConfig()
    return make_captions(scene, cfg, image_rng(seed, split, index, STREAM_CAPTIONS))
