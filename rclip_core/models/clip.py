"""Build open_clip ResNet CLIP models, describe how RegionCLIP splits them, and freeze them.

The official network is ``detectron2/modeling/backbone/clip_backbone.py: ModifiedResNet``
(``build_clip_resnet_backbone``); open_clip's ``modified_resnet.py: ModifiedResNet`` has the same
modules and names.

A RegionCLIP visual encoder is an open_clip ``ModifiedResNet`` used in two parts:

* the *trunk* ``stem .. layer3`` -> ``res4`` (stride 16, 16*width channels), run once per image;
* the *region head* ``layer4 + attnpool``, run on RoIAlign-pooled ``res4`` features of each
  region (see :mod:`rclip_core.models.region_encoder`).

The RoIAlign output is twice the attention-pool grid (``res5``'s first block halves it), so
the positional embedding of ``attnpool`` is used unchanged: pooler resolution =
``2 * image_size // 32`` (14 for RN50 at 224 px, 18 for RN50x4 at 288 px).

Every BatchNorm is converted to torchvision's ``FrozenBatchNorm2d`` (eps 1e-5, no
``num_batches_tracked``), as RegionCLIP's ``FrozenBN`` - statistics and affine parameters are
never trained.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from rclip_core.errors import InputError

# Lower-case names used by the official code / model zoo -> open_clip config names.
# RegionCLIP's text tower uses QuickGELU (``clip_backbone.py: CLIPLangEncoder``), hence the -quickgelu configs.
ALIASES = {
    "rn50": "RN50-quickgelu",
    "rn50x4": "RN50x4-quickgelu",
    "rn101": "RN101-quickgelu",
    "rn50x16": "RN50x16",
    "rn50x64": "RN50x64",
}

# Small configurations of our own, used by ShapesWorld (trained from scratch on CPU).
CUSTOM_CONFIGS: dict[str, dict[str, Any]] = {
    # ModifiedResNet [1,1,1,1] width 16 at 128 px: res4 has 256 channels, attnpool grid 4x4,
    # 8 heads, RoIAlign 8x8. 2-layer text transformer, width 128.
    "shapes-tiny": {
        "embed_dim": 128,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
    },
    # An even smaller one for unit tests.
    "test-micro": {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
}


@dataclass(frozen=True)
class Architecture:
    """A CLIP ResNet architecture: its open_clip config and the derived RegionCLIP settings."""

    name: str
    config: Mapping[str, Any] = field(hash=False, compare=False)

    @property
    def vision_cfg(self) -> Mapping[str, Any]:
        return self.config["vision_cfg"]

    @property
    def text_cfg(self) -> Mapping[str, Any]:
        return self.config["text_cfg"]

    @property
    def image_size(self) -> int:
        s = self.vision_cfg["image_size"]
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    @property
    def width(self) -> int:
        return int(self.vision_cfg["width"])

    @property
    def embed_dim(self) -> int:
        """Region / text embedding dimension (1024 for RN50, 640 for RN50x4)."""
        return int(self.config["embed_dim"])

    @property
    def res4_channels(self) -> int:
        return 16 * self.width

    @property
    def res5_channels(self) -> int:
        return 32 * self.width

    @property
    def attnpool_grid(self) -> int:
        return self.image_size // 32

    @property
    def pooler_resolution(self) -> int:
        """RoIAlign output size: 2x the attention-pool grid (14 for RN50, 18 for RN50x4)."""
        return 2 * self.attnpool_grid

    @property
    def context_length(self) -> int:
        return int(self.text_cfg.get("context_length", 77))

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "config": self.config}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        d = json.loads(text)
        return cls(name=d["name"], config=d["config"])


def available_architectures() -> list[str]:
    """open_clip ModifiedResNet configs plus our own small ones."""
    import open_clip

    names = [n for n in open_clip.list_models() if _is_modified_resnet(open_clip.get_model_config(n))]
    return sorted(set(names)) + sorted(CUSTOM_CONFIGS)


def _is_modified_resnet(cfg: Mapping[str, Any] | None) -> bool:
    if not cfg or "vision_cfg" not in cfg:
        return False
    v = cfg["vision_cfg"]
    return isinstance(v.get("layers"), (list, tuple)) and not v.get("timm_model_name")


def get_architecture(spec: str | Mapping[str, Any] | Architecture) -> Architecture:
    """Resolve a name (``RN50-quickgelu``, ``rn50x4``, ``shapes-tiny``), a config dict, or an
    :class:`Architecture` into an Architecture. Only ModifiedResNet (CLIP ResNet) configs are
    supported: the region head needs res4/res5 and attention pooling."""
    if isinstance(spec, Architecture):
        return spec
    if isinstance(spec, Mapping):
        cfg = dict(spec)
        name = str(cfg.pop("name", "custom"))
        if "config" in cfg:
            cfg = dict(cfg["config"])
        if not _is_modified_resnet(cfg):
            raise InputError(f"architecture config {name!r} is not a CLIP ModifiedResNet config")
        return Architecture(name=name, config=copy.deepcopy(cfg))
    name = ALIASES.get(str(spec).lower(), str(spec))
    if name in CUSTOM_CONFIGS:
        return Architecture(name=name, config=copy.deepcopy(CUSTOM_CONFIGS[name]))
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise InputError(f"unknown model architecture {spec!r}",
                         "choose one of: " + ", ".join(available_architectures()))
    if not _is_modified_resnet(cfg):
        raise InputError(f"architecture {spec!r} is not a CLIP ResNet (ModifiedResNet)",
                         "RegionCLIP's region head needs a ResNet: use RN50-quickgelu or RN50x4-quickgelu")
    return Architecture(name=name, config=copy.deepcopy(cfg))


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by torchvision's FrozenBatchNorm2d (in place where possible)."""
    from open_clip.utils import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)


