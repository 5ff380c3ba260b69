"""Tests of the test doubles in tests/fakes.py, talking to them with urllib and http.client only."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import (CHARTQA, Dataset, FakeDatasetsServer, FakeOpenAI, GSM8K, Reply, STRING, TINY_JPEG,  # noqa: E402
                   answers_responder, chartqa_dataset, fault_plan, free_port, image_size, list_of, make_png,
                   synthetic_chartqa_dataset)


# --- tiny HTTP client helpers ----------------------------------------------------------------


def fetch(url, body=None, headers=None, timeout=10):
    """(status, headers, body bytes) for a GET, or a POST of ``body`` as JSON; errors are returned too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={
        **({"Content-Type": "application/json"} if data else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def get_rows(server, headers=None, **params):
    query = "&".join(f"{k}={urllib.parse.quote(str(v), safe='')}" for k, v in params.items())
    status, response_headers, body = fetch(f"{server.url}/rows?{query}", headers=headers)
    return status, response_headers, json.loads(body)


def page(server, spec=GSM8K, **params):
    dataset, config, split = spec
    return get_rows(server, dataset=dataset, config=config, split=split, **params)


def capture(fixtures_dir, name):
    """The request bodies lm-eval sent, from tests/fixtures/lm_eval_requests/<name>."""
    return [r["body"] for r in json.loads((fixtures_dir / "lm_eval_requests" / name).read_text())]


# --- images ----------------------------------------------------------------------------------


def png_chunks(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    i, chunks = 8, []
    while i < len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        tag, payload = data[i + 4:i + 8], data[i + 8:i + 8 + length]
        (crc,) = struct.unpack(">I", data[i + 8 + length:i + 12 + length])
        assert crc == zlib.crc32(tag + payload), tag
        chunks.append((tag, payload))
        i += 12 + length
    return chunks


@pytest.mark.parametrize("rgba, channels, colour_type", [(False, 3, 2), (True, 4, 6)])
def test_make_png_is_a_well_formed_png(rgba, channels, colour_type):
    data = make_png(37, 21, seed=5, rgba=rgba)
    chunks = png_chunks(data)
    assert [tag for tag, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (37, 21, 8, colour_type, 0, 0, 0)
    pixels = zlib.decompress(chunks[1][1])
    stride = 1 + 37 * channels
    assert len(pixels) == 21 * stride
    assert all(pixels[y * stride] == 0 for y in range(21))  # filter byte of every scanline
    assert image_size(data) == (37, 21)


def test_make_png_depends_on_seed_only():
    assert make_png(64, 48, seed=1) == make_png(64, 48, seed=1)
    assert len({make_png(64, 48, seed=s) for s in range(20)}) == 20


def test_tiny_jpeg_is_a_well_formed_baseline_jpeg():
    data = TINY_JPEG
    assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9" and len(data) < 400
    i, markers = 2, []
    while data[i + 1] != 0xDA:  # walk the segments up to the start of scan
        assert data[i] == 0xFF
        markers.append(data[i + 1])
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    assert markers == [0xE0, 0xDB, 0xC0, 0xC4, 0xC4]
    sos_length = struct.unpack(">H", data[i + 2:i + 4])[0]
    assert data[i + 2 + 2:i + 2 + sos_length][:1] == b"\x03"  # 3 components in the scan
    assert data[i + 2 + sos_length:] == b"\x03\xff\xd9"  # entropy data, then EOI
    assert image_size(data) == (8, 8)


# --- FakeOpenAI ------------------------------------------------------------------------------


def test_models_endpoint_lists_the_models():
    with FakeOpenAI(models=["a", "b"]) as srv:
        status, headers, body = fetch(srv.base_url + "/models")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"object": "list", "data": [
            {"id": "a", "object": "model", "owned_by": "fake"},
            {"id": "b", "object": "model", "owned_by": "fake"}]}
    with FakeOpenAI(models=[]) as srv:
        assert json.loads(fetch(srv.base_url + "/models")[2]) == {"object": "list", "data": []}


def test_fake_openai_answers_lm_eval_gsm8k_requests(fake_openai, fixtures_dir):
    multiturn = capture(fixtures_dir, "gsm8k_cot_llama.multiturn.requests.json")[0]
    singleturn = capture(fixtures_dir, "variants/gsm8k_singleturn.requests.json")[0]
    for body in (multiturn, singleturn):
        status, _, raw = fetch(fake_openai.base_url + "/chat/completions", body)
        completion = json.loads(raw)
        assert status == 200
        assert completion["object"] == "chat.completion" and completion["model"] == body["model"]
        assert completion["choices"] == [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "Let me think. The final answer is 18"}}]
        usage = completion["usage"]
        assert usage["completion_tokens"] == 8  # words in the content
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    unknown = {"model": "m", "messages": [{"role": "user", "content": "Problem: 2+2?\nYour response should end with"}]}
    content = json.loads(fetch(fake_openai.base_url + "/chat/completions", unknown)[2])["choices"][0]["message"]["content"]
    assert content == "The final answer is 0"
    assert [r["body"] for r in fake_openai.chat_requests] == [multiturn, singleturn, unknown]


def test_answers_responder_reads_chartqa_requests(fixtures_dir):
    body = capture(fixtures_dir, "chartqa.real5.requests.json")[0]
    respond = answers_responder({"How many food item is shown in the bar graph?": "14"})
    assert respond(body, 0).endswith("\nFinal Answer: 14")
    assert answers_responder({})(body, 0) == "The final answer is 0"


def test_api_key_is_required_when_set():
    with FakeOpenAI(api_key="sk-test") as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, _, body = fetch(srv.base_url + "/models", headers=headers)
            assert status == 401
            assert json.loads(body) == {"error": {"message": "Invalid API key", "type": "invalid_request_error"}}
        assert fetch(srv.base_url + "/models", headers={"Authorization": "Bearer sk-test"})[0] == 200
        assert srv.requests[-1]["headers"]["authorization"] == "Bearer sk-test"


def test_reply_options_shape_the_response():
    plan = {
        0: Reply(status=503, headers={"Retry-After": "2"}),
        1: Reply(json_body={"weird": True}),
        2: Reply(status=502, raw=b"<html>Bad gateway</html>"),
        3: Reply(content=None, reasoning_content="thinking...", finish_reason="length", usage=False),
        4: Reply(content="ok", reasoning="why", usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}),
    }
    with FakeOpenAI(responder=fault_plan(plan)) as srv:
        url, body = srv.base_url + "/chat/completions", {"model": "m", "messages": []}
        status, headers, raw = fetch(url, body)
        assert (status, headers["Retry-After"]) == (503, "2")
        assert json.loads(raw)["error"]["type"] == "server_error"
        assert fetch(url, body)[2] == b'{"weird":true}'
        status, headers, raw = fetch(url, body)
        assert (status, raw) == (502, b"<html>Bad gateway</html>") and headers["Content-Type"].startswith("text/html")
        completion = json.loads(fetch(url, body)[2])
        assert completion["choices"][0] == {"index": 0, "finish_reason": "length", "message": {
            "role": "assistant", "content": None, "reasoning_content": "thinking..."}}
        assert "usage" not in completion
        completion = json.loads(fetch(url, body)[2])
        assert completion["choices"][0]["message"] == {"role": "assistant", "content": "ok", "reasoning": "why"}
        assert completion["usage"]["total_tokens"] == 2
        assert fetch(url, body)[0] == 200  # past the plan: the fallback responder


