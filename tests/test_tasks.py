"""Tasks: what is sent for each document and how its answer is scored, exactly as lm-eval does.

Request bodies equal the ones lm-eval 0.4.13 sent (tests/fixtures/lm_eval_requests), as parsed
JSON, in key order and as bytes; gen_kwargs merge as lm-eval merges them; scores equal lm-eval's
own filters and metrics on every golden case (tests/fixtures/golden); chartqa's image parts,
targets and human/augmented split; think blocks are stripped before scoring unless keep_think; and
the parsers and scorers never raise, whatever the text (hypothesis).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fakes import FIXTURES, GSM8K_ROWS, ROOT  # noqa: E402

import nano_eval  # noqa: E402
from fakes import (CAPTURES, CHARTQA, FakeDatasetsServer, FakeOpenAI, GSM, GSM_ARGS, METRICS,  # noqa: E402
                   Reply, ROWS_JSONL, TINY_JPEG, URL, bodies, chart_row_of, chartqa_cache, chartqa_dataset, cli,
                   cli_env, gsm8k_first, image_bytes_of, image_of, image_url, main_json, one_error, question_of,
                   read_log, read_log_by_row, responder_for, run_chartqa, run_gsm8k_plain, run_inproc,
                   synthetic_chartqa_dataset)
from nano_eval import (APIConfig, TASKS, _relaxed_preprocess, _answer_text, _chartqa_target, _gsm8k_target,  # noqa: E402
                       score_chartqa, score_gsm8k)


# --------------------------------------------------------------------------------------------
# Request bodies: lm-eval's, as parsed JSON, in key order, as bytes
# --------------------------------------------------------------------------------------------




def load_capture(name: str) -> list[dict]:
    return json.loads((CAPTURES / name).read_text("utf-8"))


GSM8K_CAPTURE = load_capture("gsm8k_cot_llama.multiturn.requests.json")


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


def gsm8k_rows(n: int) -> list[dict]:
    return GSM8K_ROWS[:n]


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


def indexed_gsm8k_rows(n: int) -> list[dict]:
    path = ROOT / "tests" / "fixtures" / "gsm8k" / "test.jsonl"
    with open(path, encoding="utf-8") as f:
        return [{"row_idx": i, "row": json.loads(line)} for i, line in zip(range(n), f)]


@pytest.mark.parametrize("settings", [
    {},
    {"gen_kwargs": {"temperature": 0.7, "top_p": 0.9}, "system_instruction": "Sé breve \u2603"},
    {"fewshot_as_multiturn": False, "gen_kwargs": {"stop": ["a"], "seed": 3}, "model": None},
    {"gen_kwargs": {"max_gen_toks": 512, "until": "Q:"}, "seed": None},
], ids=["defaults", "sampled-system", "single-turn", "odd-kwargs"])
def test_prepared_bodies_are_json_dumps(settings):
    task = TASKS["gsm8k_cot_llama"]
    config = APIConfig(url=URL, **{"model": "m", **settings})
    prepared = task.prepare(config)
    for row in indexed_gsm8k_rows(40):
        for repeat in (0, 1, 2):
            fast = task.build(row, config, None, repeat, prepared)
            plain = task.build(row, config, None, repeat)
            assert fast.payload == plain.payload == json.dumps(fast.body).encode()
            assert fast.body == plain.body and fast.body_hash == plain.body_hash


def test_jpeg_rows_sent_as_jpeg(no_env, chart_server, tmp_path):
    spec = chartqa_dataset(ROWS_JSONL, jpeg_rows=[0, 3])
    with FakeDatasetsServer({CHARTQA: spec}) as hf:
        result = run_chartqa(APIConfig(url=chart_server.base_url, model="m"), 5, tmp_path / "data", hf)
    sent = {chart_row_of(r["body"]): image_url(r["body"]) for r in chart_server.chat_requests}
    assert sorted(sent) == [0, 1, 2, 3, 4]
    for i in (0, 3):
        assert sent[i] == "data:image/jpeg;base64," + base64.b64encode(TINY_JPEG).decode()
    for i in (1, 2, 4):
        assert sent[i] == "data:image/png;base64," + base64.b64encode(image_of(i)).decode()
    assert result["images"] == {"formats": {"jpeg": 2, "png": 3}, "jpeg_reencoded": 2}
    images = tmp_path / "data" / "HuggingFaceM4__ChartQA" / "default" / "test" / "images"
    assert (images / "0.jpg").read_bytes() == TINY_JPEG


# --------------------------------------------------------------------------------------------
# gen_kwargs, as lm-eval merges them
# --------------------------------------------------------------------------------------------


STOP = ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "Q:", "</s>"]


def test_gen_kwargs_merged_into_body(isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "2",
                           "--gen_kwargs", "temperature=0.7,top_p=1,do_sample=true,max_gen_toks=64,"
                                           "presence_penalty=-0.5,logprobs=false,user=alice,min_p=none"], capsys)
    assert code == 0, err
    for body in bodies(fake_openai):
        assert list(body) == ["messages", "model", "max_tokens", "temperature", "stop", "seed",
                              "top_p", "presence_penalty", "logprobs", "user", "min_p"]
        assert body["max_tokens"] == 64 and body["temperature"] == 0.7 and body["stop"] == STOP
        assert body["top_p"] == 1 and type(body["top_p"]) is int
        assert body["presence_penalty"] == -0.5 and body["logprobs"] is False
        assert body["user"] == "alice" and body["min_p"] == "none"  # lm-eval sends the text
        assert "do_sample" not in body and "max_gen_toks" not in body and "until" not in body
    params = doc["config"]["request_params"][GSM]
    assert "do_sample" not in params and params["max_tokens"] == 64
    assert doc["config"]["gen_kwargs"]["temperature"] == 0.7


def test_gen_kwargs_chartqa_defaults_overridden():
    config = APIConfig(url="http://127.0.0.1:9/v1", gen_kwargs={"temperature": 0, "max_gen_toks": 9})
    params = TASKS["chartqa"].request_params(config)
    assert params == {"max_tokens": 9, "temperature": 0, "stop": [], "seed": 1234}


def body_params(gen_kwargs: dict) -> dict:
    return TASKS["gsm8k_cot_llama"].request_params(APIConfig(url="http://x/v1", gen_kwargs=gen_kwargs))


def test_gen_kwargs_stop_replaces_the_stop_list_in_place():
    params = body_params({"stop": "###"})
    assert list(params) == ["max_tokens", "temperature", "stop", "seed"] and params["stop"] == "###"


def test_gen_kwargs_until_becomes_the_stop_list_cut_to_four():
    assert body_params({"until": "###"})["stop"] == ["###"]
    assert body_params({"until": ["a", "b", "c", "d", "e"]})["stop"] == ["a", "b", "c", "d"]


def test_max_tokens_wins_and_max_gen_toks_is_then_sent_as_it_is():
    params = body_params({"max_tokens": 100, "max_gen_toks": 50})
    assert params["max_tokens"] == 100 and params["max_gen_toks"] == 50
    assert body_params({"max_gen_toks": 50}) == {"max_tokens": 50, "temperature": 0, "stop": params["stop"],
                                                 "seed": 1234}


def test_chartqa_max_tokens_override_keeps_the_task_max_gen_toks_like_lm_eval():
    params = TASKS["chartqa"].request_params(APIConfig(url="http://x/v1", gen_kwargs={"max_tokens": 100}))
    assert params == {"max_tokens": 100, "temperature": 0.0, "stop": [], "seed": 1234, "max_gen_toks": 512}


def test_until_must_be_text(isolated_env, fake_openai):
    code, out, err = cli(*GSM_ARGS, "--base_url", fake_openai.base_url, "--gen_kwargs", "until=5")
    assert "until must be text" in one_error(code, err, 2)
    assert fake_openai.chat_requests == []


# --------------------------------------------------------------------------------------------
# Scoring: lm-eval's golden vectors
# --------------------------------------------------------------------------------------------


GOLDEN = ROOT / "tests" / "fixtures" / "golden"

CHARTQA_CASES = json.loads((GOLDEN / "chartqa_scoring.json").read_text("utf-8"))

GSM8K_CASES = json.loads((GOLDEN / "gsm8k_scoring.json").read_text("utf-8"))


def test_golden_files_are_complete():
    assert len(GSM8K_CASES) == 47
    assert len(CHARTQA_CASES) == 63


@pytest.mark.parametrize("case", GSM8K_CASES, ids=[f"{i}:{c['note']}" for i, c in enumerate(GSM8K_CASES)])
def test_gsm8k_golden_case(case):
    target = _gsm8k_target({"question": "q", "answer": case["target"]})
    assert target == case["doc_to_target"]
    extracted, scores = score_gsm8k(case["response"], target)
    assert extracted == case["filtered"]
    assert scores == case["expected"]
    assert all(isinstance(v, float) for v in scores.values())


def test_gsm8k_headline_rules():
    """The documented behaviours, independent of the golden file (gold 18)."""
    for response, strict, flexible in [
        ("$18.", 0.0, 1.0), ("The final answer is 18,", 1.0, 1.0), ("The final answer is 18.00", 0.0, 0.0),
        ("The final answer is **18**", 0.0, 1.0), ("the final answer is 18", 0.0, 1.0),
        ("The final answer is 9 * 2 = 18", 0.0, 1.0), ("#### 18", 0.0, 1.0),
    ]:
        _, scores = score_gsm8k(response, "18")
        assert (scores["exact_match,strict-match"], scores["exact_match,flexible-extract"]) == (
            strict, flexible), response
    extracted, _ = score_gsm8k("no digits here", "18")
    assert extracted == {"strict-match": "[invalid]", "flexible-extract": "[invalid]"}
    assert nano_eval._regex_filter(nano_eval._GSM8K_FILTERS["strict-match"], None) == "[invalid]"


def test_unicode_digits_parse_as_lm_eval_does():
    assert nano_eval._parse_value("١٢") == 12 and nano_eval._parse_value("½") == "½"


@pytest.mark.parametrize("case", CHARTQA_CASES, ids=[f"{i}:{c['note']}" for i, c in enumerate(CHARTQA_CASES)])
def test_chartqa_golden_case(case):
    target = _chartqa_target({"label": case["target"]})
    assert target == case["doc_to_target"]
    extracted, scores = score_chartqa(case["response"], target)
    assert extracted["none"] == case["filtered"]["none"]
    expected = {key.removesuffix(",none"): value for key, value in case["expected"].items()}
    assert scores == expected
    assert all(isinstance(v, float) for v in scores.values())


@pytest.mark.parametrize("label, target", [
    ("[1,2]", "[1, 2]"),  # literal_eval'd by doc_to_target, str()'d by process_results
    ("[2014, 2016]", "[2014, 2016]"),  # already its own repr: unchanged
    ("[a, b]", "[a, b]"),  # not a Python literal: unchanged
    ("['a','b']", "['a', 'b']"),
    ("[1,  2 ]", "[1, 2]"),
    ("14", "14"),
    ("[", "["),
    ("Yes", "Yes"),
])
def test_chartqa_list_literal_label(label, target):
    assert _chartqa_target({"label": [label]}) == target
    assert TASKS["chartqa"].target({"label": [label], "query": "q"}) == target


def test_chartqa_only_first_label_is_used():
    assert _chartqa_target({"label": ["7", "8"]}) == "7"
    _, scores = score_chartqa("Final Answer: 8", _chartqa_target({"label": ["7", "8"]}))
    assert scores["exact_match"] == 0.0


def test_a_lone_quote_label_is_emptied_as_lm_eval_does():
    assert _relaxed_preprocess('"') == "" and _relaxed_preprocess("'Japan'") == "Japan"
    assert _relaxed_preprocess('"Japan') == '"Japan'
    # the emptied target matches no answer at all: a response without one still scores 0
    _, scores = score_chartqa("I cannot read this chart.", '"')
    assert scores["relaxed_accuracy"] == 0.0


def test_final_answer_drops_markdown_characters():
    """lm-eval's parse removes * _ [ ] ( ) from the answer line."""
    assert nano_eval._chartqa_final_answer("The chart has two bars.\n**Answer:** (B)") == "B"
    assert nano_eval._chartqa_final_answer("Final Answer: _[42]_") == "42"
    _, scores = score_chartqa("Final Answer: (B)", "B")
    assert scores["relaxed_accuracy"] == 1.0 and scores["exact_match"] == 0.0


