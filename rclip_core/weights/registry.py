"""Named models: name -> architecture, source, sha256; download with checksum and progress.

Official RegionCLIP files are served from a public Git LFS re-upload of the model zoo
(github.com/biluko/RegionCLIP_petrained_ckpt, pinned to one commit); their sha256 and sizes come
from the LFS pointers. open_clip pretrained tags (``--model RN50-quickgelu --pretrained openai``)
use open_clip's own sources and the usual caches (``~/.cache/clip``, the Hugging Face hub cache).
Their checksums follow open_clip (``pretrained.py: download_pretrained_from_url``): an OpenAI URL
carries the file's full sha256, an open_clip release file name ends in the first 8 hex digits of
its sha256; those of the architectures the registry names are pinned in :data:`OPEN_CLIP_TAGS`.
A tag with neither is downloaded only with a warning that it is unverified. OpenAI's files are
TorchScript archives: loading them needs ``trust=True`` (``--trust-weights``).

Offline, every download fails within a few seconds (a 3 s TCP probe; open_clip's own retries
take ~46 s) with a hint to pass ``--weights PATH``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rclip_core.errors import InputError, OfflineError
from rclip_core.weights.io import cache_dir, download, network_reachable

ZOO_REPO = "biluko/RegionCLIP_petrained_ckpt"
ZOO_COMMIT = "f5249089ebec16ff7857008fac24e12aaafdd96b"
ZOO_URL = f"https://media.githubusercontent.com/media/{ZOO_REPO}/{ZOO_COMMIT}/pretrained_ckpt/"

# path under pretrained_ckpt/ -> (sha256, size in bytes), from the Git LFS pointers
ZOO_FILES: dict[str, tuple[str, int]] = {
    "regionclip/regionclip_pretrained-cc_rn50.pth": ("afbc58d7d4bd96e2b10cc0d1928a912ed519c3b3215df7e5f3285e4bb09c7c58", 672111099),
    "regionclip/regionclip_finetuned-coco_rn50.pth": ("8d00eaf8f6b8cea60bbf27e20e499acd8f54e0edf3ad556bba10ebaced2596b3", 226512797),
    "regionclip/regionclip_finetuned-coco_rn50x4.pth": ("8aa9dac327294613347175018e70fb7b4d132d24fd2c46baddb82e23d66e5631", 421893859),
    "regionclip/regionclip_finetuned-lvis_rn50.pth": ("4ff9004fae37f9691daad9cefc133086d24edcc005af5475f733d3dc88cf8aa0", 283004706),
    "regionclip/regionclip_finetuned-lvis_rn50x4.pth": ("3ffac66b63a6487af3325b6ec517dc428d3e7dfc7add4a2f190f7d7785129a56", 477478504),
    "regionclip/regionclip_finetuned-coco-fully80_rn50x4.pth": ("f361405d2923eb24f62966af93b932a1e2a84908715a63926d2e086d35023458", 422619226),
    "regionclip/regionclip_finetuned-lvis-fully1203_rn50x4.pth": ("3072a9a8bf329909873107b5767c9f2b2a910d6ffcf94a039b071ca59d36f452", 486490730),
    "clip/teacher_RN50_student_RN50_OAI_CLIP.pth": ("b82c333ac6b16188b3d9936ea3ce985bb7e00891ad680738b06690f5e35ab6a9", 816813640),
    "clip/teacher_RN50x4_student_RN50x4_OAI_CLIP.pth": ("4e93beb1bd4a6a17c4e1a974789b60917aa2614756a5c7cf93fc1e1208013730", 1427732665),
    "rpn/rpn_lvis_866.pth": ("1695b7f1815ba40320da06a24c18045b544b2abcd015096d1b2d0939adc0e5c6", 110109894),
    "rpn/rpn_lvis_866_lsj.pth": ("41d123beefc1d2bf2f8d7097c3546109d00bea4d2bad151a58cee18992f4840d", 112523925),
    "rpn/rpn_coco_48.pth": ("8b934109caae409fbf62753d1f167ea1411b75aa0b30c60f5c289aa90ada42ca", 72439156),
    "rpn/rpn_coco_65.pth": ("27fb253a0a0184d60657b701c67d554c2a59a2bac8f11d68cf496df6fac5228a", 72439156),
    "rpn/rpn_coco_80.pth": ("57788439f378ca138f85c70c76c0a55d9cb2a4231c7c804d3a179d5c38c19939", 72439156),
    "rpn/rpn_lvis_1203_clipbackbone.pth": ("dd5b6a5e1752fb160f5c16b4ada444fa837aa53941204c77a9d657e48b3752ee", 110192352),
    "concept_emb/coco_65_cls_emb.pth": ("748c93fb6045a41a8345e1219d298802ebbe369873f5189494c65dc86e23ff83", 267000),
    "concept_emb/coco_65_cls_emb_rn50x4.pth": ("0ca8c235d3b99c443f97c6f64d67e6b6ff6a78aefbd64c6b4c55cbb91bed4455", 167160),
    "concept_emb/coco_48_base_cls_emb.pth": ("adba2da33666d11e501eb3c2872977e714fda57d20954f4b2466c8d3c8d50972", 197368),
    "concept_emb/coco_48_base_cls_emb_rn50x4.pth": ("76d2f71b64ebd32e95b349e3a47de21c0747053f7edf9887e43b2fb4c5801655", 123640),
    "concept_emb/coco_17_target_cls_emb.pth": ("383b57072b3c65793f82ca4be71cc3bd1f3b81d14771a3a2c64130caeed7b738", 70392),
    "concept_emb/coco_17_target_cls_emb_rn50x4.pth": ("b04be46250e78dc3cee1929f51b4506c1aac7eabf3ff12becac794f0b0151d44", 44280),
    "concept_emb/coco_80_cls_emb.pth": ("a62590be978bc6fa4886b38d0bdc9bac3d65653241c7e3da59d83964564186ec", 328440),
    "concept_emb/coco_80_cls_emb_rn50x4.pth": ("5f6b115ab7e10ac5e9d1eaec36261fa0385afd6f85a4c60371a29cd2397ecc8c", 205560),
    "concept_emb/lvis_1203_cls_emb.pth": ("f068696e298c27c697c7edb3cc398c78a0b9dcc4276b0622bae69fe1c017560e", 4928248),
    "concept_emb/lvis_1203_cls_emb_rn50x4.pth": ("63332de695c9ff83add129703ccf85d5e57517115c1e2e3c0d650ac35579df35", 3080440),
    "concept_emb/lvis_866_base_cls_emb.pth": ("74cd5aa4e0e8448d51cfc32275ceb93aa6c337e2e2ac7895ba4d0adba316eed8", 3547896),
    "concept_emb/lvis_866_base_cls_emb_rn50x4.pth": ("831c209a53a2b1606ea7a37a4c1085c3f8e0fa865e54fcebfcaed1b5f3dd51c3", 2217720),
    "concept_emb/coco_nouns_4764_emb.pth": ("9d2a783f6db5c5afa055484bd41a86ba1feb5365af791dbda8875c5687479ed2", 19514104),
    "concept_emb/coco_nouns_4764_emb_rn50x4.pth": ("fe91693d87773e9ea01a85664353cbaeb3d1863293c6388bf5f584e8f8844ad3", 12196600),
    "concept_emb/googlecc_nouns_6250_emb.pth": ("d71391c2967c378ff539e73c5633e2312584a8fa5d8cc993c6ce5639f02c1fcf", 25600760),
}


# open_clip tags of the architectures the registry names, pinned: (architecture, tag) ->
# (url, sha256 or the sha256 prefix open_clip publishes). From open_clip 3.x pretrained.py.
OPEN_CLIP_TAGS: dict[tuple[str, str], tuple[str, str]] = {
    ("RN50-quickgelu", "openai"): (
        "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
        "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),
    ("RN50-quickgelu", "yfcc15m"): (
        "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/rn50-quickgelu-yfcc15m-455df137.pt",
        "455df137"),
    ("RN50-quickgelu", "cc12m"): (
        "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/rn50-quickgelu-cc12m-f000538c.pt",
        "f000538c"),
    ("RN50x4-quickgelu", "openai"): (
        "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
        "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd"),
}


class UnverifiedDownloadWarning(UserWarning):
    """A file is downloaded without a checksum to compare it with (the CLI shows it as one line)."""


@dataclass(frozen=True)
class TagChecksum:
    """How a downloaded open_clip tag is verified: ``kind`` is ``sha256`` (full digest),
    ``sha256-prefix`` (open_clip's 8 hex digits) or ``unverified``; ``pinned``: from
    :data:`OPEN_CLIP_TAGS` rather than read off open_clip's URL."""

    url: str
    kind: str
    value: str | None
    pinned: bool

    def describe(self) -> str:
        if self.kind == "sha256":
            return f"sha256 {self.value[:12]}..." + (" (pinned)" if self.pinned else " (from the URL)")
        if self.kind == "sha256-prefix":
            return f"sha256 prefix {self.value} (open_clip, 32 bits)"
        return "UNVERIFIED (no checksum published)"


def tag_checksum(architecture: str, tag: str, url: str) -> TagChecksum:
    """The checksum a download of ``url`` (open_clip tag ``tag`` of ``architecture``) is checked
    against: the pinned one, else what open_clip's URL conventions give, else none."""
    import re

    pinned = OPEN_CLIP_TAGS.get((architecture, tag))
    if pinned and pinned[0] == url:
        value = pinned[1]
        return TagChecksum(url, "sha256" if len(value) == 64 else "sha256-prefix", value, True)
    parts = url.rstrip("/").split("/")
    if "openaipublic" in url and len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{64}", parts[-2]):
        return TagChecksum(url, "sha256", parts[-2], False)
    if "mlfoundations" in url:
        m = re.search(r"-([0-9a-f]{8})\.\w+$", url)
        if m:
            return TagChecksum(url, "sha256-prefix", m.group(1), False)
    return TagChecksum(url, "unverified", None, False)


def list_open_clip_tags() -> list[tuple[str, str, TagChecksum]]:
    """(architecture, tag, checksum) of the pinned open_clip tags, for ``rclip weights list``."""
    return [(a, t, tag_checksum(a, t, url)) for (a, t), (url, _) in OPEN_CLIP_TAGS.items()]


@dataclass(frozen=True)
class NamedModel:
    name: str
    architecture: str
    file: str  # path under pretrained_ckpt/
    kind: str  # regionclip | detector | clip | rpn | embeddings
    description: str

    @property
    def url(self) -> str:
        return ZOO_URL + self.file

    @property
    def sha256(self) -> str:
        return ZOO_FILES[self.file][0]

    @property
    def size(self) -> int:
        return ZOO_FILES[self.file][1]


REGISTRY: dict[str, NamedModel] = {m.name: m for m in [
    NamedModel("regionclip-rn50-cc", "RN50-quickgelu", "regionclip/regionclip_pretrained-cc_rn50.pth", "regionclip",
               "RegionCLIP RN50 pretrained on CC3M (student + teacher + text + LVIS-866 RPN)"),
    NamedModel("regionclip-rn50-coco-ovd", "RN50-quickgelu", "regionclip/regionclip_finetuned-coco_rn50.pth", "detector",
               "RN50-C4 detector fine-tuned on COCO 48 base classes (Novel AP50 31.4)"),
    NamedModel("regionclip-rn50x4-coco-ovd", "RN50x4-quickgelu", "regionclip/regionclip_finetuned-coco_rn50x4.pth",
               "detector", "RN50x4-C4 detector fine-tuned on COCO 48 base classes (Novel AP50 39.3)"),
    NamedModel("regionclip-rn50-lvis", "RN50-quickgelu", "regionclip/regionclip_finetuned-lvis_rn50.pth", "detector",
               "RN50-C4 detector fine-tuned on LVIS 866 base classes (APr 17.1)"),
    NamedModel("regionclip-rn50x4-lvis", "RN50x4-quickgelu", "regionclip/regionclip_finetuned-lvis_rn50x4.pth",
               "detector", "RN50x4-C4 detector fine-tuned on LVIS 866 base classes (APr 22.0)"),
    NamedModel("regionclip-rn50x4-coco-fully80", "RN50x4-quickgelu",
               "regionclip/regionclip_finetuned-coco-fully80_rn50x4.pth", "detector",
               "RN50x4-C4 detector, fully supervised on COCO 80 classes"),
    NamedModel("regionclip-rn50x4-lvis-fully1203", "RN50x4-quickgelu",
               "regionclip/regionclip_finetuned-lvis-fully1203_rn50x4.pth", "detector",
               "RN50x4-C4 detector, fully supervised on LVIS 1203 classes"),
    NamedModel("clip-rn50-teacher-student", "RN50-quickgelu", "clip/teacher_RN50_student_RN50_OAI_CLIP.pth", "clip",
               "OpenAI CLIP RN50, teacher + student copies (pretraining init)"),
    NamedModel("clip-rn50x4-teacher-student", "RN50x4-quickgelu", "clip/teacher_RN50x4_student_RN50x4_OAI_CLIP.pth",
               "clip", "OpenAI CLIP RN50x4, teacher + student copies (pretraining init)"),
    NamedModel("rpn-lvis-866", "", "rpn/rpn_lvis_866.pth", "rpn", "R50-FPN RPN on LVIS 866 base classes (zero-shot)"),
    NamedModel("rpn-lvis-866-lsj", "", "rpn/rpn_lvis_866_lsj.pth", "rpn", "R50-FPN RPN, LSJ, LVIS 866 (LVIS transfer)"),
    NamedModel("rpn-coco-48", "", "rpn/rpn_coco_48.pth", "rpn", "R50-C4 RPN on COCO 48 base classes (COCO transfer)"),
    NamedModel("rpn-coco-65", "", "rpn/rpn_coco_65.pth", "rpn", "R50-C4 RPN on COCO 65 classes"),
    NamedModel("rpn-coco-80", "", "rpn/rpn_coco_80.pth", "rpn", "R50-C4 RPN on COCO 80 classes"),
] + [
    NamedModel("emb-" + f.split("/")[-1][:-4].replace("_", "-"), "RN50x4-quickgelu" if "rn50x4" in f else "RN50-quickgelu",
               f, "embeddings", "official class / concept embeddings " + f.split("/")[-1])
    for f in ZOO_FILES if f.startswith("concept_emb/")
]}


def list_named_models() -> list[NamedModel]:
    return list(REGISTRY.values())


def fetch_named(name: str, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download (or reuse from the cache) a named model file, verifying its sha256."""
    if name not in REGISTRY:
        raise InputError(f"unknown model name {name!r}", "see `rclip weights list` for the named models")
    m = REGISTRY[name]
    dest = cache_dir() / "models" / Path(m.file).name
    return download(m.url, dest, sha256=m.sha256, progress=progress)


def resolve_pretrained(model: str, tag: str | None = None,
                       progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Path of the weights for a registry name, or an open_clip architecture + pretrained tag."""
    if model in REGISTRY:
        return fetch_named(model, progress)
    from rclip_core.models.clip import get_architecture

    arch = get_architecture(model)
    tag = tag or "openai"
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    base = arch.name.replace("-quickgelu", "")
    cfg = get_pretrained_cfg(arch.name, tag) or get_pretrained_cfg(base, tag)
    if not cfg:
        tags = sorted(set(open_clip.list_pretrained_tags_by_model(arch.name)) |
                      set(open_clip.list_pretrained_tags_by_model(base)))
        raise InputError(f"no pretrained weights {tag!r} for {arch.name}",
                         ("available tags: " + ", ".join(tags)) if tags else "pass --weights PATH")
    # 1) already in a cache?
    hf = cfg.get("hf_hub", "")
    if hf:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, fname = os.path.split(hf.rstrip("/")) if not hf.endswith("/") else (hf.rstrip("/"), "")
            for f in ([fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
                hit = try_to_load_from_cache(repo_id=repo, filename=f)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
        except Exception:  # noqa: BLE001 - a cache miss is not an error
            pass
    url = cfg.get("url", "")
    if not url:
        raise OfflineError(f"pretrained weights {arch.name}/{tag} are not in the Hugging Face cache, and open_clip "
                           "names no direct download for them", "pass local weights with --weights PATH")
    # 2) ~/.cache/clip (download() reuses a file there when its checksum matches), else download,
    # failing fast when offline
    dest = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if not dest.is_file() and not network_reachable(url):
        raise OfflineError(f"pretrained weights {arch.name}/{tag} are not cached and there is no network",
                           "pass local weights with --weights PATH (an official RegionCLIP .pth or an rclip "
                           ".safetensors), or run once with a connection to fill the cache")
    check = tag_checksum(arch.name, tag, url)
    if check.kind == "unverified":
        import warnings

        warnings.warn(UnverifiedDownloadWarning(
            f"{arch.name}/{tag} has no published checksum: {url} is downloaded unverified"), stacklevel=2)
    return download(url, dest, sha256=check.value, progress=progress)
