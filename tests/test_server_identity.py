"""Server identity (issue 5): identify_server() and config.server in the results of a CLI run.

Each fake exposes only the endpoint the real backend has, with the body shape that backend
returns (vLLM GET /version, SGLang GET /get_server_info, llama.cpp GET /props, Ollama
GET /api/version, TGI GET /info), everything else answering 404 as FakeOpenAI does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) does not put the repo on sys.path
    sys.path.insert(0, str(ROOT))

import nano_eval as ne  # noqa: E402
from fakes import run_main
from fakes import FakeOpenAI, _json_response, _text_response, free_port  # noqa: E402

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
        identity = ne.identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert {k: identity.get(k) for k in expected} == expected
    assert set(identity) >= {"name", "version", "evidence", "server_header", "owned_by"}


def test_identify_server_with_api_key_and_full_chat_url():
    # /v1/models needs the bearer: identify_server must send it to read owned_by
    with FakeOpenAI(api_key="sk-secret", extra_routes={"/version": (200, {"version": "0.8.0"})}) as srv:
        root, _ = ne.normalize_base_url(srv.base_url + "/chat/completions")
        identity = ne.identify_server(ne.APIConfig(url=root, api_key="sk-secret"))
        models_calls = [r for r in srv.requests if r["path"] == "/v1/models"]
    assert (identity["name"], identity["version"], identity["owned_by"]) == ("vLLM", "0.8.0", "fake")
    assert models_calls and all(r["headers"].get("Authorization") == "Bearer sk-secret" for r in models_calls)


def test_identify_server_dead_server_is_unknown():
    identity = ne.identify_server(ne.APIConfig(url=f"http://127.0.0.1:{free_port()}/v1", api_key=None), timeout=1.0)
    assert identity["name"] == "unknown"
    assert identity["version"] is None and identity["owned_by"] is None and identity["server_header"] is None


def test_identify_server_ignores_non_json_and_error_answers():
    # /version answering an HTML page or a 500 is not a vLLM
    routes = {"/version": (200, "<html><body>hello</body></html>"), "/props": (500, {"version": "1"}),
              "/api/version": (404, {"version": "0.6.5"})}
    with FakeOpenAI(extra_routes=routes, server_header="nginx") as srv:
        identity = ne.identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
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
        identity = ne.identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert identity["name"] == "catchall/1.0"
    assert identity["evidence"] == "Server header"
    assert identity["version"] is None


def test_lm_studio_style_catch_all_uses_owned_by():
    # LM Studio answers unknown endpoints with 200 {"error": "Unexpected endpoint or method. (GET /x)"}
    body = lambda path: {"error": f"Unexpected endpoint or method. (GET {path})"}  # noqa: E731
    with CatchAll(body, extra_routes=models_route("organization_owner")) as srv:
        identity = ne.identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
    assert (identity["name"], identity["version"], identity["evidence"]) == ("LM Studio", None, "owned_by")


def test_catch_all_version_body_is_not_ollama():
    with CatchAll({"version": "1.2.3"}, server_header="catchall/1.0") as srv:
        identity = ne.identify_server(ne.APIConfig(url=srv.base_url, api_key=None))
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
        identity = ne.identify_server(ne.APIConfig(url=srv.base_url, api_key=None), timeout=1.0)
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