def even_rows_right(body, n):
    _, query = question_of(body)
    i = int(query.rsplit("synthetic chart ", 1)[1].rstrip("?"))
    return f"Final Answer: {i if i % 2 == 0 else 'wrong'}"


def test_human_and_augmented_split(no_env, tmp_path):
    spec = synthetic_chartqa_dataset(10, 40, 30)  # human_or_machine = row % 2
    with FakeDatasetsServer({CHARTQA: spec}) as hf, FakeOpenAI(responder=even_rows_right) as oa:
        result = run_chartqa(APIConfig(url=oa.base_url, model="m"), 10, tmp_path / "data", hf, log_dir=tmp_path / "log")
    m = result["metrics"]
    assert m["relaxed_accuracy,human"] == 1.0
    assert m["relaxed_accuracy,augmented"] == 0.0
    assert m["relaxed_accuracy"] == 0.5
    groups = {i: rec["group"] for i, rec in read_log_by_row(tmp_path / "log").items()}
    assert groups == {i: ("human" if i % 2 == 0 else "augmented") for i in range(10)}


# --------------------------------------------------------------------------------------------
# Think blocks and reasoning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, keep, expected", [
    ("<think>x</think>The final answer is 18", False, "The final answer is 18"),
    ("<think>x</think>\n\n  The final answer is 18\n", False, "The final answer is 18\n"),  # lstrip only
    ("<think>a</think>b</think>  c", False, "c"),  # after the LAST </think>
    ("<think>x</think>The final answer is 18", True, "<think>x</think>The final answer is 18"),
    ("The final answer is 18", False, "The final answer is 18"),
    ("<think>never closed The final answer is 18", False, "<think>never closed The final answer is 18"),
    ("<think>x</think>", False, ""),
    (None, False, ""),
    ("", True, ""),
])
def test_answer_text(content, keep, expected):
    assert _answer_text(content, keep) == expected


