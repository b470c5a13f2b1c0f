"""Inference on images: the zero-shot path shared by ``rclip detect``, ``rclip eval --zero-shot``
and ``rclip pseudo-label`` (:class:`ZeroShotPipeline`), and a fine-tuned detector's
(:func:`detect_images`), both returning boxes in original-image pixels.

Zero-shot, per image (official ``clip_rcnn.py: CLIPFastRCNN.inference``): read + resize
(``detectron2/data/transforms/augmentation_impl.py: ResizeShortestEdge``) -> proposals (given
boxes, offline RPN, random or grid boxes) -> trunk once -> RoIAlign + res5 + attention pool per
region -> cosine classifier against the class embeddings (``fast_rcnn.py:
FastRCNNOutputLayers``) -> post-processing (``fast_rcnn.py: fast_rcnn_inference_single_image``,
RPN-score fusion as in ``fast_rcnn.py: FastRCNNOutputLayers.inference``) -> boxes back in
original pixels. Zero-shot settings of Table 4 (see :func:`rclip_core.evaluation.zeroshot.default_options`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from rclip_core.data.images import (MAX_SIZE, TEST_SHORT_SIDE, PreparedImage, boxes_to_original, boxes_to_resized,
                                    load_image)
from rclip_core.errors import InputError, RclipError
from rclip_core.models.classifier import FUSION_MODES, Detections, InferenceConfig, postprocess, region_class_probs
from rclip_core.models.regionclip import RegionCLIP

PROPOSAL_MODES = ("boxes", "rpn", "random", "grid")


@dataclass(kw_only=True)
class DetectOptions(InferenceConfig):
    """Zero-shot detection settings: the post-processing ones are
    :class:`rclip_core.models.classifier.InferenceConfig`'s (same names as the CLI flags and the
    recipe keys), with ``rclip detect``'s defaults (score > 0.05, top-1 class per box, RPN score
    fusion ``official``); plus where the regions come from, the test resize and the precision.
    Checked on construction and by :meth:`validate` (one-line InputErrors naming the flag)."""

    score_thresh: float = 0.05
    fusion: str = "official"  # only used with RPN proposals
    topk_labels: int = 1  # 0 = every (box, class) pair above the threshold (official protocol)
    proposals: str = "boxes"  # boxes | rpn | random | grid
    num_random: int = 100
    seed: int = 0
    short_side: int = TEST_SHORT_SIDE
    max_size: int = MAX_SIZE
    precision: str = "fp32"  # fp32 | bf16

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.proposals not in PROPOSAL_MODES:
            raise InputError(f"unknown proposal mode {self.proposals!r}", "use one of " + ", ".join(PROPOSAL_MODES))
        if self.fusion not in FUSION_MODES:
            raise InputError(f"unknown fusion {self.fusion!r}", "use one of " + ", ".join(FUSION_MODES))
        if not (0.0 <= self.score_thresh < 1.0 or (self.fusion == "official" and self.score_thresh >= 0)):
            raise InputError(f"--score-thresh {self.score_thresh} must be in [0, 1)")
        if not 0.0 < self.nms <= 1.0:
            raise InputError(f"--nms {self.nms} must be in (0, 1]")
        if self.max_dets < 1:
            raise InputError("--max-dets must be >= 1")
        if self.topk_labels < 0:
            raise InputError("--topk-labels must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise InputError(f"unknown precision {self.precision!r}", "use fp32 or bf16")
        try:
            super().__post_init__()  # the remaining post-processing checks
        except ValueError as e:
            raise InputError(str(e)) from None


@dataclass
class ImageResult:
    path: str
    orig_size: tuple[int, int]  # (h, w)
    boxes: Tensor  # [N, 4] region boxes in original pixels, input order
    embeddings: Tensor  # [N, D] unnormalised region embeddings, input order
    detections: Detections  # boxes in original pixels
    objectness: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class ZeroShotPipeline:
    """Region embeddings + classification + post-processing for one model and vocabulary."""

    def __init__(self, model: RegionCLIP, class_embeddings: Tensor | None, options: DetectOptions):
        options.validate()
        self.model = model
        self.device = model.device
        self.class_embeddings = None if class_embeddings is None else class_embeddings.float().to(self.device)
        if self.class_embeddings is not None and self.class_embeddings.shape[1] != model.embed_dim:
            raise InputError(f"class embeddings have dimension {self.class_embeddings.shape[1]} but the model's "
                             f"region embeddings have {model.embed_dim}",
                             "use embeddings made with the same architecture (e.g. *_rn50x4 files for RN50x4)")
        self.options = options
        if options.proposals == "rpn" and model.rpn is None:
            raise InputError("RPN proposals need an offline RPN, and these weights carry none",
                             "pass --rpn-weights rpn_lvis_866.pth, or use --boxes FILE / --proposals random")

    # -- proposals --------------------------------------------------------------------------
    def proposals(self, prep: PreparedImage, given: np.ndarray | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """Returns (boxes in resized pixels, objectness logits or None, boxes in original pixels)."""
        o = self.options
        if given is not None:
            resized = boxes_to_resized(given, prep)
            orig = torch.as_tensor(np.asarray(given, dtype=np.float64), dtype=torch.float32).reshape(-1, 4)
            return resized, None, orig
        if o.proposals == "rpn":
            with torch.inference_mode():
                out = self.model.rpn([prep.tensor.to(self.device)])
            boxes, logits = _unpack_rpn(out)
            return boxes.float(), logits.float(), boxes_to_original(boxes.float(), prep)
        from rclip_core.models.proposals.boxes import grid_boxes, random_boxes

        h, w = prep.size
        if o.proposals == "random":
            g = torch.Generator().manual_seed(o.seed)
            boxes = random_boxes((h, w), o.num_random, g)
        elif o.proposals == "grid":
            boxes = grid_boxes((h, w))
        else:
            raise InputError("no boxes given for this image", "pass --boxes FILE or choose --proposals rpn|random|grid")
        boxes = boxes.float()
        return boxes, None, boxes_to_original(boxes, prep)

    # -- one image -----------------------------------------------------------------------------
    def run(self, prep: PreparedImage, path: str, given: np.ndarray | None = None) -> ImageResult:
        """One image: proposals (or the ``given`` XYXY boxes in original pixels) -> region
        embeddings -> detections in original pixels."""
        return self.run_batch([(prep, path, given)])[0]

    # -- several images ------------------------------------------------------------------------
    def run_batch(self, items: Sequence[tuple[PreparedImage, str, np.ndarray | None]]) -> list[ImageResult]:
        """Several images, each ``(image, path, given boxes or None)``; results in input order.

        Images whose resized sizes are equal share one trunk call (and one RPN call), which is
        what makes batching pay on a GPU. Images of different sizes are never padded into one
        batch: padding would change the features near the bottom/right border, and the
        official test loader runs one image at a time, so each result equals :meth:`run` on
        that image alone (up to floating-point summation order).
        """
        import time

        results: list[ImageResult | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (prep, _, _) in enumerate(items):
            groups.setdefault(tuple(prep.size), []).append(i)
        enc = self.model.encoder
        for idx in groups.values():
            t0 = time.perf_counter()
            props = self._proposals_batch([items[i][0] for i in idx], [items[i][2] for i in idx])
            t1 = time.perf_counter()
            with torch.inference_mode(), autocast_context(self.device, self.options.precision):
                res4 = enc.trunk(enc.batch_images([items[i][0].tensor for i in idx]))
                t2 = time.perf_counter()
                emb = enc.forward_features(res4, [p[0].to(self.device) for p in props],
                                           chunk_size=self.options.chunk_size).float()
            t3 = time.perf_counter()
            per_image = emb.split([int(p[0].shape[0]) for p in props])
            share = 1.0 / len(idx)  # a batch's time, shared evenly, so per-image timings still add up
            for i, (boxes, logits, boxes_orig), e in zip(idx, props, per_image):
                prep, path, _ = items[i]
                t4 = time.perf_counter()
                dets = self._detections(prep, boxes, logits, e)
                post = time.perf_counter() - t4
                results[i] = ImageResult(path=path, orig_size=prep.orig_size, boxes=boxes_orig,
                                         embeddings=e.cpu(), detections=dets,
                                         objectness=None if logits is None else logits.cpu(),
                                         timings={"proposals": (t1 - t0) * share, "trunk": (t2 - t1) * share,
                                                  "head": (t3 - t2) * share, "post": post})
        return results  # type: ignore[return-value]

    def _proposals_batch(self, preps: Sequence[PreparedImage], givens: Sequence[np.ndarray | None]
                         ) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """:meth:`proposals` for images of one size; the RPN runs once for all that need it."""
        out: list[tuple[Tensor, Tensor | None, Tensor] | None] = [None] * len(preps)
        rpn_idx = [i for i, g in enumerate(givens) if g is None and self.options.proposals == "rpn"]
        if rpn_idx:
            with torch.inference_mode():
                rpn_out = self.model.rpn([preps[i].tensor.to(self.device) for i in rpn_idx])
            for i, item in zip(rpn_idx, rpn_out):
                boxes, logits = _unpack_rpn([item])
                out[i] = (boxes.float(), logits.float(), boxes_to_original(boxes.float(), preps[i]))
        for i, (prep, given) in enumerate(zip(preps, givens)):
            if out[i] is None:
                out[i] = self.proposals(prep, given)
        return out  # type: ignore[return-value]

    def _detections(self, prep: PreparedImage, boxes: Tensor, logits: Tensor | None, emb: Tensor
                    ) -> Detections:
        """Classify one image's region embeddings [N, D] and post-process (official
        ``fast_rcnn.py: fast_rcnn_inference_single_image``); boxes come back in original
        pixels, on the CPU."""
        if self.class_embeddings is None or emb.shape[0] == 0:
            z = torch.zeros(0)
            return Detections(torch.zeros(0, 4), z, z.long(), z.long(), z)
        probs = region_class_probs(emb, self.class_embeddings, keep_background=True)
        o = self.options
        dets = postprocess(boxes.to(self.device), probs, prep.size, logits, o)  # no logits: no fusion
        dets = Detections(boxes_to_original(dets.boxes.cpu(), prep), dets.scores.cpu(), dets.classes.cpu(),
                          dets.box_index.cpu(), dets.probs.cpu())
        nonempty = (dets.boxes[:, 2] > dets.boxes[:, 0]) & (dets.boxes[:, 3] > dets.boxes[:, 1])
        if not bool(nonempty.all()):
            dets = Detections(dets.boxes[nonempty], dets.scores[nonempty], dets.classes[nonempty],
                              dets.box_index[nonempty], dets.probs[nonempty])
        return dets


def detect_images(detector, images: Sequence[PreparedImage]) -> list:
    """A fine-tuned detector (:class:`rclip_core.models.detector.Detector`) on prepared images
    (:func:`rclip_core.data.images.load_image`): its ``DetectorDetections`` per image, boxes
    in ORIGINAL pixels, on the CPU, in input order, class indices into its eval-mode vocabulary.

    Images of equal resized size share one trunk call (``Detector.inference``); images are
    never padded together, so a result does not depend on the other images (the official test
    loader runs one image at a time). Boxes are mapped back and empty ones dropped as in
    ``detectron2/modeling/postprocessing.py: detector_postprocess``. Runs in eval mode and
    restores the previous mode.
    """
    was_training = detector.training
    detector.eval()
    try:
        out: list = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, prep in enumerate(images):
            groups.setdefault(tuple(prep.size), []).append(i)
        for idx in groups.values():
            dets = detector.inference([images[i].tensor for i in idx])
            for i, d in zip(idx, dets):
                d = d.to("cpu")
                d.boxes = boxes_to_original(d.boxes, images[i])
                nonempty = (d.boxes[:, 2] > d.boxes[:, 0]) & (d.boxes[:, 3] > d.boxes[:, 1])
                out[i] = d if bool(nonempty.all()) else d.select(nonempty)
        return out
    finally:
        detector.train(was_training)


def _unpack_rpn(out) -> tuple[Tensor, Tensor]:
    """Accept the RPN's per-image output in its documented forms."""
    first = out[0] if isinstance(out, (list, tuple)) else out
    if isinstance(first, dict):
        return first["boxes"], first["objectness_logits"]
    if isinstance(first, (list, tuple)) and len(first) == 2:
        return first[0], first[1]
    if hasattr(first, "boxes"):
        return first.boxes, first.objectness_logits
    raise RclipError("unexpected RPN output format")


