"""ShapesWorld: a seeded synthetic world of coloured shapes for running RegionCLIP offline.

Every image shows 1-4 (configurable) filled shapes on a textured, noisy background; the class
of an object is ``"<colour> <shape>"`` (default 5 colours x 6 shapes = 30 classes). A world on
disk is a COCO-style detection data set with a base/novel class split and captions that, like
real captions, mention only some of the objects::

    OUT/train/000001.jpg ...          images (file name = 6-digit image id)
    OUT/val/000001.jpg ...
    OUT/instances_train.json          COCO instances (file_name is relative to OUT/<split>/;
                                      segmentation = the exact drawn polygon of each shape)
    OUT/instances_val.json
    OUT/split.json                    base/novel classes, same form as coco_ovd_split.json
    OUT/captions_train.jsonl          {"image": "train/000001.jpg", "caption": ..., "concepts": ...}
    OUT/captions_val.jsonl
    OUT/world.json                    generator settings + version; written last

Modules: :mod:`.config` (settings, colours and shapes, categories, split), :mod:`.render`
(drawing a scene), :mod:`.captions` (captions of a scene), :mod:`.world` (writing and reading
a world directory).

Design decisions:

* **Determinism.** Each image draws from its own generator seeded by ``(seed, split, index,
  stream)``, so files do not depend on the number of workers and image ``i`` of a world with
  ``train=100`` is the same as image ``i`` of one with ``train=5000``. Regenerating with the same
  arguments gives byte-identical files (no timestamps or absolute paths are written).
* **Categories.** ids ``1..K`` in colour-major order: ``id = 1 + c * len(shapes) + s`` for
  colour index ``c`` in ``config.colours`` and shape index ``s`` in ``config.shapes``; with the
  defaults 1 = "red circle", 2 = "red square", ..., 30 = "purple diamond". The supercategory is
  the shape.
* **Boxes.** ``bbox = [x, y, w, h]`` is the full (amodal) extent of the shape's polygon, also
  when a later shape covers part of it; ``area = w * h``.
* **Occlusion.** Shapes are drawn in order; a later shape may cover earlier ones. Placement
  retries up to ``placement_tries`` positions to keep every earlier object at least
  ``1 - max_occlusion`` visible; when no position works the object is drawn anyway and every
  object whose visible fraction of its own pixels fell below ``1 - max_occlusion`` (default:
  more than half hidden) is dropped from the annotations *and* the captions, so labels stay
  truthful. Visible fractions use the pixels the shape covers by at least half.
* **Close-ups.** A fraction ``closeup_frac`` of *training* images show one large, centred
  object; a teacher CLIP trained with them recognises object crops much better (the
  feasibility study: image-level accuracy 66 -> 91 %). Validation images are never close-ups.
* **Captions.** Each caption mentions every class present with probability ``mention_prob``
  (at least one class, with its true count: "two red circles"), in varied templates with size
  words, spatial relations computed from the geometry, and distractor phrases. The shape noun
  is the canonical class noun with probability ``1 - synonym_prob``, else a synonym from
  :data:`SHAPE_SYNONYMS`. Colour words are omitted with probability ``colour_drop_prob``.
  Every record lists what it mentions (``concepts``, ``classes``, ``category_ids``, ``nouns``)
  so a concept extractor can be scored. Relations and background words are truthful.
* **Base/novel split.** Seeded; ``round(K * base_frac)`` base classes (default 2/3: 20 of 30),
  drawn so that every shape and every colour occurs in at least one base class (a novel class
  is a new combination of seen words), whenever that is possible.
"""

from rclip_core.data.shapes.captions import make_captions, scene_captions
from rclip_core.data.shapes.config import (COLOURS, DEFAULT_COLOURS, DEFAULT_SHAPES, SHAPE_NOUNS, SHAPE_SYNONYMS,
                                           SHAPESWORLD_VERSION, SPLITS, Scene, ShapeObject, ShapesConfig,
                                           shapes_categories, shapes_split)
from rclip_core.data.shapes.render import is_closeup, render_scene
from rclip_core.data.shapes.world import WORLD_FILES, generate_shapes_world, image_file_name, read_shapes_world

__all__ = [
    "SHAPESWORLD_VERSION", "COLOURS", "SHAPE_NOUNS", "SHAPE_SYNONYMS", "DEFAULT_SHAPES", "DEFAULT_COLOURS", "SPLITS",
    "WORLD_FILES", "ShapesConfig", "ShapeObject", "Scene", "shapes_categories", "shapes_split", "render_scene",
    "make_captions", "scene_captions", "is_closeup", "image_file_name", "generate_shapes_world",
    "read_shapes_world",
]