def test_an_empty_think_end_token_strips_nothing():
    assert _answer_text("<think>x</think>The final answer is 18", False, "") == "<think>x</think>The final answer is 18"




def test_think_block_is_stripped_before_scoring(isolated_env, tmp_path):
    content = "<think>Maybe 7? The final answer is 7. No: 16-3-4=9, 9*2=18.</think> The final answer is 18"
    with FakeOpenAI(responder=lambda body, n: Reply(content=content)) as srv:
        result, (rec,) = run_inproc(srv, tmp_path)
    assert rec["status"] == "ok"
    assert rec["extracted"] == {"strict-match": "18", "flexible-extract": "18"}
    assert rec["scores"] == {m: 1.0 for m in METRICS}
    assert rec["response"]["content"] == content  # logged raw


def test_think_stripped_answer_after_think_is_scored(isolated_env, tmp_path):
    rows = gsm8k_first(2)
    wrap = lambda text: f"<think>The final answer is 123456 maybe 99</think>\n\n{text}"  # noqa: E731
    with FakeOpenAI(responder=responder_for({0, 1}, rows, wrap=wrap)) as server:
        result = run_gsm8k_plain(APIConfig(url=server.base_url, model="fake-model"), 2, tmp_path)
    assert result["metrics"]["exact_match"] == 1.0
    assert result["metrics"]["exact_match,flexible-extract"] == 1.0


