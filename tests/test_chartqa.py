"""chartqa end to end: image download and caching, expiring URLs, rows without an image, image
formats, the sample log, the human/augmented split, full CLI runs and memory that does not grow
with the number of images."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nano_eval  # noqa: E402
from fakes import cli, cli_env, read_log
from fakes import (  # noqa: E402
    CHARTQA,
    GSM8K,
    TINY_JPEG,
    FakeDatasetsServer,
    FakeOpenAI,
    answers_responder,
    chartqa_dataset,
    make_png,
    question_of,
    synthetic_chartqa_dataset,
)
from nano_eval import TASKS, APIConfig, DatasetError, DatasetsClient, run_task, sniff_image  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
ROWS_JSONL = FIXTURES / "chartqa" / "rows.jsonl"
with open(ROWS_JSONL, encoding="utf-8") as _f:
    FIXTURE_ROWS = [json.loads(line) for line in _f]
ANSWERS = {r["query"]: r["label"][0] for r in FIXTURE_ROWS}
NULL_ROWS = {16, 17}
CQA = TASKS["chartqa"]


def image_of(row_idx: int) -> bytes:
    return (FIXTURES / "chartqa" / FIXTURE_ROWS[row_idx]["image"]).read_bytes()


def client(server) -> DatasetsClient:
    return DatasetsClient(base_url=server.url, token=None, retry_base_delay=0.01)


def run(config, n, data_dir, hf, **kwargs) -> dict:
    return asyncio.run(run_task(CQA, config, max_samples=n, data_dir=str(data_dir), datasets_server=client(hf),
                                progress=False, **kwargs))


def row_of(body: dict) -> int:
    """The fixture row a chat request is for (by its query)."""
    task, query = question_of(body)
    assert task == "chartqa"
    return next(i for i, r in enumerate(FIXTURE_ROWS) if r["query"] == query)


def image_url(body: dict) -> str:
    parts = body["messages"][-1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
    assert len(urls) == 1
    return urls[0]


def asset_rows(hf, status=None) -> list[int]:
    return sorted(int(r["path"].split("/")[-3]) for r in hf.asset_requests if status is None or r["status"] == status)


def read_log_by_row(log_dir: Path) -> dict[int, dict]:
    return {rec["row_idx"]: rec for rec in read_log(log_dir, "chartqa", sort=False)}


@pytest.fixture
def no_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("NANO_EVAL_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def chart_server():
    with FakeOpenAI(responder=answers_responder(ANSWERS)) as server:
        yield server


# --------------------------------------------------------------------------------------------
# download and cache
# --------------------------------------------------------------------------------------------


def test_downloads_only_the_images_needed(no_env, fake_hf, chart_server, tmp_path):
    config = APIConfig(url=chart_server.base_url, model="m")
    result = run(config, 20, tmp_path / "data", fake_hf)
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
    again = run(APIConfig(url=chart_server.base_url, model="m"), 20, tmp_path / "data", fake_hf)
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
        result = run(APIConfig(url=chart_server.base_url, model="m"), 5, tmp_path / "data", hf)
        assert len(hf.rows_requests) == 2  # the page again, for fresh URLs
        assert asset_rows(hf, 403) == [0, 1, 2, 3, 4]
        assert asset_rows(hf, 200) == [0, 1, 2, 3, 4]
    assert result["num_ok"] == 5 and result["metrics"]["relaxed_accuracy"] == 1.0


def test_urls_expired_between_runs(no_env, fake_hf, chart_server, tmp_path):
    run(APIConfig(url=chart_server.base_url, model="m"), 5, tmp_path / "data", fake_hf)
    assert asset_rows(fake_hf, 200) == [0, 1, 2, 3, 4]
    n_rows = len(fake_hf.rows_requests)
    fake_hf.expire_now()  # every URL issued so far (and cached in rows-00000.jsonl) is dead now
    first_new = len(fake_hf.asset_requests)
    result = run(APIConfig(url=chart_server.base_url, model="m"), 10, tmp_path / "data", fake_hf)
    new = fake_hf.asset_requests[first_new:]
    assert len(fake_hf.rows_requests) > n_rows  # the page was fetched again for fresh URLs
    assert sorted(int(r["path"].split("/")[-3]) for r in new if r["status"] == 200) == [5, 6, 7, 8, 9]
    assert result["num_ok"] == 10 and result["metrics"]["relaxed_accuracy"] == 1.0


def test_urls_that_never_work_are_a_dataset_error(no_env, chartqa_spec, chart_server, tmp_path):
    with FakeDatasetsServer({CHARTQA: chartqa_spec}, expire_seconds=-1) as hf:
        with pytest.raises(DatasetError) as err:
            run(APIConfig(url=chart_server.base_url, model="m"), 3, tmp_path / "data", hf)
        assert 2 <= len(hf.rows_requests) <= 5  # refetched a bounded number of times
    assert "\n" not in str(err.value) and err.value.exit_code == 5
    assert chart_server.chat_requests == []


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_damaged_cached_image_is_refetched(damage, no_env, fake_hf, chart_server, tmp_path):
    run(APIConfig(url=chart_server.base_url, model="m"), 3, tmp_path / "data", fake_hf)
    path = tmp_path / "data" / "HuggingFaceM4__ChartQA" / "default" / "test" / "images" / "1.png"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    chart_server.requests.clear()
    result = run(APIConfig(url=chart_server.base_url, model="m"), 3, tmp_path / "data", fake_hf)
    sent = {row_of(b): image_url(b) for b in (r["body"] for r in chart_server.chat_requests)}
    assert result["failures"] == {}
    assert sent[1] == "data:image/png;base64," + base64.b64encode(image_of(1)).decode()


# --------------------------------------------------------------------------------------------
# rows without an image
# --------------------------------------------------------------------------------------------


def test_null_image_rows_are_missing_image(no_env, fake_hf, chart_server, tmp_path):
    result = run(APIConfig(url=chart_server.base_url, model="m"), 20, tmp_path / "data", fake_hf,
                 log_dir=tmp_path / "log")
    sent_rows = sorted(row_of(r["body"]) for r in chart_server.chat_requests)
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


# --------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------


def test_sniff_image():
    assert sniff_image(make_png(4, 3)) == ("png", "image/png")
    assert sniff_image(TINY_JPEG) == ("jpeg", "image/jpeg")
    assert sniff_image(b"GIF87a" + b"\x00" * 10) == ("gif", "image/gif")
    assert sniff_image(b"GIF89a" + b"\x00" * 10) == ("gif", "image/gif")
    assert sniff_image(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == ("webp", "image/webp")
    assert sniff_image(b"RIFF\x10\x00\x00\x00WAVEfmt ") is None
    assert sniff_image(b"<html>nope</html>") is None
    assert sniff_image(b"") is None
    assert sniff_image(b"\x89PNG") is None  # a truncated magic


def test_jpeg_rows_sent_as_jpeg(no_env, chart_server, tmp_path):
    spec = chartqa_dataset(ROWS_JSONL, jpeg_rows=[0, 3])
    with FakeDatasetsServer({CHARTQA: spec}) as hf:
        result = run(APIConfig(url=chart_server.base_url, model="m"), 5, tmp_path / "data", hf)
    sent = {row_of(r["body"]): image_url(r["body"]) for r in chart_server.chat_requests}
    assert sorted(sent) == [0, 1, 2, 3, 4]
    for i in (0, 3):
        assert sent[i] == "data:image/jpeg;base64," + base64.b64encode(TINY_JPEG).decode()
    for i in (1, 2, 4):
        assert sent[i] == "data:image/png;base64," + base64.b64encode(image_of(i)).decode()
    assert result["images"] == {"formats": {"jpeg": 2, "png": 3}, "jpeg_reencoded": 2}
    images = tmp_path / "data" / "HuggingFaceM4__ChartQA" / "default" / "test" / "images"
    assert (images / "0.jpg").read_bytes() == TINY_JPEG


# --------------------------------------------------------------------------------------------
# the sample log
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_images", [False, True])
def test_sample_log_images(log_images, no_env, fake_hf, chart_server, tmp_path):
    run(APIConfig(url=chart_server.base_url, model="m"), 4, tmp_path / "data", fake_hf, log_dir=tmp_path / "log",
        log_images=log_images)
    log = read_log_by_row(tmp_path / "log")
    sent = {row_of(r["body"]): r["body"] for r in chart_server.chat_requests}
    for i in range(4):
        data = image_of(i)
        digest = hashlib.sha256(data).hexdigest()
        rec = log[i]
        assert rec["image"] == {"sha256": digest, "bytes": len(data), "format": "png"}
        logged_url = image_url(rec["request"])
        if log_images:
            assert rec["request"] == sent[i]
        else:
            assert logged_url == f"<image sha256={digest} bytes={len(data)} format=png>"
            assert base64.b64encode(data).decode()[:200] not in json.dumps(rec)
            # everything but the image URL is the exact body sent
            stripped = json.loads(json.dumps(sent[i]).replace(image_url(sent[i]), logged_url))
            assert rec["request"] == stripped
        assert rec["status"] == "ok" and rec["target"] == FIXTURE_ROWS[i]["label"][0]
        assert rec["extracted"]["final_answer"] == FIXTURE_ROWS[i]["label"][0]
        assert rec["group"] == "human"
    size = (tmp_path / "log" / "samples_chartqa.jsonl").stat().st_size
    assert (size > 40_000) == log_images


# --------------------------------------------------------------------------------------------
# human / augmented
# --------------------------------------------------------------------------------------------


def even_rows_right(body, n):
    _, query = question_of(body)
    i = int(query.rsplit("synthetic chart ", 1)[1].rstrip("?"))
    return f"Final Answer: {i if i % 2 == 0 else 'wrong'}"


def test_human_and_augmented_split(no_env, tmp_path):
    spec = synthetic_chartqa_dataset(10, 40, 30)  # human_or_machine = row % 2
    with FakeDatasetsServer({CHARTQA: spec}) as hf, FakeOpenAI(responder=even_rows_right) as oa:
        result = run(APIConfig(url=oa.base_url, model="m"), 10, tmp_path / "data", hf, log_dir=tmp_path / "log")
    m = result["metrics"]
    assert m["relaxed_accuracy,human"] == 1.0
    assert m["relaxed_accuracy,augmented"] == 0.0
    assert m["relaxed_accuracy"] == 0.5
    groups = {i: rec["group"] for i, rec in read_log_by_row(tmp_path / "log").items()}
    assert groups == {i: ("human" if i % 2 == 0 else "augmented") for i in range(10)}


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------


CHARTQA_KEYS = {"exact_match", "relaxed_accuracy", "anywhere_accuracy"}


def test_cli_chartqa_30(fake_hf, chart_server, tmp_path):
    args = ["--tasks", "chartqa", "--base_url", chart_server.base_url, "--max_samples", "30", "--no_progress"]
    proc = cli(*args, env=cli_env(tmp_path, fake_hf))
    assert proc.returncode == 1, proc.stderr  # 2 of 30 failed (missing_image) > --max_fail_rate 0.05
    doc = json.loads(proc.stdout)  # results are still written
    res = doc["results"]["chartqa"]
    expected_keys = set()
    for k in CHARTQA_KEYS:
        expected_keys |= {k, f"{k}_stderr", f"{k},valid"}
    expected_keys.add("relaxed_accuracy,human")
    assert set(res["metrics"]) == expected_keys  # every row of the fixture is human
    assert res["headline"] == "relaxed_accuracy"
    assert res["num_samples"] == 30 and res["num_ok"] == 28
    assert res["failures"] == {"missing_image": 2}
    assert res["images"] == {"formats": {"png": 28}, "jpeg_reencoded": 0}
    assert res["metrics"]["relaxed_accuracy"] == pytest.approx(28 / 30)
    assert res["metrics"]["relaxed_accuracy,human"] == pytest.approx(28 / 30)
    assert res["metrics"]["exact_match,valid"] == 1.0
    assert res["dataset"] == {"path": "HuggingFaceM4/ChartQA", "config": "default", "split": "test",
                              "revision": "a" * 40}
    assert doc["config"]["request_params"]["chartqa"] == {"max_tokens": 512, "temperature": 0.0, "stop": [],
                                                          "seed": 1234}
    assert len(chart_server.chat_requests) == 28
    assert len(fake_hf.asset_requests) == 28
    assert "missing_image" in proc.stderr
    # the same run again, allowing 10% failures: exit 0, and nothing downloaded
    n = len(fake_hf.requests) + len(fake_hf.asset_requests)
    proc = cli(*(args + ["--max_fail_rate", "0.1"]), env=cli_env(tmp_path, fake_hf))
    assert proc.returncode == 0, proc.stderr
    assert len(fake_hf.requests) + len(fake_hf.asset_requests) == n
    assert json.loads(proc.stdout)["results"]["chartqa"]["metrics"] == res["metrics"]


def test_cli_both_tasks(fake_hf, gsm8k_answers, tmp_path):
    with FakeOpenAI(responder=answers_responder({**gsm8k_answers, **ANSWERS})) as oa:
        proc = cli("--tasks", "gsm8k_cot_llama,chartqa", "--base_url", oa.base_url, "--max_samples", "5",
                        "--log_samples", tmp_path / "log", env=cli_env(tmp_path, fake_hf))
        kinds = sorted(question_of(r["body"])[0] for r in oa.chat_requests)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc["results"]) == ["gsm8k_cot_llama", "chartqa"]
    assert doc["results"]["gsm8k_cot_llama"]["metrics"]["exact_match"] == 1.0
    assert doc["results"]["chartqa"]["metrics"]["relaxed_accuracy"] == 1.0
    assert kinds == ["chartqa"] * 5 + ["gsm8k"] * 5
    assert (tmp_path / "log" / "samples_gsm8k_cot_llama.jsonl").is_file()
    assert (tmp_path / "log" / "samples_chartqa.jsonl").is_file()
    assert set(doc["config"]["request_params"]) == {"gsm8k_cot_llama", "chartqa"}
    assert not [r for r in fake_hf.rows_requests if r["query"]["dataset"] == GSM8K[0]]  # gsm8k ships in data/


# --------------------------------------------------------------------------------------------
# memory: images are streamed, not accumulated
# --------------------------------------------------------------------------------------------


DRIVER = r"""
import contextlib, io, json, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
import nano_eval
tracemalloc.start()
with contextlib.redirect_stdout(io.StringIO()):
    code = nano_eval.main(sys.argv[2:])
