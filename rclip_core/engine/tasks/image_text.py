"""CLIP image-text training from scratch (how ShapesWorld gets its teacher) as a task of the
one training loop.

A CLIP (``model.architecture``) is trained from scratch, both towers, on whole images resized to
its native square resolution, with the standard symmetric CLIP loss over the gathered batch and
CLIP's learned logit scale (init 1/0.07, clamped at 100): it trains CLIP itself, so it uses
CLIP's temperature, not RegionCLIP's fixed 0.01. The visual tower has ordinary, trainable
BatchNorm layers (a tower built from scratch cannot learn with frozen statistics); the saved
file converts them to FrozenBN (running statistics become the frozen buffers), the form every
rclip model has, so ``load_model(weights=final.safetensors)`` loads it as a teacher.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rclip_core.config.pretrain import PretrainRecipe
from rclip_core.engine.data import SquareResize, TrainSample
from rclip_core.engine.tasks.pretraining import PretrainTask, ddp_buffer_sync

__all__ = ["ImageTextTask"]


class ImageTextTask(PretrainTask):
    """A CLIP trained from scratch with the CLIP loss (see the module docstring)."""

    def __init__(self, recipe: PretrainRecipe, device: torch.device, rank: int = 0):
        super().__init__(recipe, device, rank)
        # BN statistics (trainable BatchNorm here) follow rank 0
        self.ddp_kwargs = ddp_buffer_sync(True)
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        from rclip_core.models.clip import get_architecture
        from rclip_core.models.region_encoder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
        from rclip_core.models.text import get_tokenizer

        self.arch = get_architecture(recipe.model.architecture or "")
        cfg = self.arch.config
        torch.manual_seed(recipe.seed)  # the same initial weights on every process
        self.clip = CLIP(embed_dim=int(cfg["embed_dim"]), vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                         text_cfg=CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=bool(cfg.get("quick_gelu", False)),
                         init_logit_scale=math.log(recipe.model.init_logit_scale)).to(device)
        self.clip.train()
        self.max_log_scale = math.log(recipe.model.max_logit_scale)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_PIXEL_MEAN, device=device).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_PIXEL_STD, device=device).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.tokenizer = get_tokenizer(self.arch.context_length)
        d = recipe.data
        self.transform = SquareResize(d.image_size or self.arch.image_size, d.interpolation, d.flip)

    def trainable_state(self) -> dict[str, Tensor]:
        return self.clip.state_dict()

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        self.clip.load_state_dict(state, strict=True)

    def trainable_module(self) -> nn.Module:
        return self.clip

    def after_step(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, self.max_log_scale)

    def forward(self, batch: list[TrainSample]) -> dict[str, Tensor]:
        from rclip_core.losses import image_text_contrastive

        dev = self.device_
        x = torch.stack([s.image for s in batch]).to(dev, non_blocking=True).float()
        x = (x - self.pixel_mean) / self.pixel_std
        tokens = self.tokenizer([s.caption for s in batch]).to(dev)
        img = self.clip.encode_image(x).float()
        txt = self.clip.encode_text(tokens).float()
        with torch.autocast(dev.type, enabled=False):  # the loss in fp32, also under AMP
            scale = self.clip.logit_scale.float().exp()
            loss = image_text_contrastive(img, txt, temperature=1.0 / scale, gather=True)
        return {"image_text_contrastive": loss, "total": loss, "logit_scale": scale.detach()}

    def to_regionclip(self):
        """The trained CLIP as a :class:`RegionCLIP` with frozen BN (running stats frozen)."""
        from rclip_core.models.regionclip import ModelInfo, RegionCLIP
        from rclip_core.weights.loaders import load_clip_state

        model = RegionCLIP(self.arch, with_text=True)
        state = {k: v.detach().cpu() for k, v in self.clip.state_dict().items()}
        load_clip_state(model, state, require_text=True)
        model.info = ModelInfo(source="rclip-pretrain:image_text", source_format="rclip", text_loaded=True)
        return model.eval()

    def save_final(self, path: Path, meta: dict[str, Any]) -> Path:
        from rclip_core.weights.native import save_model

        return save_model(self.to_regionclip(), path, kind="clip", extra={"pretrain": meta})
