"""Datasets: rows and images, fetched once and verified ever after.

The datasets-server client pages through /rows concurrently, fetching only the pages needed first,
retrying 429/5xx/not-ready answers and sending HF_TOKEN to the API only; the verified cache keeps
each page with its sha256 in a manifest, so a damaged, truncated or lying cache is refetched and a
complete cache (the shipped gsm8k split) needs no datasets-server; chartqa images are downloaded
only when needed, refetched when their signed URL expired or their cached bytes are damaged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import shutil
import sys
from pathlib import Path

import pytest

from fakes import FIXTURES, GSM8K_ROWS, ROOT  # noqa: E402

import nano_eval  # noqa: E402
from fakes import (CAPTURES, CHARTQA, Dataset, FakeDatasetsServer, FakeOpenAI, GSM8K, GSM_ARGS, NANO_EVAL,  # noqa: E402
                   TINY_JPEG, URL, answers_responder, chart_row_of, chartqa_cache, cli, cli_env, client, error_line,
                   image_bytes_of, image_of, image_url, interrupt_while_waiting, make_png, read_log_by_row,
                   run_chartqa, ByRow, GSM, one_error)
from nano_eval import (APIConfig, _DatasetCache, DatasetError, TASKS, _load_rows, _resolve_data_dir, run_task,  # noqa: E402
                       _sniff_image)


# --------------------------------------------------------------------------------------------
# The datasets-server client
# --------------------------------------------------------------------------------------------


GSM_REF = TASKS["gsm8k_cot_llama"].data


class SlowRows(FakeDatasetsServer):
    """/rows answers after a delay; counts how many are answered at once."""

    def __init__(self, *args, row_delay=0.15, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_delay = row_delay
        self.rows_in_flight = self.max_rows_in_flight = 0

    def _rows(self, request):
        with self._lock:
            self.rows_in_flight += 1
            self.max_rows_in_flight = max(self.max_rows_in_flight, self.rows_in_flight)
        try:
            self._sleep(self.row_delay)
            return super()._rows(request)
        finally:
            with self._lock:
                self.rows_in_flight -= 1


def assert_gsm8k_rows(rows, n):
    assert [r["row_idx"] for r in rows] == list(range(n))
    assert [r["row"] for r in rows] == GSM8K_ROWS[:n]


def load(ref, count, roots, server, image_column=None, token=None):
    return asyncio.run(_load_rows(ref, count, [Path(r) for r in roots], image_column, client(server, token)))


@pytest.fixture
def no_bundled(monkeypatch, tmp_path):
    """Hide the data/ shipped beside nano_eval.py, so gsm8k has to come from the datasets-server."""
    monkeypatch.setattr(nano_eval, "_BUNDLED_DATA", tmp_path / "no-bundled-data")
    for name in ("HF_TOKEN", "NANO_EVAL_DATA_DIR", "NANO_EVAL_DATASETS_SERVER"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache"


def offsets(server) -> list[int]:
    return [int(r["query"]["offset"]) for r in server.rows_requests]


def stray_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_all_pages_fetched_concurrently(no_bundled, gsm8k_spec):
    with SlowRows({GSM8K: gsm8k_spec}) as server:
        rows, cache = load(GSM_REF, None, [no_bundled], server)
        assert sorted(offsets(server)) == list(range(0, 1400, 100))  # 14 pages, each once
        assert {r["query"]["length"] for r in server.rows_requests} == {"100"}
        assert server.max_rows_in_flight > 1  # pages after the first overlap
    assert_gsm8k_rows(rows, 1319)
    manifest = json.loads((no_bundled / "openai__gsm8k" / "main" / "test" / "manifest.json").read_text())
    assert manifest["num_rows_total"] == 1319
    assert len(manifest["pages"]) == 14
    assert manifest["pages"]["1300"]["rows"] == 19  # the last, partial page
    assert stray_files(no_bundled) == []


def test_only_needed_pages_then_the_rest(no_bundled, gsm8k_spec):
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as server:
        rows, _ = load(GSM_REF, 250, [no_bundled], server)
        assert_gsm8k_rows(rows, 250)
        assert sorted(offsets(server)) == [0, 100, 200]
        rows, _ = load(GSM_REF, None, [no_bundled], server)
        assert_gsm8k_rows(rows, 1319)
        assert sorted(offsets(server)) == [0, 100, 200] + list(range(300, 1400, 100))


def test_429_retry_after_then_success(no_bundled, gsm8k_spec):
    faults = [{"path": "/rows", "match": {"offset": "100"}, "status": 429, "headers": {"Retry-After": "1"}}]
    with FakeDatasetsServer({GSM8K: gsm8k_spec}, faults=faults) as server:
        rows, _ = load(GSM_REF, 200, [no_bundled], server)
        hits = [r for r in server.rows_requests if r["query"]["offset"] == "100"]
    assert_gsm8k_rows(rows, 200)
    assert [h["status"] for h in hits] == [429, 200]
    assert hits[1]["time"] - hits[0]["time"] >= 0.9  # Retry-After: 1 honoured (own backoff is 0.01 s)


def test_response_not_ready_twice_then_success(no_bundled, gsm8k_spec):
    faults = [{"path": "/rows", "status": 500, "error_code": "ResponseNotReady", "times": 2}]
    with FakeDatasetsServer({GSM8K: gsm8k_spec}, faults=faults) as server:
        rows, _ = load(GSM_REF, 100, [no_bundled], server)
        assert [r["status"] for r in server.rows_requests] == [500, 500, 200]
    assert_gsm8k_rows(rows, 100)


def test_plain_text_500_then_success(no_bundled, gsm8k_spec):
    faults = [{"path": "/rows", "status": 500, "body": "Internal Server Error", "match": {"offset": "0"}}]
    with FakeDatasetsServer({GSM8K: gsm8k_spec}, faults=faults) as server:
        rows, _ = load(GSM_REF, 120, [no_bundled], server)
        assert sorted(r["status"] for r in server.rows_requests) == [200, 200, 500]
    assert_gsm8k_rows(rows, 120)


def test_plain_text_500_forever_is_a_dataset_error(no_bundled, gsm8k_spec):
    faults = [{"path": "/rows", "status": 500, "body": "Internal Server Error", "times": 1000}]
    with FakeDatasetsServer({GSM8K: gsm8k_spec}, faults=faults) as server:
        with pytest.raises(DatasetError) as err:
            load(GSM_REF, 10, [no_bundled], server)
        assert 2 <= len(server.rows_requests) <= 10  # retried, but not forever
    message = str(err.value)
    assert "500" in message and "\n" not in message
    assert not (no_bundled / "openai__gsm8k" / "main" / "test" / "rows-00000.jsonl").exists()


def test_a_long_retry_after_from_the_datasets_server_is_announced_and_interruptible(isolated_env, fake_hf):
    """chartqa's rows are throttled with Retry-After: 3600: said on stderr, and Ctrl-C stops the wait."""
    fake_hf.faults.append({"path": "/rows", "status": 429, "headers": {"Retry-After": "3600"}, "times": 100})
    with FakeOpenAI() as srv:
        proc, lines, notice, out, elapsed = interrupt_while_waiting(
            [sys.executable, str(NANO_EVAL), "--tasks", "chartqa", "--no_progress", "--base_url", srv.base_url,
             "--max_samples", "2"])
        chat = len(srv.chat_requests)
    assert "datasets-server" in notice and "429" in notice
    assert "waiting 300 s" in notice and "Retry-After: 3600 s, capped at 300 s" in notice
    assert proc.returncode == 130, "".join(lines)
    assert elapsed < 5, elapsed
    assert len(fake_hf.rows_requests) == 1 and chat == 0
    document = json.loads(out)
    assert document["complete"] is False and document["interrupted"] is True


