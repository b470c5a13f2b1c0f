"""Import of official RegionCLIP / Detectron2 / OpenAI-CLIP checkpoints (the state-dict names of
RegionCLIP's ``clip_rcnn.py: CLIPFastRCNN`` / ``PretrainFastRCNN`` saved by
``detectron2/checkpoint/detection_checkpoint.py``, and OpenAI / open_clip ``CLIP``).

Everything here is key mapping on flat ``{name: tensor}`` dicts (no modules are built):

=============================================  ==============================================
official key                                   rclip (open_clip) key
=============================================  ==============================================
``backbone.<rest>`` (CLIP ModifiedResNet)      ``visual.<rest>``
``lang_encoder.<rest>``                        ``<rest>`` (text tower of open_clip ``CLIP``)
``teacher_backbone.<rest>``                    teacher ``visual.<rest>``
``offline_backbone.*`` / ``offline_proposal_generator.*``   RPN ``backbone.*`` / ``proposal_generator.*``
``roi_heads.box_predictor.<rest>``             box predictor ``<rest>``
``roi_heads.mask_head.<rest>``                 mask head ``<rest>``
``visual.*``, ``transformer.*``, ... (OpenAI)  unchanged
=============================================  ==============================================

The architecture (ResNet layers, width, embedding dim, attention-pool grid, text tower) is
inferred from tensor shapes, so a file always builds the model it was saved from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from rclip_core.errors import WeightsError

TEXT_KEYS_PREFIXES = ("transformer.", "token_embedding.", "ln_final.")
TEXT_KEYS_EXACT = ("positional_embedding", "text_projection", "logit_scale")
TEACHER_PREFIXES = ("teacher_backbone.", "teacher_visual.", "teacher.visual.", "teacher.")


@dataclass
class ConvertedCheckpoint:
    """A foreign checkpoint split into the parts rclip builds separately."""

    source_format: str  # regionclip | oai_clip | open_clip | rpn | embeddings | rclip
    clip_state: dict[str, torch.Tensor] = field(default_factory=dict)  # open_clip CLIP names
    teacher_visual_state: dict[str, torch.Tensor] = field(default_factory=dict)  # "visual." stripped
    rpn_state: dict[str, torch.Tensor] = field(default_factory=dict)  # backbone.* / proposal_generator.*
    box_predictor: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_head: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None
    ignored: list[str] = field(default_factory=list)

    @property
    def has_visual(self) -> bool:
        return any(k.startswith("visual.") for k in self.clip_state)

    @property
    def has_text(self) -> bool:
        return "token_embedding.weight" in self.clip_state


def _is_detectron_resnet(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix + "bottom_up.") or k.startswith(prefix + "res2.") or
               k.startswith(prefix + "stem.conv1") for k in keys)


def convert_checkpoint(tensors: dict[str, torch.Tensor]) -> ConvertedCheckpoint:
    """Sort a flat official/OpenAI/open_clip state dict into rclip's parts."""
    keys = list(tensors)
    if keys == ["__tensor__"]:
        emb = tensors["__tensor__"]
        if emb.ndim == 1:  # the official tool squeezes single-concept files to [D]
            emb = emb.unsqueeze(0)
        if emb.ndim != 2 or not emb.is_floating_point():
            raise WeightsError(f"embedding tensor has shape {list(emb.shape)}, expected [N, D] floats")
        return ConvertedCheckpoint("embeddings", embeddings=emb.float())

    # A standalone Detectron2 RPN file: backbone.* is a Detectron2 ResNet, plus proposal_generator.*
    if _is_detectron_resnet(keys, "backbone.") and any(k.startswith("proposal_generator.") for k in keys):
        out = ConvertedCheckpoint("rpn")
        for k, v in tensors.items():
            if k.startswith("backbone.") or k.startswith("proposal_generator."):
                out.rpn_state[k] = v
            else:
                out.ignored.append(k)  # e.g. roi_heads of a full Mask R-CNN file
        return out

    if any(k.startswith("backbone.") for k in keys):
        out = ConvertedCheckpoint("regionclip")
        for k, v in tensors.items():
            if k.startswith("backbone."):
                out.clip_state["visual." + k[len("backbone."):]] = v
            elif k.startswith("lang_encoder."):
                out.clip_state[k[len("lang_encoder."):]] = v
            elif k.startswith("teacher_backbone."):
                out.teacher_visual_state[k[len("teacher_backbone."):]] = v
            elif k.startswith("offline_backbone."):
                out.rpn_state["backbone." + k[len("offline_backbone."):]] = v
            elif k.startswith("offline_proposal_generator."):
                out.rpn_state["proposal_generator." + k[len("offline_proposal_generator."):]] = v
            elif k.startswith("roi_heads.box_predictor."):
                out.box_predictor[k[len("roi_heads.box_predictor."):]] = v
            elif k.startswith("roi_heads.mask_head."):
                out.mask_head[k[len("roi_heads.mask_head."):]] = v
            else:
                out.ignored.append(k)
        return out

    if any(k.startswith("visual.") for k in keys):
        # OpenAI / open_clip names; the teacher/student OAI_CLIP file carries a second copy.
        fmt = "oai_clip" if any(k.startswith(TEACHER_PREFIXES) for k in keys) else "open_clip"
        out = ConvertedCheckpoint(fmt)
        for k, v in tensors.items():
            tp = next((p for p in TEACHER_PREFIXES if k.startswith(p)), None)
            if tp is not None:
                rest = k[len(tp):]
                if rest.startswith("visual."):
                    rest = rest[len("visual."):]
                if rest.startswith(("conv", "bn", "layer", "attnpool")):
                    out.teacher_visual_state[rest] = v
                else:
                    out.ignored.append(k)  # the duplicated teacher text tower is never used
            elif k.startswith("visual.") or k.startswith(TEXT_KEYS_PREFIXES) or k in TEXT_KEYS_EXACT:
                out.clip_state[k] = v
            elif k in ("input_resolution", "context_length", "vocab_size"):
                continue  # OpenAI JIT constants
            else:
                out.ignored.append(k)
        return out

    sample = ", ".join(keys[:4])
    raise WeightsError(f"unrecognised checkpoint layout (first keys: {sample})",
                       "expected a RegionCLIP/Detectron2 .pth, an OpenAI/open_clip CLIP, or an rclip .safetensors")


