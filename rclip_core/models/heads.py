"""The heads on region features: the text-embedding box predictor and the mask head.

* :class:`BoxPredictor`: RegionCLIP's ``detectron2/modeling/roi_heads/fast_rcnn.py:
  FastRCNNOutputLayers`` with ``USE_CLIP_CLS_EMB``: frozen class text embeddings ``cls_score``
  (the base classes while training) and optional ``test_cls_score`` (all classes, used in eval
  mode), a frozen all-zero background embedding ``cls_bg_score``, fixed temperature 0.01
  (``CLSS_TEMP``); the region embedding and the class embeddings are L2-normalised at use time,
  so the stored embeddings may be unnormalised. One class-agnostic ``bbox_pred = Linear(D, 4)``
  on the *unnormalised* embedding (``CLS_AGNOSTIC_BBOX_REG``). Submodule names equal the
  official ones, so ``roi_heads.box_predictor.*`` of a released detector loads by name.
* :class:`MaskHead`: ``detectron2/modeling/roi_heads/mask_head.py: MaskRCNNConvUpsampleHead``
  with ``NUM_CONV 0`` and ``CLS_AGNOSTIC_MASK`` (the LVIS transfer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rclip_core.errors import InputError
from rclip_core.models.classifier import CLASSIFIER_TEMPERATURE

__all__ = ["BoxPredictor", "MaskHead"]


def _frozen_linear(weight: Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
    layer.weight.requires_grad_(False)
    return layer


class BoxPredictor(nn.Module):
    """Text-embedding classifier, zero background and class-agnostic box regressor
    (RegionCLIP's ``fast_rcnn.py: FastRCNNOutputLayers`` with ``USE_CLIP_CLS_EMB``).

    State-dict keys: ``cls_score.weight`` [K, D], ``cls_bg_score.weight`` [1, D] (zeros),
    ``test_cls_score.weight`` [K_test, D] (optional), ``bbox_pred.weight`` [4, D],
    ``bbox_pred.bias`` [4]: the official names. Only ``bbox_pred`` is trainable.

    forward: region embeddings [R, D] -> (logits [R, K+1] with the background last, box deltas
    [R, 4]). In eval mode the test classifier is used when there is one.
    """

    def __init__(self, train_embeddings: Tensor, test_embeddings: Tensor | None = None,
                 temperature: float = CLASSIFIER_TEMPERATURE):
        super().__init__()
        if train_embeddings.ndim != 2:
            raise InputError(f"class embeddings must be [K, D], got shape {list(train_embeddings.shape)}")
        dim = int(train_embeddings.shape[1])
        self.temperature = float(temperature)
        self.cls_score = _frozen_linear(train_embeddings)
        self.cls_bg_score = _frozen_linear(torch.zeros(1, dim))
        self.test_cls_score: nn.Linear | None = None
        if test_embeddings is not None:
            self.set_test_embeddings(test_embeddings)
        self.bbox_pred = nn.Linear(dim, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    @property
    def embed_dim(self) -> int:
        return int(self.cls_score.weight.shape[1])

    def set_test_embeddings(self, embeddings: Tensor | None) -> None:
        """Replace the eval-time classifier (None: use the training classes at test too)."""
        if embeddings is None:
            self.test_cls_score = None
            return
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise InputError(f"class embeddings have shape {list(embeddings.shape)}, expected [K, {self.embed_dim}]",
                             "use embeddings made with the detector's own architecture")
        layer = _frozen_linear(embeddings.detach().to("cpu"))
        self.test_cls_score = layer.to(self.cls_score.weight.device)

    def classifier_weight(self) -> Tensor:
        if not self.training and self.test_cls_score is not None:
            return self.test_cls_score.weight
        return self.cls_score.weight

    @property
    def num_classes(self) -> int:
        """K of the classifier the current mode uses."""
        return int(self.classifier_weight().shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # fp32 for the cosine classifier: a 0.01 temperature magnifies half-precision rounding 100x
        x32 = x.float()
        x_hat = F.normalize(x32, p=2.0, dim=1)
        w_hat = F.normalize(self.classifier_weight().float(), p=2.0, dim=1)
        cls = x_hat @ w_hat.t()
        bg = x_hat @ self.cls_bg_score.weight.float().t()  # zero embedding: always 0
        logits = torch.cat([cls, bg], dim=1) / self.temperature
        deltas = self.bbox_pred(x)
        return logits, deltas.float()


class MaskHead(nn.Module):
    """Class-agnostic ``MaskRCNNConvUpsampleHead`` with no convs (``mask_head.py``): res5 RoI features
    [R, C, h, w] -> ConvTranspose2d(C, 256, 2, 2) + ReLU -> 1x1 conv -> mask logits [R, 1, 2h, 2w]
    (14 x 14 for RN50). Keys ``deconv.*`` and ``predictor.*`` as the official files."""

    def __init__(self, in_channels: int, conv_dim: int = 256):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1, kernel_size=1)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(F.relu(self.deconv(x)))