def test_unknown_dataset_401_mentions_hf_token(no_bundled):
    with FakeDatasetsServer({}) as server:
        with pytest.raises(DatasetError) as err:
            load(GSM_REF, 10, [no_bundled], server)
        assert len(server.rows_requests) == 1  # a 401 is not retried
    message = str(err.value)
    assert "HF_TOKEN" in message and "401" in message and "\n" not in message
    assert err.value.exit_code == 5


CQA_REF = TASKS["chartqa"].data

TOKEN = "hf_TESTTOKEN_do_not_leak_42"


def test_hf_token_sent_as_bearer_to_the_api_only(no_bundled, chartqa_spec):
    with FakeDatasetsServer({CHARTQA: chartqa_spec}) as server:
        rows, cache = load(CQA_REF, 5, [no_bundled], server, image_column="image", token=TOKEN)
        assert server.rows_requests
        assert {r["headers"].get("Authorization") for r in server.rows_requests} == {f"Bearer {TOKEN}"}
        assert len(server.asset_requests) == 5
        # signed asset URLs carry their own auth: the token must not travel to a CDN
        assert all("Authorization" not in r["headers"] for r in server.asset_requests)
    for path in no_bundled.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_no_token_no_authorization_header(no_bundled, gsm8k_spec):
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as server:
        load(GSM_REF, 10, [no_bundled], server)
        assert all("Authorization" not in r["headers"] for r in server.rows_requests)