@pytest.mark.parametrize("keep_think", [False, True])
def test_think_stripping_in_a_run(isolated_env, tmp_path, keep_think):
    """The answer only inside <think>...</think>: dropped (wrong) unless keep_think."""
    rows = gsm8k_first(3)
    wrap = lambda text: f"<think>{text}</think>\n"  # noqa: E731
    with FakeOpenAI(responder=responder_for({0, 1, 2}, rows, wrap=wrap)) as server:
        config = APIConfig(url=server.base_url, model="fake-model", keep_think=keep_think)
        result = run_gsm8k_plain(config, 3, tmp_path)
    expected = 1.0 if keep_think else 0.0
    assert result["metrics"]["exact_match,strict-match"] == expected
    assert result["metrics"]["exact_match,flexible-extract"] == expected
    assert result["num_ok"] == 3  # the content is not empty: still an ok sample


def test_think_end_token_model_arg(isolated_env, tmp_path):
    reply = "draft: The final answer is 1 [END] The final answer is 18"
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1,
                             "--model_args", "think_end_token=[END]")
    assert code == 0, err
    assert json.loads(out)["results"]["gsm8k_cot_llama"]["metrics"]["exact_match,flexible-extract"] == 1.0


def test_answer_only_in_reasoning(isolated_env, tmp_path):
    reply = Reply(content="", reasoning_content="9 eggs at $2: The final answer is 18", finish_reason="stop")
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 3,
                             "--log_samples", tmp_path / "logs", "--no_progress")
    assert code == 1  # 3 of 3 failed
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["failures"] == {"empty": 3}
    assert result["reasoning"] == {"answer_only_in_reasoning": 3}
    records = read_log(tmp_path / "logs")
    assert [r["status"] for r in records] == ["empty"] * 3
    assert all(r["reasoning_flags"] == ["answer_only_in_reasoning"] for r in records)
    assert all(r["response"]["reasoning_content"] == "9 eggs at $2: The final answer is 18" for r in records)
    warning = [line for line in err.splitlines() if "reasoning channel" in line]
    # not truncated: raising max_tokens would not help, the reasoning parser is what to check
    assert len(warning) == 1 and "3 samples" in warning[0] and "reasoning parser" in warning[0]
    assert "max_tokens" not in warning[0]


