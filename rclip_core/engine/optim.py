"""SGD, the warm-up multi-step learning-rate schedule and per-parameter gradient clipping,
with Detectron2's semantics (``detectron2/solver/build.py``: ``build_optimizer``,
``get_default_optimizer_params``, ``_create_gradient_clipper``; ``lr_scheduler.py``:
``WarmupMultiStepLR``), on plain ``torch.optim``, and the cosine schedule for CLIP training."""

from __future__ import annotations

import bisect
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["NORM_TYPES", "build_sgd", "warmup_multistep_factor", "WarmupMultiStepLR",
           "clip_grad_per_parameter", "WarmupCosineLR", "build_optimizer", "build_scheduler"]


def _norm_types() -> tuple[type, ...]:
    types: list[type] = [
        nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm
        nn.GroupNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
    ]
    from torchvision.ops.misc import FrozenBatchNorm2d  # torchvision is a dependency

    types.append(FrozenBatchNorm2d)
    return tuple(types)


#: Module types whose parameters get no weight decay (Detectron2 ``WEIGHT_DECAY_NORM`` = 0).
NORM_TYPES: tuple[type, ...] = _norm_types()


def build_sgd(
    params: nn.Module | Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    no_decay_norms: bool = True,
) -> torch.optim.SGD:
    """SGD as Detectron2's ``build_optimizer`` makes it (``detectron2/solver/build.py``).

    Only parameters with ``requires_grad`` are optimised; shared parameters appear once.
    With a module and ``no_decay_norms``, parameters of normalisation layers (BatchNorm,
    GroupNorm, LayerNorm, ...; Detectron2's ``WEIGHT_DECAY_NORM = 0``) go to a second group
    with ``weight_decay = 0``; biases keep the normal decay (Detectron2's
    ``WEIGHT_DECAY_BIAS`` defaults to ``WEIGHT_DECAY``). No Nesterov.

    Args:
        params: a module, or an iterable of parameters (no norm detection possible then).
        lr: base learning rate (the paper: 0.002).
        momentum, weight_decay: the paper's 0.9 and 1e-4.
        no_decay_norms: exempt normalisation layers from weight decay.

    Returns:
        ``torch.optim.SGD`` with one or two parameter groups (empty groups are left out).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()

    def add(p: nn.Parameter, in_norm: bool) -> None:
        if not p.requires_grad or id(p) in seen:
            return
        seen.add(id(p))
        (no_decay if in_norm and no_decay_norms else decay).append(p)

    if isinstance(params, nn.Module):
        for module in params.modules():
            is_norm = isinstance(module, NORM_TYPES)
            for p in module.parameters(recurse=False):
                add(p, is_norm)
    else:
        for item in params:
            add(item[1] if isinstance(item, tuple) else item, False)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters to optimise")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)


def warmup_multistep_factor(
    it: int,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.001,
) -> float:
    """The learning-rate multiplier at iteration ``it`` (0-based), Detectron2 ``WarmupMultiStepLR``.

        factor(it) = w(it) * gamma ** (number of milestones <= it)
        w(it) = warmup_factor * (1 - it / W) + it / W   for it < W (linear), else 1

    so ``factor(0) = 0.001`` and the learning rate reaches its base value at ``it = W``; at a
    milestone m the rate drops on iteration m itself (``bisect_right``).
    """
    if it < warmup_iters:
        alpha = it / warmup_iters
        warm = warmup_factor * (1.0 - alpha) + alpha
    else:
        warm = 1.0
    return warm * gamma ** bisect.bisect_right(list(milestones), it)


class WarmupMultiStepLR(LRScheduler):
    """Linear warm-up then x``gamma`` at each milestone (Detectron2 ``WarmupMultiStepLR``).

    Call ``step()`` once after every optimizer step, as in Detectron2's trainer; the rate used
    by iteration ``it`` (0-based) is ``base_lr * warmup_multistep_factor(it, ...)``. Paper values:
    pretraining milestones (300k, 525k), W = 1000; COCO transfer (60k, 80k), W = 5000; LVIS
    (120k, 160k), W = 5000; factor 0.001 and gamma 0.1 everywhere. ``state_dict()`` holds only
    plain Python values (loads with ``torch.load(weights_only=True)``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_iters: int = 1000,
        warmup_factor: float = 0.001,
        last_epoch: int = -1,
    ):
        ms = [int(m) for m in milestones]
        if ms != sorted(ms):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        if warmup_iters < 0:
            raise ValueError("warmup_iters must be >= 0")
        self.milestones = ms
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        return warmup_multistep_factor(it, self.milestones, self.gamma, self.warmup_iters, self.warmup_factor)

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