def test_revision_in_manifest_and_results(no_bundled, gsm8k_spec, gsm8k_answers):
    revision = "b" * 40
    with FakeDatasetsServer({GSM8K: gsm8k_spec}, revision=revision) as hf, FakeOpenAI(answers=gsm8k_answers) as oa:
        result = asyncio.run(run_task(TASKS["gsm8k_cot_llama"], APIConfig(url=oa.base_url, model="m"),
                                      max_samples=150, data_dir=str(no_bundled), datasets_server=client(hf)))
    assert result["dataset"] == {"path": "openai/gsm8k", "config": "main", "split": "test", "revision": revision}
    assert result["metrics"]["exact_match"] == pytest.approx(50 / 150)
    manifest = json.loads((no_bundled / "openai__gsm8k" / "main" / "test" / "manifest.json").read_text())
    assert {p["revision"] for p in manifest["pages"].values()} == {revision}
    assert set(manifest["pages"]) == {"0", "100"}


def test_new_revision_recorded_per_page(no_bundled, gsm8k_spec):
    with FakeDatasetsServer({GSM8K: gsm8k_spec}, revision="1" * 40) as server:
        load(GSM_REF, 100, [no_bundled], server)
        server.revision = "2" * 40
        _, cache = load(GSM_REF, 200, [no_bundled], server)
    assert cache.manifest["pages"]["0"]["revision"] == "1" * 40
    assert cache.manifest["pages"]["100"]["revision"] == "2" * 40
    assert cache.revisions([0, 100]) == ["1" * 40, "2" * 40]


@pytest.mark.parametrize("style", ["List", "Sequence", "legacy"])
def test_list_feature_styles_accepted(style, no_bundled, chartqa_spec):
    answers = {}
    with open(FIXTURES / "chartqa" / "rows.jsonl", encoding="utf-8") as f:
        fixture = [json.loads(line) for line in f]
    for r in fixture[:6]:
        answers[r["query"]] = r["label"][0]
    with FakeDatasetsServer({CHARTQA: chartqa_spec}, list_style=style) as hf, \
            FakeOpenAI(responder=answers_responder(answers)) as oa:
        result = asyncio.run(run_task(TASKS["chartqa"], APIConfig(url=oa.base_url, model="m"), max_samples=6,
                                      data_dir=str(no_bundled), datasets_server=client(hf)))
    assert result["num_ok"] == 6
    assert result["metrics"]["relaxed_accuracy"] == 1.0
    assert result["metrics"]["exact_match"] == 1.0


def test_a_short_page_is_an_error_not_a_smaller_denominator(tmp_path, monkeypatch, gsm8k_spec, fake_openai):
    rows = [row for i, row in enumerate(gsm8k_spec.rows[:150]) if i != 5]
    monkeypatch.setattr(nano_eval, "_BUNDLED_DATA", tmp_path / "none")
    with FakeDatasetsServer({GSM8K: Dataset(gsm8k_spec.features, rows)}) as hf:
        # the fake renumbers rows densely, so tamper with what it sends: drop row 5 from page 0
        original = hf._route

        def route(request):
            response = original(request)
            if request["path"] == "/rows" and request["query"].get("offset") == "0":
                body = json.loads(response.body)
                body["rows"] = [r for r in body["rows"] if r["row_idx"] != 5]
                response.body = json.dumps(body).encode()
            return response

        monkeypatch.setattr(hf, "_route", route)
        monkeypatch.setenv("NANO_EVAL_DATASETS_SERVER", hf.url)
        code = nano_eval.main([*GSM_ARGS, "--base_url", fake_openai.base_url, "--max_samples", "20",
                               "--data_dir", str(tmp_path / "d")])
    assert code == 5
    assert not list((tmp_path / "d").rglob("rows-00000.jsonl"))  # nothing cached


# --------------------------------------------------------------------------------------------
# The verified cache
# --------------------------------------------------------------------------------------------


def test_second_load_makes_no_request(no_bundled, gsm8k_spec):
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as server:
        load(GSM_REF, 300, [no_bundled], server)
        before = len(server.requests)
        rows, _ = load(GSM_REF, 300, [no_bundled], server)
        rows_again, _ = load(GSM_REF, 120, [no_bundled], server)
        assert len(server.requests) == before
    assert_gsm8k_rows(rows, 300)
    assert_gsm8k_rows(rows_again, 120)


def test_second_run_makes_no_request(no_bundled, gsm8k_spec, fake_openai):
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as hf:
        for _ in range(2):
            asyncio.run(run_task(TASKS["gsm8k_cot_llama"], APIConfig(url=fake_openai.base_url, model="m"),
                                 max_samples=30, data_dir=str(no_bundled), datasets_server=client(hf)))
        assert len(hf.requests) == 1