def prefetch_images(paths: Sequence[str], short: int, max_size: int, workers: int = 2
                    ) -> Iterator[tuple[str, PreparedImage | None, Exception | None]]:
    """Decode + resize images in background threads (PIL releases the GIL) while the model runs.
    Yields (path, image or None, error or None) in input order."""
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(load_image, p, short, max_size) for p in paths[: workers * 2]]
        nxt = len(futures)
        for i, p in enumerate(paths):
            fut = futures[i]
            if nxt < len(paths):
                futures.append(pool.submit(load_image, paths[nxt], short, max_size))
                nxt += 1
            try:
                yield p, fut.result(), None
            except RclipError as e:
                yield p, None, e
            futures[i] = None  # free memory


#: ``runner(image, path, given XYXY boxes or None) -> ImageResult``
Runner = Callable[[PreparedImage, str, "np.ndarray | None"], ImageResult]


def detector_runner(detector, precision: str = "fp32") -> Runner:
    """``runner(image, path, boxes) -> ImageResult`` of a fine-tuned detector (it makes its own
    boxes: ``boxes`` is unused; no region embeddings), through :func:`detect_images`."""

    def run(prep: PreparedImage, path: str, boxes: np.ndarray | None = None) -> ImageResult:
        with torch.inference_mode(), autocast_context(detector.device, precision):
            d = detect_images(detector, [prep])[0]
        return ImageResult(path=path, orig_size=prep.orig_size, boxes=d.boxes, embeddings=torch.zeros(0),
                           detections=d)

    return run


