"""Weights on the Hugging Face Hub: ``hf://OWNER/REPO[/FILE][@REVISION]`` wherever a weights
path is read, and the folder ``rclip weights push`` uploads.

Resolution goes through ``huggingface_hub.hf_hub_download``, so its cache
(``HF_HUB_CACHE`` / ``HF_HOME``, shared with every other Hub library), ``HF_HUB_OFFLINE=1``
(cache only), ``HF_ENDPOINT`` (a mirror) and ``HF_TOKEN`` behave as everywhere else. The
resolved local file then goes through :func:`rclip_core.weights.io.read_weights` like any local
file: the same safety rules (safetensors and ``weights_only`` pickles; code-running formats
only with ``--trust-weights``). ``FILE`` defaults to ``model.safetensors`` (what ``rclip
weights push`` writes); ``REVISION`` is a branch, tag or commit (default ``main``).

Every failure is one line: an unknown repository, file or revision is an InputError; a file
that is not in the cache while offline, or a network failure, is an OfflineError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from rclip_core.errors import InputError, OfflineError
from rclip_core.weights import io as _io

PREFIX = "hf://"
DEFAULT_FILE = "model.safetensors"

__all__ = ["PREFIX", "DEFAULT_FILE", "HubRef", "is_hub_path", "parse_hub_path", "resolve_weights_path",
           "read_weights", "read_safetensors_metadata", "model_card", "hub_config"]


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    filename: str | None
    revision: str | None

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"/{self.filename}" if self.filename else "") + \
            (f"@{self.revision}" if self.revision else "")


def is_hub_path(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse_hub_path(path: str) -> HubRef:
    """``hf://OWNER/REPO[/FILE][@REVISION]`` -> :class:`HubRef` (FILE None when not given)."""
    rest = path[len(PREFIX):]
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision:
            raise InputError(f"{path}: empty revision after '@'", "e.g. hf://OWNER/REPO@main or @v1.0")
    parts = [p for p in rest.split("/")]
    if len(parts) < 2 or not parts[0] or not parts[1] or any(not p for p in parts[2:]):
        raise InputError(f"{path} is not hf://OWNER/REPO[/FILE][@REVISION]",
                         "e.g. hf://me/rclip-shapes or hf://me/rclip-shapes/model.safetensors@v1")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision)


