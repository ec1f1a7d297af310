"""config.json from the hub for the memory planner: read by the launcher before planning, from
a local stand-in for the hub (HF_ENDPOINT), once, with the token, never when offline or cached,
and never fatal. Nothing leaves this machine."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LLAMA_3_8B, clean_env, run_cli, write_recipe

from entrypoint import hub
from recipes import catalog

TOKEN = "hf_not_a_real_token"
RECIPE = """
model: {{name: {name}, load_in: 4bit, max_seq_length: 2048}}
data: {{source: someorg/some-chats, format: messages}}
training: {{per_device_batch_size: 1}}
"""


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves /someorg/Mystery-Model/resolve/main/config.json; a gated repo wants the token."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str | None]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        self.server.requests.append((self.path, auth))
        public = self.path == "/someorg/Mystery-Model/resolve/main/config.json"
        gated = self.path == "/someorg/Gated-Model/resolve/main/config.json"
        if gated and auth != f"Bearer {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        if not (public or gated):
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps(LLAMA_3_8B).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def plan_json(tmp_path: Path, name: str, **env: str):
    recipe = write_recipe(tmp_path, "hubby", RECIPE.format(name=name))
    base = {"HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
    done = run_cli("plan", str(recipe), "--json", "--assume-gpus", "2x80", cwd=tmp_path, env=clean_env(**base | env))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_a_config_json_read_from_the_hub_gives_the_exact_parameter_count(tmp_path, fake_hub):
    plan, notes = plan_json(tmp_path, "someorg/Mystery-Model", HF_ENDPOINT=fake_hub.endpoint)
    assert plan["memory"]["source"] == "config.json of someorg/Mystery-Model from the hub"
    assert plan["memory"]["params_b"] == pytest.approx(8.03, abs=0.01)
    assert "read from the hub" in notes
    assert [path for path, _ in fake_hub.requests] == ["/someorg/Mystery-Model/resolve/main/config.json"]
    assert not (tmp_path / "hf").exists(), "planning writes nothing, not even to the cache"


def test_a_gated_model_without_a_token_falls_back_and_says_to_set_hf_token(tmp_path, fake_hub):
    plan, notes = plan_json(tmp_path, "someorg/Gated-Model", HF_ENDPOINT=fake_hub.endpoint)
    assert "gated or private: set HF_TOKEN" in notes
    assert plan["memory"]["params_b"] is None and plan["mode"] == "ddp"


def test_the_token_is_sent_to_the_hub_and_never_printed(tmp_path, fake_hub):
    plan, notes = plan_json(tmp_path, "someorg/Gated-Model", HF_ENDPOINT=fake_hub.endpoint, HF_TOKEN=TOKEN)
    assert plan["memory"]["source"].endswith("from the hub")
    assert fake_hub.requests == [("/someorg/Gated-Model/resolve/main/config.json", f"Bearer {TOKEN}")]
    assert TOKEN not in notes and TOKEN not in json.dumps(plan)


def test_offline_the_hub_is_not_asked(tmp_path, fake_hub):
    plan, notes = plan_json(tmp_path, "someorg/Mystery-Model", HF_ENDPOINT=fake_hub.endpoint, HF_HUB_OFFLINE="1")
    assert fake_hub.requests == [] and notes == ""
    assert plan["memory"]["params_b"] is None


def test_a_cached_config_is_used_and_the_hub_is_not_asked(tmp_path, fake_hub):
    snapshot = tmp_path / "hf" / "hub" / "models--someorg--Mystery-Model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA_3_8B))
    plan, _ = plan_json(tmp_path, "someorg/Mystery-Model", HF_ENDPOINT=fake_hub.endpoint)
    assert fake_hub.requests == [] and plan["memory"]["source"] == "config.json of someorg/Mystery-Model"


def test_an_unreachable_hub_is_not_fatal(tmp_path, fake_hub):
    closed = fake_hub.endpoint
    fake_hub.shutdown()
    fake_hub.server_close()  # nothing listens there any more
    plan, notes = plan_json(tmp_path, "someorg/Mystery-Model", HF_ENDPOINT=closed)
    assert "not read from the hub" in notes and "HF_HUB_OFFLINE=1" in notes
    assert plan["memory"]["params_b"] is None


@pytest.mark.parametrize(
    ("name", "asked"),
    [("someorg/Mystery-Model", True), ("./my-model", False), ("/models/llama", False), ("smoke", False)],
)
def test_only_hub_ids_are_fetched(tmp_path, name, asked):
    recipe = catalog.load(str(write_recipe(tmp_path, "r", RECIPE.format(name=name)))).recipe
    assert hub.needs_fetch(recipe, {"HF_HOME": str(tmp_path / "hf")}) is asked
