"""The RegionCLIP model container.

``RegionCLIP`` holds an open_clip ``CLIP`` (visual tower with frozen BN, optional text tower),
the :class:`RegionEncoder` view of its visual tower, optionally the offline RPN and the class
embeddings a detector file carries. Building one from a weights file is
:func:`rclip_core.weights.loaders.load_model`; writing one is
:func:`rclip_core.weights.native.save_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rclip_core.errors import InputError
from rclip_core.models.clip import Architecture, build_clip
from rclip_core.models.region_encoder import RegionEncoder


@dataclass
class ModelInfo:
    """Where a model came from, for reports and metadata."""

    source: str  # path, "open_clip:RN50-quickgelu/openai" or "random:RN50-quickgelu"
    source_format: str
    text_loaded: bool
    rpn_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RegionCLIP(nn.Module):
    """CLIP ResNet split for regions, with optional text tower, offline RPN and class embeddings."""

    def __init__(self, arch: Architecture, with_text: bool = True, fast_attnpool: bool = True):
        super().__init__()
        self.arch = arch
        self.clip = build_clip(arch, with_text=with_text)
        self.encoder = RegionEncoder(self.clip.visual, arch.pooler_resolution, fast_attnpool=fast_attnpool)
        self.rpn: nn.Module | None = None
        self.class_names: list[str] | None = None
        self.class_embeddings: torch.Tensor | None = None  # [K, D], unnormalised
        self.box_predictor: dict[str, torch.Tensor] = {}
        self.info = ModelInfo(source="", source_format="", text_loaded=False)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    @property
    def has_text(self) -> bool:
        return self.clip.transformer is not None and self.info.text_loaded

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.clip.transformer is None:
            raise InputError("this model has no text encoder", "pass class embeddings with --class-embeddings")
        return self.clip.encode_text(tokens)

    def identity(self) -> str:
        """A string that identifies the weights (for caches)."""
        return f"{self.arch.name}|{self.info.source}|{self.info.extra.get('sha256', '')}"


__all__ = ["RegionCLIP", "ModelInfo"]