def test_budget_ran_out_inside_think(isolated_env, tmp_path):
    reply = Reply(content="<think>Janet has 16 eggs. She eats three, so 13 remain. Then she bakes",
                  finish_reason="length")
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 2,
                             "--log_samples", tmp_path / "logs", "--no_progress")
    assert code == 0, err  # truncated samples are scored, not failures
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_truncated"] == 2 and result["num_failed"] == 0
    assert result["reasoning"] == {"budget_ran_out_in_reasoning": 2}
    records = read_log(tmp_path / "logs")
    assert all(r["status"] == "truncated" for r in records)
    assert all(r["reasoning_flags"] == ["budget_ran_out_in_reasoning"] for r in records)
    assert any("ran out of tokens" in line and "max_tokens" in line for line in err.splitlines())


def test_budget_ran_out_in_reasoning_channel(isolated_env, tmp_path):
    reply = Reply(content=None, reasoning_content="Janet has 16 eggs. She eats", finish_reason="length")
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        result, (rec,) = run_inproc(srv, tmp_path)
    assert rec["status"] == "empty"
    # the reasoning holds no "The final answer is N": no answer is only in the reasoning channel
    assert rec["reasoning_flags"] == ["budget_ran_out_in_reasoning"]
    assert result["reasoning"] == {"budget_ran_out_in_reasoning": 1}
    assert result["num_truncated"] == 1 and result["finish_reasons"] == {"length": 1}


# --------------------------------------------------------------------------------------------
# Properties: the scorers and chartqa_target never raise, whatever the text
# --------------------------------------------------------------------------------------------


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_binary(scores: dict, names: set):
    assert set(scores) == names
    for value in scores.values():
        assert type(value) is float and value in (0.0, 1.0)


# Text that tends to break number parsing and regexes
TRICKY = ["1e999", "-1e999", "nan", "NaN", "inf", "-inf", "Infinity", "-0", "0", "%", "-%", "1e999%", "nan%",
          "12%", "12.5%", "0.125", ".5", "5.", "$1,234.50", "1,2,3", "--1", "+-1", "1e-999", "0x1F", "1_000",
          "١٢٣", "½", "²", "∞", "", " ", "\n", "\u200b", "Final Answer:", "FINAL ANSWER: ", "answer:",
          "**Answer:** 5", "The final answer is", "The final answer is $", "[invalid]", "####", "</think>",
          "[1, 2]", "['a']", "[", "]", "()", "[[[[", "'quoted'", '"x"', "a" * 500, "9" * 400]