print("PEAK", json.dumps({"code": code, "peak": tracemalloc.get_traced_memory()[1]}), file=sys.stderr)
"""


def peak_memory(n: int, tmp_path: Path, hf, oa, log: bool) -> int:
    args = ["--tasks", "chartqa", "--base_url", oa.base_url, "--max_samples", str(n), "--no_progress",
            "--max_fail_rate", "1"]
    if log:
        args += ["--log_samples", tmp_path / f"log{n}"]
    env = cli_env(tmp_path, hf)
    env["NANO_EVAL_DATA_DIR"] = str(tmp_path / f"data{n}")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK ")]
    assert line, proc.stderr
    report = json.loads(line[0][5:])
    assert report["code"] == 0, proc.stderr
    return report["peak"]


@pytest.mark.parametrize("log", [False, True], ids=["no_log", "log_samples"])
def test_peak_memory_does_not_grow_with_images(log, tmp_path):
    spec = synthetic_chartqa_dataset(300, 128, 128, noise=True)
    assert len(spec.rows[0]["image"]) > 45_000  # ~48 KB per image, ~14 MB for 300
    with FakeDatasetsServer({CHARTQA: spec}) as hf, FakeOpenAI() as oa:
        peak_100 = peak_memory(100, tmp_path, hf, oa, log)
        peak_300 = peak_memory(300, tmp_path, hf, oa, log)
    assert peak_300 < peak_100 * 1.5 + 1_500_000, (peak_100, peak_300)
