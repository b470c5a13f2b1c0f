"""Region embeddings: the same function as the official RegionCLIP path.

The reference here is written independently and literally from the official code (``clip_rcnn.py:
CLIPFastRCNN.preprocess_image``, ``clip_roi_heads.py: CLIPRes5ROIHeads``, Detectron2's
``ResizeShortestEdge`` and ``ROIAlignV2``): PIL read
+ EXIF + RGB, Detectron2's resize arithmetic, ``(x/255 - mean)/std``, open_clip's own modules
(stem, layer1-3, layer4, and the *module* attention pool over all tokens), torchvision
``roi_align(aligned=True, sampling_ratio=0, scale 1/16)`` on boxes scaled in float64. rclip's
pipeline (``rclip detect --save-embeddings`` on an official-format checkpoint) must match it,
and each of the common mistakes must move the embeddings far beyond the 1e-3 parity tolerance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torchvision.ops import roi_align

from rclip_cli.main import cli
from rclip_core.data.images import load_image, resized_shape
from rclip_core.models.clip import build_clip, get_architecture
from rclip_core.models.ops import attnpool_token0
from rclip_core.models.region_encoder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, RegionEncoder

BOXES = [[100.0, 100.0, 500.0, 400.0], [812.5, 301.25, 1207.0, 899.0], [0.0, 0.0, 1920.0, 1080.0],
         [1500.0, 50.0, 1900.0, 600.0], [930.0, 610.0, 990.0, 660.0]]


def _calibrated_rn50(image_path) -> torch.nn.Module:
    """A random RN50 whose BN statistics are calibrated on the photo (data-dependent init).

    Plain random weights make a deep ResNet + attention pool nearly input-independent (every
    region gets the same embedding), which would hide preprocessing mistakes. Calibrating the BN
    statistics on real activations keeps the features informative, so (as with trained weights)
    each classic mistake moves the embeddings by 0.1-7 in max-abs terms.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from rclip_core.models.clip import freeze_batch_norm

    torch.manual_seed(0)
    cfg = get_architecture("RN50-quickgelu").config
    m = CLIP(embed_dim=1024, vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]), text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
             quick_gelu=True)
    v = m.visual
    for name, mod in v.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration batches
            if name.endswith("bn3"):
                mod.weight.data.fill_(0.5)  # open_clip zero-inits these, making blocks identities
    enc = RegionEncoder(v)
    prep = load_image(image_path, short=400, max_size=800)
    rois = torch.tensor([[0, 0, 0, 700, 400], [0, 100, 50, 400, 300], [0, 300, 100, 700, 390], [0, 0, 0, 200, 200],
                         [0, 500, 0, 700, 200], [0, 200, 200, 500, 400]], dtype=torch.float32)
    v.train()
    with torch.no_grad():
        res4 = enc.trunk(enc.normalize(prep.tensor)[None])
        v.layer4(roi_align(res4, rois, 14, 1 / 16, 0, True))
    v.eval()
    freeze_batch_norm(v)
    return m


@pytest.fixture(scope="module")
def rn50(sample_image):
    return _calibrated_rn50(sample_image)


def test_architecture_numbers():
    a, b = get_architecture("RN50-quickgelu"), get_architecture("rn50x4")
    assert (a.pooler_resolution, a.attnpool_grid, a.embed_dim, a.res4_channels, a.res5_channels) == (14, 7, 1024, 1024, 2048)
    assert (b.pooler_resolution, b.attnpool_grid, b.embed_dim, b.res4_channels, b.res5_channels) == (18, 9, 640, 1280, 2560)
    assert b.name == "RN50x4-quickgelu" and b.config["quick_gelu"] is True


def test_bn_is_frozen():
    rn50 = build_clip("RN50-quickgelu", with_text=False)
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in rn50.visual.modules())
    assert isinstance(rn50.visual.layer4[0].bn2, FrozenBatchNorm2d)
    assert not any("num_batches_tracked" in k for k in rn50.visual.state_dict())
    # train() must not start updating statistics
    enc = RegionEncoder(rn50.visual)
    before = rn50.visual.bn1.running_mean.clone()
    enc.train()
    enc.trunk(torch.randn(1, 3, 64, 64))
    assert torch.equal(before, rn50.visual.bn1.running_mean)
    enc.eval()


