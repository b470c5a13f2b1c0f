"""Deployment: ``rclip export`` writes ONNX graphs whose vocabulary is an input
(:mod:`rclip_core.export.build`, torch), and :class:`OnnxDetector` runs them with onnxruntime,
numpy and Pillow only (:mod:`rclip_core.export.runtime`). Importing this package imports
neither torch nor onnxruntime."""

from __future__ import annotations

__all__ = ["OnnxDetector", "export_onnx"]


def __getattr__(name: str):
    if name == "OnnxDetector":
        from rclip_core.export.runtime import OnnxDetector

        return OnnxDetector
    if name == "export_onnx":
        from rclip_core.export.build import export_onnx

        return export_onnx
    raise AttributeError(name)