def _page_file(root: Path, offset: int) -> Path:
    return root / "openai__gsm8k" / "main" / "test" / f"rows-{offset:05d}.jsonl"


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_damaged_page_is_refetched(damage, no_bundled, gsm8k_spec):
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as server:
        load(GSM_REF, 300, [no_bundled], server)
        page = _page_file(no_bundled, 100)
        data = bytearray(page.read_bytes())
        if damage == "flip_byte":
            i = data.index(b"question") + 20  # inside the text of row 100: still valid JSON lines
            data[i] ^= 0x01
            page.write_bytes(bytes(data))
        elif damage == "truncate":
            page.write_bytes(bytes(data[: len(data) // 2]))
        else:
            page.unlink()
        before = offsets(server)
        rows, _ = load(GSM_REF, 300, [no_bundled], server)
        assert offsets(server)[len(before):] == [100]  # only the damaged page is fetched again
    assert_gsm8k_rows(rows, 300)  # never the damaged rows
    rows, _ = load(GSM_REF, 300, [no_bundled], FakeDatasetsServer({}))  # repaired: no server needed
    assert_gsm8k_rows(rows, 300)


def test_truncated_manifest_is_refetched(no_bundled, gsm8k_spec):
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as server:
        load(GSM_REF, 300, [no_bundled], server)
        manifest = no_bundled / "openai__gsm8k" / "main" / "test" / "manifest.json"
        text = manifest.read_bytes()
        manifest.write_bytes(text[: len(text) // 2])
        n = len(server.rows_requests)
        rows, _ = load(GSM_REF, 300, [no_bundled], server)
        assert sorted(offsets(server)[n:]) == [0, 100, 200]
    assert_gsm8k_rows(rows, 300)
    assert json.loads(manifest.read_text())["num_rows_total"] == 1319  # valid again


def test_manifest_lies_about_a_page(no_bundled, gsm8k_spec):
    """A page whose recorded sha256 is wrong is not trusted."""
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as server:
        load(GSM_REF, 100, [no_bundled], server)
        path = no_bundled / "openai__gsm8k" / "main" / "test" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["pages"]["0"]["sha256"] = "0" * 64
        path.write_text(json.dumps(manifest))
        n = len(server.rows_requests)
        rows, _ = load(GSM_REF, 100, [no_bundled], server)
        assert offsets(server)[n:] == [0]
    assert_gsm8k_rows(rows, 100)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "d" / "file.json"
    nano_eval._atomic_write(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(nano_eval.os, "replace", boom)
    with pytest.raises(OSError):
        nano_eval._atomic_write(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]  # no temp file left


def test_cache_writes_leave_no_temp_files(no_bundled, chartqa_spec, gsm8k_spec):
    with FakeDatasetsServer({GSM8K: gsm8k_spec, CHARTQA: chartqa_spec}) as server:
        load(GSM_REF, 400, [no_bundled], server)
        load(CQA_REF, 12, [no_bundled], server, image_column="image")
    assert stray_files(no_bundled) == []
    images = sorted(p.name for p in (no_bundled / "HuggingFaceM4__ChartQA" / "default" / "test" / "images").iterdir())
    assert images == sorted(f"{i}.png" for i in range(12))


def test_shipped_gsm8k_cache_is_complete_and_verifies():
    cache = _DatasetCache([ROOT / "data"], GSM_REF)
    assert cache.num_rows_total() == 1319
    assert len(cache.manifest["pages"]) == 14
    rows = []
    for offset in range(0, 1319, 100):
        page = cache.read_page(offset)  # None unless size and sha256 match the manifest
        assert page is not None, offset
        rows += page
    assert_gsm8k_rows(rows, 1319)
    assert nano_eval._BUNDLED_DATA == ROOT / "data"


def test_complete_bundled_cache_needs_no_datasets_server(tmp_path, monkeypatch, fake_openai):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeDatasetsServer({}) as hf:  # would answer 401 to anything
        rows, _ = load(GSM_REF, None, [tmp_path / "cache", nano_eval._BUNDLED_DATA], hf)
        result = asyncio.run(run_task(TASKS["gsm8k_cot_llama"], APIConfig(url=fake_openai.base_url, model="m"),
                                      max_samples=250, data_dir=str(tmp_path / "cache"),
                                      datasets_server=client(hf)))
        assert hf.requests == [] and hf.asset_requests == []
    assert_gsm8k_rows(rows, 1319)
    assert result["num_samples"] == 250
    assert result["metrics"]["exact_match"] == pytest.approx(50 / 250)


def test_a_bad_hf_token_does_not_stop_an_offline_run(isolated_env, fake_openai, monkeypatch):
    monkeypatch.delenv("NANO_EVAL_DATA_DIR")  # gsm8k from the shipped data/: nothing is fetched
    code, out, err = cli(*GSM_ARGS, "--base_url", fake_openai.base_url, "--max_samples", 2,
                         env={**nano_eval.os.environ, "HF_TOKEN": "hf_\x01bad"})
    assert code == 0, err


def test_a_pip_installed_module_caches_in_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("NANO_EVAL_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    installed = tmp_path / "lib" / "site-packages" / "data"
    installed.parent.mkdir(parents=True)
    monkeypatch.setattr(nano_eval, "_BUNDLED_DATA", installed)
    assert _resolve_data_dir(None) == [tmp_path / "cache" / "nano-eval", installed]
    copied = tmp_path / "box" / "data"
    copied.parent.mkdir()
    monkeypatch.setattr(nano_eval, "_BUNDLED_DATA", copied)  # nano_eval.py copied alone: data/ beside it
    assert _resolve_data_dir(None) == [copied]


def solo_copy(tmp_path: Path) -> Path:
    """nano_eval.py copied alone (no data/ beside it)."""
    folder = tmp_path / "solo"
    folder.mkdir()
    shutil.copy(ROOT / "nano_eval.py", folder / "nano_eval.py")
    return folder / "nano_eval.py"


def test_cli_unknown_dataset_exit_5(tmp_path, fake_openai):
    script = solo_copy(tmp_path)
    with FakeDatasetsServer({}) as hf:
        proc = cli("--tasks", "gsm8k_cot_llama", "--base_url", fake_openai.base_url, env=cli_env(NANO_EVAL_DATASETS_SERVER=hf.url), script=script)
    assert proc.returncode == 5, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("nano-eval: error:")]
    assert len(errors) == 1 and "HF_TOKEN" in errors[0]
    assert fake_openai.chat_requests == []


def test_cli_copied_alone_fetches_gsm8k_with_token(tmp_path, gsm8k_spec, fake_openai):
    script = solo_copy(tmp_path)
    out = tmp_path / "out" / "r.json"
    out.parent.mkdir()
    with FakeDatasetsServer({GSM8K: gsm8k_spec}, revision="c" * 40) as hf:
        proc = cli("--tasks", "gsm8k_cot_llama", "--base_url", fake_openai.base_url,
                                "--max_samples", "150", "--output", out, env=cli_env(NANO_EVAL_DATASETS_SERVER=hf.url, HF_TOKEN=TOKEN), script=script)
        assert {r["headers"].get("Authorization") for r in hf.rows_requests} == {f"Bearer {TOKEN}"}
        assert sorted(offsets(hf)) == [0, 100]
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["results"]["gsm8k_cot_llama"]["dataset"]["revision"] == "c" * 40
    assert doc["results"]["gsm8k_cot_llama"]["num_samples"] == 150
    assert (tmp_path / "solo" / "data" / "openai__gsm8k" / "main" / "test" / "manifest.json").is_file()
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    # a second run: the cache written beside the copy is complete for these rows
    with FakeDatasetsServer({}) as hf2:
        proc = cli("--tasks", "gsm8k_cot_llama", "--base_url", fake_openai.base_url,
                                "--max_samples", "150", env=cli_env(NANO_EVAL_DATASETS_SERVER=hf2.url), script=script)
        assert hf2.requests == []
    assert proc.returncode == 0, proc.stderr


def test_cli_token_not_in_dataset_error(tmp_path, fake_openai):
    script = solo_copy(tmp_path)
    faults = [{"path": "/rows", "status": 404, "body": {"error": f"token {TOKEN} has no access"}}]
    with FakeDatasetsServer({}, faults=faults) as hf:
        proc = cli("--tasks", "gsm8k_cot_llama", "--base_url", fake_openai.base_url, env=cli_env(NANO_EVAL_DATASETS_SERVER=hf.url, HF_TOKEN=TOKEN), script=script)
    assert proc.returncode == 5
    assert "has no access" in proc.stderr  # the server's message is shown...
    assert TOKEN not in proc.stderr and TOKEN not in proc.stdout  # ...with the token scrubbed


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_unwritable_data_dir_exit_2(how, tmp_path, fake_openai):
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("not a folder")
    target = blocker / "x"  # can never be created, even by root
    args = ["--tasks", "gsm8k_cot_llama", "--base_url", fake_openai.base_url, "--max_samples", "2"]
    env = cli_env()
    if how == "flag":
        args += ["--data_dir", target]
    else:
        env["NANO_EVAL_DATA_DIR"] = str(target)
    proc = cli(*args, env=env, script=ROOT / "nano_eval.py")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" or how == "env"
    error_line(proc.stderr, str(target))  # one error line, no traceback
    assert fake_openai.requests == []  # checked before connecting


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_cli_read_only_data_dir_exit_2(tmp_path, fake_openai):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        proc = cli("--tasks", "gsm8k_cot_llama", "--base_url", fake_openai.base_url,
                                               "--data_dir", folder / "cache", env=cli_env(), script=ROOT / "nano_eval.py")
    finally:
        folder.chmod(0o700)
    assert proc.returncode == 2
    assert "not writable" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


NULL_ROWS = {16, 17}


def asset_rows(hf, status=None) -> list[int]:
    return sorted(int(r["path"].split("/")[-3]) for r in hf.asset_requests if status is None or r["status"] == status)


def test_downloads_only_the_images_needed(no_env, fake_hf, chart_server, tmp_path):
    config = APIConfig(url=chart_server.base_url, model="m")
    result = run_chartqa(config, 20, tmp_path / "data", fake_hf)
    with_image = [i for i in range(20) if i not in NULL_ROWS]
    assert asset_rows(fake_hf) == with_image  # 18 <= 20: only rows the run needs, once each
    assert asset_rows(fake_hf, 200) == with_image
    images = tmp_path / "data" / "HuggingFaceM4__ChartQA" / "default" / "test" / "images"
    for i in with_image:
        assert (images / f"{i}.png").read_bytes() == image_of(i)
    assert result["num_samples"] == 20 and result["num_ok"] == 18
    assert result["images"] == {"formats": {"png": 18}, "jpeg_reencoded": 0}
    assert result["metrics"]["relaxed_accuracy"] == pytest.approx(18 / 20)
    assert result["metrics"]["relaxed_accuracy,valid"] == 1.0
    # a second run: everything from the cache
    n_rows, n_assets = len(fake_hf.requests), len(fake_hf.asset_requests)
    again = run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 20, tmp_path / "data", fake_hf)
    assert (len(fake_hf.requests), len(fake_hf.asset_requests)) == (n_rows, n_assets)
    assert again["metrics"] == result["metrics"]


class ExpireFirstIssue(FakeDatasetsServer):
    """The first /rows answer carries already-expired image URLs; later ones are valid."""

    def _rows(self, request):
        response = super()._rows(request)
        self.expire_seconds = 3600
        return response


def test_expired_urls_refetch_the_page(no_env, chartqa_spec, chart_server, tmp_path):
    with ExpireFirstIssue({CHARTQA: chartqa_spec}, expire_seconds=-1) as hf:
        result = run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 5, tmp_path / "data", hf)
        assert len(hf.rows_requests) == 2  # the page again, for fresh URLs
        assert asset_rows(hf, 403) == [0, 1, 2, 3, 4]
        assert asset_rows(hf, 200) == [0, 1, 2, 3, 4]
    assert result["num_ok"] == 5 and result["metrics"]["relaxed_accuracy"] == 1.0


def test_urls_expired_between_runs(no_env, fake_hf, chart_server, tmp_path):
    run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 5, tmp_path / "data", fake_hf)
    assert asset_rows(fake_hf, 200) == [0, 1, 2, 3, 4]
    n_rows = len(fake_hf.rows_requests)
    fake_hf.expire_now()  # every URL issued so far (and cached in rows-00000.jsonl) is dead now
    first_new = len(fake_hf.asset_requests)
    result = run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 10, tmp_path / "data", fake_hf)
    new = fake_hf.asset_requests[first_new:]
    assert len(fake_hf.rows_requests) > n_rows  # the page was fetched again for fresh URLs
    assert sorted(int(r["path"].split("/")[-3]) for r in new if r["status"] == 200) == [5, 6, 7, 8, 9]
    assert result["num_ok"] == 10 and result["metrics"]["relaxed_accuracy"] == 1.0


def test_urls_that_never_work_are_a_dataset_error(no_env, chartqa_spec, chart_server, tmp_path):
    with FakeDatasetsServer({CHARTQA: chartqa_spec}, expire_seconds=-1) as hf:
        with pytest.raises(DatasetError) as err:
            run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 3, tmp_path / "data", hf)
        assert 2 <= len(hf.rows_requests) <= 5  # refetched a bounded number of times
    assert "\n" not in str(err.value) and err.value.exit_code == 5
    assert chart_server.chat_requests == []


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_damaged_cached_image_is_refetched(damage, no_env, fake_hf, chart_server, tmp_path):
    run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 3, tmp_path / "data", fake_hf)
    path = tmp_path / "data" / "HuggingFaceM4__ChartQA" / "default" / "test" / "images" / "1.png"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    chart_server.requests.clear()
    result = run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 3, tmp_path / "data", fake_hf)
    sent = {chart_row_of(b): image_url(b) for b in (r["body"] for r in chart_server.chat_requests)}
    assert result["failures"] == {}
    assert sent[1] == "data:image/png;base64," + base64.b64encode(image_of(1)).decode()