def resolve_weights_path(path: str | os.PathLike) -> str | os.PathLike:
    """A local path for ``path``: an ``hf://`` reference is fetched into (or found in) the
    Hugging Face cache; anything else is returned unchanged."""
    if not is_hub_path(path):
        return path
    ref = parse_hub_path(str(path))
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    filename = ref.filename or DEFAULT_FILE
    where = f"{ref}" + ("" if ref.filename else f" ({filename})")
    try:
        return hf_hub_download(ref.repo_id, filename, revision=ref.revision, library_name="rclip")
    except HFValidationError as e:
        raise InputError(f"{path}: {' '.join(str(e).split())}") from None
    except GatedRepoError:
        raise InputError(f"{where}: the repository is gated", "accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"{where}: no such repository on {constants.ENDPOINT} (or it is private)",
                         "check OWNER/REPO; for a private repository set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise InputError(f"{where}: no revision {ref.revision!r} in {ref.repo_id}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # before EntryNotFoundError, its base
        if constants.HF_HUB_OFFLINE:
            raise OfflineError(f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                               "HF_HUB_OFFLINE is set",
                               "download it once online (unset HF_HUB_OFFLINE), or pass a local --weights PATH") \
                from None
        raise OfflineError(f"cannot reach {constants.ENDPOINT} for {where}, and it is not in the cache",
                           "check the network or HF_ENDPOINT, or pass a local --weights PATH") from None
    except EntryNotFoundError:
        raise InputError(f"{where}: {ref.repo_id} has no file {filename!r}",
                         "name the file: hf://OWNER/REPO/FILE.safetensors") from None
    except HfHubHTTPError as e:
        raise OfflineError(f"{where}: the Hub answered {' '.join(str(e).split())[:200]}") from None
    except OSError as e:  # a cache that cannot be written, a connection reset
        raise OfflineError(f"{where}: {' '.join(str(e).split())[:200]}") from None


def read_weights(path: str | os.PathLike, *args: Any, **kwargs: Any) -> "_io.WeightsFile":
    """:func:`rclip_core.weights.io.read_weights` of :func:`resolve_weights_path` ``(path)``."""
    return _io.read_weights(resolve_weights_path(path), *args, **kwargs)


def read_safetensors_metadata(path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """:func:`rclip_core.weights.io.read_safetensors_metadata` of :func:`resolve_weights_path` ``(path)``."""
    return _io.read_safetensors_metadata(resolve_weights_path(path), *args, **kwargs)


# --------------------------------------------------------------------------------------------
# What `rclip weights push` uploads
# --------------------------------------------------------------------------------------------


def hub_config(meta: Mapping[str, Any], architecture_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config.json`` of a pushed rclip model: its kind, architecture (name and the open_clip
    style config), class names and embedding size, from the weights file's rclip metadata."""
    from rclip_core import __version__

    arch = meta.get("architecture")
    cfg: dict[str, Any] = {"library_name": "rclip", "rclip_version": __version__, "format": "rclip",
                           "kind": meta.get("kind", "model"),
                           "architecture": arch.get("name") if isinstance(arch, dict) else arch, "weights": DEFAULT_FILE}
    if architecture_config is not None:
        cfg["architecture_config"] = dict(architecture_config)
    names = meta.get("class_names") or meta.get("names")
    if names:
        cfg["class_names"] = list(names)
    if meta.get("embed_dim"):
        cfg["embed_dim"] = meta["embed_dim"]
    return cfg


def model_card(repo_id: str, config: Mapping[str, Any], recipe_text: str | None, metrics: Mapping[str, Any],
               base_model: str | None = None) -> str:
    """The README.md (a ``huggingface_hub.ModelCard``) of a pushed model: architecture,
    vocabulary, training recipe and metrics, with metadata the Hub indexes."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="rclip", tags=["object-detection", "open-vocabulary", "regionclip", "rclip"],
                         pipeline_tag="zero-shot-object-detection", **({"base_model": base_model} if base_model else {}))
    names = config.get("class_names") or []
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"An rclip RegionCLIP {config.get('kind', 'model')} (architecture `{config.get('architecture')}`), "
             "written by `rclip weights push`.", "",
             "```bash", f"rclip detect photo.jpg --weights hf://{repo_id} --classes \"cat,dog\"", "```", "",
             "## Architecture", "", f"- kind: {config.get('kind')}", f"- architecture: `{config.get('architecture')}`"]
    arch = config.get("architecture_config") or {}
    if arch:
        vis = arch.get("vision_cfg", {})
        lines.append(f"- embed_dim {arch.get('embed_dim')}, ResNet layers {vis.get('layers')}, width "
                     f"{vis.get('width')}, image size {vis.get('image_size')}")
    lines += ["", "## Vocabulary", ""]
    lines.append(f"{len(names)} classes: " + ", ".join(f"`{n}`" for n in names[:80])
                 + (" ..." if len(names) > 80 else "") if names else
                 "Open vocabulary: give class names (`--classes`) or `--class-embeddings`.")
    lines += ["", "## Training recipe", ""]
    lines += (["```yaml", recipe_text.rstrip(), "```"] if recipe_text else ["Not recorded with these weights."])
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines.append("None recorded with these weights.")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def upload_folder(folder: str | os.PathLike, ref: HubRef, private: bool = False, message: str | None = None) -> str:
    """``HfApi.create_repo`` (exist_ok) + ``HfApi.upload_folder``; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        api.create_repo(ref.repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=ref.repo_id, folder_path=str(Path(folder)), revision=ref.revision,
                                 commit_message=message or "rclip weights push")
    except LocalTokenNotFoundError:
        raise InputError("no Hugging Face token", "run `hf auth login` or set HF_TOKEN") from None
    except HfHubHTTPError as e:
        raise OfflineError(f"push to {ref}: {' '.join(str(e).split())[:200]}") from None
    except OSError as e:
        raise OfflineError(f"push to {ref}: {' '.join(str(e).split())[:200]}") from None
    return str(getattr(info, "commit_url", info))
