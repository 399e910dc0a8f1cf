"""Service settings: the access log of `serve` (a real uvicorn on 127.0.0.1), and config errors
that name the key and the expected type."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from search.app.config import load_service_config
from tests.conftest import ROOT, free_port

SERVE = ("import sys; from pathlib import Path; from search.app.config import load_service_config; "
         "from search.app.service import serve; "
         "config = load_service_config(Path(sys.argv[1]), Path(sys.argv[2]) if sys.argv[2] else None, "
         "{'access_log': None if sys.argv[3] == 'default' else sys.argv[3] == 'on'}); "
         "serve(config, '127.0.0.1', int(sys.argv[4]))")


def _serve_output(home: Path, config: Path | None, access_log: str) -> str:
    """Start `serve` (no index: /health still answers), send two requests, stop it, return its output."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(home), str(config or ""), access_log, str(port)],
                               cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.time() < deadline, process.stdout.read() if process.stdout else ""
                time.sleep(0.2)
        httpx.get(f"http://127.0.0.1:{port}/documents/nope", timeout=5)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    return output


def test_serve_writes_an_access_log_by_default_and_the_config_turns_it_off(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    output = _serve_output(home, None, "default")
    assert '"GET /health HTTP/1.1" 200' in output and '"GET /documents/nope HTTP/1.1" 503' in output
    off = tmp_path / "off.toml"
    off.write_text("access_log = false\n")
    quiet = _serve_output(home, off, "default")
    assert "GET /health" not in quiet and "Uvicorn running" in quiet
    assert '"GET /health HTTP/1.1" 200' in _serve_output(home, off, "on")  # the flag's override wins over the file


def test_access_log_override_and_file(tmp_path):
    path = tmp_path / "service.toml"
    path.write_text("access_log = false\n")
    assert load_service_config(tmp_path, path).access_log is False
    assert load_service_config(tmp_path, path, {"access_log": None}).access_log is False  # flag not given
    assert load_service_config(tmp_path, path, {"access_log": True}).access_log is True
    assert load_service_config(tmp_path).access_log is True


@pytest.mark.parametrize("text, message", [
    ('[exploration]\nepsilon = "lots"\n', 'exploration.epsilon: expected a number, got "lots"'),
    ('[exploration]\nprotected_top = 1.5\n', "exploration.protected_top: expected an integer, got 1.5"),
    ('[exploration]\nmode = 3\n', "exploration.mode: expected a string, got 3"),
    ('[exploration]\nepsilom = 0.1\n', "exploration.epsilom: unknown key; known: epsilon"),
    ('rerank_window = "x"\n', 'rerank_window: expected an integer, got "x"'),
    ('access_log = "yes"\n', 'access_log: expected true or false, got "yes"'),
    ('threads = true\n', "threads: expected an integer, got true"),
    ('index = 3\n', "index: expected a string, got 3"),
    ('exploration = 3\n', "[exploration] must be a table, got 3"),
    ('[experiments]\ninterleave_share = "half"\n', 'experiments.interleave_share: expected a number, got "half"'),
    ('[fusion.x]\nmethod = 1\n', "fusion.x.method: expected a string, got 1"),
    ('[fusion.x]\nweight = 1\n', "fusion.x.weight: unknown key"),
    ('fusion = 2\n', "[fusion] must hold one table per index, got 2"),
    ('trusted_origins = "https://a.example"\n', 'trusted_origins: expected a list of strings, got "https://a.example"'),
    ('trusted_origins = ["ftp://a.example"]\n', "trusted_origins: 'ftp://a.example' is not an origin"),
    ('trusted_origins = ["https://a.example/judge"]\n', "trusted_origins: 'https://a.example/judge' is not an origin"),
])
def test_config_errors_name_the_key_and_the_expected_type(tmp_path, text, message):
    path = tmp_path / "service.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as raised:
        load_service_config(tmp_path, path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)
    assert "TypeError" not in str(raised.value) and "__init__" not in str(raised.value)


def test_trusted_origins_are_normalised_as_browsers_send_them(tmp_path):
    path = tmp_path / "service.toml"
    path.write_text('trusted_origins = ["HTTPS://Search.Example:8443/", "http://10.0.0.5"]\n')
    assert load_service_config(tmp_path, path).trusted_origins == ("https://search.example:8443", "http://10.0.0.5")
    assert load_service_config(tmp_path).trusted_origins == ()
