"""The commands the README shows, run as written.

No COCO / LVIS images and no official checkpoints exist here, so the files the README names are
made by :func:`_standins` under the same names, in the same formats and layouts, at a tiny size:
official-layout RegionCLIP checkpoints of the ``test-micro`` architecture (student, teacher,
text encoder and the LVIS-866 FPN RPN, as in ``regionclip_pretrained-cc_rn50.pth``; the
fine-tuned COCO layout with its C4 RPN and box predictor), stand-alone RPN files in the
Detectron2 layout, an official ``[65, D]`` class-embedding file, COCO 2017 and LVIS v1 instance
files (every category, the real ids and names) over the shipped sample photos, a COCO captions
file, caption JSONL, and ShapesWorlds made by the README's own ``rclip data shapes`` lines.

Then every ``bash`` command of the README runs in that folder, in an order where each finds what
an earlier one wrote (``runs/mine/detector.safetensors``, ``coco_nouns.txt``, ``labels/``):

- :data:`AS_WRITTEN`: exactly as the README writes them;
- :data:`SHORTENED`: training and labelling lines that take hours as written run with the README's
  arguments unchanged plus a step or image budget appended (``key=value`` overrides are applied
  in order, so ``max_steps=2`` after the README's ``max_steps=20000`` wins);
- :data:`NOT_RUN`: the full quickstart (its whole pipeline runs at a small size in
  ``test_quickstart.py``), CC3M pretraining (needs CC3M and the RN50 weights) and the multi-node
  line; these still run to the end of their option parsing.

A command added to the README without a decision here fails :func:`test_every_readme_command_is_covered`.
The two set-up commands are what ``.ci/run`` runs. The README's Python block runs too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

#: the exemplar and video lines use the teacher of the pretraining lines (run before them)
EXEMPLARS_AND_VIDEO = [
    "rclip detect shapes/val/000001.jpg --weights runs/shapes_teacher/final.safetensors --short-side 256 "
    '--classes "red diamond" --exemplar "shapes/train/000002.jpg:13.89,4,111,101.11=purple square" --proposals grid',
    "rclip embed --exemplars refs.csv --weights runs/shapes_teacher/final.safetensors --short-side 256 "
    "--out refs.safetensors",
    "rclip detect shapes/val/000001.jpg shapes/val/000002.jpg --weights runs/shapes_teacher/final.safetensors "
    "--class-embeddings refs.safetensors --short-side 256 --proposals grid",
    'rclip detect clip.mp4 --weights runs/shapes_teacher/final.safetensors --classes "red circle" '
    "--proposals grid --short-side 256 --every 5 --track --out vid-out",
]

#: commands run exactly as written
AS_WRITTEN = [
    "rclip quickstart --dry-run",
    "rclip data shapes world --train 2000 --val 500 --seed 0",
    "rclip data inspect world",
    "rclip data shapes shapes/ --train 2000 --val 500",
    'rclip detect photo.jpg --classes "kite,boy" --weights regionclip_pretrained-cc_rn50.pth',
    'rclip detect photo.jpg --classes "kite,boy" --weights regionclip_pretrained-cc_rn50.pth --proposals rpn '
    "--score-thresh 0.02 --nms 0.5 --max-dets 300 --fusion official --topk-labels 0",
    'rclip detect photo.jpg --classes "kite,boy" --weights regionclip_pretrained-cc_rn50.pth '
    "--rpn-weights rpn_lvis_866.pth",
    "rclip detect imgs/ --boxes boxes.json --class-embeddings coco_65_cls_emb.pth --vocabulary coco-ovd "
    "--weights regionclip_pretrained-cc_rn50.pth --save-embeddings",
    'rclip detect "photos/*.jpg" --vocabulary lvis --weights regionclip_pretrained-cc_rn50x4.pth '
    "--rpn-weights rpn_lvis_866.pth --nms 0.3 --score-thresh 0.02",
    "rclip eval --zero-shot --boxes gt --dataset coco-ovd --images coco/val2017 "
    "--weights regionclip_pretrained-cc_rn50.pth --class-embeddings coco_65_cls_emb.pth --json coco_gt.json",
    "rclip eval --zero-shot --boxes rpn --dataset lvis --images coco/ --weights regionclip_pretrained-cc_rn50x4.pth",
    "rclip eval --detector --dataset coco-ovd --images coco/val2017 --weights regionclip_finetuned-coco_rn50.pth",
    "rclip eval --detector --dataset lvis-minival --images coco/ --annotations lvis_v1_minival.json "
    "--protocol fixed-ap --weights regionclip_finetuned-lvis_rn50.pth --rpn-weights rpn_lvis_866_lsj.pth "
    "--json minival_fixed_ap.json",
    'rclip eval --zero-shot --dataset mydata/val.json --images mydata/images --novel-classes "zebra,kite" '
    "--weights W.pth",
    "rclip eval --zero-shot --dataset shapes:world --weights student.safetensors --json report.json",
    "rclip concepts captions_train2017.json --min-freq 100 --out coco_nouns.txt",
    "rclip embed coco_nouns.txt --weights regionclip_pretrained-cc_rn50.pth --out nouns.safetensors",
    "rclip embed coco_nouns.txt --weights W.pth --format official --out coco_nouns_emb.pth",
    'rclip embed "kite,boy,dog" --weights regionclip_pretrained-cc_rn50.pth --out kite_boy_dog.safetensors',
    "rclip pseudo-label captions.jsonl --teacher W.pth --concepts coco_nouns.txt --proposals rpn --out labels/",
    "rclip pseudo-label --inspect labels/",
    *EXEMPLARS_AND_VIDEO,
    "rclip detect --weights runs/mine/detector.safetensors photo.jpg",
    'rclip detect --weights runs/mine/detector.safetensors photo.jpg --classes "zebra,okapi"',
    "rclip eval --detector --weights runs/mine/detector.safetensors --dataset val.json --images val_imgs/",
]

_OWN_DATA = ('rclip finetune recipes/shapes_finetune.yaml --dataset train.json --images imgs/ '
             '--val-dataset val.json --val-images val_imgs/ --novel-classes "zebra,giraffe" '
             "--init regionclip_pretrained-cc_rn50.pth --out runs/mine "
             "data.train_short_sides=[640,672,704,736,768,800] data.max_size=1333 "
             "data.test_short_side=800 data.test_max_size=1333 max_steps=20000 optim.steps=[15000,18000]")

#: command -> what is appended (the README's arguments are kept as they are)
SHORTENED = {
    "rclip finetune recipes/finetune_coco_ovd_rn50.yaml --dataset coco-ovd --images coco "
    "--init regionclip_pretrained-cc_rn50.pth --rpn-weights rpn_coco_48.pth --nproc 8":
        "max_steps=2 optim.steps=[1] optim.warmup_iters=1 --out runs/coco_ovd",
    "rclip finetune recipes/shapes_finetune.yaml --dataset shapes:world --init student.safetensors":
        "max_steps=2 optim.steps=[1] optim.warmup_iters=1 test.final_eval=false --out runs/shapes_ft",
    _OWN_DATA: "max_steps=2 optim.steps=[1] optim.warmup_iters=1",
    "rclip pretrain recipes/shapes_teacher.yaml data.root=shapes": "max_steps=2 eval.max_images=20",
    "rclip pretrain recipes/shapes_regionclip.yaml data.root=shapes --nproc 2": "max_steps=2 eval.max_images=20",
    "rclip pseudo-label --dataset shapes:world --teacher W.pth --concepts world/instances_train.json --out labels/":
        "--max-images 3",
}

#: command -> why it is only parsed
NOT_RUN = {
    "rclip quickstart": "about 45 min here; test_quickstart.py runs the same plan on a small world",
    "rclip quickstart --seeds 3": "three quickstarts",
    "rclip quickstart --ablation image-text --ablation regions --ablation losses": "three more pretrainings",
    "rclip pretrain recipes/regionclip_rn50_cc3m.yaml data.root=/data/cc3m --nproc 8": "needs CC3M and RN50 weights",
    "rclip weights push runs/shapes_teacher hf://me/rclip-shapes-teacher":
        "needs the Hub (tests/test_hub.py pushes to stand-ins of huggingface_hub's API)",
    'HF_HUB_OFFLINE=1 rclip detect photo.jpg --weights hf://me/rclip-shapes-teacher@main --classes "red circle"':
        "needs that repository in the Hub cache (tests/test_hub.py fills a cache from a 127.0.0.1 server)",
}

_EXPORT_WHY = "an export takes minutes on 2 cores; tests/test_export.py runs these commands on stand-ins"
NOT_RUN.update({
    "rclip export --weights regionclip_pretrained-cc_rn50.pth --out rn50-onnx": _EXPORT_WHY,
    "rclip detect photo.jpg --engine onnx --weights rn50-onnx/export.json --class-embeddings kite_boy_dog.safetensors":
        _EXPORT_WHY,
    "rclip export --weights runs/mine/detector.safetensors --out det-onnx": _EXPORT_WHY,
})

#: Python blocks that are not run (a name they import -> why)
PYTHON_NOT_RUN = {"fiftyone": "FiftyOne is not a dependency of rclip",
                  "OnnxDetector": "it reads the export above (tests/test_export.py runs OnnxDetector)"}

#: "rclip finetune ... --fully-supervised" is the line above it, without --novel-classes, plus the flag
FULLY = "rclip finetune ... --fully-supervised"

#: the order they run in (each finds what an earlier one wrote)
ORDER = [
    "rclip quickstart --dry-run",
    "rclip data shapes world --train 2000 --val 500 --seed 0",
    "rclip data inspect world",
    "rclip data shapes shapes/ --train 2000 --val 500",
    *[c for c in AS_WRITTEN if c.startswith("rclip detect") and "runs/" not in c],
    *[c for c in AS_WRITTEN if c.startswith("rclip eval") and "runs/mine" not in c],
    *[c for c in SHORTENED if c.startswith("rclip finetune")],
    FULLY,
    *AS_WRITTEN[-3:],
    *[c for c in SHORTENED if c.startswith("rclip pretrain")],
    *EXEMPLARS_AND_VIDEO,
    *[c for c in AS_WRITTEN if c.startswith(("rclip concepts", "rclip embed")) and c not in EXEMPLARS_AND_VIDEO],
    "rclip pseudo-label captions.jsonl --teacher W.pth --concepts coco_nouns.txt --proposals rpn --out labels/",
    *[c for c in SHORTENED if c.startswith("rclip pseudo-label")],
    "rclip pseudo-label --inspect labels/",
]


def readme_commands() -> list[str]:
    """Every command line of the README's ``bash`` blocks (continuations joined, comments dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.strip())
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def _without_env(command: str) -> str:
    """``VAR=value rclip ...`` -> ``rclip ...``"""
    return re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", command)