def load_capture(name: str) -> list[dict]:
    return json.loads((CAPTURES / name).read_text("utf-8"))


def test_chartqa_corrupted_cached_image_is_not_sent(tmp_path):
    """A cached image whose bytes no longer match the manifest sha256 is never sent."""
    captures = load_capture("chartqa.synthetic.requests.json")
    meta = json.loads((CAPTURES / "chartqa_images" / "chartqa_images_meta.json").read_text("utf-8"))
    cache = chartqa_cache(tmp_path)
    png = image_bytes_of(captures[0]["body"])
    entry = cache.write_image(0, png, "png")
    path = cache.write_dir / entry["file"]
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    row = {"row_idx": 0, "row": {"image": {"src": "x"}, "query": meta[0]["query"], "label": meta[0]["label"],
                                 "human_or_machine": 0}}
    sample = TASKS["chartqa"].build(row, APIConfig(url=URL, model="stub-model"), cache)
    assert sample.error is not None and sample.error[0] == "missing_image"
    assert "base64" not in json.dumps(sample.body)


def test_null_image_rows_are_missing_image(no_env, fake_hf, chart_server, tmp_path):
    result = run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 20, tmp_path / "data", fake_hf,
                 log_dir=tmp_path / "log")
    sent_rows = sorted(chart_row_of(r["body"]) for r in chart_server.chat_requests)
    assert sent_rows == [i for i in range(20) if i not in NULL_ROWS]  # never sent
    log = read_log_by_row(tmp_path / "log")
    assert sorted(log) == list(range(20))
    for i in NULL_ROWS:
        rec = log[i]
        assert rec["status"] == "missing_image"
        assert "image" in rec["error"].lower()
        assert rec["scores"] == {"exact_match": 0.0, "relaxed_accuracy": 0.0, "anywhere_accuracy": 0.0}
        assert rec["image"] is None
    assert result["failures"] == {"missing_image": 2}
    assert result["num_failed"] == 2 and result["num_samples"] == 20
    assert result["metrics"]["relaxed_accuracy"] == pytest.approx(18 / 20)