FREEZE_AT_MAX = 5


def freeze_visual(visual: nn.Module, freeze_at: int = 2) -> nn.Module:
    """Detectron2 ``FREEZE_AT`` on a CLIP ModifiedResNet ``visual``: the first ``freeze_at`` of
    (stem, layer1 (res2), layer2, layer3, layer4) are frozen, the rest and ``attnpool`` are made
    trainable: 0 = nothing frozen, 1 = the stem, 2 = stem + layer1 (the paper, in pretraining and
    transfer: ``BACKBONE.FREEZE_AT 2``), ... 5 = everything up to layer4 (only attnpool trains).

    ``attnpool.k_proj.bias`` is always frozen: it adds the same ``q . b_k`` to every token's
    attention score, which softmax cancels, so it never gets a gradient (token-0 attention pooling
    does not even compute it), which DDP would report as an unused parameter. BN is FrozenBN in
    the whole tower already (:func:`build_clip`). Returns ``visual``.
    """
    if not 0 <= int(freeze_at) <= FREEZE_AT_MAX:
        raise InputError(f"freeze_at must be in 0..{FREEZE_AT_MAX}, got {freeze_at}")
    visual.requires_grad_(True)
    stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
    stages = [stem, [visual.layer1], [visual.layer2], [visual.layer3], [visual.layer4]]
    for group in stages[:int(freeze_at)]:
        for module in group:
            module.requires_grad_(False)
    visual.attnpool.k_proj.bias.requires_grad_(False)
    return visual


def build_clip(arch: str | Mapping[str, Any] | Architecture, with_text: bool = True) -> nn.Module:
    """Build a randomly initialised open_clip ``CLIP`` for ``arch`` with frozen BN in the visual
    tower. ``with_text=False`` drops the text transformer (detectors need no text tower)."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    arch = get_architecture(arch)
    cfg = arch.config
    model = CLIP(
        embed_dim=int(cfg["embed_dim"]),
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )
    model.visual = freeze_batch_norm(model.visual)
    if not with_text:
        for name in ("transformer", "token_embedding", "ln_final"):
            setattr(model, name, None)
        model.positional_embedding = None
        model.text_projection = None
    del open_clip
    return model
