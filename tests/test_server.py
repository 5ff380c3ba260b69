"""Finding the server: which URL, which model, which backend.

Without --base_url the usual local ports are probed; the model comes from GET /v1/models when
there is exactly one (none, several, an HTML page, bytes that are not UTF-8 or a refused key stop
the run with exit 3 or 4 before any chat request); identify_server() names the backend (vLLM,
SGLang, llama.cpp, Ollama, TGI, LM Studio, a gateway) without waiting on endpoints that hang.
"""

from __future__ import annotations

import http.server
import json
import socket
import time
from pathlib import Path

import pytest


import fakes  # noqa: E402
import nano_eval as ne  # noqa: E402
from fakes import (ByRow, FakeOpenAI, GSM, TASK_ARGS, _json_response, _text_response, assert_auth_failure,  # noqa: E402
                   bodies, cli, cli_env, error_line, error_lines, free_port, main_json, one_error, run_main)


# --------------------------------------------------------------------------------------------
# Probing local ports when there is no --base_url
# --------------------------------------------------------------------------------------------


class _PortHTTPServer(fakes._HTTPServer):
    def __init__(self, fake, port):
        self.fake = fake
        http.server.ThreadingHTTPServer.__init__(self, ("127.0.0.1", port), fakes._Handler)


class FakeOpenAIOnPort(FakeOpenAI):
    """FakeOpenAI bound to a chosen port (the base class picks a random one)."""

    def __init__(self, port, **kwargs):
        super().__init__(**kwargs)
        self._httpd.server_close()
        self._httpd = _PortHTTPServer(self, port)
        self.port, self.url = port, f"http://127.0.0.1:{port}"


PROBED = [8000, 8080, 30000, 11434, 1234]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_base_url_probing(tmp_path, gsm8k_answers):
    for i, port in enumerate(PROBED[:2]):
        if _bindable(port) and not any(_listening(p) for p in PROBED[:i]):
            break
    else:
        pytest.skip("ports 8000 and 8080 are both in use on 127.0.0.1")
    with FakeOpenAIOnPort(port, answers=gsm8k_answers) as server:
        proc = cli("--tasks", GSM, "--max_samples", "3", "--no_progress", env=cli_env(tmp_path))
        assert any(r["path"] == "/v1/models" for r in server.requests)
        assert len(server.chat_requests) == 3
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["config"]["base_url"] == f"http://127.0.0.1:{port}/v1"
    assert doc["results"][GSM]["metrics"]["exact_match"] == 1.0
    assert str(port) in proc.stderr  # it says which port it picked


def test_base_url_probing_nothing_answers(tmp_path):
    if any(_listening(p) for p in PROBED):
        pytest.skip("something listens on one of the probed ports")
    proc = cli("--tasks", GSM, env=cli_env(tmp_path))
    assert proc.returncode == 3
    line = error_line(proc.stderr)
    for port in PROBED:
        assert str(port) in line


def test_server_not_there_exits_3_quickly(isolated_env):
    port = free_port()
    start = time.monotonic()
    code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", f"http://127.0.0.1:{port}/v1",
                         "--max_samples", 5, "--no_progress", timeout=30)
    elapsed = time.monotonic() - start
    assert code == 3, err
    lines = error_lines(err)
    assert len(lines) == 1 and str(port) in lines[0] and "cannot reach" in lines[0]
    assert "Traceback" not in err and out == ""
    assert elapsed < 5


# --------------------------------------------------------------------------------------------
# The model, from GET /v1/models
# --------------------------------------------------------------------------------------------


def test_model_autodetected_when_one(isolated_env, capsys):
    with FakeOpenAI(models=["the-only-model"]) as server:
        code, doc, err = main_json(["--tasks", GSM, "--base_url", server.base_url, "--max_samples", "2"], capsys)
        assert code == 0, err
        assert {b["model"] for b in bodies(server)} == {"the-only-model"}
    assert doc["config"]["model"] == "the-only-model"


