"""Nothing executable runs without consent: pickles that need ``weights_only=False`` and
TorchScript archives that cannot be read as plain data (their tensors, never their code) are
refused by every command that reads weights (and by the library) unless ``--trust-weights`` /
``trust=True`` is given. Each payload below creates a file when it
runs, so "refused" is checked by that file not existing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from rclip_cli.main import cli
from rclip_core.errors import WeightsError
from rclip_core.weights.io import read_weights, safe_torch_load

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- payloads

class _Node(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _mirror(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state_dict is ``state`` (nested sub-modules named like the keys)."""
    root = _Node()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not isinstance(getattr(node, part, None), torch.nn.Module):
                node.add_module(part, _Node())
            node = getattr(node, part)
        node.register_buffer(leaf, value.clone())
    return root


def _scripted_payload(target: Path, out: Path) -> Path:
    """A TorchScript archive whose __setstate__ (run by torch.jit.load) creates ``target``
    (torch.from_file with shared=True makes the file)."""

    class Evil(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.path = str(target)

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
            return (self.w, self.path, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
            self.path = state[1]
            self.training = state[2]
            self.w = state[0] + torch.from_file(self.path, shared=True, size=2) * 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        torch.jit.script(Evil()).save(str(out))
    assert not target.exists()  # saving does not run it
    return out


class _OpenOnLoad:
    """Unpickling this calls open(path, "w"): a pickle payload that creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_payload(target: Path, out: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"model": state, "__author__": _OpenOnLoad(target)}, str(out))
    assert not target.exists()
    return out


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    """A random test-micro CLIP (its open_clip state), as an rclip file and as a legit
    TorchScript archive of the same tensors."""
    from rclip_core.weights.loaders import load_model
    from rclip_core.weights.native import save_model

    d = tmp_path_factory.mktemp("trust")
    model = load_model(model="test-micro", random_init=True, seed=0)
    state = {k: v.detach().clone() for k, v in model.clip.state_dict().items()}
    native = save_model(model, d / "micro.safetensors", kind="clip")
    legit = d / "legit_ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_mirror(state)).save(str(legit))
    return {"dir": d, "state": state, "native": native, "legit": legit}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from rclip_core.data.shapes import generate_shapes_world

    d = tmp_path_factory.mktemp("trustworld") / "shapes"
    generate_shapes_world(d, train=4, val=2, seed=0, workers=1, image_size=64, closeup_frac=0.0)
    return d


@pytest.fixture(params=["torchscript", "pickle"])
def payload(request, tmp_path, micro) -> tuple[Path, Path]:
    """(payload file, the file its code would create)."""
    target = tmp_path / "PWNED"
    if request.param == "torchscript":
        return _scripted_payload(target, tmp_path / "evil_ts.pt"), target
    return _pickle_payload(target, tmp_path / "evil_pickle.pth", micro["state"]), target


# --------------------------------------------------------------------------------- the payloads are live

def test_the_payloads_do_run_when_trusted(tmp_path, micro):
    """Without this, a refusal test could pass with a payload that never did anything."""
    target = tmp_path / "ran_ts"
    read_weights(_scripted_payload(target, tmp_path / "a.pt"), trust=True)
    assert target.exists()
    target = tmp_path / "ran_pickle"
    wf = read_weights(_pickle_payload(target, tmp_path / "b.pth", micro["state"]), trust=True)
    assert target.exists() and set(wf.tensors) == set(micro["state"])


# --------------------------------------------------------------------------------- library

def test_library_refuses_by_default(payload):
    path, target = payload
    with pytest.raises(WeightsError) as e:
        read_weights(path)
    assert "--trust-weights" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError):
        safe_torch_load(path)
    from rclip_core.weights.inspect import describe_weights
    from rclip_core.weights.loaders import is_detector_file, load_class_embeddings, load_detector, load_model

    for call in (lambda: load_model(weights=path), lambda: load_detector(path), lambda: is_detector_file(path),
                 lambda: load_class_embeddings(path), lambda: describe_weights(path)):
        with pytest.raises(WeightsError, match="--trust-weights"):
            call()
    assert not target.exists()


def test_library_trust_loads_a_legit_torchscript_archive(micro):
    from rclip_core.weights.loaders import load_model

    wf = read_weights(micro["legit"], trust=True)
    assert wf.container == "torchscript"
    assert set(wf.tensors) == set(micro["state"])
    assert all(torch.equal(wf.tensors[k], v) for k, v in micro["state"].items())
    m = load_model(weights=micro["legit"], trust=True)
    assert m.arch.name == "test-micro" and m.has_text
    assert all(torch.equal(m.clip.state_dict()[k], v.float()) for k, v in micro["state"].items()
               if v.is_floating_point())


# --------------------------------------------------------------------------------- every command

def _recipe(tmp_path: Path, world: Path, weights: Path) -> Path:
    d = {
        "mode": "regionclip", "output_dir": str(tmp_path / "pre-out"), "max_steps": 1, "checkpoint_every": 0,
        "model": {"teacher": {"weights": str(weights)}},
        "data": {"root": str(world), "captions": ["captions_train.jsonl"], "short_sides": [64],
                 "max_size": 128, "num_workers": 0},
        "regions": {"source": "random", "per_image": 2},
        "concepts": {"pool": "instances_train.json", "templates": "single"},
        "batch": {"images_per_process": 2}, "logging": {"tensorboard": False},
    }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _command(name: str, path: Path, tmp_path: Path, world: Path, sample: Path) -> list[str]:
    out = str(tmp_path / f"{name}-out")
    return {
        "detect": ["detect", str(sample), "--weights", str(path), "--classes", "a,b", "--out", out],
        "detect-rpn": ["detect", str(sample), "--model", "test-micro", "--random-init", "--rpn-weights", str(path),
                       "--classes", "a,b", "--out", out],
        "detect-embeddings": ["detect", str(sample), "--model", "test-micro", "--random-init",
                              "--class-embeddings", str(path), "--proposals", "grid", "--out", out],
        "eval": ["eval", "--zero-shot", "--boxes", "gt", "--dataset", f"shapes:{world}", "--weights", str(path),
                 "--device", "cpu"],
        "eval-detector": ["eval", "--detector", "--dataset", f"shapes:{world}", "--weights", str(path),
                          "--device", "cpu"],
        "embed": ["embed", "a,b", "--weights", str(path), "--out", str(tmp_path / "e.safetensors")],
        "pseudo-label": ["pseudo-label", str(world / "captions_train.jsonl"), "--teacher", str(path),
                         "--concepts", str(world / "instances_train.json"), "--proposals", "random",
                         "--out", out, "--device", "cpu"],
        "weights-info": ["weights", "info", str(path)],
        "weights-convert": ["weights", "convert", str(path), str(tmp_path / "c.safetensors")],
        "pretrain": ["pretrain", str(_recipe(tmp_path, world, path)), "--device", "cpu"],
        "finetune": ["finetune", str(REPO / "recipes" / "shapes_finetune.yaml"), "--dataset", str(world),
                     "--init", str(path), "--out", out, "--device", "cpu", "max_steps=1", "data.num_workers=0"],
    }[name]


COMMANDS = ["detect", "detect-rpn", "detect-embeddings", "eval", "eval-detector", "embed", "pseudo-label",
            "weights-info", "weights-convert", "pretrain", "finetune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_code_without_trust_weights(command, payload, tmp_path, world, sample_image):
    path, target = payload
    r = CliRunner().invoke(cli, _command(command, path, tmp_path, world, sample_image))
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert r.exit_code == 2, r.output
    assert len(errors) == 1 and "--trust-weights" in errors[0] and "refusing to load" in errors[0], r.output
    assert "Traceback" not in r.output
    assert not target.exists(), "the payload ran"
    assert not (tmp_path / f"{command}-out").exists()  # nothing left behind
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "e.safetensors").exists()


def test_trust_weights_loads_a_legit_torchscript_archive_in_the_cli(micro, tmp_path):
    legit = micro["legit"]
    r = CliRunner().invoke(cli, ["weights", "info", str(legit), "--json"])  # read as data: no trust needed
    assert r.exit_code == 0 and '"container": "torchscript"' in r.output, r.output
    r = CliRunner().invoke(cli, ["weights", "info", str(legit), "--json", "--trust-weights"])
    assert r.exit_code == 0, r.output
    assert '"container": "torchscript"' in r.output
    out = tmp_path / "converted.safetensors"
    r = CliRunner().invoke(cli, ["weights", "convert", str(legit), str(out), "--trust-weights"])
    assert r.exit_code == 0, r.output
    wf = read_weights(out)  # a plain safetensors file now: no trust needed
    for k, v in micro["state"].items():
        if v.is_floating_point():
            assert torch.equal(wf.tensors[k].float(), v.float()), k
    emb = tmp_path / "emb.safetensors"
    r = CliRunner().invoke(cli, ["embed", "a,b", "--weights", str(legit), "--trust-weights", "--templates", "single",
                                 "--out", str(emb), "--no-cache", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert read_weights(emb).tensors["embeddings"].shape[0] == 2


def test_trust_weights_is_a_recipe_key_and_a_pretrain_flag(tmp_path, world, micro):
    from rclip_core.config.pretrain import load_pretrain_recipe

    recipe = _recipe(tmp_path, world, micro["legit"])
    assert load_pretrain_recipe(recipe).trust_weights is False
    assert load_pretrain_recipe(recipe, {"trust_weights": "true"}).trust_weights is True
    r = CliRunner().invoke(cli, ["pretrain", str(recipe), "--trust-weights", "--print-recipe"])
    assert r.exit_code == 0 and "trust_weights: true" in r.output, r.output


def test_convert_keeps_the_old_trust_spelling(tmp_path, micro):
    target = tmp_path / "ran"
    src = _pickle_payload(target, tmp_path / "d2.pth", micro["state"])
    r = CliRunner().invoke(cli, ["weights", "convert", str(src), str(tmp_path / "o.safetensors"), "--trust"])
    assert r.exit_code == 0, r.output
    assert target.exists()  # trusted: the pickle did run, as the user asked
    assert os.path.getsize(tmp_path / "o.safetensors") > 0


# --------------------------------------------------------------------------------- paths read as data

def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("backend", ["webdataset", "tarfile"])
def test_tar_shards_are_streamed_never_extracted(tmp_path, monkeypatch, backend):
    """Members named ../evil, /abs/evil or links are read as bytes (or skipped), never written."""
    import io
    import tarfile

    import rclip_core.data.captions as captions
    from rclip_core.data.streams import ImageTextDataset

    if backend == "tarfile":
        monkeypatch.setattr(captions, "_webdataset", lambda: None)
    shard_dir = tmp_path / "a" / "b"
    shard_dir.mkdir(parents=True)
    abs_target = tmp_path / "abs_evil"
    shard = shard_dir / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("../evil.jpg", _jpeg()), ("../evil.txt", b"a red square"),
                           (f"{abs_target}.jpg", _jpeg()), (f"{abs_target}.txt", b"an absolute one"),
                           ("ok.jpg", _jpeg()), ("ok.txt", b"a fine one")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../evil_link"
        tar.addfile(link)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(shard_dir)  # a relative extraction would land next to the shard's folder
    try:
        caps = list(captions.iter_captions(str(shard)))
        samples = list(ImageTextDataset(str(shard), caption_choice="first"))
    finally:
        os.chdir(cwd)
    assert caps == ["a red square", "an absolute one", "a fine one"]
    assert [s.caption for s in samples] == caps
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not abs_target.with_suffix(".jpg").exists()


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    target = tmp_path / "YAML_PWNED"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'seed: !!python/object/apply:os.system ["touch {target}"]\n')
    r = CliRunner().invoke(cli, ["pretrain", str(recipe)])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "!!python/object/apply:os.system is not allowed" in lines[0]
    assert not target.exists()
    r = CliRunner().invoke(cli, ["finetune", str(recipe), "--dry-run"])
    assert r.exit_code == 2 and "is not allowed" in r.output and not target.exists()


def test_no_eval_or_unsafe_yaml_in_the_library():
    """Recipe values are data: no eval/exec, no YAML loader that builds objects."""
    import re

    pattern = re.compile(r"(?<![\w.])(eval|exec)\(|yaml\.(unsafe_load|full_load|load_all)\(|Loader=yaml\.(Full)?Loader"
                         r"|yaml\.UnsafeLoader|pickle\.loads?\(")
    hits = []
    for py in list((REPO / "rclip_core").rglob("*.py")) + list((REPO / "rclip_cli").rglob("*.py")):
        for n, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{py.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []


# --------------------------------------------------------------------------------- TorchScript as data

class _Tricky(torch.nn.Module):
    """Scripted sub-modules of one class with different constants (mangled class names), a
    missing bias, a half parameter, a strided buffer and a plain tensor attribute (not state)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.c2 = torch.nn.Conv2d(4, 5, 1, stride=2)
        self.seq = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.LayerNorm(6), torch.nn.BatchNorm1d(6))
        self.mask = torch.ones(3, 3)
        self.register_buffer("pos", torch.arange(6.0).reshape(2, 3)[:, 1:])
        self.h = torch.nn.Parameter(torch.tensor(2.0).half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.c1(x)).mean((2, 3))
        return self.seq(y) * self.h.float() + self.mask.sum() + self.pos.sum()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_tensors_are_read_as_data_without_running_it(how, tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = _Tricky().eval()
    for p in module.parameters():
        p.data.normal_()
    path = tmp_path / f"{how}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (torch.jit.script(module) if how == "script" else torch.jit.trace(module, torch.randn(2, 3, 8, 8))).save(path)
        want = torch.jit.load(path).state_dict()

    def no_jit(*a, **k):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    wf = read_weights(path)
    assert wf.container == "torchscript"
    assert sorted(wf.tensors) == sorted(want) and "mask" not in wf.tensors and "c1.bias" not in wf.tensors
    for k, v in want.items():
        assert wf.tensors[k].dtype == v.dtype and torch.equal(wf.tensors[k], v), k


def test_legit_torchscript_clip_loads_without_trust(micro):
    from rclip_core.weights.loaders import load_model

    wf = read_weights(micro["legit"])
    assert wf.container == "torchscript" and set(wf.tensors) == set(micro["state"])
    assert all(torch.equal(wf.tensors[k], v) for k, v in micro["state"].items())
    m = load_model(weights=micro["legit"])
    assert m.arch.name == "test-micro" and m.has_text


def test_torchscript_that_is_not_plain_data_is_refused(tmp_path):
    """An archive whose data.pkl names a callable outside tensor rebuilding is refused, not run."""
    import zipfile

    good = tmp_path / "good.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(good)
    evil = tmp_path / "evil.pt"
    target = tmp_path / "PWNED"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                # protocol-2 pickle calling os.system(touch target) before the module
                data = b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {target}").to_bytes(4, "little") + \
                    f"touch {target}".encode() + b"\x85R0" + data[2:]
            dst.writestr(item, data)
    with pytest.raises(WeightsError, match="--trust-weights") as e:
        read_weights(evil)
    assert "os.system" in str(e.value) and not target.exists()
