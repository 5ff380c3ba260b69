"""Request parity with lm-eval: the bodies nano-eval builds equal the bodies lm-eval 0.4.13 sent
(tests/fixtures/lm_eval_requests), as parsed JSON *and* in key order, and the bytes on the wire are
lm-eval's ``json.dumps`` (ASCII-escaped)."""

from __future__ import annotations

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

import fakes  # noqa: E402
import nano_eval  # noqa: E402
from fakes import FakeOpenAI, cli_env  # noqa: E402
from nano_eval import TASKS, APIConfig, DatasetCache  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
CAPTURES = FIXTURES / "lm_eval_requests"
URL = "http://127.0.0.1:9/v1"  # never contacted: build() does not talk to the server


def load_capture(name: str) -> list[dict]:
    return json.loads((CAPTURES / name).read_text("utf-8"))


def gsm8k_rows(n: int) -> list[dict]:
    with open(FIXTURES / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def key_paths(obj, prefix=()):
    """Every dict key path in document order: equal lists mean equal key order at every level."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += key_paths(v, prefix + (k,))
        return out
    if isinstance(obj, list):
        out = []
        for i, v in enumerate(obj):
            out += key_paths(v, prefix + (i,))
        return out
    return []


def assert_same_request(actual: dict, expected: dict) -> None:
    assert actual == expected
    assert key_paths(actual) == key_paths(expected), "same JSON but different key order"
    # type-exact: 0 vs 0.0 (gsm8k temperature int, chartqa float) compare equal in Python
    assert json.dumps(actual) == json.dumps(expected)


def image_bytes_of(body: dict) -> bytes:
    url = body["messages"][-1]["content"][0]["image_url"]["url"]
    header, _, data = url.partition(",")
    assert header == "data:image/png;base64"
    return base64.b64decode(data)


# --------------------------------------------------------------------------------------------
# gsm8k_cot_llama
# --------------------------------------------------------------------------------------------

GSM8K_CAPTURE = load_capture("gsm8k_cot_llama.multiturn.requests.json")


@pytest.mark.parametrize("i", range(4))
def test_gsm8k_multiturn_body_equals_lm_eval(i):
    capture = GSM8K_CAPTURE[i]
    doc = gsm8k_rows(4)[i]
    assert doc == capture["doc"]  # the fixture row is the doc lm-eval used
    config = APIConfig(url=URL, model="stub-model", seed=1234)
    sample = TASKS["gsm8k_cot_llama"].build({"row_idx": i, "row": doc}, config)
    assert_same_request(sample.body, capture["body"])
    assert list(sample.body) == ["messages", "model", "max_tokens", "temperature", "stop", "seed"]
    assert len(sample.body["messages"]) == 17
    # the exact bytes: lm-eval's json.dumps (default separators, ensure_ascii)
    assert sample.payload == json.dumps(capture["body"]).encode("ascii")
    assert sample.body_hash == hashlib.sha256(sample.payload).hexdigest()
    assert sample.target == capture["doc"]["answer"].split("####")[-1].strip()


def test_gsm8k_body_model_none_and_default_seed():
    """model=None is sent as null (lm-eval without model=); the default seed is lm-eval's 1234."""
    config = APIConfig(url=URL)
    sample = TASKS["gsm8k_cot_llama"].build({"row_idx": 0, "row": gsm8k_rows(1)[0]}, config)
    expected = dict(GSM8K_CAPTURE[0]["body"], model=None)
    assert_same_request(sample.body, expected)
    assert sample.body["seed"] == 1234


VARIANTS = {
    "genkwargs": dict(gen_kwargs={"max_gen_toks": 1024, "temperature": 0.5, "top_p": 0.9}),
    "modelargs": dict(seed=42, max_gen_toks=777),
    "sysinstr": dict(system_instruction="You are a careful math tutor."),
    "singleturn": dict(fewshot_as_multiturn=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gsm8k_variant_bodies_equal_lm_eval(variant):
    captures = load_capture(f"variants/gsm8k_{variant}.requests.json")
    assert len(captures) == (4 if variant == "singleturn" else 1)
    config = APIConfig(url=URL, model="stub-model", **VARIANTS[variant])
    rows = gsm8k_rows(len(captures))
    for i, capture in enumerate(captures):
        sample = TASKS["gsm8k_cot_llama"].build({"row_idx": i, "row": rows[i]}, config)
        assert_same_request(sample.body, capture["body"])
        assert sample.payload == json.dumps(capture["body"]).encode("ascii")


def test_gsm8k_variant_shapes():
    """Spot checks of what the variants change, so a wrong capture file cannot hide a mismatch."""
    rows = gsm8k_rows(1)
    build = lambda **kw: TASKS["gsm8k_cot_llama"].build(  # noqa: E731
        {"row_idx": 0, "row": rows[0]}, APIConfig(url=URL, model="stub-model", **kw)).body
    body = build(**VARIANTS["genkwargs"])
    assert list(body)[-1] == "top_p" and body["max_tokens"] == 1024 and body["temperature"] == 0.5
    body = build(**VARIANTS["modelargs"])
    assert body["max_tokens"] == 777 and body["seed"] == 42
    body = build(**VARIANTS["sysinstr"])
    assert body["messages"][0] == {"role": "system", "content": "You are a careful math tutor."}
    assert len(body["messages"]) == 18
    body = build(**VARIANTS["singleturn"])
    assert len(body["messages"]) == 1 and body["messages"][0]["content"].endswith("\n")
    assert body["messages"][0]["content"].count("Problem: ") == 9


# --------------------------------------------------------------------------------------------
# chartqa
# --------------------------------------------------------------------------------------------


def chartqa_cache(tmp_path: Path) -> DatasetCache:
    return DatasetCache([tmp_path], TASKS["chartqa"].data)


def test_chartqa_synthetic_bodies_equal_lm_eval(tmp_path):
    captures = load_capture("chartqa.synthetic.requests.json")
    meta = json.loads((CAPTURES / "chartqa_images" / "chartqa_images_meta.json").read_text("utf-8"))
    assert len(captures) == len(meta) == 5
    cache = chartqa_cache(tmp_path)
    config = APIConfig(url=URL, model="stub-model", seed=1234)
    for m, capture in zip(meta, captures):
        png = image_bytes_of(capture["body"])
        assert hashlib.sha256(png).hexdigest() == capture["image_info"][0]["sent_png_sha256"]
        cache.write_image(m["idx"], png, "png")
        row = {"row_idx": m["idx"], "row": {"image": {"src": "http://x/image.png", "height": 1, "width": 1},
                                             "query": m["query"], "label": m["label"], "human_or_machine": 0}}
        sample = TASKS["chartqa"].build(row, config, cache)
        assert sample.error is None
        assert_same_request(sample.body, capture["body"])
        assert sample.payload == json.dumps(capture["body"]).encode("ascii")
        assert sample.image == {"sha256": hashlib.sha256(png).hexdigest(), "bytes": len(png), "format": "png"}
        assert sample.target == m["label"][0]
        # lm-eval order: image part first, then the text, which starts with a literal <image>
        content = sample.body["messages"][0]["content"]
        assert [p["type"] for p in content] == ["image_url", "text"]
        assert content[0]["image_url"]["detail"] == "auto"
        assert content[1]["text"].startswith("<image>") and content[1]["text"].endswith("\n")
        assert sample.body["temperature"] == 0.0 and isinstance(sample.body["temperature"], float)
        assert sample.body["stop"] == [] and sample.body["max_tokens"] == 512


def test_chartqa_real5_bodies_equal_lm_eval(tmp_path):
    captures = load_capture("chartqa.real5.requests.json")
    with open(FIXTURES / "chartqa" / "rows.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:5]
    cache = chartqa_cache(tmp_path)
    config = APIConfig(url=URL, model="stub-model", seed=1234)
    for i, capture in enumerate(captures):
        png = image_bytes_of(capture["body"])  # the PIL re-encoded PNG lm-eval sent
        info = capture["image_info"][0]
        assert (hashlib.sha256(png).hexdigest(), len(png)) == (info["sent_png_sha256"], info["sent_png_bytes"])
        cache.write_image(i, png, "png")
        r = rows[i]
        row = {"row_idx": i, "row": {"image": {"src": "http://x/image.png", "height": r["height"],
                                               "width": r["width"]},
                                     "query": r["query"], "label": r["label"],
                                     "human_or_machine": r["human_or_machine"]}}
        sample = TASKS["chartqa"].build(row, config, cache)
        assert_same_request(sample.body, capture["body"])
        assert sample.payload == json.dumps(capture["body"]).encode("ascii")
        assert sample.image["sha256"] == info["sent_png_sha256"]
        assert sample.group == "human"


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


# --------------------------------------------------------------------------------------------
# end to end: the CLI, as a subprocess, against FakeOpenAI
# --------------------------------------------------------------------------------------------


def test_cli_end_to_end_bodies_equal_lm_eval(tmp_path, raw_bodies):
    with FakeOpenAI(models=["stub-model"]) as server:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "nano_eval.py"), "--tasks", "gsm8k_cot_llama", "--base_url",
             server.base_url, "--seed", "1234", "--model", "stub-model", "--max_samples", "4", "--no_progress"],
            capture_output=True, text=True, env=cli_env(tmp_path), cwd=str(tmp_path), timeout=120)
        chats = server.chat_requests
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results["results"]["gsm8k_cot_llama"]["num_samples"] == 4
    assert len(chats) == 4
    # requests run concurrently: pair them with the captures by their last user message
    by_question = {c["body"]["messages"][-1]["content"]: c["body"] for c in chats}
    assert len(by_question) == 4
    for capture in GSM8K_CAPTURE:
        received = by_question[capture["body"]["messages"][-1]["content"]]
        assert_same_request(received, capture["body"])
    for c in chats:
        assert c["headers"]["Content-Type"] == "application/json"
        assert "Authorization" not in c["headers"]  # no key given: no bearer sent
    # the wire bytes: ASCII-escaped json.dumps, exactly as lm-eval's requests/aiohttp send them
    chat_raw = [r for r in raw_bodies if r.startswith(b'{"messages"')]
    assert len(chat_raw) == 4
    expected_wire = {json.dumps(c["body"]).encode("ascii") for c in GSM8K_CAPTURE}
    assert set(chat_raw) == expected_wire
    for data in chat_raw:
        assert max(data) < 128, "non-ASCII byte on the wire (json.dumps must use ensure_ascii)"
    janet = next(r for r in chat_raw if b"Janet" in r)
    assert b"Janet\\u2019s ducks" in janet  # U+2019 escaped, as lm-eval sends it