def test_given_model_skips_detection_among_several(isolated_env, capsys):
    with FakeOpenAI(models=["model-a", "model-b"]) as server:
        code, _, err = main_json(["--tasks", GSM, "--base_url", server.base_url, "--model", "model-b",
                             "--max_samples", "1"], capsys)
        assert code == 0, err
        assert bodies(server)[0]["model"] == "model-b"


@pytest.mark.parametrize("models", [[], ["model-a", "model-b", "model-c"]])
def test_model_autodetection_none_or_several_exit_3(models, isolated_env, capsys):
    with FakeOpenAI(models=models) as server:
        code, doc, err = main_json(["--tasks", GSM, "--base_url", server.base_url], capsys)
        assert server.chat_requests == []
    assert code == 3 and doc is None
    line = error_line(err)
    assert "--model" in line
    for m in models:
        assert m in line
    if not models:
        assert "no models" in line


HTML_PAGE = ("<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
             "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>")


class RawModels(FakeOpenAI):
    """A FakeOpenAI whose GET /v1/models answers with fixed bytes."""

    def __init__(self, body: bytes, status: int = 200, content_type: str = "application/json", **kwargs):
        super().__init__(**kwargs)
        self.models_answer = (status, body, content_type)

    def _route(self, request):
        if request["method"] == "GET" and request["path"] == "/v1/models":
            self._record(self.requests, request)
            status, body, content_type = self.models_answer
            return fakes._Response(status, body, {"Content-Type": content_type})
        return super()._route(request)


class LoadingModels(FakeOpenAI):
    """A FakeOpenAI whose GET /v1/models answers 503 (the model is still loading) to its first
    `loading` requests."""

    def __init__(self, loading: int, **kwargs):
        super().__init__(**kwargs)
        self.loading = loading

    def _route(self, request):
        if request["method"] == "GET" and request["path"] == "/v1/models" and self.loading > 0:
            self.loading -= 1
            self._record(self.requests, request)
            return _json_response(503, {"error": {"message": "Loading model"}})
        return super()._route(request)


def test_a_server_still_loading_its_model_is_waited_for(isolated_env, gsm8k_answers):
    with LoadingModels(2, answers=gsm8k_answers) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url)
        models_asked = [r for r in srv.requests if r["path"] == "/v1/models"]
        assert [r["status"] for r in models_asked][:3] == [503, 503, 200] and len(srv.chat_requests) == 2
    assert code == 0, err
    assert json.loads(out)["config"]["model"] == "fake-model"
    notices = [line for line in err.splitlines() if "answers 503" in line]
    assert len(notices) == 1 and "finish loading" in notices[0]  # said once, not once a second


@pytest.mark.parametrize("model", [[], ["--model", "fake-model"]], ids=["model-from-the-list", "model-given"])
def test_a_server_that_stays_loading_is_given_up(isolated_env, monkeypatch, capsys, model):
    """Given --model or not: nothing is sent to a server that never finishes loading."""
    monkeypatch.setattr(ne, "_LOADING_WAIT", 1.5)
    with LoadingModels(10 ** 6) as srv:
        code, doc, err = main_json([*TASK_ARGS, "--base_url", srv.base_url, *model], capsys)
        assert srv.chat_requests == []
    assert doc is None
    one_error(code, err, 3, "still answers HTTP 503 after 2 s", "not finished loading")


@pytest.mark.parametrize("status", [200, 502])
def test_html_page_instead_of_model_list(isolated_env, status):
    with RawModels(HTML_PAGE.encode(), status=status, content_type="text/html") as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url)
        assert srv.chat_requests == []
    line = one_error(code, err, 3, "/v1/models")
    assert "<html" not in line.lower()


@pytest.mark.parametrize("body", [b"\xff\xfe\x00garbage\x80\x81", b'{"data": [{"id": "m\xff\xfe"}]}'],
                         ids=["binary", "json-with-bad-bytes"])
def test_non_utf8_model_list(isolated_env, body):
    with RawModels(body) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url)
        assert srv.chat_requests == []
    one_error(code, err, 3, "/v1/models")


