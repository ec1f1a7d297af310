"""A model's config.json, wherever it is, so the memory planner can count its exact parameters:
a local model folder, the newest snapshot in the Hugging Face cache, or one read from the hub; and
its tokenizer's files, from a local folder or the cache only, for the data report.

Acting, not planning: entrypoint/host.py gathers it before planning and the planner receives
the parsed file as data. The hub read is one plain GET with a short timeout and no retries
(huggingface_hub retries a dead network for ~20 s); skipped offline (HF_HUB_OFFLINE /
TRANSFORMERS_OFFLINE) and for local or random-init models; never fatal: without it the estimate
falls back to the parameter count in the name. Nothing is written: the download proper happens
in the training program, into the cache.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from entrypoint.environment import TRUE_WORDS
from recipes.schema import Recipe

TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def is_hub_id(name: str) -> bool:
    """An "org/model" name is a hub repository; paths (absolute, relative, home) are not."""
    return name.count("/") == 1 and not name.startswith(("/", ".", "~"))


def local_folders(name: str, environ: Mapping[str, str]) -> list[Path]:
    """Where a model's files may be on this machine: its local folder, then the snapshots of the
    Hugging Face cache, newest first. Files are read from there, nothing is fetched."""
    folders = [Path(name).expanduser()]
    hub_cache = environ.get("HF_HUB_CACHE") or str(
        Path(environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"
    )
    if is_hub_id(name):
        snapshots = Path(hub_cache) / f"models--{name.replace('/', '--')}" / "snapshots"
        if snapshots.is_dir():
            folders += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return folders


def cached_config(name: str, environ: Mapping[str, str]) -> dict | None:
    """config.json of a local model folder, or of the newest snapshot in the Hugging Face cache."""
    for folder in local_folders(name, environ):
        try:
            return json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
    return None


@dataclass(frozen=True)
class TokenizerFiles:
    """A model's tokenizer as its files hold it (read, never run): the fast tokenizer's JSON, its
    settings (tokenizer_config.json: special tokens) and its chat template, if it has one."""

    folder: str
    tokenizer_json: str
    config: dict
    chat_template: str | None


def cached_tokenizer(name: str, environ: Mapping[str, str]) -> TokenizerFiles | None:
    """The tokenizer files of a local model folder, or of the newest cached snapshot that has them."""
    for folder in local_folders(name, environ):
        try:
            text = (folder / "tokenizer.json").read_text(encoding="utf-8")
            config_file = folder / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        except (OSError, ValueError):
            continue
        return TokenizerFiles(
            str(folder), text, config if isinstance(config, dict) else {}, chat_template(folder, config)
        )
    return None


def chat_template(folder: Path, config: dict) -> str | None:
    """Where transformers keeps it: chat_template.jinja, or tokenizer_config.json's chat_template (one
    template, or named ones of which "default" is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def local_config(recipe: Recipe, environ: Mapping[str, str]) -> tuple[dict | None, str]:
    """(config.json from a local folder or the cache, or None; where it came from)."""
    if recipe.model.random_init is not None:
        return None, ""  # the shape is in the recipe itself
    config = cached_config(recipe.model.name, environ)
    return config, (f"config.json of {recipe.model.name}" if config is not None else "")


def offline(environ: Mapping[str, str]) -> bool:
    return any(environ.get(name, "").strip().lower() in TRUE_WORDS for name in OFFLINE_VARIABLES)


def needs_fetch(recipe: Recipe, environ: Mapping[str, str]) -> bool:
    """A hub id whose config.json is neither local nor cached, and the hub may be asked."""
    name = recipe.model.name
    if recipe.model.random_init is not None or offline(environ):
        return False
    if not is_hub_id(name) or Path(name).exists():  # a local folder that looks like org/model
        return False
    return cached_config(name, environ) is None


def fetch_config(name: str, environ: Mapping[str, str], timeout_s: float = TIMEOUT_S) -> tuple[dict | None, str]:
    """(config.json parsed, or None; a one-line account for the plan's output)."""
    endpoint = (environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    url = f"{endpoint}/{urllib.parse.quote(name)}/resolve/main/config.json"
    request = urllib.request.Request(url)
    token = next((environ[v] for v in TOKEN_VARIABLES if environ.get(v)), None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            config = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            why = "gated or private: set HF_TOKEN" if not token else "HF_TOKEN has no access to it"
        else:
            why = f"HTTP {exc.code}"
        return None, f"config.json of {name} not read from the hub ({why})"
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        reason = getattr(exc, "reason", exc)
        return None, f"config.json of {name} not read from the hub ({reason}); set HF_HUB_OFFLINE=1 to skip"
    if not isinstance(config, dict):
        return None, f"config.json of {name} from the hub is not a JSON object"
    return config, f"config.json of {name} read from the hub"


def find_config(recipe: Recipe, environ: Mapping[str, str]) -> tuple[dict | None, str, str | None]:
    """(config.json or None, where it came from, a note for the user or None): local or cached
    first; else the hub, when it may be asked."""
    config, source = local_config(recipe, environ)
    if config is not None or not needs_fetch(recipe, environ):
        return config, source, None
    config, note = fetch_config(recipe.model.name, environ)
    return config, (f"config.json of {recipe.model.name} from the hub" if config is not None else ""), note