def _kind(command: str) -> str:
    if command.startswith("python3 -m venv"):
        return "setup"
    if command.startswith("torchrun "):
        return "multi-node"
    if command in AS_WRITTEN or command == FULLY:
        return "run"
    if command in SHORTENED:
        return "shortened"
    if command in NOT_RUN:
        return "parse"
    return "unknown"


def _rclip(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", RCLIP_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rclip_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 30
    kinds = {c: _kind(c) for c in commands}
    assert [c for c, k in kinds.items() if k == "unknown"] == []
    # every decision names a README command, and the run order holds each runnable one once
    assert sorted(set(AS_WRITTEN) | set(SHORTENED) | set(NOT_RUN) | {FULLY}) == \
        sorted(c for c, k in kinds.items() if k in ("run", "shortened", "parse"))
    assert sorted(ORDER) == sorted(set(AS_WRITTEN) | set(SHORTENED) | {FULLY})
    assert sum(k == "setup" for k in kinds.values()) == 2


# ------------------------------------------------------------------------------------------
# Stand-ins for the files the README names
# ------------------------------------------------------------------------------------------

def _micro_clip(seed: int) -> dict:
    """A test-micro open_clip state dict, perturbed away from open_clip's init (which zeroes every
    bn3 scale, so that all regions would look alike)."""
    import torch

    from rclip_core.models.clip import build_clip

    torch.manual_seed(seed)
    out = {}
    for k, v in build_clip("test-micro").state_dict().items():
        v = v.clone()
        if v.is_floating_point() and not k.endswith("running_var"):
            v += 0.3 * torch.randn_like(v)
        out[k] = v
    return out


def _backbone(clip: dict, prefix: str = "backbone.") -> dict:
    return {prefix + k[len("visual."):]: v for k, v in clip.items() if k.startswith("visual.")}


def _rpn(kind: str, seed: int) -> dict:
    import torch

    from rclip_core.models.proposals.offline import build_offline_rpn

    torch.manual_seed(seed)
    state = build_offline_rpn(kind).state_dict()
    return {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() and "norm" not in k and "bn" not in k
            else v for k, v in state.items()}


def _pretrained_cc(path: Path, seed: int) -> None:
    """``regionclip_pretrained-cc_*.pth``: student, teacher, text encoder, LVIS-866 FPN RPN."""
    import torch

    clip = _micro_clip(seed)
    model = {**_backbone(clip), **_backbone(clip, "teacher_backbone."),
             **{"lang_encoder." + k: v for k, v in clip.items() if not k.startswith("visual.") and k != "logit_scale"},
             **{"offline_" + k: v for k, v in _rpn("lvis_866_fpn", seed).items()}}
    torch.save({"model": model, "iteration": 0, "__author__": "rclip test stand-in"}, path)


def _finetuned_coco(path: Path, seed: int) -> None:
    """``regionclip_finetuned-coco_rn50.pth``: CLIP trunk, C4 RPN, box predictor (48 train / 65 test)."""
    import torch

    clip = _micro_clip(seed)
    g = torch.Generator().manual_seed(seed)
    d = 32
    model = {**_backbone(clip), **{"offline_" + k: v for k, v in _rpn("coco_c4", seed).items()},
             "roi_heads.box_predictor.cls_score.weight": torch.randn(48, d, generator=g),
             "roi_heads.box_predictor.test_cls_score.weight": torch.randn(65, d, generator=g),
             "roi_heads.box_predictor.cls_bg_score.weight": torch.zeros(1, d),
             "roi_heads.box_predictor.bbox_pred.weight": 0.01 * torch.randn(4, d, generator=g),
             "roi_heads.box_predictor.bbox_pred.bias": torch.zeros(4)}
    torch.save({"model": model, "iteration": 0}, path)


def _finetuned_lvis(path: Path, seed: int) -> None:
    """``regionclip_finetuned-lvis_rn50.pth``: CLIP trunk, LSJ FPN RPN, box predictor (866 train /
    1203 test) and the class-agnostic mask head."""
    import torch

    from rclip_core.models.heads import MaskHead

    clip = _micro_clip(seed)
    g = torch.Generator().manual_seed(seed)
    d = 32
    mask = MaskHead(8 * d)  # res5 of test-micro has 8 x 32 channels
    model = {**_backbone(clip), **{"offline_" + k: v for k, v in _rpn("lvis_866_lsj_fpn", seed).items()},
             **{"roi_heads.mask_head." + k: v for k, v in mask.state_dict().items()},
             "roi_heads.box_predictor.cls_score.weight": torch.randn(866, d, generator=g),
             "roi_heads.box_predictor.test_cls_score.weight": torch.randn(1203, d, generator=g),
             "roi_heads.box_predictor.cls_bg_score.weight": torch.zeros(1, d),
             "roi_heads.box_predictor.bbox_pred.weight": 0.01 * torch.randn(4, d, generator=g),
             "roi_heads.box_predictor.bbox_pred.bias": torch.zeros(4)}
    torch.save({"model": model, "iteration": 0}, path)


def _photo(src: Path, dst: Path, width: int) -> tuple[int, int]:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im = im.convert("RGB")
        im = im.resize((width, round(im.height * width / im.width)), Image.BILINEAR)
        im.save(dst, quality=92)
        return im.size


def _instances(images: list[tuple[str, int, int]], categories: list[dict], labels: list[list[int]],
               lvis: bool = False, folder: str = "val2017") -> dict:
    """An instances file: image i gets one box per category id in ``labels[i]``, laid out in a row."""
    out_images, anns = [], []
    for i, ((name, w, h), cats) in enumerate(zip(images, labels), start=1):
        img = {"id": i, "width": w, "height": h}
        if lvis:
            img.update(coco_url=f"http://images.cocodataset.org/{folder}/{name}", neg_category_ids=[],
                       not_exhaustive_category_ids=[])
        else:
            img["file_name"] = name
        out_images.append(img)
        for j, cid in enumerate(cats):
            x, y, bw, bh = 10 + j * w // (len(cats) + 1), h // 4, w // (len(cats) + 2), h // 2
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cid, "bbox": [x, y, bw, bh],
                         "area": float(bw * bh), "iscrowd": 0, "segmentation": [[x, y, x + bw, y, x + bw, y + bh]]})
    return {"images": out_images, "annotations": anns, "categories": categories}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _standins(root: Path) -> None:
    import torch

    from rclip_core.data.vocab import get_vocabulary
    from rclip_core.weights.native import save_model
    from rclip_core.weights.loaders import load_model

    samples = [DATA / "sample_img1.jpg", DATA / "sample_img2.jpg"]
    # photos and image folders
    _photo(samples[0], root / "photo.jpg", 640)
    sizes = [_photo(s, root / "imgs" / s.name, 640) for s in samples]
    for s in samples:
        _photo(s, root / "photos" / s.name, 480)
    boxes = json.loads((DATA / "sample_img1_boxes.json").read_text())["sample_img1.jpg"]
    scale = 640 / 1920
    _write(root / "boxes.json", {"sample_img1.jpg": [[round(v * scale, 1) for v in b] for b in boxes],
                                 "sample_img2.jpg": [[20, 20, 300, 200], [100, 50, 600, 340]]})

    # official checkpoints, RPN files and class embeddings
    _pretrained_cc(root / "regionclip_pretrained-cc_rn50.pth", 0)
    _pretrained_cc(root / "regionclip_pretrained-cc_rn50x4.pth", 1)
    shutil.copy(root / "regionclip_pretrained-cc_rn50.pth", root / "W.pth")
    _finetuned_coco(root / "regionclip_finetuned-coco_rn50.pth", 2)
    _finetuned_lvis(root / "regionclip_finetuned-lvis_rn50.pth", 6)
    torch.save({"model": _rpn("lvis_866_lsj_fpn", 7)}, root / "rpn_lvis_866_lsj.pth")
    torch.save({"model": _rpn("lvis_866_fpn", 3)}, root / "rpn_lvis_866.pth")
    torch.save({"model": _rpn("coco_c4", 4)}, root / "rpn_coco_48.pth")
    g = torch.Generator().manual_seed(5)
    torch.save(torch.nn.functional.normalize(torch.randn(65, 32, generator=g), dim=-1), root / "coco_65_cls_emb.pth")
    save_model(load_model(weights=root / "W.pth", device="cpu"), root / "student.safetensors")

    # COCO 2017 and LVIS v1 under coco/ (real category ids and names, sample photos as images)
    coco = get_vocabulary("coco")
    coco_cats = [{"id": int(i), "name": n, "supercategory": "thing"} for i, n in zip(coco.category_ids, coco.names)]
    ids = {n: int(i) for i, n in zip(coco.category_ids, coco.names)}
    names = ["000000000139.jpg", "000000000285.jpg", "000000000632.jpg"]
    coco_sizes = [_photo(samples[k % 2], root / "coco" / folder / n, 512 + 64 * k)
                  for k, n in enumerate(names) for folder in ("val2017", "train2017")][::2]
    images = [(n, w, h) for n, (w, h) in zip(names, coco_sizes)]
    labels = [[ids["person"], ids["kite"], ids["umbrella"]], [ids["dog"], ids["car"]],
              [ids["person"], ids["bus"], ids["zebra"]]]
    _write(root / "coco" / "annotations" / "instances_val2017.json", _instances(images, coco_cats, labels))
    _write(root / "coco" / "annotations" / "instances_train2017.json", _instances(images, coco_cats, labels))
    lvis_cats = json.loads((REPO / "rclip_core" / "assets" / "lvis_v1_categories.json").read_text())
    lvis_cats = [{**c, "image_count": 1, "instance_count": 1} for c in lvis_cats]
    lvis_ids = {c["name"]: c["id"] for c in lvis_cats}
    lvis_labels = [[lvis_ids["person"], lvis_ids["kite"]], [lvis_ids["dog"]], [lvis_ids["zebra"], lvis_ids["bus_(vehicle)"]]]
    _write(root / "coco" / "annotations" / "lvis_v1_val.json", _instances(images, lvis_cats, lvis_labels, lvis=True))
    shutil.copy(root / "coco" / "annotations" / "lvis_v1_val.json", root / "lvis_v1_minival.json")

    # your own COCO-format data
    own = [{"id": k, "name": n} for k, n in enumerate(["zebra", "giraffe", "kite", "person", "dog"], start=1)]
    own_images = [(s.name, w, h) for s, (w, h) in zip(samples, sizes)]
    _write(root / "train.json", _instances(own_images, own, [[1, 3, 4], [2, 4, 5]]))
    for s in samples:
        _photo(s, root / "val_imgs" / s.name, 640)
        _photo(s, root / "mydata" / "images" / s.name, 640)
    _write(root / "val.json", _instances(own_images, own, [[1, 2, 4], [3, 5]]))
    _write(root / "mydata" / "val.json", _instances(own_images, own, [[1, 3, 4], [2, 3, 5]]))

    # captions: a COCO captions file (the hand-labelled captions, 50 times: nouns seen twice pass --min-freq 100) and JSONL
    rows = [json.loads(line) for line in (DATA / "realistic_captions.jsonl").read_text().splitlines() if line.strip()]
    caps = [{"id": k, "image_id": k % len(rows) + 1, "caption": r["caption"]}
            for k, r in enumerate(rows * 50)]
    _write(root / "captions_train2017.json", {"images": [{"id": k + 1, "file_name": f"{k + 1:012d}.jpg"}
                                                         for k in range(len(rows))], "annotations": caps})
    (root / "captions.jsonl").write_text(
        "\n".join(json.dumps({"image": f"imgs/{s.name}", "caption": c})
                  for s, c in zip(samples, ["A boy flying a kite on the beach.", "A dog next to a car."])) + "\n")