def test_wrong_api_key_exits_4(isolated_env):
    with FakeOpenAI(api_key="sk-right-key", responder=ByRow()) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 5,
                             "--api_key", "sk-wrong-key", "--no_progress")
        chat = len(srv.chat_requests)
    assert_auth_failure(code, out, err, "sk-wrong-key")
    assert chat == 0  # refused at GET /v1/models, before any chat request


# --------------------------------------------------------------------------------------------
# Server identity
# --------------------------------------------------------------------------------------------


LLAMA_PROPS = {
    "default_generation_settings": {"n_ctx": 4096, "params": {"temperature": 0.8, "top_k": 40}},
    "total_slots": 2, "model_path": "/models/qwen2.5-0.5b-instruct-q4_k_m.gguf",
    "chat_template": "{% for message in messages %}...", "build_info": "b5000-abc",
}

SGLANG_INFO = {"version": "0.4.6", "tp_size": 1, "model_path": "Qwen/Qwen2.5-0.5B-Instruct",
               "served_model_name": "Qwen/Qwen2.5-0.5B-Instruct", "port": 30000}

TGI_INFO = {"model_id": "Qwen/Qwen2.5-0.5B-Instruct", "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_input_tokens": 4095, "max_total_tokens": 4096, "router": "text-generation-router",
            "version": "3.0.0", "sha": "abc", "docker_label": None}


def models_route(owned_by: str, model: str = "m") -> dict:
    return {"/v1/models": (200, {"object": "list", "data": [{"id": model, "object": "model", "owned_by": owned_by}]})}


@pytest.mark.parametrize("routes, header, expected", [
    # vLLM: GET /version -> {"version": ...}; /v1/models owned_by "vllm"
    ({"/version": (200, {"version": "0.9.1"}), **models_route("vllm")}, "uvicorn",
     {"name": "vLLM", "version": "0.9.1", "evidence": "/version", "owned_by": "vllm", "server_header": "uvicorn"}),
    # vLLM whose /v1/models says something else: /version alone still names it
    ({"/version": (200, {"version": "0.9.1"})}, None, {"name": "vLLM", "version": "0.9.1", "evidence": "/version"}),
    # SGLang: GET /get_server_info (a big dict with version, tp_size, model_path, ...)
    ({"/get_server_info": (200, SGLANG_INFO), **models_route("sglang")}, "uvicorn",
     {"name": "SGLang", "version": "0.4.6", "evidence": "/get_server_info"}),
    # SGLang that also has GET /version
    ({"/get_server_info": (200, SGLANG_INFO), "/version": (200, {"version": "0.4.6"})}, None,
     {"name": "SGLang", "version": "0.4.6", "evidence": "/get_server_info"}),
    # llama.cpp server: GET /props (build_info, default_generation_settings, total_slots)
    ({"/props": (200, LLAMA_PROPS), **models_route("llamacpp")}, "llama.cpp",
     {"name": "llama.cpp", "version": "b5000-abc", "evidence": "/props"}),
    # Ollama: GET /api/version -> {"version": ...}; /v1/models owned_by "library"
    ({"/api/version": (200, {"version": "0.6.5"}), **models_route("library")}, None,
     {"name": "Ollama", "version": "0.6.5", "evidence": "/api/version"}),
    # TGI: GET /info (model_id, version, ...)
    ({"/info": (200, TGI_INFO), **models_route("tgi")}, "text-generation-inference",
     {"name": "TGI", "version": "3.0.0", "evidence": "/info"}),
    # only owned_by in /v1/models
    (models_route("vllm"), None, {"name": "vLLM", "version": None, "evidence": "owned_by", "owned_by": "vllm"}),
    (models_route("sglang"), None, {"name": "SGLang", "version": None, "evidence": "owned_by"}),
    (models_route("llamacpp"), None, {"name": "llama.cpp", "version": None, "evidence": "owned_by"}),
    (models_route("organization_owner"), None, {"name": "LM Studio", "version": None, "evidence": "owned_by"}),
    # nothing but the Server header
    ({}, "Werkzeug/3.0.1 Python/3.11.7",
     {"name": "Werkzeug/3.0.1 Python/3.11.7", "version": None, "evidence": "Server header", "owned_by": "fake",
      "server_header": "Werkzeug/3.0.1 Python/3.11.7"}),
], ids=["vllm", "vllm-no-owned-by", "sglang", "sglang+version", "llama.cpp", "ollama", "tgi", "owned_by-vllm",
        "owned_by-sglang", "owned_by-llamacpp", "owned_by-lmstudio", "server-header"])