def test_attnpool_token0_equals_module(rn50):
    torch.manual_seed(0)
    ap = rn50.visual.attnpool
    x = torch.randn(13, 2048, 7, 7)
    with torch.no_grad():
        ref = ap(x)
        fast = attnpool_token0(ap, x)
    assert ref.shape == fast.shape == (13, 1024)
    rel = ((ref - fast).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert rel < 1e-5, rel


def test_whole_image_box_equals_image_forward(rn50):
    """At CLIP's native 224 px, RoIAlign(aligned=True) of the whole-image box samples exactly the
    res4 grid, so the region embedding IS the image embedding (no positional-embedding interpolation)."""
    enc = RegionEncoder(rn50.visual, fast=False)  # the plain modules: exact up to summation order
    img = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0)) * 255
    box = [torch.tensor([[0.0, 0.0, 224.0, 224.0]])]
    with torch.no_grad():
        region = enc([img], box)[0]
        image = rn50.visual(enc.normalize(img).unsqueeze(0))
        res4 = enc.trunk(enc.normalize(img).unsqueeze(0))
        rois = torch.tensor([[0.0, 0.0, 0.0, 224.0, 224.0]])
        misaligned = roi_align(res4, rois, 14, 1 / 16, 0, aligned=False)
        wrong = rn50.visual.attnpool(rn50.visual.layer4(misaligned))
        fast = RegionEncoder(rn50.visual)([img], box)[0]  # folded BN, channels_last, conv1 before RoIAlign
    rel = ((region - image).norm() / image.norm()).item()
    assert rel < 1e-5, rel
    assert ((wrong - image).norm() / image.norm()).item() > 100 * rel
    # The fast path's rounding differs (~2e-6 in res4, amplified by res5 + attention pooling on
    # noise input); tests/test_speed_parity.py bounds it tightly on real photos.
    assert ((fast - image).norm() / image.norm()).item() < 1e-4


@pytest.mark.parametrize("hw,expected", [((1080, 1920), (750, 1333)), ((480, 640), (800, 1067)),
                                         ((1920, 1080), (1333, 750)), ((50, 100), (667, 1333)),
                                         ((800, 800), (800, 800)), ((427, 640), (800, 1199))])
def test_resize_arithmetic(hw, expected):
    # e.g. 50x100: scale 16 -> 800x1600, long side > 1333 -> x0.833125 -> 666.5 -> int(667.0)
    assert resized_shape(*hw) == expected


