"""Caption data sets (rclip_core.data.captions): every format on tiny files written here."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rclip_core.data import captions as CAP
from rclip_core.data.captions import (CaptionRecord, expand_paths, iter_caption_records, iter_captions, iter_records,
                                      resolve_sources)
from rclip_core.data.images import load_image, read_image, xywh_to_xyxy
from rclip_core.data.streams import ImageTextDataset
from rclip_core.errors import InputError


def jpeg_bytes(w: int = 8, h: int = 6, colour=(200, 30, 30), orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), colour)
    if orientation is None:
        img.save(buf, "JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def write_image(path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(**kw))
    return path


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


CORRUPT = b"\xff\xd8\xff\xe0 this is not really a jpeg"


def grey_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


def stats(ok: int, missing: int, corrupt: int, no_caption: int = 0, bad_shards: int = 0) -> dict[str, int]:
    return {"ok": ok, "skipped_missing": missing, "skipped_corrupt": corrupt,
            "skipped_no_caption": no_caption, "bad_shards": bad_shards}


# ------------------------------------------------------------------------------ text formats


def test_jsonl_records_relative_paths_and_caption_lists(tmp_path):
    f = tmp_path / "data" / "caps.jsonl"
    f.parent.mkdir()
    f.write_text("\n".join([
        json.dumps({"image": "img/a.jpg", "caption": "a dog"}),
        "",
        json.dumps({"image": "img/a.jpg", "caption": "a brown dog"}),
        json.dumps({"filepath": "/abs/b.jpg", "captions": ["a cat", "two cats"], "key": "k2"}),
        json.dumps({"caption": "text only"}),
    ]) + "\n")
    recs = list(iter_records(f))
    img_a = str(tmp_path / "data" / "img" / "a.jpg")
    assert recs == [CaptionRecord("img/a.jpg", img_a, "a dog"),
                    CaptionRecord("img/a.jpg", img_a, "a brown dog"),
                    CaptionRecord("k2", "/abs/b.jpg", "a cat"), CaptionRecord("k2", "/abs/b.jpg", "two cats"),
                    CaptionRecord("5", None, "text only")]


def test_images_root_overrides_the_file_folder(tmp_path):
    f = tmp_path / "meta" / "caps.jsonl"
    f.parent.mkdir()
    f.write_text(json.dumps({"image": "a.jpg", "caption": "a cat"}) + "\n")
    write_image(tmp_path / "pics" / "a.jpg")
    assert next(iter_records(f, images_root=tmp_path / "pics")).image == str(tmp_path / "pics" / "a.jpg")
    with pytest.raises(InputError, match="none of its first 1 images exist"):
        ImageTextDataset(f)
    assert [s.caption for s in ImageTextDataset(f, images_root=tmp_path / "pics")] == ["a cat"]


@pytest.mark.parametrize("name, text", [
    ("caps.csv", 'image,caption\nimg/a.jpg,"a dog, running"\nimg/b.jpg,a cat\n'),  # quoted comma
    # img2dataset / open_clip column names
    ("caps.csv", "filepath,title\nimg/a.jpg,\"a dog, running\"\nimg/b.jpg,a cat\n"),
    ("caps.tsv", "filepath\ttitle\nimg/a.jpg\ta dog, running\nimg/b.jpg\ta cat\n"),
])
def test_csv_and_tsv_with_header(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    recs = list(iter_records(f))
    assert [(r.image, r.caption) for r in recs] == [(str(tmp_path / "img/a.jpg"), "a dog, running"),
                                                     (str(tmp_path / "img/b.jpg"), "a cat")]


def test_csv_without_caption_column_is_input_error(tmp_path):
    f = tmp_path / "caps.csv"
    f.write_text("url,width\nhttp://x/a.jpg,3\n")
    with pytest.raises(InputError, match="no caption column"):
        list(iter_records(f))


def test_regionclip_text_tsv(tmp_path):
    f = tmp_path / "train.text.tsv"
    f.write_text('000001\ta man on a horse\n000002\t{"captions": ["a kite", "two kites"]}\n')
    assert list(iter_records(f)) == [CaptionRecord("000001", None, "a man on a horse"),
                                     CaptionRecord("000002", None, "a kite"),
                                     CaptionRecord("000002", None, "two kites")]


def coco_captions(tmp_path: Path) -> Path:
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({
        "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
        "annotations": [{"id": 1, "image_id": 9, "caption": "A plate of food."},
                        {"id": 2, "image_id": 25, "caption": "A giraffe eating leaves."},
                        {"id": 3, "image_id": 9, "caption": "Broccoli and rice."}],
    }))
    write_image(tmp_path / "train2017" / "000000000009.jpg")
    return ann


def test_coco_captions_grouped_by_image_and_images_root_guessed(tmp_path):
    ann = coco_captions(tmp_path)
    recs = list(iter_records(ann))
    root = tmp_path / "train2017"
    assert recs == [CaptionRecord("9", str(root / "000000000009.jpg"), "A plate of food."),
                    CaptionRecord("9", str(root / "000000000009.jpg"), "Broccoli and rice."),
                    CaptionRecord("25", str(root / "000000000025.jpg"), "A giraffe eating leaves.")]
    other = tmp_path / "elsewhere"
    assert list(iter_records(ann, images_root=other))[0].image == str(other / "000000000009.jpg")


def test_json_of_the_wrong_kind(tmp_path):
    inst = tmp_path / "instances_val2017.json"
    inst.write_text(json.dumps({"images": [],
                                "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 2, 2]}]}))
    with pytest.raises(InputError, match="COCO instances file without captions") as e:
        list(iter_records(inst))
    assert "captions_train2017.json" in e.value.hint
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"model": "RN50"}))
    with pytest.raises(InputError, match="not a caption file"):
        list(iter_records(other))
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        list(iter_records(bad))


def test_json_list_and_jsonl_saved_as_json(tmp_path):
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"image": "a.jpg", "caption": "a cat"}]))
    assert list(iter_records(lst)) == [CaptionRecord("a.jpg", str(tmp_path / "a.jpg"), "a cat")]
    jl = tmp_path / "lines.json"
    jl.write_text('{"image": "a.jpg", "caption": "a cat"}\n{"image": "b.jpg", "caption": "a dog"}\n')
    assert [r.caption for r in iter_records(jl)] == ["a cat", "a dog"]


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "caps.jsonl"
    f.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg"}\n')
    with pytest.raises(InputError, match="record 2 has no caption"):
        list(iter_records(f))
    f.write_text('{"image": "a.jpg", "caption": "ok"}\n[1, 2]\n')
    with pytest.raises(InputError, match="record 2 is a JSON list"):
        list(iter_records(f))
    f.write_bytes(b'{"caption": "\xff\xfe"}\n')
    with pytest.raises(InputError, match="not UTF-8"):
        list(iter_records(f))


def test_iter_captions_mixes_formats_and_gzip(tmp_path):
    (tmp_path / "a.txt").write_text("first caption\n\nsecond caption\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as g:
        g.write(json.dumps({"image": "x.jpg", "caption": "third caption"}) + "\n")
    write_shard(tmp_path / "c.tar", [("k1.jpg", jpeg_bytes()), ("k1.txt", b"fourth caption")])
    caps = list(iter_captions([tmp_path / "a.txt", str(tmp_path / "b.jsonl.gz"), tmp_path / "c.tar"]))
    assert caps == ["first caption", "second caption", "third caption", "fourth caption"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.jsonl", "not found"),
    (lambda d: (d / "caps.parquet").write_text("x") and d / "caps.parquet", "unknown caption format"),
    (lambda d: d, "no .tar shards"),
])
def test_bad_inputs_fail_before_reading(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message):
        iter_captions([path])  # eager: raised on the call, not on the first next()


def test_expand_paths_braces_lists_and_shard_folders(tmp_path):
    assert CAP._braceexpand("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert CAP._braceexpand("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_paths("x.tar::y.tar") == ["x.tar", "y.tar"]
    for name in ("b.tar", "a.tar", "notes.md"):
        (tmp_path / name).write_text("")
    assert expand_paths(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(InputError, match="not found"):
        resolve_sources(str(tmp_path / "{0..1}.tar"))  # 0.tar does not exist
    with pytest.raises(InputError, match="only tar shards"):
        resolve_sources("http://example.invalid/caps.jsonl")


# ------------------------------------------------------------------------------ tar shards


def shards(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    write_shard(d / "00000.tar", [
        ("000000.jpg", jpeg_bytes(colour=(255, 0, 0))), ("000000.txt", b"a red square"),
        ("000001.jpg", jpeg_bytes(colour=(0, 255, 0))), ("000001.json", json.dumps({"caption": "a green one",
                                                                                    "width": 8}).encode()),
        ("000002.jpg", CORRUPT), ("000002.txt", b"a corrupt image"),
    ])
    write_shard(d / "00001.tar", [
        ("000003.txt", b"a caption without image"),
        ("000004.jpg", jpeg_bytes(colour=(0, 0, 255))),  # no caption
        ("000005.png", grey_png(5, 7)),
        ("000005.txt", b"a grey png"),
    ])
    return d


@pytest.mark.parametrize("backend", ["webdataset", "tarfile"])
def test_shard_captions_streamed_with_braces(tmp_path, monkeypatch, backend):
    d = shards(tmp_path)
    if backend == "tarfile":
        monkeypatch.setattr(CAP, "_webdataset", lambda: None)
    else:
        assert CAP._webdataset() is not None
    caps = list(iter_captions(str(d / "{00000..00001}.tar")))
    assert caps == ["a red square", "a green one", "a corrupt image", "a caption without image", "a grey png"]
    recs = list(iter_caption_records(str(d / "00000.tar")))
    assert [r.key for r in recs] == ["000000", "000001", "000002"] and recs[0].image is None


@pytest.mark.parametrize("backend", ["webdataset", "tarfile"])
def test_shard_dataset_skips_and_counts(tmp_path, monkeypatch, backend):
    if backend == "tarfile":
        monkeypatch.setattr(CAP, "_webdataset", lambda: None)
    d = shards(tmp_path)
    ds = ImageTextDataset(str(d / "{00000..00001}.tar"))
    samples = list(ds)
    assert [(s.key, s.caption, s.image.size, s.image.mode) for s in samples] == [
        ("000000", "a red square", (8, 6), "RGB"), ("000001", "a green one", (8, 6), "RGB"),
        ("000005", "a grey png", (5, 7), "RGB")]
    assert samples[0].image.getpixel((4, 3))[0] > 200
    assert ds.stats == stats(ok=3, missing=1, corrupt=1, no_caption=1)


@pytest.mark.parametrize("backend", ["webdataset", "tarfile"])
def test_truncated_shard(tmp_path, monkeypatch, backend):
    if backend == "tarfile":
        monkeypatch.setattr(CAP, "_webdataset", lambda: None)
    good = write_shard(tmp_path / "good.tar", [m for i in range(3) for m in
                                               ((f"{i:06d}.jpg", jpeg_bytes()), (f"{i:06d}.txt", b"cap"))])
    cut = tmp_path / "cut.tar"
    # cut inside the data of the 2nd member (0.txt): both readers report "unexpected end of data".
    # (tarfile reads a cut exactly at a member boundary as a normal end of archive.)
    cut.write_bytes(good.read_bytes()[:2100])
    with pytest.raises(InputError, match="cannot read tar shard .*cut.tar: unexpected end of data$"):
        list(iter_captions(cut))
    ds = ImageTextDataset([cut, good])
    assert len(list(ds)) == 3 and ds.stats["bad_shards"] == 1 and ds.stats["ok"] == 3


# ------------------------------------------------------------------------------ images


def image_jsonl(tmp_path: Path) -> Path:
    write_image(tmp_path / "img" / "a.jpg")
    write_image(tmp_path / "img" / "b.jpg", w=8, h=4, orientation=6)  # rotated 90 degrees by EXIF
    Image.new("RGBA", (3, 3), (0, 0, 255, 128)).save(tmp_path / "img" / "c.png")
    (tmp_path / "img" / "bad.jpg").write_bytes(CORRUPT)
    f = tmp_path / "caps.jsonl"
    rows = [("img/a.jpg", "a red thing"), ("img/b.jpg", "rotated"), ("img/missing.jpg", "gone"),
            ("img/c.png", "blue"), ("img/bad.jpg", "corrupt"), ("img/a.jpg", "a red thing again")]
    f.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    return f


def test_read_image_exif_rgb_and_errors(tmp_path):
    f = image_jsonl(tmp_path)
    assert read_image(tmp_path / "img" / "b.jpg").size == (4, 8)
    assert read_image((tmp_path / "img" / "c.png").read_bytes()).mode == "RGB"
    with pytest.raises(InputError, match="image not found"):
        read_image(tmp_path / "img" / "missing.jpg")
    with pytest.raises(InputError, match="cannot read image <bytes>: corrupt or truncated"):
        read_image(CORRUPT)
    with pytest.raises(InputError, match=r"cannot read image shard/k\.jpg"):
        read_image(CORRUPT, name="shard/k.jpg")
    assert f.exists()


def jpeg_with_broken_exif(w: int = 8, h: int = 4) -> bytes:
    """A JPEG whose EXIF block says orientation 6 (rotate 90 degrees) but also holds a DateTime
    tag stored as a signed rational: PIL reads the orientation, yet ``ImageOps.exif_transpose``
    raises when it re-writes the block (PIL 13: AttributeError)."""
    import struct

    ifd = [struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0),  # Orientation SHORT 6
           struct.pack("<HHII", 0x0132, 10, 1, 38)]  # DateTime as SRATIONAL at offset 38
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(ifd)) + b"".join(ifd) + b"\x00" * 4
    app1 = b"Exif\x00\x00" + tiff + struct.pack("<ii", -1, 0)
    plain = jpeg_bytes(w, h)
    return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + plain[2:]


def test_broken_exif_one_policy_for_inference_and_training(tmp_path):
    """One decoder: a broken EXIF block never loses the image, the readable orientation is
    applied (detectron2's _apply_exif_orientation), and the training stream gets exactly the
    pixels inference reads."""
    import numpy as np

    write_image(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(jpeg_with_broken_exif())
    (tmp_path / "header-only.jpg").write_bytes(jpeg_bytes(8, 4)[:2] + b"\xff\xe1\x00\x08Exif\x00\x00"
                                               + jpeg_bytes(8, 4)[2:])
    inference = read_image(tmp_path / "broken.jpg")
    assert inference.size == (4, 8) and inference.mode == "RGB"
    assert read_image(tmp_path / "header-only.jpg").size == (8, 4)
    assert load_image(tmp_path / "broken.jpg", short=16, max_size=64).orig_size == (8, 4)  # (h, w)
    f = tmp_path / "caps.jsonl"
    f.write_text("".join(json.dumps({"image": n, "caption": n}) + "\n"
                         for n in ("ok.jpg", "broken.jpg", "header-only.jpg")))
    ds = ImageTextDataset(f, caption_choice="first", transform=np.asarray)
    got = {s.caption: s.image for s in ds}
    assert ds.stats == stats(ok=3, missing=0, corrupt=0)
    for name, pixels in got.items():
        assert np.array_equal(pixels, np.asarray(read_image(tmp_path / name))), name
    shard = write_shard(tmp_path / "s.tar", [("k.jpg", jpeg_with_broken_exif()), ("k.txt", b"broken")])
    (sample,) = list(ImageTextDataset(shard, transform=np.asarray))
    assert np.array_equal(sample.image, np.asarray(inference))


def test_xywh_to_xyxy():
    import numpy as np

    got = xywh_to_xyxy([[10, 20, 5, 0.5], [0, 0, 0, 0]])
    assert got.dtype == np.float64 and got.tolist() == [[10, 20, 15, 20.5], [0, 0, 0, 0]]
    assert xywh_to_xyxy([]).shape == (0, 4)


def test_image_text_dataset_counts_and_transforms(tmp_path):
    f = image_jsonl(tmp_path)
    ds = ImageTextDataset(f, caption_choice="all", transform=lambda im: im.size, text_transform=str.upper)
    assert ds.num_images == 5
    got = [(s.key, s.image, s.caption) for s in ds]
    assert got == [("img/a.jpg", (8, 6), "A RED THING"), ("img/a.jpg", (8, 6), "A RED THING AGAIN"),
                   ("img/b.jpg", (4, 8), "ROTATED"), ("img/c.png", (3, 3), "BLUE")]
    assert ds.stats == stats(ok=4, missing=1, corrupt=1)
    ds.reset_stats()
    first = [s.caption for s in ImageTextDataset(f, caption_choice="first")]
    assert first == ["a red thing", "rotated", "blue"]


def test_random_caption_is_deterministic_per_epoch(tmp_path):
    f = tmp_path / "caps.jsonl"
    write_image(tmp_path / "a.jpg")
    f.write_text("".join(json.dumps({"image": "a.jpg", "caption": f"caption {i}"}) + "\n" for i in range(8)))
    ds = ImageTextDataset(f, seed=1)
    by_epoch = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        a, b = [s.caption for s in ds], [s.caption for s in ds]
        assert a == b and len(a) == 1
        by_epoch.append(a[0])
    assert len(set(by_epoch)) > 1  # a different caption in some epochs


def test_split_by_rank_and_shuffle(tmp_path):
    f = tmp_path / "caps.jsonl"
    for i in range(7):
        write_image(tmp_path / f"{i}.jpg")
    f.write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": str(i)}) + "\n" for i in range(7)))
    parts = [[s.caption for s in ImageTextDataset(f, rank=r, world_size=2)] for r in (0, 1)]
    assert parts == [["0", "2", "4", "6"], ["1", "3", "5"]]
    shuffled = [[s.caption for s in ImageTextDataset(f, rank=r, world_size=2, shuffle=True, seed=3)]
                for r in (0, 1)]
    assert sorted(shuffled[0] + shuffled[1]) == [str(i) for i in range(7)] and shuffled[0] != parts[0]
    with pytest.raises(InputError):
        ImageTextDataset(f, rank=2, world_size=2)


def test_shards_split_by_rank(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    for k in range(3):
        write_shard(d / f"{k}.tar", [m for i in range(2) for m in
                                     ((f"{k}{i}.jpg", jpeg_bytes()), (f"{k}{i}.txt", f"{k}{i}".encode()))])
    keys = lambda ds: [s.key for s in ds]  # noqa: E731
    # 3 shards, 2 ranks: shards 0, 2 | 1
    assert [keys(ImageTextDataset(str(d / "{0..2}.tar"), rank=r, world_size=2)) for r in (0, 1)] == \
        [["00", "01", "20", "21"], ["10", "11"]]
    # 1 shard, 2 ranks: every other sample
    assert [keys(ImageTextDataset(d / "0.tar", rank=r, world_size=2)) for r in (0, 1)] == [["00"], ["01"]]


def test_dataloader_workers_split_work_and_share_stats(tmp_path):
    f = image_jsonl(tmp_path)

    def to_tensor(im):
        return torch.tensor(im.size)

    ds = ImageTextDataset(f, caption_choice="first", transform=to_tensor)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    keys = sorted(s.key for s in loader)
    assert keys == ["img/a.jpg", "img/b.jpg", "img/c.png"]
    # counted in the worker processes, read in this one
    assert ds.stats == stats(ok=3, missing=1, corrupt=1)


def test_dataset_input_errors(tmp_path):
    (tmp_path / "caps.txt").write_text("a caption\n")
    with pytest.raises(InputError, match="captions only"):
        ImageTextDataset(tmp_path / "caps.txt")
    f = tmp_path / "caps.jsonl"
    f.write_text(json.dumps({"image": "nowhere/a.jpg", "caption": "x"}) + "\n")
    with pytest.raises(InputError, match="none of its first 1 images exist"):
        ImageTextDataset(f)
    f.write_text(json.dumps({"caption": "no image"}) + "\n")
    with pytest.raises(InputError, match="has no image path"):
        ImageTextDataset(f)
    with pytest.raises(InputError, match="caption_choice"):
        ImageTextDataset(f, caption_choice="longest")


def test_coco_dataset_reads_images(tmp_path):
    ann = coco_captions(tmp_path)
    ds = ImageTextDataset(ann, caption_choice="all")
    assert [(s.key, s.caption) for s in ds] == [("9", "A plate of food."), ("9", "Broccoli and rice.")]
    assert ds.stats["skipped_missing"] == 1 and ds.stats["ok"] == 2