# ------------------------------------------------------------------------------------------
# Architecture inference
# ------------------------------------------------------------------------------------------

def infer_visual_config(state: dict[str, torch.Tensor], prefix: str = "visual.") -> dict[str, Any]:
    """ModifiedResNet config from shapes: layers, width, image_size (attnpool grid x 32), embed dim."""
    try:
        width = int(state[prefix + "conv3.weight"].shape[0])
        pos = state[prefix + "attnpool.positional_embedding"]
        embed_dim = int(state[prefix + "attnpool.c_proj.weight"].shape[0])
    except KeyError as e:
        raise WeightsError(f"checkpoint has no CLIP ResNet visual tower (missing {e.args[0]})",
                           "pass a RegionCLIP / CLIP ResNet checkpoint") from None
    layers = []
    for L in range(1, 5):
        idx = {int(m.group(1)) for k in state
               if (m := re.match(re.escape(prefix) + rf"layer{L}\.(\d+)\.", k))}
        if not idx:
            raise WeightsError(f"checkpoint visual tower has no layer{L} blocks")
        layers.append(max(idx) + 1)
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid + 1 != pos.shape[0]:
        raise WeightsError(f"attnpool.positional_embedding has {pos.shape[0]} rows, not a square grid + 1")
    return {"embed_dim": embed_dim, "vision_cfg": {"image_size": grid * 32, "layers": layers, "width": width,
                                                   "patch_size": None}}


def infer_text_config(state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    if "token_embedding.weight" not in state:
        return None
    vocab, width = state["token_embedding.weight"].shape
    ctx = state["positional_embedding"].shape[0]
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    return {"context_length": int(ctx), "vocab_size": int(vocab), "width": int(width),
            "heads": max(1, int(width) // 64), "layers": n_layers}


def known_architecture_name(config: dict[str, Any]) -> str | None:
    """Name of the open_clip / rclip config with the same visual tower, if any."""
    from rclip_core.models.clip import CUSTOM_CONFIGS

    candidates = {"RN50-quickgelu", "RN50x4-quickgelu", "RN101-quickgelu", "RN50x16-quickgelu", "RN50x64-quickgelu"}
    try:
        import open_clip

        pool = {n: open_clip.get_model_config(n) for n in candidates}
    except Exception:  # noqa: BLE001
        pool = {}
    pool.update(CUSTOM_CONFIGS)
    v = config["vision_cfg"]
    for name, cfg in pool.items():
        if not cfg:
            continue
        cv = cfg["vision_cfg"]
        if (list(cv["layers"]) == list(v["layers"]) and int(cv["width"]) == int(v["width"]) and
                int(cv["image_size"]) == int(v["image_size"]) and int(cfg["embed_dim"]) == int(config["embed_dim"])):
            return name
    return None