def _reference_embeddings(visual, path, boxes, *, aligned=True, bgr=False, shift=0.0, resize="pil"):
    """The official path, literally. Keyword arguments inject the common mistakes."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = im.size
    nh, nw = resized_shape(h, w)
    if resize == "pil":
        arr = np.asarray(im.resize((nw, nh), Image.BILINEAR))
        x = torch.as_tensor(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    else:  # a non-PIL resize (torch bilinear on the full-resolution tensor)
        full = torch.as_tensor(np.asarray(im).transpose(2, 0, 1).copy()).float()[None]
        x = F.interpolate(full, size=(nh, nw), mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    if bgr:
        x = x.flip(0)
    mean = torch.tensor(CLIP_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD).view(3, 1, 1)
    x = ((x / 255.0) - mean) / std
    b = np.asarray(boxes, dtype=np.float64).copy()
    b[:, 0::2] *= nw / w
    b[:, 1::2] *= nh / h
    b = np.minimum(b.clip(min=0), [nw, nh, nw, nh]) + shift
    rois = torch.cat([torch.zeros(len(b), 1), torch.as_tensor(b, dtype=torch.float32)], dim=1)
    with torch.no_grad():
        f = visual.stem(x[None])
        f = visual.layer3(visual.layer2(visual.layer1(f)))
        pooled = roi_align(f, rois, (14, 14), spatial_scale=1 / 16, sampling_ratio=0, aligned=aligned)
        return visual.attnpool(visual.layer4(pooled))


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory, rn50):
    """An official-format RegionCLIP file ({"model": {backbone.*}}) and a [K, D] embedding file."""
    d = tmp_path_factory.mktemp("official")
    sd = {"backbone." + k[len("visual."):]: v for k, v in rn50.state_dict().items() if k.startswith("visual.")}
    torch.save({"model": sd, "iteration": 600000}, d / "regionclip_pretrained-cc_rn50.pth")
    emb = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1))
    torch.save(emb, d / "four_cls_emb.pth")
    (d / "boxes.json").write_text(json.dumps({"sample_img1.jpg": BOXES}))
    return d


@pytest.fixture(scope="module")
def cli_embeddings(official_checkpoint, sample_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("det")
    d = official_checkpoint
    r = CliRunner().invoke(cli, ["detect", str(sample_image), "--weights", str(d / "regionclip_pretrained-cc_rn50.pth"),
                                 "--boxes", str(d / "boxes.json"), "--class-embeddings", str(d / "four_cls_emb.pth"),
                                 "--classes", "sink,window,plant,wall", "--out", str(out), "--save-embeddings",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return out


def test_detect_embeddings_match_reference(cli_embeddings, rn50, sample_image):
    saved = load_file(str(cli_embeddings / "embeddings" / "sample_img1.safetensors"))
    assert saved["boxes"].shape == (5, 4) and saved["embeddings"].shape == (5, 1024)
    assert torch.allclose(saved["boxes"], torch.tensor(BOXES))  # original pixels, input order
    ref = _reference_embeddings(rn50.visual, sample_image, BOXES)
    err = (saved["embeddings"] - ref).abs().max().item()
    assert ref.abs().max().item() > 1.0  # informative features, not a collapsed constant
    assert err < 1e-4, err
    # the outputs a user sees
    preds = json.loads((cli_embeddings / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} == {1} and all(len(p["bbox"]) == 4 for p in preds)
    cats = json.loads((cli_embeddings / "categories.json").read_text())
    assert [c["name"] for c in cats] == ["sink", "window", "plant", "wall"]
    assert Image.open(cli_embeddings / "sample_img1.jpg").size == (1920, 1080)


@pytest.mark.parametrize("mistake", [dict(aligned=False), dict(bgr=True), dict(shift=1.0), dict(resize="torch")])
def test_common_mistakes_break_parity(mistake, rn50, sample_image, cli_embeddings):
    """Each classic error moves the embeddings far beyond the 1e-3 parity tolerance, so the
    parity test above would catch it (measured here: 0.13 for a 1-pixel box shift up to ~6.6 for
    BGR input, against a parity error below 1e-4)."""
    saved = load_file(str(cli_embeddings / "embeddings" / "sample_img1.safetensors"))["embeddings"]
    wrong = _reference_embeddings(rn50.visual, sample_image, BOXES, **mistake)
    assert (saved - wrong).abs().max().item() > 0.05


def test_load_image_is_pil_bilinear(sample_image):
    prep = load_image(sample_image)
    assert prep.size == (750, 1333) and prep.orig_size == (1080, 1920)
    im = Image.open(sample_image).convert("RGB").resize((1333, 750), Image.BILINEAR)
    assert torch.equal(prep.tensor, torch.as_tensor(np.asarray(im).transpose(2, 0, 1).copy()).float())


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue left strip
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    prep = load_image(tmp_path / "rot.jpg", short=20, max_size=1000)
    assert prep.orig_size == (40, 20)  # (h, w) after orientation: portrait


def test_chunked_head_equals_unchunked(rn50):
    enc = RegionEncoder(rn50.visual)
    res4 = torch.randn(1, 1024, 20, 30)
    boxes = [torch.tensor([[0.0, 0.0, 100.0, 100.0], [50.0, 60.0, 300.0, 310.0], [10.0, 10.0, 470.0, 310.0]])]
    with torch.no_grad():
        a = enc.forward_features(res4, boxes)
        b = enc.forward_features(res4, boxes, chunk_size=2)
    assert torch.allclose(a, b, atol=1e-5)
