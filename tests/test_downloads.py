"""Downloads: one fetch per node under torchrun (main process first, the others read the cache),
a temporary file of each download's own, moved into place only after its checksum matched,
nothing left behind on a mismatch, a progress report, pinned open_clip checksums, and one line
when offline. A local HTTP server on 127.0.0.1 serves the files slowly; nothing else is reached."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from rclip_cli._torchrun import free_port
from rclip_core.errors import OfflineError, RuntimeFailure
from rclip_core.weights import io as wio

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = os.urandom(384 * 1024)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 32 * 1024


class _Server:
    """Serves PAYLOAD at any path, CHUNK bytes every ``delay`` seconds; counts the GETs."""

    def __init__(self, delay: float = 0.03) -> None:
        self.gets: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.gets.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAYLOAD)))
                self.end_headers()
                for i in range(0, len(PAYLOAD), CHUNK):
                    self.wfile.write(PAYLOAD[i:i + CHUNK])
                    self.wfile.flush()
                    time.sleep(delay)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 so that nothing reaches the internet; this server is local
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("RCLIP_OFFLINE", raising=False)
    s = _Server()
    yield s
    s.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------ one process

def test_download_verifies_reports_progress_and_reuses(server, tmp_path):
    dest = tmp_path / "cache" / "file.bin"
    seen: list[tuple[int, int | None]] = []
    assert wio.download(server.url + "/file.bin", dest, sha256=SHA, progress=lambda d, t: seen.append((d, t))) == dest
    assert dest.read_bytes() == PAYLOAD and _leftovers(dest.parent) == ["file.bin"]
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert wio.download(server.url + "/file.bin", dest, sha256=SHA) == dest
    assert len(server.gets) == 1  # reused: the checksum matched
    dest.write_bytes(b"corrupt")  # a damaged cache entry is fetched again
    wio.download(server.url + "/file.bin", dest, sha256=SHA[:8])  # a prefix (open_clip's) works too
    assert dest.read_bytes() == PAYLOAD and len(server.gets) == 2


def test_checksum_mismatch_leaves_nothing_behind(server, tmp_path):
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(RuntimeFailure, match="checksum mismatch") as e:
        wio.download(server.url + "/file.bin", dest, sha256="0" * 64)
    assert "\n" not in str(e.value)
    assert _leftovers(dest.parent) == []


def test_named_model_download_checks_the_registry_sha256(server, tmp_path, monkeypatch):
    from rclip_core.weights import registry

    monkeypatch.setattr(registry, "ZOO_URL", server.url + "/pretrained_ckpt/")
    with pytest.raises(RuntimeFailure, match="checksum mismatch"):
        registry.fetch_named("emb-coco-65-cls-emb")  # our bytes are not the official file
    assert server.gets == ["/pretrained_ckpt/concept_emb/coco_65_cls_emb.pth"]
    assert _leftovers(wio.cache_dir() / "models") == []


def test_concurrent_downloads_use_their_own_temporary_files(server, tmp_path):
    """Two downloads of one file at once (no process group to order them): each writes its own
    temporary file, so neither corrupts nor deletes the other's; the last move wins."""
    dest = tmp_path / "cache" / "file.bin"
    dest.parent.mkdir()
    parts: set[str] = set()
    results: list[object] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            parts.update(p.name for p in dest.parent.glob("*.part"))
            time.sleep(0.005)

    def fetch() -> None:
        try:
            results.append(wio.download(server.url + "/file.bin", dest, sha256=SHA))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            results.append(e)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=fetch) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    watcher.join()
    assert results == [dest, dest]
    assert len(parts) == 2, parts  # two distinct temporary names
    assert dest.read_bytes() == PAYLOAD and _leftovers(dest.parent) == ["file.bin"]