@torch.no_grad()
def clip_grad_per_parameter(
    params: Iterable[torch.Tensor], max_norm: float = 5.0, norm_type: float = 2.0
) -> torch.Tensor:
    """Detectron2's ``CLIP_TYPE: "norm"`` clipper: each parameter's gradient separately
    (``_create_gradient_clipper``).

    Equivalent to ``torch.nn.utils.clip_grad_norm_(p, max_norm, norm_type)`` for every
    parameter ``p`` on its own (scale g by ``min(1, max_norm / (||g|| + 1e-6))``), NOT one
    global norm over all gradients. Done with ``torch._foreach`` kernels per device and dtype,
    which gives the same numbers with far fewer kernel launches.

    Args:
        params: parameters (those without ``.grad`` are skipped).
        max_norm: per-tensor norm limit (the paper: 5.0).
        norm_type: p of the norm (2.0 = L2).

    Returns:
        [P] the gradient norms before clipping, one per parameter with a gradient (float32, on
        the first gradient's device); empty when there is none.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms_out: list[torch.Tensor] = []
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype), []).append(i)
    per_index: dict[int, torch.Tensor] = {}
    for idx in groups.values():
        gs = [grads[i] for i in idx]
        norms = torch._foreach_norm(gs, norm_type)
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(gs, coefs)
        for i, n in zip(idx, norms):
            per_index[i] = n
    device = grads[0].device
    norms_out = [per_index[i].to(device=device, dtype=torch.float32) for i in range(len(grads))]
    return torch.stack(norms_out)


class WarmupCosineLR(LRScheduler):
    """Linear warm-up (from ``warmup_factor``) over ``warmup_iters``, then cosine decay from the
    base rate to ``base * min_factor`` at ``max_iters``. ``step()`` once per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, warmup_iters: int = 0,
                 warmup_factor: float = 0.001, min_factor: float = 0.0, last_epoch: int = -1):
        self.max_iters = int(max_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.min_factor = float(min_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        import math

        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            return self.warmup_factor * (1 - alpha) + alpha
        span = max(1, self.max_iters - self.warmup_iters)
        progress = min(1.0, (it - self.warmup_iters) / span)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


def build_optimizer(optim, module: nn.Module) -> torch.optim.Optimizer:
    """The optimizer an ``optim`` recipe section names, over ``module``'s trainable parameters:
    SGD with Detectron2's parameter groups (:func:`build_sgd`), or AdamW with CLIP's rule (no
    weight decay on gains, biases and the logit scale: the 1-D / 0-D tensors)."""
    if optim.name == "sgd":
        return build_sgd(module, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def build_scheduler(optim, optimizer: torch.optim.Optimizer, max_steps: int) -> LRScheduler:
    """``schedule: step`` (:class:`WarmupMultiStepLR`) or ``cosine`` (:class:`WarmupCosineLR`)."""
    if optim.schedule == "cosine":
        return WarmupCosineLR(optimizer, max_steps, optim.warmup_iters, optim.warmup_factor, optim.min_lr_factor)
    return WarmupMultiStepLR(optimizer, optim.steps, optim.gamma, optim.warmup_iters, optim.warmup_factor)