def test_responder_gets_the_request_index_and_errors_become_500s():
    seen = []

    def responder(body, n):
        seen.append(n)
        if n == 1:
            raise RuntimeError("boom")
        return "fine"

    with FakeOpenAI(responder=responder) as srv:
        statuses = [fetch(srv.base_url + "/chat/completions", {"messages": []})[0] for _ in range(3)]
        assert statuses == [200, 500, 200] and seen == [0, 1, 2]
        assert "RuntimeError: boom" in srv.errors[0]
        assert fetch(srv.base_url + "/chat/completions", body="not an object")[0] == 400


def test_dropped_connection_gives_the_client_no_response():
    with FakeOpenAI(responder=lambda body, n: Reply(drop=True)) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("POST", "/v1/chat/completions", body=b"{}", headers={"Content-Type": "application/json"})
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse()
        assert srv.chat_requests[0]["status"] is None


def test_close_unblocks_a_hanging_request():
    srv = FakeOpenAI(responder=lambda body, n: Reply(hang=True)).start()
    outcome = []

    def client():
        try:
            fetch(srv.base_url + "/chat/completions", {"messages": []}, timeout=30)
            outcome.append("answered")
        except (OSError, http.client.HTTPException) as error:
            outcome.append(type(error).__name__)

    thread = threading.Thread(target=client)
    thread.start()
    while srv.in_flight == 0:
        time.sleep(0.01)
    started = time.monotonic()
    srv.close()
    thread.join(5)
    assert not thread.is_alive() and outcome and outcome != ["answered"]
    assert time.monotonic() - started < 3
    assert srv.in_flight == 0