def detect_files(run: Runner, paths: Sequence[str], *, boxes: Mapping[str, np.ndarray] | None = None,
                 short_side: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE, workers: int = 1
                 ) -> Iterator[tuple[str, ImageResult | None, str | None]]:
    """``run`` on image files (``rclip detect``), decoded ahead in ``workers`` threads: yields
    ``(path, result, None)`` or ``(path, None, error message)`` per image, in input order, so one
    bad image does not stop the others.

    ``boxes``: given XYXY boxes in original pixels per image (a
    :func:`rclip_core.data.boxes.load_boxes_file` mapping); every image's entry is looked up
    before any work (a missing one is an InputError), and checked against the image's size.
    """
    from rclip_core.data.boxes import lookup_boxes

    if boxes is not None:  # now, not when the first result is asked for
        for p in paths:
            lookup_boxes(boxes, p)
    return _detect_files(run, paths, boxes, short_side, max_size, workers)


def _detect_files(run: Runner, paths: Sequence[str], boxes: Mapping[str, np.ndarray] | None, short_side: int,
                  max_size: int, workers: int) -> Iterator[tuple[str, ImageResult | None, str | None]]:
    from rclip_core.data.boxes import lookup_boxes, validate_boxes

    for path, prep, err in prefetch_images(paths, short_side, max_size, workers=workers):
        if err is not None:
            yield path, None, str(err)
            continue
        try:
            given = None
            if boxes is not None:
                given = validate_boxes(np.asarray(lookup_boxes(boxes, path), dtype=np.float64),
                                       prep.orig_size[1], prep.orig_size[0], os.path.basename(path))
            res, msg = run(prep, path, given), None
        except RclipError as e:
            res, msg = None, str(e)
        yield path, res, msg


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded and resized for test (``ResizeShortestEdge``) in DataLoader workers.

    Item ``i`` is ``(i, PreparedImage or None, error message or None)``: a corrupt or missing
    file is reported, not raised, so one bad image does not stop an evaluation.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], short: int = TEST_SHORT_SIDE,
                 max_size: int = MAX_SIZE):
        self.paths = [os.fspath(p) for p in paths]
        self.short, self.max_size = short, max_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, PreparedImage | None, str | None]:
        try:
            return i, load_image(self.paths[i], self.short, self.max_size), None
        except RclipError as e:
            return i, None, str(e)


