"""Zero-shot evaluation settings: the official zero-shot post-processing of each data set and box
mode (:func:`default_options`) and the classifier rows of a data set's classes
(:func:`dataset_class_embeddings`). The data sets are
:func:`rclip_core.data.datasets.resolve_dataset`'s, the loop is :mod:`rclip_core.evaluation.protocol`.
"""

from __future__ import annotations

import os

from torch import Tensor

from rclip_core.data.vocab import Vocabulary, class_name_key
from rclip_core.errors import InputError
from rclip_core.inference import DetectOptions

__all__ = ["default_options", "dataset_class_embeddings"]


def default_options(kind: str, boxes: str) -> DetectOptions:
    """The official zero-shot settings (``configs/*/CLIP_fast_rcnn_R_50_C4_zsinf.yaml``, Table 4)
    for ``kind`` (coco | lvis) and ``boxes`` (gt | rpn): COCO score > 0.001, 100 detections;
    LVIS score > 0.02 (RPN) / 0.0001 (GT), 300 detections; per-class NMS 0.5; every (box, class) pair may become a detection; RPN scores
    fused as the released code (``official``), GT boxes unfused."""
    if boxes not in ("gt", "rpn"):
        raise InputError(f"unknown --boxes {boxes!r}", hint="use gt or rpn")
    lvis = kind == "lvis"
    score = (0.0001 if boxes == "gt" else 0.02) if lvis else 0.001
    return DetectOptions(proposals="boxes" if boxes == "gt" else "rpn", score_thresh=score, nms=0.5,
                         max_dets=300 if lvis else 100, fusion="none" if boxes == "gt" else "official",
                         topk_labels=0)


def dataset_class_embeddings(model, vocab: Vocabulary, class_embeddings: str | os.PathLike | None = None,
                             templates: str = "clip81", average: str = "raw", trust: bool = False) -> Tensor:
    """[K, D] embeddings of the vocabulary's classes, rows in vocabulary order: read from
    ``class_embeddings`` (an official ``*_emb.pth`` or rclip embeddings file; its row count, and
    its class names when it has them, must match) or computed with the model's text tower and
    the prompt ensemble (cached on disk for trained weights)."""
    from rclip_core.weights.loaders import load_class_embeddings

    if class_embeddings:
        emb, names = load_class_embeddings(class_embeddings, trust=trust)  # trust: --trust-weights
        if emb.dim() != 2 or emb.shape[0] != len(vocab):
            raise InputError(f"--class-embeddings has {emb.shape[0]} rows but the dataset has "
                             f"{len(vocab)} classes",
                             hint="the rows must be the dataset's classes in category-id order "
                                  "(e.g. coco_65_cls_emb.pth for coco-ovd, lvis_1203_cls_emb.pth for lvis)")
        if names:
            for i, (a, b) in enumerate(zip(names, vocab.names)):
                if class_name_key(a) != class_name_key(b):
                    raise InputError(f"--class-embeddings row {i} is {a!r} but the dataset's class {i} "
                                     f"is {b!r}",
                                     hint="the rows must be the dataset's classes in category-id order")
        if emb.shape[1] != model.embed_dim:
            raise InputError(f"--class-embeddings have dimension {emb.shape[1]} but the model's region "
                             f"embeddings have {model.embed_dim}",
                             hint="use embeddings made with the same architecture")
        return emb.float()
    from rclip_core.models.text import embed_class_names

    return embed_class_names(model, list(vocab.names), templates or "clip81", average or "raw")
