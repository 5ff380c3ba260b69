"""Preflight (issue 5): preflight_checks(), `--check` and `--tasks api_conformance`.

ConformanceFake (tests/conformance_fakes.py) is a well-behaved chat server; each keyword breaks one
behaviour. Every check must PASS against the good server, and each broken variant must fail or
warn exactly its own check.
"""

from __future__ import annotations

import base64
import json
import time

import pytest


import nano_eval as ne  # noqa: E402
from conformance_fakes import CHECKS, ConformanceFake, COUNTING_ANSWER  # noqa: E402
from fakes import FakeOpenAI, GSM, cli, main_json, run_main  # noqa: E402

MODEL = "conformance-model"


def grid(report: dict) -> dict:
    return {c["check"]: c["result"] for c in report["checks"]}


def preflight(srv: ConformanceFake, **config) -> dict:
    config.setdefault("timeout", 10)
    return ne._preflight_checks(ne.APIConfig(srv.base_url, model=MODEL, **config))


def test_well_behaved_server_passes_every_check():
    with ConformanceFake() as srv:
        report = preflight(srv)
        bodies = [r["body"] for r in srv.chat_requests]
    assert [c["check"] for c in report["checks"]] == CHECKS
    assert grid(report) == {name: "PASS" for name in CHECKS}
    assert report["metrics"] == {"pass": 13, "warn": 0, "fail": 0}
    evidence = {c["check"]: c["evidence"] for c in report["checks"]}
    assert evidence["/v1/models"] == "object list, 1 model(s)"
    assert evidence["usage"] == json.dumps({"prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40})
    assert evidence["max_tokens"] == "completion_tokens 5, finish_reason 'length'"
    assert evidence["stop"] == "stopped before '3': '1 2 ', finish_reason 'stop'"
    assert evidence["max_completion_tokens"] == "honoured: completion_tokens 5, finish_reason 'length'"
    assert evidence["malformed request"] == "HTTP 400 with a JSON error"
    assert evidence["logprobs"] == "8 tokens, each with top 3 sorted, the greedy choice first"
    assert sum(1 for b in bodies if b.get("logprobs") is True and b.get("top_logprobs") == 3) == 1
    assert all(len(c["evidence"]) <= 300 and "\n" not in c["evidence"] for c in report["checks"])
    # what was sent: every body names the model; the requests the checks describe
    assert all(b.get("model") == MODEL for b in bodies)
    assert any(b.get("max_tokens") == 5 and "max_completion_tokens" not in b for b in bodies)
    assert any(b.get("max_completion_tokens") == 5 and "max_tokens" not in b for b in bodies)
    assert any(b.get("stop") == ["3"] for b in bodies)
    assert any(b.get("seed") == 1234 for b in bodies)
    assert sum(1 for b in bodies if b.get("max_tokens") == 96 and b.get("temperature") == 0 and "stop" not in b) == 2
    assert any(not isinstance(b.get("messages"), list) for b in bodies)
    images = [p["image_url"]["url"] for b in bodies if isinstance(b.get("messages"), list)
              for m in b["messages"] if isinstance(m.get("content"), list) for p in m["content"]
              if p.get("type") == "image_url"]
    assert len(images) == 1 and images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(images[0].split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_seed_check_sends_the_configured_seed():
    with ConformanceFake() as srv:
        report = preflight(srv, seed=42)
        seeds = [r["body"]["seed"] for r in srv.chat_requests if "seed" in r["body"]]
    assert seeds == [42]
    assert {c["check"]: c["evidence"] for c in report["checks"]}["seed"] == "seed 42 accepted"


# Without usage, the image placeholder check cannot count tokens either: it warns as well.
ALSO_WARNS = {"usage-missing": ["image placeholder"]}

# Each broken behaviour of ConformanceFake: its option=value, the one check it trips, the
# result, a phrase of the evidence
BROKEN_BEHAVIOURS = """
models=no_data                | /v1/models            | FAIL | no data list
models=not_openai             | /v1/models            | WARN | not OpenAI-shaped
usage=missing                 | usage                 | FAIL | usage missing or incomplete: None
usage=bad_total               | usage                 | WARN | total_tokens 47 != prompt + completion
max_tokens=ignored            | max_tokens            | FAIL | max_tokens 5 but completion_tokens 30
max_tokens=wrong_finish       | max_tokens            | FAIL | finish_reason 'stop', not 'length'
stop=included                 | stop                  | FAIL | stop '3' is in the output: '1 2 3'
stop=ignored                  | stop                  | FAIL | stop '3' is in the output
deterministic=False           | greedy repeatable     | WARN | temperature 0 differs between two identical requests
seed=reject                   | seed                  | FAIL | seed rejected: Unrecognized request argument: seed
image=reject                  | image input           | WARN | HTTP 500: this model does not support images
reasoning=think               | reasoning channel     | WARN | <think>
max_completion_tokens=reject  | max_completion_tokens | WARN | not accepted: HTTP 400: Unknown field max_completion_tokens
max_completion_tokens=ignored | max_completion_tokens | WARN | accepted but ignored: completion_tokens 30 > 5
malformed=500                 | malformed request     | FAIL | HTTP 500 instead of a 4xx
malformed=200                 | malformed request     | FAIL | HTTP 200 instead of a 4xx
malformed=400_text            | malformed request     | WARN | HTTP 400 but the body is not JSON
logprobs=missing              | logprobs              | WARN | no logprobs in the answer
logprobs=reject               | logprobs              | WARN | logprobs refused (compare cannot judge numerics): HTTP 400
logprobs=positive             | logprobs              | FAIL | token 1: logprob 0.5 > 0
logprobs=unsorted             | logprobs              | FAIL | token 0: top_logprobs not sorted
logprobs=not_greedy           | logprobs              | FAIL | token 0: chosen '1' (-0.1000) is not the top-1 '1!'
logprobs=wrong_k              | logprobs              | FAIL | token 0: 4 top_logprobs, asked for 3
image_literal=token           | image placeholder     | WARN | the literal <image> is one token here (2 -> 3
image_literal=reject          | image placeholder     | WARN | a text-only prompt with the literal <image> is refused (HTTP 400
"""


def broken_behaviour(line: str) -> tuple:
    option, check, result, phrase = (cell.strip() for cell in line.split(" | "))
    name, value = option.split("=")
    return {name: False if value == "False" else value}, check, result, phrase


BROKEN = [broken_behaviour(line) for line in BROKEN_BEHAVIOURS.strip().splitlines()]


@pytest.mark.parametrize("options, check, result, phrase", BROKEN,
                         ids=[f"{check}-{'-'.join(map(str, o.values()))}" for o, check, _, _ in BROKEN])
def test_each_broken_behaviour_trips_only_its_check(options, check, result, phrase):
    with ConformanceFake(**options) as srv:
        report = preflight(srv)
    assert [c["check"] for c in report["checks"]] == CHECKS
    also = ALSO_WARNS.get(f"{check}-{'-'.join(map(str, options.values()))}", [])
    expected = {name: "PASS" for name in CHECKS}
    expected.update({name: "WARN" for name in also})
    expected[check] = result
    assert grid(report) == expected
    evidence = next(c["evidence"] for c in report["checks"] if c["check"] == check)
    assert phrase in evidence
    assert report["metrics"] == {"pass": 12 - len(also), "warn": int(result == "WARN") + len(also),
                                 "fail": int(result == "FAIL")}


def test_malformed_request_that_hangs_fails_within_the_configured_timeout():
    # Preflight's per-request timeout is min(120, APIConfig.timeout): 2 s here, not 120
    with ConformanceFake(malformed="hang") as srv:
        start = time.monotonic()
        report = preflight(srv, timeout=2)
        elapsed = time.monotonic() - start
    expected = {name: "PASS" for name in CHECKS}
    expected["malformed request"] = "FAIL"
    assert grid(report) == expected
    assert "no answer" in report["checks"][-1]["evidence"]
    assert elapsed < 60  # bounded by the 2 s timeout, far from the 120 s default


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_in_its_own_field_passes_and_names_it(field):
    with ConformanceFake(reasoning=field) as srv:
        report = preflight(srv)
    assert grid(report) == {name: "PASS" for name in CHECKS}
    evidence = next(c["evidence"] for c in report["checks"] if c["check"] == "reasoning channel")
    assert evidence == f"reasoning arrives in message.{field}"


def test_reasoning_in_content_evidence():
    with ConformanceFake(reasoning="think") as srv:
        report = preflight(srv)
    evidence = next(c["evidence"] for c in report["checks"] if c["check"] == "reasoning channel")
    assert evidence == "reasoning arrives inside content as <think>...</think> (nano-eval drops it before scoring)"


def test_chat_that_fails_stops_the_preflight():
    with ConformanceFake(chat="fail") as srv:
        report = preflight(srv)
    assert [(c["check"], c["result"]) for c in report["checks"]] == [("/v1/models", "PASS"),
                                                                       ("chat completion", "FAIL")]
    assert "HTTP 500" in report["checks"][1]["evidence"]
    assert report["metrics"] == {"pass": 1, "warn": 0, "fail": 1}


def test_unreachable_server_fails_without_raising():
    from fakes import free_port
    report = ne._preflight_checks(ne.APIConfig(f"http://127.0.0.1:{free_port()}/v1", model=MODEL, timeout=2))
    assert [(c["check"], c["result"]) for c in report["checks"]] == [("/v1/models", "FAIL"),
                                                                       ("chat completion", "FAIL")]
    assert "connection refused" in report["checks"][0]["evidence"]


def test_max_completion_tokens_ignored_without_usage_is_not_a_pass():
    with ConformanceFake(usage="missing", max_completion_tokens="ignored") as srv:
        report = preflight(srv)
    assert grid(report)["max_completion_tokens"] != "PASS"


def assert_grid_on_stderr(err: str, expected: dict) -> None:
    lines = [line for line in err.splitlines() if line[:4] in ("PASS", "WARN", "FAIL")]
    assert [line.split("  ")[0].strip() for line in lines] == [expected[name] for name in CHECKS]
    for line, name in zip(lines, CHECKS):
        assert line[4:].lstrip().startswith(name)


def test_check_alone(isolated_env, capsys):
    with ConformanceFake() as srv:
        code, out, err = run_main(["--check", "--base_url", srv.base_url, "--no_progress"], capsys)
    assert code == 0, err
    document = json.loads(out)
    assert list(document["results"]) == ["api_conformance"]
    conformance = document["results"]["api_conformance"]
    assert [c["check"] for c in conformance["checks"]] == CHECKS
    assert all(c["result"] == "PASS" for c in conformance["checks"])
    assert conformance["metrics"] == {"pass": 13, "warn": 0, "fail": 0}
    assert document["complete"] is True
    assert document["config"]["model"] == MODEL
    assert_grid_on_stderr(err, {name: "PASS" for name in CHECKS})
    assert "api_conformance" in err  # the start line lists what runs
    assert "api_conformance" not in out.replace('"api_conformance"', "")  # stdout is only the JSON


def test_api_conformance_task_in_a_subprocess(isolated_env):
    with ConformanceFake() as srv:
        proc = cli("--tasks", "api_conformance", "--base-url", srv.base_url, "--no_progress")
    assert proc.returncode == 0, proc.stderr
    conformance = json.loads(proc.stdout)["results"]["api_conformance"]
    assert [(c["check"], c["result"]) for c in conformance["checks"]] == [(name, "PASS") for name in CHECKS]
    assert conformance["metrics"] == {"pass": 13, "warn": 0, "fail": 0}
    assert_grid_on_stderr(proc.stderr, {name: "PASS" for name in CHECKS})


def test_check_fail_exits_1_and_still_writes_results(isolated_env, tmp_path, capsys):
    output = tmp_path / "results.json"
    with ConformanceFake(seed="reject") as srv:
        code, out, err = run_main(["--check", "--base_url", srv.base_url, "--output", str(output)], capsys)
    assert code == 1
    document = json.loads(out)
    assert json.loads(output.read_text()) == document
    results = {c["check"]: c["result"] for c in document["results"]["api_conformance"]["checks"]}
    assert results == {**{name: "PASS" for name in CHECKS}, "seed": "FAIL"}
    assert document["results"]["api_conformance"]["metrics"] == {"pass": 12, "warn": 0, "fail": 1}
    assert "the conformance preflight failed 1 check(s)" in err
    assert_grid_on_stderr(err, {**{name: "PASS" for name in CHECKS}, "seed": "FAIL"})


def test_check_warn_only_exits_0(isolated_env, capsys):
    with ConformanceFake(image="reject", max_completion_tokens="reject") as srv:
        code, out, err = run_main(["--check", "--base_url", srv.base_url], capsys)
    assert code == 0, err
    assert json.loads(out)["results"]["api_conformance"]["metrics"] == {"pass": 11, "warn": 2, "fail": 0}
    assert_grid_on_stderr(err, {**{name: "PASS" for name in CHECKS}, "image input": "WARN",
                                "max_completion_tokens": "WARN"})


def test_check_with_a_task_runs_both(isolated_env, gsm8k_answers, capsys):
    with ConformanceFake(answers=gsm8k_answers) as srv:
        code, out, err = run_main(["--check", "--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url,
                                   "--max_samples", "5", "--no_progress"], capsys)
        first = srv.chat_requests[0]["body"]
        gsm8k_bodies = [r["body"] for r in srv.chat_requests
                        if isinstance(r["body"].get("messages"), list) and len(r["body"]["messages"]) > 2]
    assert code == 0, err
    results = json.loads(out)["results"]
    assert set(results) == {"api_conformance", "gsm8k_cot_llama"}
    assert all(c["result"] == "PASS" for c in results["api_conformance"]["checks"])
    assert results["gsm8k_cot_llama"]["num_samples"] == 5
    assert results["gsm8k_cot_llama"]["metrics"]["exact_match"] == 1.0  # the fake answers them right
    assert len(gsm8k_bodies) == 5
    # the preflight runs first
    assert first["messages"][-1]["content"].startswith("Write the numbers from 1 to 30")
    assert_grid_on_stderr(err, {name: "PASS" for name in CHECKS})
    # --tasks api_conformance,gsm8k_cot_llama is the same thing
    with ConformanceFake(answers=gsm8k_answers) as srv:
        code, out, _ = run_main(["--tasks", "api_conformance,gsm8k_cot_llama", "--base_url", srv.base_url,
                                 "--max_samples", "5", "--no_progress"], capsys)
    assert code == 0
    assert set(json.loads(out)["results"]) == {"api_conformance", "gsm8k_cot_llama"}


def test_check_hang_with_short_timeout_in_a_subprocess(isolated_env):
    with ConformanceFake(malformed="hang") as srv:
        proc = cli("--check", "--base_url", srv.base_url, "--timeout", "2", "--no_progress")
    assert proc.returncode == 1, proc.stderr
    checks = json.loads(proc.stdout)["results"]["api_conformance"]["checks"]
    assert {c["check"]: c["result"] for c in checks} == {**{name: "PASS" for name in CHECKS},
                                                          "malformed request": "FAIL"}
    assert "Traceback" not in proc.stderr


def test_check_with_a_model_list_of_the_wrong_shape(isolated_env, capsys):
    # /v1/models without a data list: --model is needed, and the check FAILs
    with ConformanceFake(models="no_data") as srv:
        code, out, err = run_main(["--check", "--base_url", srv.base_url, "--model", MODEL], capsys)
    assert code == 1
    checks = json.loads(out)["results"]["api_conformance"]["checks"]
    assert {c["check"]: c["result"] for c in checks} == {**{name: "PASS" for name in CHECKS}, "/v1/models": "FAIL"}


def test_counting_answer_is_what_the_fake_sends():
    # guard for the fake itself: the answer the stop / greedy checks build on
    assert COUNTING_ANSWER.split() == [str(i) for i in range(1, 31)]


def test_check_with_several_servers(isolated_env, gsm8k_answers, capsys):
    # each server gets its own preflight; a FAIL on either makes the command exit 1
    with ConformanceFake(answers=gsm8k_answers) as good, ConformanceFake(answers=gsm8k_answers, stop="included") as bad:
        code, out, err = run_main(["--check", "--tasks", "gsm8k_cot_llama", "--base_url", good.base_url,
                                   "--base_url", bad.base_url, "--max_samples", "3", "--no_progress"], capsys)
    assert code == 1
    document = json.loads(out)
    grids = [{c["check"]: c["result"] for c in run["results"]["api_conformance"]["checks"]} for run in document["runs"]]
    assert grids == [{name: "PASS" for name in CHECKS}, {**{name: "PASS" for name in CHECKS}, "stop": "FAIL"}]
    assert [run["results"]["gsm8k_cot_llama"]["num_samples"] for run in document["runs"]] == [3, 3]
    c = document["comparisons"][0]["comparison"]["gsm8k_cot_llama"]
    assert (c["n"], c["a_only_correct"], c["b_only_correct"]) == (3, 0, 0)
    assert sum(1 for line in err.splitlines() if line.startswith(("PASS", "WARN", "FAIL"))) == 2 * len(CHECKS)


def test_check_flag_and_conformance_task(isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "2", "--check"], capsys)
    checks = doc["results"]["api_conformance"]["checks"]
    assert {c["result"] for c in checks} <= {"PASS", "WARN", "FAIL"}
    assert doc["results"][GSM]["num_samples"] == 2
    metrics = doc["results"]["api_conformance"]["metrics"]
    assert metrics["pass"] + metrics["warn"] + metrics["fail"] == len(checks)
    assert code == (1 if metrics["fail"] else 0), err  # the fake is not a perfect server; a FAIL makes it 1
    code2, doc2, _ = main_json(["--tasks", "api_conformance", "--base_url", fake_openai.base_url], capsys)
    assert list(doc2["results"]) == ["api_conformance"]
    assert code2 == code


def test_check_alone_against_two_servers(isolated_env, fake_openai, tmp_path):
    with FakeOpenAI() as other:
        code, out, err = cli("--check", "--base_url", fake_openai.base_url, "--base_url", other.base_url,
                             "--output", tmp_path / "o.json")
    document = json.loads(out)
    assert "Traceback" not in err
    assert [len(run["results"]["api_conformance"]["checks"]) for run in document["runs"]] == [13, 13]
    failed = [run["results"]["api_conformance"]["metrics"]["fail"] for run in document["runs"]]
    assert code == (1 if any(failed) else 0), err
    assert document["comparisons"] == [] and json.loads((tmp_path / "o.json").read_text()) == document


def test_the_preflight_sends_the_headers(isolated_env):
    with FakeOpenAI() as srv:
        code, out, err = cli("--check", "--no_progress", "--base_url", srv.base_url, "--header", "X-Gw: pf-s3cr3t")
        requests = srv.requests
    assert json.loads(out)["results"]["api_conformance"]["checks"], err
    chat = [r for r in requests if r["path"] == "/v1/chat/completions"]
    assert len(chat) >= 3
    assert all(r["headers"].get("X-Gw") == "pf-s3cr3t" for r in requests)
    assert "pf-s3cr3t" not in out + err
