"""What the two pretraining tasks (RegionCLIP region-text, CLIP image-text) share: the caption
data stream, the region sampler's generator, and the final outputs (``final.safetensors`` and
the quick zero-shot check ``eval.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from rclip_core.config.pretrain import PretrainRecipe, resolve_data_path
from rclip_core.engine.data import PretrainData
from rclip_core.engine.trainer import Task

__all__ = ["FINAL_WEIGHTS", "EVAL_FILE", "PretrainStream", "PretrainTask", "ddp_buffer_sync"]

FINAL_WEIGHTS = "final.safetensors"
EVAL_FILE = "eval.json"


def ddp_buffer_sync(sync: bool) -> dict[str, bool]:
    """DDP's buffer-sync option under its name in this torch version."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return {"find_unused_parameters": False, key: sync}


def merge_data_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The data reports of every process as one: counts summed, the first examples kept."""
    out: dict[str, Any] = {"bad_items": 0, "bad_examples": []}
    for r in reports:
        bad = r.get("bad_items", {})
        out["bad_items"] += int(bad.get("count", 0))
        out["bad_examples"] = (out["bad_examples"] + list(bad.get("examples", [])))[:5]
        if "gt_box_misses" in r:
            out["gt_box_misses"] = out.get("gt_box_misses", 0) + int(r["gt_box_misses"])
    return out


class PretrainStream:
    """:class:`rclip_core.engine.data.PretrainData` as the trainer's stream: one forward pass of
    ``per_pass`` samples per ``next_batch()``."""

    def __init__(self, data: PretrainData, per_pass: int):
        self.data = data
        self.per_pass = int(per_pass)

    @property
    def epoch(self) -> int:
        return self.data.epoch

    def next_batch(self):
        return self.data.next_batch(self.per_pass)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], exact: bool) -> None:
        if exact:
            self.data.load_state_dict(dict(state))
        else:  # another number of processes: the data order restarts at the next epoch
            self.data.load_state_dict({"epoch": int(state.get("epoch", 0)), "world_size": -1})

    def close(self) -> None:
        self.data.close()


class PretrainTask(Task):
    """Base of :class:`~rclip_core.engine.tasks.regionclip.RegionCLIPTask` and
    :class:`~rclip_core.engine.tasks.image_text.ImageTextTask`. Subclasses set ``self.transform``
    (how a caption file's image becomes a training tensor) and ``self.generator`` (their own
    random draws, saved in every checkpoint)."""

    objective = "total"

    def __init__(self, recipe: PretrainRecipe, device: torch.device, rank: int = 0):
        super().__init__()
        self.recipe = recipe
        self.device_ = device
        self.generator = torch.Generator().manual_seed(recipe.seed * 1000 + rank + 1)
        self.transform: Any = None

    def stream(self, *, per_pass: int, accumulation: int, rank: int, world: int, start_step: int) -> PretrainStream:
        r, d = self.recipe, self.recipe.data
        data = PretrainData([resolve_data_path(r, c) for c in d.captions], self.transform, fmt=d.format,
                            images_root=resolve_data_path(r, d.images_root) if d.images_root else None,
                            seed=r.seed, rank=rank, world_size=world, num_workers=d.num_workers,
                            caption_choice=d.caption_choice, max_images=d.max_images,
                            max_bad_items=d.max_bad_items)
        self._data = data
        return PretrainStream(data, per_pass)

    def data_report(self) -> dict[str, Any]:
        """This process's skipped training items (see :meth:`PretrainData.bad_items`)."""
        data = getattr(self, "_data", None)
        return {"bad_items": data.bad_items() if data is not None else {"count": 0, "examples": []}}

    def rng_state(self) -> dict[str, Any]:
        return {"regions": self.generator.get_state()}

    def load_rng_state(self, state: Mapping[str, Any]) -> None:
        if "regions" in state:
            self.generator.set_state(state["regions"])

    def save_final(self, path: Path, meta: dict[str, Any]) -> Path:
        raise NotImplementedError

    def finish(self, step: int, world: int, steps_per_second: float | None = None
               ) -> tuple[Path | None, dict[str, Any] | None]:
        """``final.safetensors`` and, with ``eval.instances``, ``eval.json`` (rank 0)."""
        from rclip_core.dist import barrier, get_rank
        from rclip_core.fileio import atomic_write_json

        from rclip_core.engine.trainer import _gather_objects

        out = Path(self.recipe.output_dir).expanduser()
        final, evaluation = None, None
        self.report = merge_data_reports(_gather_objects(self.data_report()))
        if get_rank() == 0:
            meta = {"mode": self.recipe.mode, "steps": step, "seed": self.recipe.seed, "world_size": world}
            final = self.save_final(out / FINAL_WEIGHTS, meta)
            if self.recipe.eval.instances:
                from rclip_core.engine.quick_eval import evaluate_run

                evaluation = evaluate_run(self.recipe, self, final, self.device_)
                atomic_write_json(out / EVAL_FILE, evaluation, indent=1)
        barrier()
        return final, evaluation
