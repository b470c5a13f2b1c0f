"""``--weights hf://OWNER/REPO[/FILE][@REVISION]``: resolved through huggingface_hub into its own
cache, which a 127.0.0.1 test server (the Hub's ``resolve`` endpoint: ``X-Repo-Commit``,
``ETag``, ``X-Error-Code``) lets huggingface_hub populate itself (``HF_ENDPOINT``); then read
offline (``HF_HUB_OFFLINE=1``) like a local file, with the same safety rules. Unknown repos,
files and revisions, offline or not, are one-line errors that write nothing; ``rclip weights
push`` stages safetensors, config.json and a model card and calls huggingface_hub's API."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli
from rclip_core.errors import InputError, OfflineError, WeightsError
from rclip_core.weights.hub import parse_hub_path, resolve_weights_path
from rclip_core.weights.loaders import load_model
from rclip_core.weights.native import save_model

REPO = Path(__file__).resolve().parents[1]
COMMIT = {"main": "a" * 40, "v1": "b" * 40}


class _Hub(BaseHTTPRequestHandler):
    files: dict[tuple[str, str, str], bytes] = {}

    def log_message(self, *a):  # quiet
        pass

    def _answer(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self.send_response(404)
            self.end_headers()
            return
        repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repos = {k[0] for k in self.files}
        if repo not in repos:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.end_headers()
            return
        rev = {v: k for k, v in COMMIT.items()}.get(rev, rev)
        if rev not in COMMIT:
            self.send_response(404)
            self.send_header("X-Error-Code", "RevisionNotFound")
            self.end_headers()
            return
        data = self.files.get((repo, rev, name))
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT[rev])
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        self._answer(False)

    def do_GET(self):  # noqa: N802
        self._answer(True)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache laid out by huggingface_hub itself: hf_hub_download in a child process
    (HF_ENDPOINT = the 127.0.0.1 server, HF_HUB_CACHE = a test folder), then the server stops."""
    d = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = load_model(model="test-micro", random_init=True)
    save_model(model, d / "micro.safetensors")
    save_model(load_model(model="test-micro", random_init=True, seed=1), d / "micro_v1.safetensors")
    torch.save({"weights": torch.zeros(3)}, d / "plain.pth")

    class Code:  # a pickle that needs weights_only=False (it would run code)
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"a": Code()}, d / "code.pth")
    _Hub.files = {("me/micro", "main", "model.safetensors"): (d / "micro.safetensors").read_bytes(),
                  ("me/micro", "v1", "model.safetensors"): (d / "micro_v1.safetensors").read_bytes(),
                  ("me/micro", "main", "sub/code.pth"): (d / "code.pth").read_bytes()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = d / "hf-cache"
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    code = ("from huggingface_hub import hf_hub_download as d\n"
            "print(d('me/micro', 'model.safetensors'))\n"
            "print(d('me/micro', 'model.safetensors', revision='v1'))\n"
            "print(d('me/micro', 'sub/code.pth'))\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(d / "img.png")
    (d / "boxes.json").write_text(json.dumps({"img.png": [[2, 2, 30, 30], [20, 10, 60, 44]]}))
    return {"dir": d, "cache": cache, "model": d / "micro.safetensors", "v1": d / "micro_v1.safetensors",
            "img": d / "img.png", "boxes": d / "boxes.json", "paths": r.stdout.split()}


@pytest.fixture
def offline(hub, monkeypatch):
    """This process as with HF_HUB_OFFLINE=1 HF_HUB_CACHE=<the test cache> (huggingface_hub reads
    its environment at import, so its constants are set)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    return hub


def test_the_cache_is_huggingface_hubs_own_layout(hub):
    snap = hub["cache"] / "models--me--micro" / "snapshots"
    assert sorted(p.name for p in snap.iterdir()) == [COMMIT["main"], COMMIT["v1"]]
    assert (hub["cache"] / "models--me--micro" / "refs" / "v1").read_text() == COMMIT["v1"]
    assert (snap / COMMIT["main"] / "model.safetensors").is_symlink()  # -> ../../blobs/<etag>


def test_parse():
    r = parse_hub_path("hf://me/repo/dir/file.safetensors@v1.0")
    assert (r.repo_id, r.filename, r.revision) == ("me/repo", "dir/file.safetensors", "v1.0")
    assert parse_hub_path("hf://me/repo").filename is None
    for bad in ("hf://me", "hf://me/", "hf://me/repo@", "hf://me//x"):
        with pytest.raises(InputError):
            parse_hub_path(bad)


def test_load_model_from_the_hub_offline_with_revisions(offline):
    want = load_model(weights=offline["model"])
    got = load_model(weights="hf://me/micro")
    for (k, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), k
    v1 = load_model(weights="hf://me/micro/model.safetensors@v1")
    ref = load_model(weights=offline["v1"])
    assert torch.equal(v1.state_dict()["clip.visual.conv1.weight"], ref.state_dict()["clip.visual.conv1.weight"])
    assert not torch.equal(v1.state_dict()["clip.visual.conv1.weight"], got.state_dict()["clip.visual.conv1.weight"])
    commit = load_model(weights=f"hf://me/micro@{COMMIT['v1']}")
    assert torch.equal(commit.state_dict()["clip.visual.conv1.weight"], ref.state_dict()["clip.visual.conv1.weight"])
    assert str(resolve_weights_path("hf://me/micro")).startswith(str(offline["cache"]))


def test_same_safety_rules_as_local_files(offline):
    with pytest.raises(WeightsError, match="trust-weights"):
        load_model(weights="hf://me/micro/sub/code.pth")


@pytest.mark.parametrize("ref,err,match", [
    ("hf://nobody/unknown", OfflineError, "not in the Hugging Face cache"),
    ("hf://me/micro/other.safetensors", OfflineError, "not in the Hugging Face cache"),
    ("hf://me/micro@v9", OfflineError, "not in the Hugging Face cache"),
])
def test_unknown_offline_is_one_error(offline, ref, err, match):
    with pytest.raises(err, match=match):
        load_model(weights=ref)


def test_detect_with_hub_weights_offline_in_a_fresh_process(hub, tmp_path):
    """The environment variables as a user sets them: HF_HUB_OFFLINE=1 and HF_HUB_CACHE."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub["cache"]), "RCLIP_CACHE": str(tmp_path / "c")}
    out = tmp_path / "out"
    rclip = [sys.executable, "-m", "rclip_cli.main"] if not (REPO / ".venv/bin/rclip").exists() else \
        [str(REPO / ".venv/bin/rclip")]
    r = subprocess.run([*rclip, "detect", str(hub["img"]), "--boxes", str(hub["boxes"]), "--weights", "hf://me/micro",
                        "--classes", "a,b", "--score-thresh", "0", "--no-images", "--out", str(out), "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((out / "predictions.json").read_text())
    bad = tmp_path / "bad"
    r = subprocess.run([*rclip, "detect", str(hub["img"]), "--boxes", str(hub["boxes"]), "--weights",
                        "hf://nobody/unknown", "--classes", "a,b", "--out", str(bad), "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 1 and lines[0].startswith("error:") and "hf://nobody/unknown" in lines[0], lines
    assert len(lines) <= 2 and "Traceback" not in r.stderr
    assert not bad.exists()


def test_unknown_repo_online_is_one_error(hub, monkeypatch):
    """Against the running test server: RepositoryNotFound / EntryNotFound headers."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            f"http://127.0.0.1:{server.server_port}" + "/{repo_id}/resolve/{revision}/{filename}")
        with pytest.raises(InputError, match="no such repository"):
            resolve_weights_path("hf://nobody/unknown")
        with pytest.raises(InputError, match="has no file 'nope.safetensors'"):
            resolve_weights_path("hf://me/micro/nope.safetensors")
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ push

def test_push_stages_model_card_config_and_calls_the_api(hub, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.safetensors").write_bytes(hub["model"].read_bytes())
    (run / "recipe.yaml").write_text("mode: image_text\nmax_steps: 3\n")
    (run / "eval.json").write_text(json.dumps({"metrics": {"AP50": 12.5, "region_acc": 0.25}}))
    calls = {}
    import huggingface_hub

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)), kw)
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
        calls["same"] = (Path(folder_path) / "model.safetensors").read_bytes() == hub["model"].read_bytes()
        return type("Info", (), {"commit_url": "http://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    r = CliRunner().invoke(cli, ["weights", "push", str(run), "hf://me/pushed@main"])
    assert r.exit_code == 0, r.output
    assert calls["create"][0] == "me/pushed" and calls["upload"][0] == "me/pushed"
    assert calls["upload"][1] == ["README.md", "config.json", "model.safetensors", "recipe.yaml"]
    assert calls["upload"][2]["revision"] == "main" and calls["same"]
    assert calls["config"]["architecture"] == "test-micro" and calls["config"]["library_name"] == "rclip"
    from huggingface_hub import ModelCard

    card = ModelCard(calls["card"])
    assert card.data.library_name == "rclip"
    for text in ("## Architecture", "test-micro", "## Vocabulary", "max_steps: 3", "| AP50 | 12.5 |"):
        assert text in calls["card"], text


@pytest.mark.parametrize("args,match", [
    (["{missing}", "hf://me/x"], "no such directory"),
    (["{run}", "me/x"], "hf://OWNER/REPO"),
    (["{empty}", "hf://me/x"], "no final.safetensors"),
])
def test_push_bad_input(hub, tmp_path, args, match):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.safetensors").write_bytes(hub["model"].read_bytes())
    argv = [a.format(missing=tmp_path / "nope", run=run, empty=tmp_path / "empty") for a in args]
    r = CliRunner().invoke(cli, ["weights", "push", *argv])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and match in lines[0] and len(lines) <= 2, r.output