def test_identify_server(routes, header, expected):
    with FakeOpenAI(extra_routes=routes, server_header=header) as srv:
        identity = ne._identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert {k: identity.get(k) for k in expected} == expected
    assert set(identity) >= {"name", "version", "evidence", "server_header", "owned_by"}


def test_identify_server_with_api_key_and_full_chat_url():
    # /v1/models needs the bearer: identify_server must send it to read owned_by
    with FakeOpenAI(api_key="sk-secret", extra_routes={"/version": (200, {"version": "0.8.0"})}) as srv:
        root, _ = ne._normalize_base_url(srv.base_url + "/chat/completions")
        identity = ne._identify_server(ne.APIConfig(url=root, api_key="sk-secret"))
        models_calls = [r for r in srv.requests if r["path"] == "/v1/models"]
    assert (identity["name"], identity["version"], identity["owned_by"]) == ("vLLM", "0.8.0", "fake")
    assert models_calls and all(r["headers"].get("Authorization") == "Bearer sk-secret" for r in models_calls)


def test_identify_server_dead_server_is_unknown():
    identity = ne._identify_server(ne.APIConfig(url=f"http://127.0.0.1:{free_port()}/v1", api_key=None), timeout=1.0)
    assert identity["name"] == "unknown"
    assert identity["version"] is None and identity["owned_by"] is None and identity["server_header"] is None


def test_identify_server_ignores_non_json_and_error_answers():
    # /version answering an HTML page or a 500 is not a vLLM
    routes = {"/version": (200, "<html><body>hello</body></html>"), "/props": (500, {"version": "1"}),
              "/api/version": (404, {"version": "0.6.5"})}
    with FakeOpenAI(extra_routes=routes, server_header="nginx") as srv:
        identity = ne._identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert (identity["name"], identity["version"], identity["evidence"]) == ("nginx", None, "Server header")


class CatchAll(FakeOpenAI):
    """Answers every GET outside /v1/ with 200 and the same body (a proxy, an SPA, LM Studio)."""

    def __init__(self, body, **kwargs):
        super().__init__(**kwargs)
        self.body = body

    def _route(self, request):
        if request["method"] == "GET" and not request["path"].startswith("/v1/"):
            self._record(self.requests, request)
            body = self.body(request["path"]) if callable(self.body) else self.body
            return _text_response(200, body) if isinstance(body, str) else _json_response(200, body)
        return super()._route(request)


@pytest.mark.parametrize("body", [
    "<!doctype html><html><body><div id=app></div></body></html>",  # a web UI served for every path
    {"status": "ok"},
    {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]},
    {"status": "ok", "version": "1.2.3"},  # a health document that happens to carry a version
], ids=["html", "status-ok", "models-doc", "health-doc"])
def test_catch_all_get_is_not_misidentified(body):
    with CatchAll(body, server_header="catchall/1.0") as srv:
        identity = ne._identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert identity["name"] == "catchall/1.0"
    assert identity["evidence"] == "Server header"
    assert identity["version"] is None


def test_lm_studio_style_catch_all_uses_owned_by():
    # LM Studio answers unknown endpoints with 200 {"error": "Unexpected endpoint or method. (GET /x)"}
    body = lambda path: {"error": f"Unexpected endpoint or method. (GET {path})"}  # noqa: E731
    with CatchAll(body, extra_routes=models_route("organization_owner")) as srv:
        identity = ne._identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert (identity["name"], identity["version"], identity["evidence"]) == ("LM Studio", None, "owned_by")