tricky_text = st.one_of(
    st.sampled_from(TRICKY),
    st.text(max_size=80),
    st.lists(st.sampled_from(TRICKY + ["The final answer is ", "Final Answer: ", "\n", " ", "answer: "]),
             max_size=6).map("".join),
    st.text(alphabet="0123456789.,-+$%e ", max_size=30),
)


@FAST
@given(tricky_text, tricky_text)
def test_score_gsm8k_never_raises(response, target):
    extracted, scores = score_gsm8k(response, target)
    assert set(extracted) == {"strict-match", "flexible-extract"}
    assert all(isinstance(v, str) for v in extracted.values())
    assert_binary(scores, {"exact_match,strict-match", "exact_match,flexible-extract"})


@FAST
@given(st.integers(min_value=-10**30, max_value=10**30), st.sampled_from(["{}", "{:,}", "${}", "{}."]))
def test_score_gsm8k_recognises_the_final_answer(number, style):
    if style.startswith("$"):
        number = abs(number)  # "$-5" is not a number lm-eval's strict regex accepts
    response = f"Some reasoning 1 2 3. The final answer is {style.format(number)}"
    extracted, scores = score_gsm8k(response, str(number))
    assert scores["exact_match,strict-match"] == 1.0
    assert scores["exact_match,flexible-extract"] == 1.0


@FAST
@given(tricky_text, tricky_text)
def test_score_chartqa_never_raises(response, target):
    extracted, scores = score_chartqa(response, target)
    assert extracted["none"] == response and isinstance(extracted["final_answer"], str)
    assert_binary(scores, {"exact_match", "relaxed_accuracy", "anywhere_accuracy"})


def test_scorers_on_every_tricky_pair():
    for answer in TRICKY:
        for target in TRICKY:
            for response in (f"Final Answer: {answer}", answer, f"FINAL ANSWER: {answer}\n",
                             f"answer:\n\n{answer}", f"The final answer is {answer}"):
                _, scores = score_chartqa(response, target)
                assert_binary(scores, {"exact_match", "relaxed_accuracy", "anywhere_accuracy"})
                _, scores = score_gsm8k(response, target)
                assert_binary(scores, {"exact_match,strict-match", "exact_match,flexible-extract"})


@pytest.mark.parametrize("answer,target,expected", [
    ("-0", "0", 1.0),
    ("0", "-0", 1.0),
    ("12%", "0.12", 1.0),  # percent/decimal equivalence (as in the golden cases)
    ("0.12", "12%", 1.0),
    ("1e999", "5", 0.0),  # inf is not within 5% of anything finite
    ("5", "1e999", 0.0),
])
def test_relaxed_accuracy_edge_values(answer, target, expected):
    _, scores = score_chartqa(f"Final Answer: {answer}", target)
    assert scores["relaxed_accuracy"] == expected


@FAST
@given(st.integers(min_value=-10**12, max_value=10**12))
def test_score_chartqa_exact_number(number):
    _, scores = score_chartqa(f"The chart shows bars.\nFinal Answer: {number}", str(number))
    assert scores == {"exact_match": 1.0, "relaxed_accuracy": 1.0, "anywhere_accuracy": 1.0}


@FAST
@given(st.one_of(tricky_text, st.text(alphabet="[]()'\",0123456789 ae", max_size=40),
                 st.integers(0, 400).map(lambda n: "[" * n + "]" * n)))
def test_chartqa_target_never_raises(label):
    for doc in ({"label": [label]}, {"label": label}, {"label": [label, "other"]}):
        assert isinstance(_chartqa_target(doc), str)


def test_chartqa_target_examples():
    assert _chartqa_target({"label": ["Yes"]}) == "Yes"
    assert _chartqa_target({"label": ["[1, 2]"]}) == "[1, 2]"
    assert _chartqa_target({"label": ["['a', 'b']"]}) == "['a', 'b']"
    assert _chartqa_target({"label": ["[not python]"]}) == "[not python]"
    assert _chartqa_target({"label": []}) == "[]"


@pytest.mark.parametrize("element", [None, 5, 2.5, True], ids=["null", "int", "float", "bool"])
def test_chartqa_target_non_string_label_element(element):
    assert _chartqa_target({"label": [element]}) == str(element)
