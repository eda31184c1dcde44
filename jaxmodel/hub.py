"""Hugging Face model ids: `org/name` (optionally `org/name@revision`) wherever a model directory is taken.

Inside: `HubError`, `is_hub_id(text)`, `check_revision(text)` (an empty `org/name@`), `resolve_model(path, *,
revision=None, allow_pickle=False)` (a local directory, a `gs://` URL, or a hub id -> what the loaders read),
`resolve_adapter(path)` (the same for a PEFT adapter: only adapter_config.json and adapter_model.safetensors
are fetched), `WEIGHT_PATTERNS`, `TOKENIZER_PATTERNS`, `ADAPTER_PATTERNS`.

Rules (one place, used by `jaxmodel.from_pretrained`, `import_hf`, `export_hf`, `parity`,
`inference.Generator.from_pretrained`, a run config's `model.init_from` and the CLI commands that take a
model directory):
- An existing local directory wins over a hub id of the same spelling; a `gs://` (or other remote) URL is
  returned unchanged for `jaxmodel.storage`; anything else shaped `org/name[@revision]` is a hub id.
- A hub id is fetched with `huggingface_hub.snapshot_download` into the standard cache (`HF_HUB_CACHE`, or
  `HF_HOME/hub`, or `~/.cache/huggingface/hub`), downloading only what the loaders read: config.json,
  generation_config.json, the safetensors files and their index, the tokenizer files. PyTorch pickles
  (`pytorch_model*.bin`) only with `allow_pickle=True`, and then only when the repository has no
  safetensors. Tokens come from the environment (`HF_TOKEN`) or `huggingface-cli login`, as
  huggingface_hub finds them.
- The environment is read at call time (not when huggingface_hub was imported): `HF_HUB_OFFLINE=1` (or
  `TRANSFORMERS_OFFLINE=1`) uses the cache only; `HF_HOME` / `HF_HUB_CACHE` choose the cache; `HF_ENDPOINT`
  the hub (a mirror; the tests' local server).
- Every failure is one `HubError` line naming the id and the reason: not found (or private), gated,
  unknown revision, an empty one (`org/name@`), offline and not cached, or the hub unreachable.
  `HubError` is a `StorageError`, so the CLI prints it as `normistral: error: ...` with exit status 2.
"""

from __future__ import annotations

import os
import re

from jaxmodel.storage import StorageError, is_remote

WEIGHT_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors")  # jaxmodel.lora's files (never pickles)

# org/name, each part as the hub allows it (letters, digits, -, _, .), and an optional @revision.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


class HubError(StorageError):
    """A hub model id that cannot be used (the message names the id and the reason)."""


def is_hub_id(text) -> bool:
    """True if `text` is shaped like a hub id (`org/name` or `org/name@revision`) and is not a local
    directory or a URL."""
    text = os.fspath(text)
    return not is_remote(text) and not os.path.isdir(text) and _HUB_ID.fullmatch(text) is not None


def check_revision(text) -> None:
    """A HubError for a hub id with an empty revision (`org/name@`), which would otherwise be taken for a
    missing local path."""
    text = os.fspath(text)
    if text.endswith("@") and _HUB_ID.fullmatch(text[:-1]) and not is_remote(text) and not os.path.exists(text):
        raise HubError(f"{text}: the revision after @ is empty; write {text[:-1]}@REVISION (a branch, tag or "
                       f"commit), or {text[:-1]} for the default branch")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def cache_dir() -> str:
    """The hub cache as the environment names it now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def resolve_model(path, *, revision: str | None = None, allow_pickle: bool = False,
                  config_only: bool = False) -> str:
    """What the loaders should read for `path`: itself (a local directory or a URL), or the local
    snapshot directory of a hub id (downloaded if needed and allowed). A path that is neither an
    existing directory nor shaped like a hub id is returned unchanged: the caller reports it missing.
    `config_only`: fetch just config.json (what a run config needs for the architecture)."""
    path = os.fspath(path)
    check_revision(path)
    if not is_hub_id(path):
        return path
    match = _HUB_ID.fullmatch(path)
    repo, revision = match["repo"], revision or match["revision"]
    shown = repo + (f"@{revision}" if revision else "")
    if config_only:
        return _snapshot(repo, revision, shown, ("config.json",))
    folder = _snapshot(repo, revision, shown, (*WEIGHT_PATTERNS, *TOKENIZER_PATTERNS))
    if allow_pickle and not any(n.endswith(".safetensors") for n in os.listdir(folder)):
        folder = _snapshot(repo, revision, shown, (*WEIGHT_PATTERNS, *TOKENIZER_PATTERNS, *PICKLE_PATTERNS))
    return folder


def resolve_adapter(path) -> str:
    """`resolve_model` for a PEFT adapter (`--lora`, `--merge-lora`): a hub id fetches only its adapter files."""
    path = os.fspath(path)
    check_revision(path)
    if not is_hub_id(path):
        return path
    match = _HUB_ID.fullmatch(path)
    shown = match["repo"] + (f"@{match['revision']}" if match["revision"] else "")
    return _snapshot(match["repo"], match["revision"], shown, ADAPTER_PATTERNS)


def endpoint() -> str:
    """The hub's address as the environment names it now (`HF_ENDPOINT`, default https://huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _snapshot(repo: str, revision: str | None, shown: str, patterns) -> str:
    import huggingface_hub
    from huggingface_hub import errors

    where = f"{shown} (no such directory; tried as a Hugging Face model id)"
    try:
        return huggingface_hub.snapshot_download(
            repo, revision=revision, cache_dir=cache_dir(), local_files_only=offline(),
            allow_patterns=list(patterns), endpoint=endpoint())
    except errors.GatedRepoError:  # a subclass of RepositoryNotFoundError: first
        raise HubError(f"{where}: gated repository; accept its license at {endpoint()}/{repo} and set HF_TOKEN "
                       "(or run `huggingface-cli login`)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: not found on the hub (no such repository, or private and no valid token "
                       "in HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: revision {revision!r} not found") from None
    except errors.LocalEntryNotFoundError as e:
        if offline():
            raise HubError(f"{where}: not in the local cache ({cache_dir()}) and HF_HUB_OFFLINE is set; "
                           "download it once online, or unset HF_HUB_OFFLINE") from None
        reason = str(e).splitlines()[0]
        raise HubError(f"{where}: not in the local cache ({cache_dir()}) and the hub is unreachable "
                       f"({reason})") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{where}: hub request failed ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise HubError(f"{where}: {e.strerror or e}") from None