def test_catch_all_version_body_is_not_ollama():
    with CatchAll({"version": "1.2.3"}, server_header="catchall/1.0") as srv:
        identity = ne._identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert identity["name"] not in ("Ollama", "llama.cpp", "SGLang", "TGI")
    assert identity["evidence"] != "/api/version"


def test_identify_server_does_not_wait_for_a_hanging_endpoint():
    # one probe that never answers (timeout 1 s) must not stop the others from identifying the server
    class Hangs(FakeOpenAI):
        def _route(self, request):
            if request["path"] == "/info":
                self._closing.wait()
                return _json_response(200, {})
            return super()._route(request)

    with Hangs(extra_routes={"/version": (200, {"version": "0.9.1"})}) as srv:
        identity = ne._identify_server(ne.APIConfig(url=srv.base_url, api_key=None), timeout=1.0)
    assert (identity["name"], identity["version"]) == ("vLLM", "0.9.1")


@pytest.mark.parametrize("routes, header, name, version, evidence", [
    ({"/version": (200, {"version": "0.9.1"}), **models_route("vllm", "fake-model")}, None,
     "vLLM", "0.9.1", "/version"),
    ({"/props": (200, LLAMA_PROPS)}, None, "llama.cpp", "b5000-abc", "/props"),
    ({}, "my-gateway/2", "my-gateway/2", None, "Server header"),
])
def test_cli_records_server_identity(isolated_env, gsm8k_answers, capsys, routes, header, name, version, evidence):
    with FakeOpenAI(answers=gsm8k_answers, extra_routes=routes, server_header=header) as srv:
        code, out, err = run_main(["--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", "2",
                                   "--no_progress"], capsys)
    assert code == 0, err
    server = json.loads(out)["config"]["server"]
    assert (server["name"], server["version"], server["evidence"]) == (name, version, evidence)
    if header:
        assert server["server_header"] == header
    else:  # FakeOpenAI then sends http.server's default Server header
        assert server["server_header"].startswith("BaseHTTP/")
    assert server["owned_by"] == ("vllm" if name == "vLLM" else "fake")
    # the start line on stderr names it too
    label = f"({name} {version})" if version else f"({name})"
    assert label in err


# --------------------------------------------------------------------------------------------
# The real servers' own answers (tests/fixtures/servers, recorded from the pinned builds)
# --------------------------------------------------------------------------------------------

SERVERS = Path(__file__).parent / "fixtures" / "servers"


def recorded(name: str) -> tuple[dict, str | None]:
    """(GET routes answering as the real server did, its Server header)."""
    routes, header = {}, None
    for path in sorted((SERVERS / name).glob("get-*.json")):
        answer = json.loads(path.read_text("utf-8"))
        routes[answer["path"]] = (answer["status"], answer["body"] if answer["body"] is not None else "")
        header = answer["headers"].get("server", header)
    return routes, header


@pytest.mark.parametrize("name, expected", [
    ("max-26.7.0", {"name": "MAX", "version": "26.7.0", "evidence": "/version, /openapi.json", "owned_by": "",
                    "server_header": "uvicorn"}),
    ("vllm-0.32.0", {"name": "vLLM", "version": "0.32.0", "evidence": "/version", "owned_by": "vllm",
                     "server_header": "uvicorn"}),
    ("llama.cpp-11434", {"name": "llama.cpp", "version": "b0-unknown", "evidence": "/props", "owned_by": "llamacpp",
                         "server_header": "llama.cpp"}),
    ("sglang-0.5.23", {"name": "SGLang", "version": "0.5.23", "evidence": "/get_server_info", "owned_by": "sglang",
                       "server_header": "uvicorn"}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_identify_the_real_servers_from_their_recorded_answers(name, expected):
    """MAX is named MAX (not vLLM, whose /version looks the same), from what MAX really answers;
    SGLang (no /version: 404) from its /get_server_info (`pytest -k sglang` selects it)."""
    routes, header = recorded(name)
    with FakeOpenAI(extra_routes=routes, server_header=header) as srv:
        identity = ne._identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert {k: identity.get(k) for k in expected} == expected
