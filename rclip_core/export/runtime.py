"""Run an ``rclip export`` directory with onnxruntime, numpy and Pillow alone (no torch import).

:class:`OnnxDetector` does what the graphs do not hold: decoding (EXIF orientation, RGB) and the
test resize, with the same functions as the PyTorch path (:func:`rclip_core.data.images.read_image`
and :func:`~rclip_core.data.images.resize_array`, neither imports torch), so the graph sees the
very bytes ``rclip detect`` feeds its network.

Example::

    from rclip_core.export import OnnxDetector
    det = OnnxDetector("export/")
    names, emb = det.load_class_embeddings("kite_boy.safetensors")  # `rclip embed` output
    out = det.detect("photo.jpg", emb)                       # dict of numpy arrays
    out["boxes"], out["scores"], out["classes"]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rclip_core.errors import InputError, RuntimeFailure

__all__ = ["OnnxDetector", "PreparedImage"]


@dataclass
class PreparedImage:
    """The graph's image input and sizes (the numpy twin of ``rclip_core.data.images.PreparedImage``)."""

    array: np.ndarray  # uint8 [H, W, 3] RGB, resized
    orig_size: tuple[int, int]  # (h, w)
    size: tuple[int, int]  # (h, w) resized



class OnnxDetector:
    """An exported detector: ``detector.onnx`` (its own proposals), ``detector_boxes.onnx`` (given
    boxes, zero-shot exports) and ``text_encoder.onnx`` when exported, as ``export.json``
    describes them."""

    def __init__(self, export_dir: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        self.dir = Path(export_dir)
        meta_path = self.dir / "export.json"
        if not meta_path.is_file():
            raise InputError(f"{self.dir} is not an rclip export (no export.json)", "make one with `rclip export`")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {meta_path}: {e}") from None
        if not str(self.meta.get("format", "")).startswith("rclip-onnx/"):
            raise InputError(f"{meta_path} is not an rclip ONNX export description")
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("onnxruntime is not installed", "pip install 'rclip-toolkit[export]'") from None
        self._ort = ort
        self._providers = list(providers or ["CPUExecutionProvider"])
        self._threads = threads
        self._sessions: dict[str, Any] = {}
        pre = self.meta["preprocessing"]
        self.short_side, self.max_size = int(pre["short_side"]), int(pre["max_size"])
        self.embed_dim = int(self.meta["embed_dim"])

    # -- sessions -----------------------------------------------------------------------------
    def session(self, graph: str):
        """The onnxruntime session of ``graph`` (``detector``, ``detector_boxes``, ``text_encoder``)."""
        if graph not in self._sessions:
            info = self.meta["graphs"].get(graph)
            if info is None:
                raise InputError(f"this export has no {graph} graph", "graphs: " + ", ".join(self.meta["graphs"]))
            opts = self._ort.SessionOptions()
            if self._threads:
                opts.intra_op_num_threads = int(self._threads)
            try:
                self._sessions[graph] = self._ort.InferenceSession(str(self.dir / info["file"]), opts,
                                                                   providers=self._providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise RuntimeFailure(f"onnxruntime cannot load {info['file']}: {' '.join(str(e).split())[:200]}") from None
        return self._sessions[graph]

    # -- inputs -------------------------------------------------------------------------------
    def prepare(self, source: str | os.PathLike | bytes) -> PreparedImage:
        """Decode (EXIF, RGB) and resize an image file as ``rclip detect`` does."""
        from rclip_core.data.images import read_image, resize_array

        arr, orig, size = resize_array(read_image(source), self.short_side, self.max_size)
        return PreparedImage(np.ascontiguousarray(arr), orig, size)

    def check_class_embeddings(self, emb: Any) -> np.ndarray:
        e = np.asarray(emb, dtype=np.float32)
        if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] != self.embed_dim:
            raise InputError(f"class_embeddings must be [K, {self.embed_dim}] (K >= 1), got shape {list(e.shape)}",
                             f"use embeddings made with the exported architecture ({self.meta['source']['architecture']})")
        if not np.isfinite(e).all():
            raise InputError("class_embeddings contain NaN or infinite values")
        return np.ascontiguousarray(e)

    def load_class_embeddings(self, path: str | os.PathLike) -> tuple[list[str] | None, np.ndarray]:
        """An ``rclip embed`` safetensors file (``embeddings`` [K, D], names in its metadata) or a
        ``.npy`` [K, D] array -> (names or None, embeddings)."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"class embeddings file not found: {p}")
        if p.suffix == ".npy":
            return None, self.check_class_embeddings(np.load(p, allow_pickle=False))
        from safetensors import safe_open

        try:
            with safe_open(str(p), "np") as f:
                raw = (f.metadata() or {}).get("rclip")
                if "embeddings" not in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    raise InputError(f"{p} has no 'embeddings' tensor", "pass the output of `rclip embed`")
                emb = f.get_tensor("embeddings")
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise InputError(f"cannot read {p} as safetensors: {' '.join(str(e).split())[:200]}") from None
        names = (json.loads(raw).get("names") if raw else None) or None
        return (list(names) if names else None), self.check_class_embeddings(emb)

    def default_class_embeddings(self) -> tuple[list[str], np.ndarray]:
        """The vocabulary stored with the export (a fine-tuned detector's own classes)."""
        if not self.meta.get("class_embeddings"):
            raise InputError("this export carries no class embeddings", "pass class embeddings (`rclip embed`)")
        return list(self.meta["class_names"]), self.check_class_embeddings(np.load(self.dir / self.meta["class_embeddings"]))

    # -- running ------------------------------------------------------------------------------
    def run(self, image: PreparedImage, class_embeddings: Any, boxes: Any | None = None,
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One prepared image -> the graph's outputs (``boxes``, ``scores``, ``classes``,
        ``box_index``, ``region_boxes``, ``region_embeddings``, ``objectness``; only ``outputs``
        when given). ``boxes``: XYXY in original pixels (the box graph)."""
        emb = self.check_class_embeddings(class_embeddings)
        feeds: dict[str, np.ndarray] = {"image": image.array,
                                        "orig_size": np.asarray(image.orig_size, dtype=np.int64),
                                        "class_embeddings": emb}
        graph = "detector"
        if boxes is not None:
            b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            if b.shape[0] == 0:
                raise InputError("no boxes given")
            feeds["given_boxes"] = b
            graph = "detector_boxes"
        sess = self.session(graph)
        names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
        try:
            res = sess.run(names, feeds)
        except Exception as e:  # noqa: BLE001
            raise RuntimeFailure(f"onnxruntime failed: {' '.join(str(e).split())[:300]}") from None
        return dict(zip(names, res))

    def detect(self, source: str | os.PathLike | bytes, class_embeddings: Any, boxes: Any | None = None,
               outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """:meth:`prepare` then :meth:`run`."""
        return self.run(self.prepare(source), class_embeddings, boxes, outputs)

    def encode_tokens(self, token_ids: Any) -> np.ndarray:
        """``text_encoder.onnx``: int64 [N, context_length] CLIP BPE ids -> [N, D] text embeddings."""
        t = np.asarray(token_ids, dtype=np.int64)
        return self.session("text_encoder").run(None, {"token_ids": t})[0]