def test_delay_lets_requests_overlap_and_max_in_flight_counts_them():
    with FakeOpenAI(delay=0.3) as srv:
        threads = [threading.Thread(target=fetch, args=(srv.base_url + "/chat/completions", {"messages": []}))
                   for _ in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.max_in_flight == 4 and srv.in_flight == 0
        assert 0.3 <= time.monotonic() - started < 1.0
    with FakeOpenAI(responder=lambda body, n: Reply(content="x", delay=0.05)) as srv:
        for _ in range(3):
            fetch(srv.base_url + "/chat/completions", {"messages": []})
        assert srv.max_in_flight == 1


def test_keep_alive_connections_are_counted():
    with FakeOpenAI() as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", body=b'{"messages": []}')
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("Content-Length")
            response.read()
        assert srv.connections == 1
        fetch(srv.base_url + "/models")  # urllib opens a new connection per request
        assert srv.connections == 2 and len(srv.requests) == 4
        started = time.monotonic()
    # Leaving the block closed the server although `conn` still holds an idle keep-alive connection.
    assert time.monotonic() - started < 1
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", "/v1/models")
        conn.getresponse()
    conn.close()


def test_extra_routes_and_server_header():
    routes = {"/version": (200, {"version": "0.9.1"}), "/v1/models": (404, "no such route")}
    with FakeOpenAI(extra_routes=routes, server_header="vllm-fake/1.0") as srv:
        status, headers, body = fetch(srv.url + "/version")
        assert (status, json.loads(body), headers["Server"]) == (200, {"version": "0.9.1"}, "vllm-fake/1.0")
        status, headers, body = fetch(srv.base_url + "/models")
        assert (status, body) == (404, b"no such route")
        assert fetch(srv.url + "/nothing")[0] == 404


def test_free_port_is_unused():
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{free_port()}/", timeout=2)


# --- FakeDatasetsServer: /rows ----------------------------------------------------------------


def test_rows_pages_through_gsm8k(fake_hf, fixtures_dir):
    lines = (fixtures_dir / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    seen = []
    for offset in range(0, 1400, 100):
        status, headers, body = page(fake_hf, offset=offset, length=100)
        assert status == 200
        assert re.fullmatch(r"[0-9a-f]{40}", headers["X-Revision"]) and headers["Cache-Control"] == "max-age=120"
        assert body["num_rows_total"] == 1319 and body["num_rows_per_page"] == 100 and body["partial"] is False
        assert body["features"] == [
            {"feature_idx": 0, "name": "question", "type": {"dtype": "string", "_type": "Value"}},
            {"feature_idx": 1, "name": "answer", "type": {"dtype": "string", "_type": "Value"}}]
        for i, row in enumerate(body["rows"]):
            assert row["row_idx"] == offset + i and row["truncated_cells"] == []
            assert list(row["row"]) == ["question", "answer"]
        seen += [row["row"] for row in body["rows"]]
    assert len(seen) == 1319 and seen == [json.loads(line) for line in lines]
    assert len(page(fake_hf, offset=1300)[2]["rows"]) == 19
    assert len(page(fake_hf)[2]["rows"]) == 100  # length defaults to 100
    assert page(fake_hf, offset=5000)[2]["rows"] == []
    assert page(fake_hf, length=0)[2]["rows"] == []


def test_rows_returns_min_of_length_and_what_is_left():
    spec = Dataset([("text", STRING)], [{"text": str(i)} for i in range(50)])
    with FakeDatasetsServer({("d", "c", "s"): spec}) as srv:

        @settings(max_examples=60, deadline=None)
        @given(offset=st.integers(0, 60), length=st.integers(0, 100))
        def check(offset, length):
            status, _, body = get_rows(srv, dataset="d", config="c", split="s", offset=offset, length=length)
            assert status == 200
            assert [r["row_idx"] for r in body["rows"]] == list(range(offset, min(offset + length, 50)))
            assert [r["row"]["text"] for r in body["rows"]] == [str(i) for i in range(offset, min(offset + length, 50))]

        check()


GSM8K_PARAMS = {"dataset": "openai/gsm8k", "config": "main", "split": "test"}


@pytest.mark.parametrize("params, message, code", [
    ({}, "Parameter 'dataset' is required", "MissingRequiredParameter"),
    ({"dataset": " ", "config": "main"}, "Parameter 'dataset' is required", "MissingRequiredParameter"),
    ({"dataset": "openai/gsm8k", "offset": "x"}, "Parameter 'config' is required", "MissingRequiredParameter"),
    ({**GSM8K_PARAMS, "split": ""}, "Parameter 'split' is required", "MissingRequiredParameter"),
    ({**GSM8K_PARAMS, "offset": "x", "length": "y"}, "Parameter 'offset' must be integer", "InvalidParameter"),
    ({**GSM8K_PARAMS, "offset": "-1"}, "Parameter 'offset' must be positive", "InvalidParameter"),
    ({**GSM8K_PARAMS, "length": "1.5"}, "Parameter 'length' must be integer", "InvalidParameter"),
    ({**GSM8K_PARAMS, "length": "-3"}, "Parameter 'length' must be positive", "InvalidParameter"),
    ({**GSM8K_PARAMS, "length": "101"}, "Parameter 'length' must not be greater than 100", "InvalidParameter"),
    ({**GSM8K_PARAMS, "dataset": "nobody/nothing", "length": "101"},
     "Parameter 'length' must not be greater than 100", "InvalidParameter"),  # validation before auth
])
def test_rows_validation_errors(fake_hf, params, message, code):
    status, headers, body = get_rows(fake_hf, **params)
    assert (status, body, headers["X-Error-Code"]) == (422, {"error": message}, code)
    assert headers["Cache-Control"] == "max-age=10"


def test_unknown_dataset_config_and_split(fake_hf):
    status, headers, body = page(fake_hf, ("nobody/nothing", "main", "test"))
    assert (status, headers["X-Error-Code"]) == (401, "ExternalUnauthenticatedError")
    assert body["error"].startswith("The dataset does not exist, or is not accessible without authentication")
    status, headers, _ = page(fake_hf, ("nobody/nothing", "main", "test"), headers={"Authorization": "Bearer hf_x"})
    assert (status, headers["X-Error-Code"]) == (404, "ExternalAuthenticatedError")
    status, headers, body = page(fake_hf, ("openai/gsm8k", "nope", "test"))
    assert (status, headers["X-Error-Code"], body) == (404, "ResponseNotFound", {"error": "Not found."})
    status, headers, body = page(fake_hf, ("openai/gsm8k", "main", "validation"))
    assert (status, headers["X-Error-Code"], body["error"]) == (500, "UnexpectedApiError", "Unexpected error.")
    assert body["cause_exception"] == "EmptyParquetMetadataError"


def test_requests_are_recorded_with_query_and_headers(fake_hf):
    fetch(f"{fake_hf.url}/rows?dataset=openai%2Fgsm8k&config=main&split=test&offset=0&length=2",
          headers={"Authorization": "Bearer hf_secret", "User-Agent": "nano-eval-test"})
    [request] = fake_hf.requests
    assert request["method"] == "GET" and request["path"] == "/rows" and request["status"] == 200
    assert request["query"] == {"dataset": "openai/gsm8k", "config": "main", "split": "test", "offset": "0", "length": "2"}
    assert request["headers"]["Authorization"] == "Bearer hf_secret"
    assert request["headers"]["user-agent"] == "nano-eval-test"
    assert fake_hf.rows_requests == [request] and fake_hf.asset_requests == []


@pytest.mark.parametrize("list_style, label_type", [
    ("List", {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"}),
    ("Sequence", {"feature": {"dtype": "string", "_type": "Value"}, "length": -1, "_type": "Sequence"}),
    ("legacy", [{"dtype": "string", "_type": "Value"}]),
])
def test_chartqa_features_in_each_list_style(chartqa_spec, list_style, label_type):
    with FakeDatasetsServer({CHARTQA: chartqa_spec}, list_style=list_style) as srv:
        body = page(srv, CHARTQA, length=1)[2]
    assert body["features"] == [
        {"feature_idx": 0, "name": "image", "type": {"_type": "Image"}},
        {"feature_idx": 1, "name": "query", "type": {"dtype": "string", "_type": "Value"}},
        {"feature_idx": 2, "name": "label", "type": label_type},
        {"feature_idx": 3, "name": "human_or_machine", "type": {"names": ["human", "machine"], "_type": "ClassLabel"}}]
    assert list_of(STRING) == {"feature": STRING, "_type": "List"}


# --- FakeDatasetsServer: images ----------------------------------------------------------------

SRC = re.compile(r"http://127\.0\.0\.1:(\d+)/cached-assets/HuggingFaceM4/ChartQA/--/([0-9a-f]{40})/--/default/test/"
                 r"(\d+)/image/image\.(png|jpg)\?Expires=(\d+)&Signature=[^&]+&Key-Pair-Id=K")


def test_chartqa_rows_link_to_the_fixture_images(fake_hf, fixtures_dir):
    lines = [json.loads(line) for line in (fixtures_dir / "chartqa" / "rows.jsonl").read_text().splitlines()]
    status, _, body = page(fake_hf, CHARTQA)
    assert status == 200 and body["num_rows_total"] == 40 and len(body["rows"]) == 40
    for row, line in zip(body["rows"], lines):
        cells = row["row"]
        assert (cells["query"], cells["label"], cells["human_or_machine"]) == (
            line["query"], line["label"], line["human_or_machine"])
        if line["image"] is None:
            assert cells["image"] is None
            continue
        image = cells["image"]
        port, revision, row_idx, ext, expires = SRC.fullmatch(image["src"]).groups()
        assert (int(port), revision, int(row_idx), ext) == (fake_hf.port, fake_hf.revision, row["row_idx"], "png")
        assert 3500 < int(expires) - time.time() <= 3600
        assert (image["width"], image["height"]) == (line["width"], line["height"])
    assert [r["row_idx"] for r in body["rows"] if r["row"]["image"] is None] == [16, 17]

    status, headers, data = fetch(body["rows"][0]["row"]["image"]["src"])
    assert (status, headers["Content-Type"]) == (200, "image/png")
    assert hashlib.sha256(data).hexdigest() == lines[0]["image_sha256"]
    assert "authorization" not in fake_hf.asset_requests[0]["headers"]
    assert len(fake_hf.requests) == 1  # image downloads are recorded apart from API calls


def test_jpeg_rows_serve_a_jpeg(fixtures_dir):
    spec = chartqa_dataset(fixtures_dir / "chartqa" / "rows.jsonl", jpeg_rows={1})
    with FakeDatasetsServer({CHARTQA: spec}) as srv:
        image = page(srv, CHARTQA, offset=1, length=1)[2]["rows"][0]["row"]["image"]
        assert SRC.fullmatch(image["src"]).group(4) == "jpg" and (image["width"], image["height"]) == (8, 8)
        status, headers, data = fetch(image["src"])
    assert (status, headers["Content-Type"], data) == (200, "image/jpeg", TINY_JPEG)


def test_expired_or_tampered_image_urls_get_403(chartqa_spec):
    with FakeDatasetsServer({CHARTQA: chartqa_spec}, expire_seconds=-1) as srv:
        src = page(srv, CHARTQA, length=1)[2]["rows"][0]["row"]["image"]["src"]
        status, headers, body = fetch(src)
        assert (status, headers["Content-Type"]) == (403, "text/xml") and b"AccessDenied" in body

    with FakeDatasetsServer({CHARTQA: chartqa_spec}) as srv:
        old = page(srv, CHARTQA, length=1)[2]["rows"][0]["row"]["image"]["src"]
        assert fetch(old)[0] == 200
        srv.expire_now()
        assert fetch(old)[0] == 403
        fresh = page(srv, CHARTQA, length=1)[2]["rows"][0]["row"]["image"]["src"]
        assert fetch(fresh)[0] == 200
        expires = re.search(r"Expires=(\d+)", fresh).group(1)
        assert fetch(fresh.replace(expires, str(int(expires) + 100)))[0] == 403
        assert fetch(fresh.replace("/image.png", "/image.jpg"))[0] == 403
        assert [r["status"] for r in srv.asset_requests] == [200, 403, 200, 403, 403]


def test_synthetic_chartqa_dataset_serves_distinct_pngs():
    with FakeDatasetsServer({CHARTQA: synthetic_chartqa_dataset(300)}) as srv:
        pages = [page(srv, CHARTQA, offset=o)[2] for o in (0, 100, 200)]
        rows = [row for p in pages for row in p["rows"]]
        assert pages[0]["num_rows_total"] == 300 and [r["row_idx"] for r in rows] == list(range(300))
        assert (rows[0]["row"]["image"]["width"], rows[0]["row"]["image"]["height"]) == (400, 300)
        images = [fetch(rows[i]["row"]["image"]["src"])[2] for i in (0, 1, 299)]
    assert len(set(images)) == 3 and all(image_size(img) == (400, 300) for img in images)
    assert rows[7]["row"]["label"] == ["7"] and "synthetic chart 7?" in rows[7]["row"]["query"]


def test_splits_endpoint(fake_hf):
    status, _, body = fetch(f"{fake_hf.url}/splits?dataset=openai/gsm8k")
    assert status == 200
    assert json.loads(body) == {"splits": [{"dataset": "openai/gsm8k", "config": "main", "split": "test"}],
                                "pending": [], "failed": []}
    assert fetch(f"{fake_hf.url}/splits?dataset=nobody/nothing")[0] == 401


# --- FakeDatasetsServer: faults ---------------------------------------------------------------


def test_not_ready_fault_applies_n_times_then_clears(fake_hf):
    fake_hf.faults.append({"path": "/rows", "status": 500, "error_code": "ResponseNotReady", "times": 2})
    for _ in range(2):
        status, headers, body = page(fake_hf, length=1)
        assert (status, headers["X-Error-Code"]) == (500, "ResponseNotReady")
        assert body == {"error": "The server is busier than usual and the response is not ready yet. "
                                 "Please retry later."}
    assert page(fake_hf, length=1)[0] == 200 and fake_hf.faults == []
    assert [r["status"] for r in fake_hf.requests] == [500, 500, 200]


def test_rate_limit_and_plain_500_faults(fake_hf):
    fake_hf.faults += [{"path": "/rows", "status": 429, "headers": {"Retry-After": "1"}},
                       {"path": "/rows", "status": 500}]
    status, headers, body = page(fake_hf, length=1)
    assert (status, headers["Retry-After"], body) == (429, "1", {"error": "too many requests"})
    assert "X-Error-Code" not in headers
    status, headers, raw = fetch(f"{fake_hf.url}/rows?dataset=openai/gsm8k&config=main&split=test")
    assert (status, raw, headers["Content-Type"]) == (500, b"Internal Server Error", "text/plain; charset=utf-8")


def test_faults_can_target_a_page_an_image_or_drop_the_connection(fake_hf):
    fake_hf.faults.append({"path": "/rows", "match": {"offset": 100}, "status": 502, "body": "<html>bad gateway</html>"})
    assert page(fake_hf, offset=0, length=1)[0] == 200
    assert fetch(f"{fake_hf.url}/rows?dataset=openai/gsm8k&config=main&split=test&offset=100")[0] == 502

    src = page(fake_hf, CHARTQA, length=1)[2]["rows"][0]["row"]["image"]["src"]
    fake_hf.faults.append({"path": "/cached-assets", "status": 503, "body": b"busy"})
    status, _, body = fetch(src)
    assert (status, body) == (503, b"busy")
    assert fetch(src)[0] == 200

    fake_hf.faults.append({"drop": True})
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(src, timeout=5)
    assert fetch(src)[0] == 200


# --- conftest fixtures ------------------------------------------------------------------------


def test_isolated_env_points_at_the_fake_hf(isolated_env, fake_hf, tmp_path):
    assert os.environ["NANO_EVAL_DATASETS_SERVER"] == fake_hf.url
    assert os.environ["NANO_EVAL_DATA_DIR"] == str(isolated_env) == str(tmp_path / "data")
    assert "OPENAI_API_KEY" not in os.environ and "HF_TOKEN" not in os.environ


def test_fixture_files_match_their_readme(fixtures_dir):
    readme = (fixtures_dir / "README.md").read_text()
    files = [p for p in fixtures_dir.rglob("*") if p.is_file() and p.name != "README.md"]
    assert len(list((fixtures_dir / "chartqa" / "images").iterdir())) <= 20
    for path in files:
        top = path.relative_to(fixtures_dir).parts[0]
        assert top in readme, path
    for line in (fixtures_dir / "chartqa" / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["image"]:
            data = (fixtures_dir / "chartqa" / row["image"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