def test_sniff_image():
    assert _sniff_image(make_png(4, 3)) == ("png", "image/png")
    assert _sniff_image(TINY_JPEG) == ("jpeg", "image/jpeg")
    assert _sniff_image(b"GIF87a" + b"\x00" * 10) == ("gif", "image/gif")
    assert _sniff_image(b"GIF89a" + b"\x00" * 10) == ("gif", "image/gif")
    assert _sniff_image(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == ("webp", "image/webp")
    assert _sniff_image(b"RIFF\x10\x00\x00\x00WAVEfmt ") is None
    assert _sniff_image(b"<html>nope</html>") is None
    assert _sniff_image(b"") is None
    assert _sniff_image(b"\x89PNG") is None  # a truncated magic


class TruncatesRowOne(FakeDatasetsServer):
    """Serves row 1's chart cut to its first 40 bytes (the PNG signature and IHDR, no IEND)."""

    def _asset(self, request):
        response = super()._asset(request)
        if "/1/image/" in request["path"] and response.status == 200:
            response.body = response.body[:40]
        return response


def test_a_truncated_image_is_not_cached_nor_sent(no_env, chartqa_spec, chart_server, tmp_path, capsys):
    """Issue 23, item 8: a 40-byte PNG is named, not cached, and its sample fails as missing_image."""
    with TruncatesRowOne({CHARTQA: chartqa_spec}) as hf:
        result = run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 3, tmp_path / "data", hf)
    err = capsys.readouterr().err
    assert "the image of row 1 of HuggingFaceM4/ChartQA is truncated (40 bytes of PNG): not cached" in err
    assert sorted(chart_row_of(r["body"]) for r in chart_server.chat_requests) == [0, 2]
    assert result["failures"] == {"missing_image": 1} and result["num_samples"] == 3
    assert not (tmp_path / "data" / "HuggingFaceM4__ChartQA" / "default" / "test" / "images" / "1.png").exists()
    for fmt, whole in (("png", make_png(4, 3)), ("jpeg", TINY_JPEG)):
        assert nano_eval._image_is_whole(whole, fmt) and not nano_eval._image_is_whole(whole[:-10], fmt)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.update(num_rows_total=1219), "page 1200 holds 100 rows, which does not fit num_rows_total 1219"),
    (lambda m: m.update(num_rows_total=1419), "page 1300 holds 19 rows, which does not fit num_rows_total 1419"),
    (lambda m: (m.update(num_rows_total=1219), m["pages"].pop("1200"), m["pages"].pop("1300"),
                m["pages"].__setitem__("1200", {**m["pages"]["1100"], "rows": 19})),
     "num_rows_total is 1219, but the shipped split has 1319 rows"),
    (lambda m: m.update(num_rows_total="1319"), "num_rows_total is '1319'"),
])
def test_an_edited_cache_manifest_is_never_a_smaller_denominator(tmp_path, edit, problem):
    """Issue 23, item 7: the manifest is checked against itself and the shipped split's size."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "bench", "__pycache__"))
    manifest_path = copy / "data" / "openai__gsm8k" / "main" / "test" / "manifest.json"
    manifest = json.loads(manifest_path.read_text("utf-8"))
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with FakeOpenAI(responder=ByRow()) as srv:
        proc = cli("--tasks", GSM, "--base_url", srv.base_url, "--no_progress", env=cli_env(),
                   script=copy / "nano_eval.py")
        assert srv.chat_requests == []
    one_error(proc.returncode, proc.stderr, 5, "does not agree with itself", problem, "delete that folder")


def test_a_read_only_checkout_without_a_writable_home_runs_the_shipped_split(isolated_env):
    """Issue 23, item 13: as user nobody, a read-only copy and no writable HOME: the shipped gsm8k
    split needs no cache and runs; a split that must be fetched says once that it cannot be cached."""
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as nobody")
    top = Path(tempfile.mkdtemp(prefix="nano-eval-ro-"))
    try:
        copy = top / "checkout"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "bench", "__pycache__"))
        for path in [top, *copy.rglob("*"), copy]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        env = {**cli_env(), "HOME": "/nonexistent", "XDG_CACHE_HOME": "/nonexistent/cache"}
        nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                  str(copy / "nano_eval.py")]
        with FakeOpenAI(responder=ByRow()) as srv, FakeDatasetsServer({CHARTQA: chartqa_dataset_small()}) as hf:
            gsm = subprocess.run([*nobody, "--tasks", GSM, "--base_url", srv.base_url, "--max_samples", "2",
                                  "--no_progress"], capture_output=True, text=True, env=env, timeout=120)
            chart = subprocess.run([*nobody, "--tasks", "chartqa", "--base_url", srv.base_url, "--max_samples", "1",
                                    "--no_progress"], capture_output=True, text=True, timeout=120,
                                   env={**env, "NANO_EVAL_DATASETS_SERVER": hf.url})
        assert gsm.returncode == 0, gsm.stderr
        assert json.loads(gsm.stdout)["results"][GSM]["num_samples"] == 2
        assert chart.returncode == 5, chart.stderr
        errors = [line for line in chart.stderr.splitlines() if line.startswith("nano-eval: error:")]
        assert len(errors) == 1 and "cannot write the dataset cache in" in errors[0], chart.stderr
        assert "pass a writable --data_dir" in chart.stderr and "Traceback" not in chart.stderr
    finally:
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(top)


def chartqa_dataset_small():
    from fakes import synthetic_chartqa_dataset

    return synthetic_chartqa_dataset(3)


def test_a_fetched_split_whose_cached_size_was_edited_is_caught_by_the_datasets_server(no_bundled, gsm8k_spec):
    """Issue 23, item 7: a fetched split's manifest edited to fewer rows, consistently (pages that
    tile it), is caught when a missing page is fetched: the datasets-server's num_rows_total is
    not the cache's, and no run goes on with the smaller denominator."""
    with FakeDatasetsServer({GSM8K: gsm8k_spec}) as server:
        load(GSM_REF, None, [no_bundled], server)
        path = no_bundled / "openai__gsm8k" / "main" / "test" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["num_rows_total"] = 1200
        del manifest["pages"]["1200"], manifest["pages"]["1300"], manifest["pages"]["500"]  # page 500: fetched again
        path.write_text(json.dumps(manifest))
        with pytest.raises(nano_eval.DatasetError, match="the dataset cache says openai/gsm8k test has 1200 rows, "
                                                         "the datasets-server 1319: the cache is stale or was edited"):
            load(GSM_REF, None, [no_bundled], server)
        assert "500" not in json.loads(path.read_text())["pages"]  # nothing cached from the refused page