def test_default_progress_is_a_bar_on_stderr(server, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("RCLIP_PROGRESS", "1")
    wio.download(server.url + "/file.bin", tmp_path / "file.bin", sha256=SHA)
    out, err = capfd.readouterr()
    assert out == "" and "downloading file.bin" in err


def test_offline_is_one_line_within_seconds(tmp_path, monkeypatch):
    from rclip_cli.main import cli

    monkeypatch.setenv("RCLIP_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(OfflineError) as e:
        wio.download("http://127.0.0.1:9/x.bin", tmp_path / "x.bin", sha256=SHA)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value)
    assert _leftovers(tmp_path) == []
    r = CliRunner().invoke(cli, ["weights", "download", "emb-coco-65-cls-emb", "--out", str(tmp_path / "o")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and lines[0].startswith("error: cannot download") and len(lines) <= 2, r.output
    assert not (tmp_path / "o").exists() or _leftovers(tmp_path / "o") == []


# ------------------------------------------------------------------------------------ two processes

_WORKER = """
import json, sys
from rclip_core.dist import cleanup, init_distributed
from rclip_core.weights.io import download
url, dest, sha = sys.argv[1:4]
info = init_distributed(device="cpu")
try:
    print(json.dumps({"rank": info.rank, "path": str(download(url, dest, sha256=sha))}))
except Exception as e:
    print(json.dumps({"rank": info.rank, "error": str(e), "type": type(e).__name__}))
finally:
    cleanup()
"""


def _two_processes(url: str, dest: Path, sha: str) -> list[dict]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "RCLIP_OFFLINE")}
    procs = []
    for rank in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, str(dest), sha], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(out, key=lambda r: r["rank"])


def test_two_processes_fetch_once_main_process_first(server, tmp_path):
    dest = tmp_path / "cache" / "file.bin"
    results = _two_processes(server.url + "/file.bin", dest, SHA)
    assert [r.get("path") for r in results] == [str(dest), str(dest)], results
    assert len(server.gets) == 1  # the second process read the cache
    assert dest.read_bytes() == PAYLOAD and _leftovers(dest.parent) == ["file.bin"]


def test_two_processes_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "cache" / "file.bin"
    results = _two_processes(server.url + "/file.bin", dest, "f" * 64)
    assert results[0]["type"] == "RuntimeFailure" and "checksum mismatch" in results[0]["error"]
    assert results[1]["type"] == "RuntimeFailure" and "local main process" in results[1]["error"]
    assert len(server.gets) == 1  # the second process did not try again on its own
    assert _leftovers(dest.parent) == []


# ------------------------------------------------------------------------------------ open_clip tags

def test_open_clip_tags_are_pinned_to_open_clips_urls():
    from open_clip.pretrained import get_pretrained_cfg

    from rclip_core.weights.registry import OPEN_CLIP_TAGS, REGISTRY, tag_checksum

    archs = {m.architecture for m in REGISTRY.values() if m.architecture}
    assert {a for a, _ in OPEN_CLIP_TAGS} == archs
    for (arch, tag), (url, sha) in OPEN_CLIP_TAGS.items():
        cfg = get_pretrained_cfg(arch, tag) or get_pretrained_cfg(arch.replace("-quickgelu", ""), tag)
        assert cfg["url"] == url, (arch, tag)
        check = tag_checksum(arch, tag, url)
        assert check.pinned and check.value == sha and check.kind in ("sha256", "sha256-prefix")
        assert sha in url  # OpenAI: the digest is a URL component; open_clip: the file name's suffix
    other = tag_checksum("RN101-quickgelu", "openai", "https://openaipublic.azureedge.net/clip/models/"
                         + "ab" * 32 + "/RN101.pt")
    assert other.kind == "sha256" and other.value == "ab" * 32 and not other.pinned
    assert tag_checksum("X", "y", "https://example.org/w.bin").kind == "unverified"


def test_weights_list_names_each_tags_checksum():
    from rclip_cli.main import cli

    r = CliRunner().invoke(cli, ["weights", "list"])
    assert r.exit_code == 0
    assert "open_clip pretrained tags" in r.output and "sha256 prefix 455df137" in r.output
    assert "unverified" in r.output