def _video(path: Path, frames: int = 12) -> None:
    """A short H.264 clip of the sample photo panning (what ``rclip detect clip.mp4`` reads)."""
    import av
    import numpy as np
    from PIL import Image

    with Image.open(DATA / "sample_img1.jpg") as im:
        base = np.asarray(im.convert("RGB").resize((384, 216)))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 256, 144, "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[k * 4:k * 4 + 144, k * 8:k * 8 + 256]),
                                               format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    _standins(root)
    _video(root / "clip.mp4")
    csv = re.findall(r"```csv\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    assert len(csv) == 1 and csv[0].startswith("image,x1,y1,x2,y2,name")
    (root / "refs.csv").write_text(csv[0], encoding="utf-8")
    shutil.copytree(REPO / "recipes", root / "recipes")
    return root


def _args(command: str) -> list[str]:
    if command == FULLY:
        # the "..." is the line above without its novel classes (the two exclude each other)
        command = (_OWN_DATA.replace(' --novel-classes "zebra,giraffe"', "") + " " + SHORTENED[_OWN_DATA]
                   + " --fully-supervised --out runs/mine-fully")
    elif command in SHORTENED:
        command = command + " " + SHORTENED[command]
    return shlex.split(command)[1:]


@pytest.mark.slow
def test_readme_commands_run_as_written(scratch):
    for command in ORDER:
        if command == "rclip pseudo-label --dataset shapes:world --teacher W.pth --concepts world/instances_train.json " \
                      "--out labels/":
            shutil.rmtree(scratch / "labels")  # the caption labels above went there; each line is its own example
        res = _rclip(_args(command), scratch)
        assert res.returncode == 0, f"{command}\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr, command
    # what the commands promise to write
    assert (scratch / "world" / "world.json").is_file() and (scratch / "shapes" / "world.json").is_file()
    assert (scratch / "rclip-out").is_dir() and any((scratch / "rclip-out").glob("*.json"))
    report = json.loads((scratch / "coco_gt.json").read_text())
    assert report and "Traceback" not in json.dumps(report)
    assert (scratch / "report.json").is_file()
    frames = json.loads((scratch / "vid-out" / "clip.json").read_text())
    assert (scratch / "vid-out" / "clip.mp4").stat().st_size > 0 and frames
    assert (scratch / "refs.safetensors").is_file()
    fixed = json.loads((scratch / "minival_fixed_ap.json").read_text())
    assert fixed["protocol"]["name"] == "fixed-ap" and "segm_AP" in fixed["metrics"]
    for run in ("runs/mine", "runs/mine-fully", "runs/coco_ovd", "runs/shapes_ft"):
        assert (scratch / run / "detector.safetensors").is_file(), run
    assert (scratch / "runs" / "shapes_teacher" / "final.safetensors").is_file()
    nouns = [ln.split(",")[0] for ln in (scratch / "coco_nouns.txt").read_text().splitlines() if ln.strip()]
    assert "kite" in nouns and "man" in nouns
    assert (scratch / "nouns.safetensors").is_file() and (scratch / "coco_nouns_emb.pth").is_file()
    import torch

    emb = torch.load(scratch / "coco_nouns_emb.pth", weights_only=True)
    assert tuple(emb.shape) == (len(nouns), 32)
    index = json.loads((scratch / "labels" / "index.json").read_text())
    assert index  # the ShapesWorld labels of the last run


@pytest.mark.slow
def test_readme_python_block_runs(scratch):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for code in blocks:
        if any(re.search(rf"^(from|import) .*\b{name}\b", code, re.M) for name in PYTHON_NOT_RUN):
            continue
        res = subprocess.run([sys.executable, "-c", code], cwd=scratch, capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, PYTHONPATH=str(REPO), RCLIP_OFFLINE="1"))
        assert res.returncode == 0, f"{code}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"


@pytest.mark.parametrize("command", list(NOT_RUN))
def test_readme_commands_not_run_still_parse(command):
    """Options and subcommands as the README writes them, up to the end of option parsing."""
    res = _rclip([*shlex.split(_without_env(command))[1:], "--help"], REPO)
    assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    assert "Usage:" in res.stdout