def _as_list(batch: list) -> list:
    return batch


def load_image_batches(paths: Sequence[str | os.PathLike], short: int = TEST_SHORT_SIDE,
                       max_size: int = MAX_SIZE, batch_size: int = 1, workers: int = 0
                       ) -> Iterator[list[tuple[int, PreparedImage | None, str | None]]]:
    """Batches of ``batch_size`` decoded images in input order, each item ``(index into paths,
    image or None, error or None)``.

    With ``workers`` > 0, decoding and resizing run in that many DataLoader worker processes,
    two batches ahead of the consumer, so they overlap with the model's compute; 0 decodes in
    the calling process.
    """
    if batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    if workers < 0:
        raise InputError("--workers must be >= 0")
    if not paths:
        return
    # own generator: the loader draws its workers' base seed from it, not from the global RNG
    # (an evaluation between training steps must not move it: exact resume)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, short, max_size), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, collate_fn=_as_list,
                                         prefetch_factor=2 if workers > 0 else None,
                                         generator=torch.Generator().manual_seed(0))
    yield from loader


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def collect_images(inputs: Iterable[str]) -> list[str]:
    """Files, directories (their images, sorted) and glob patterns -> image paths (deduplicated,
    order kept). A missing path or an empty directory/glob is bad input."""
    import glob

    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        rp = os.path.abspath(p)
        if rp not in seen:
            seen.add(rp)
            out.append(p)

    for item in inputs:
        if any(ch in item for ch in "*?[") and not os.path.exists(item):
            hits = sorted(glob.glob(item, recursive=True))
            hits = [h for h in hits if os.path.isfile(h)]
            if not hits:
                raise InputError(f"no files match {item!r}")
            for h in hits:
                add(h)
        elif os.path.isdir(item):
            hits = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not hits:
                raise InputError(f"directory {item} contains no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
            for h in hits:
                add(h)
        elif os.path.exists(item):
            add(item)
        else:
            raise InputError(f"image not found: {item}")
    return out


ProgressFn = Callable[[int], None]
