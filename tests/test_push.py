"""push_folder against a local stand-in for the Hugging Face Hub.

No Hub can be reached from the test machines, so ``LocalHub`` below is NOT the Hub: it is a small HTTP server
on 127.0.0.1 that implements only the endpoints a push with huggingface_hub's ``create_repo`` + ``upload_folder``
calls (repo create, README metadata validation, preupload answered "regular" for every file so nothing goes
through LFS/Xet, and the NDJSON commit). It records each request so the test can compare what was sent with
the folder on disk; any other endpoint gets a 404 and fails the test.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from reattend.export.push import push_folder

TOKEN = "hf_reattendFakeTokenThatMustNeverBePrinted"
REPO = "someone/tiny-reattend"
EXPECTED_CALLS = [
    ("POST", "/api/repos/create"),
    ("POST", "/api/validate-yaml"),
    ("POST", f"/api/models/{REPO}/preupload/main"),
    ("POST", f"/api/models/{REPO}/commit/main"),
]


class LocalHub:
    """What the stand-in received: every request, the repos created and each commit's files."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[dict] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.lock = threading.Lock()

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # a stalled client cannot hold a server thread longer than this

    def log_message(self, format, *args) -> None:
        """Quiet: the test reads stderr for what push_folder prints."""

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> tuple[dict, str]:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = urlsplit(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = {"method": self.command, "path": path, "headers": headers, "body": body}
        hub: LocalHub = self.server.hub
        with hub.lock:
            hub.requests.append(request)
        return request, path

    def do_GET(self) -> None:
        self._record()
        self._reply(404, {"error": "not served by the local stand-in"})

    def do_POST(self) -> None:
        request, path = self._record()
        hub: LocalHub = self.server.hub
        if path == "/api/repos/create":
            payload = json.loads(request["body"])
            with hub.lock:
                hub.created.append(payload)
            repo_id = f"{payload['organization']}/{payload['name']}"
            return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": "0" * 24})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(request["body"])["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", path):
            lines = [json.loads(line) for line in request["body"].splitlines() if line]
            with hub.lock:
                hub.commits.append({"header": lines[0], "ops": lines[1:]})
                oid = f"{len(hub.commits):040x}"
            return self._reply(200, {"commitUrl": f"{hub.url}/{match[1]}/commit/{oid}", "commitOid": oid,
                                     "success": True})
        return self._reply(404, {"error": "not served by the local stand-in"})


@pytest.fixture
def hub(monkeypatch):
    # The stand-in is on loopback, so a developer's HF_HUB_OFFLINE=1 must not block the test's requests.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # With telemetry on, huggingface_hub's user agent fetches an agent registry from huggingface.co (whatever
    # the endpoint) once per process; off, every request of the test goes to the stand-in and nowhere else.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hub = LocalHub()
    server.hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere: not in the environment, not in a login file (HF_HOME is an empty folder)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub derives the token file's path from HF_HOME once, at import, so point it there as well.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))


@pytest.fixture
def export_dir(tmp_path):
    folder = tmp_path / "export" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, folder / "model.safetensors")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "modeling_reattend.py").write_text("class Model:\n    pass\n")
    (folder / ".model.safetensors.tmp").write_bytes(b"half-written")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "README-checkpoint.md").write_text("scratch")
    return folder


def committed_files(commit: dict) -> dict[str, bytes]:
    files = {}
    for op in commit["ops"]:
        assert op["key"] == "file" and op["value"]["encoding"] == "base64", op
        files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
    return files


def test_push_sends_every_file_intact_and_never_shows_the_token(hub, export_dir, no_token, monkeypatch, capfd,
                                                                 caplog):
    # Debug logging everywhere (HTTP stack included) with request dumps on: the most that could ever be printed
    # or logged during a push, all of it checked for the token below.
    monkeypatch.setattr(constants, "HF_DEBUG", True)
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="huggingface_hub"):
        url = push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url, commit_message="tiny model")
    out, err = capfd.readouterr()

    assert hub.calls() == EXPECTED_CALLS
    assert url == f"{hub.url}/{REPO}/commit/{1:040x}"
    assert hub.created == [{"name": "tiny-reattend", "organization": "someone", "visibility": "private"}]
    [commit] = hub.commits
    assert commit["header"] == {"key": "header", "value": {"summary": "tiny model", "description": ""}}
    expected = {p.name: p.read_bytes() for p in export_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert set(expected) == {"config.json", "model.safetensors", "README.md", "modeling_reattend.py"}
    assert committed_files(commit) == expected
    assert "pushing 4 files" in err and REPO in err

    for request in hub.requests:
        assert request["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert caplog.records, "debug logging was expected to record the requests"
    for text in (out, err, caplog.text):
        assert TOKEN not in text


def test_push_takes_token_and_endpoint_from_the_environment(hub, export_dir, no_token, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    url = push_folder(export_dir, REPO, private=False)

    assert url.startswith(f"{hub.url}/{REPO}/commit/")
    assert hub.calls() == EXPECTED_CALLS
    assert hub.created[0]["visibility"] == "public"
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert TOKEN not in "".join(capfd.readouterr())


def test_push_refuses_a_missing_folder(hub, tmp_path):
    missing = tmp_path / "never-exported"
    with pytest.raises(FileNotFoundError, match="never-exported.*reattend export"):
        push_folder(missing, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_push_refuses_a_folder_without_weights(hub, export_dir):
    (export_dir / "model.safetensors").unlink()
    (export_dir / ".model.safetensors").write_bytes(b"half-copied")  # hidden files are never uploaded, so no weights
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights.*reattend export"):
        push_folder(export_dir, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_push_without_a_token_says_how_to_get_one(hub, export_dir, no_token):
    with pytest.raises(ValueError, match=r"HF_TOKEN.*hf auth login"):
        push_folder(export_dir, REPO, endpoint=hub.url)
    assert hub.requests == []
