"""Results: what a run reports and how it exits.

The aggregate (means, lm-eval's stderr, self-agreement over repeats), the warnings of the
reasoning accounting, --expect verdicts and the published reference scores, the results JSON
(stdout and --output alike, whatever stdout's encoding), and the exit codes with their order of
severity (--max_fail_rate, the gate, real errors).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest


import nano_eval as ne  # noqa: E402
from fakes import (ByRow, FakeOpenAI, GSM, GSM8K_GOLD, GSM_ARGS, NANO_EVAL, Reply, TASK, WRONG, cli,  # noqa: E402
                   error_lines, gsm8k_args, gsm8k_first, main_json, read_log, responder_for, right, run_gsm8k_plain,
                   run_inproc, sem, warning_lines)
from nano_eval import APIConfig, _mean_stderr  # noqa: E402


# --------------------------------------------------------------------------------------------
# aggregate: means and lm-eval's stderr
# --------------------------------------------------------------------------------------------


def test_stderr_is_sample_stdev_over_sqrt_n(isolated_env, tmp_path):
    rows = gsm8k_first(10)
    correct = {0, 2, 3, 7}
    with FakeOpenAI(responder=responder_for(correct, rows)) as server:
        result = run_gsm8k_plain(APIConfig(url=server.base_url, model="fake-model"), 10, tmp_path)
    values = [1.0 if i in correct else 0.0 for i in range(10)]
    expected_se = statistics.stdev(values) / math.sqrt(10)
    m = result["metrics"]
    for key in ("exact_match", "exact_match,strict-match", "exact_match,flexible-extract"):
        assert m[key] == pytest.approx(0.4)
        assert m[f"{key},valid"] == pytest.approx(0.4)
    for key in ("exact_match_stderr", "exact_match_stderr,strict-match", "exact_match_stderr,flexible-extract"):
        assert m[key] == pytest.approx(expected_se, rel=1e-12)
    assert expected_se != pytest.approx(statistics.pstdev(values) / math.sqrt(10))  # n-1, not n
    assert result["num_samples"] == 10 and result["num_ok"] == 10 and result["failures"] == {}
    assert result["headline"] == "exact_match"


def test_stderr_is_na_for_one_sample(isolated_env, tmp_path):
    rows = gsm8k_first(1)
    with FakeOpenAI(responder=responder_for({0}, rows)) as server:
        result = run_gsm8k_plain(APIConfig(url=server.base_url, model="fake-model"), 1, tmp_path)
    assert result["num_samples"] == 1
    assert result["metrics"]["exact_match"] == 1.0
    assert result["metrics"]["exact_match_stderr"] == "N/A"
    assert result["metrics"]["exact_match_stderr,flexible-extract"] == "N/A"
    assert _mean_stderr([1.0]) == (1.0, "N/A")
    assert _mean_stderr([0.0, 1.0])[1] == pytest.approx(0.5)


STRICT, FLEX = "exact_match,strict-match", "exact_match,flexible-extract"


def test_latency_percentiles_are_nearest_rank_over_the_requests_sent():
    """One quantile for latency and logprob distances alike: the nearest rank (p50 of four is
    the second). Reused answers were not sent by this run and do not count."""
    def rec(row, latency, reused=False):
        return ne._Logged.of({"task": TASK.name, "doc_hash": str(row), "row_idx": row, "status": "ok",
                             "scores": {STRICT: 1.0, FLEX: 1.0}, "latency": latency, "attempts": 1, "reused": reused})
    records = [rec(0, 4.0), rec(1, 1.0), rec(2, 3.0), rec(3, 2.0), rec(4, 99.0, reused=True)]
    result = ne._aggregate(TASK, records, planned=5, elapsed=2.0)
    assert (result["latency_p50"], result["latency_p95"]) == (2.0, 4.0)
    assert (result["num_reused"], result["requests_per_second"]) == (1, 2.0)
    assert ne._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0 and ne._quantile([], 0.5) is None


def test_aggregate_counts_each_record_where_it_belongs():
    """Hand-made records, one of each kind: what each count, rate and mean is taken over."""
    def rec(row, status, strict, **fields):
        response = {"finish_reason": fields.pop("finish", None), "usage": fields.pop("usage", {})}
        return ne._Logged.of({"task": TASK.name, "doc_hash": str(row), "row_idx": row, "status": status,
                             "scores": {STRICT: strict, FLEX: strict}, "response": response, **fields})
    records = [
        rec(0, "ok", 1.0, finish="stop", latency=1.0, attempts=1,
            usage={"prompt_tokens": 100, "completion_tokens": 10}),
        rec(1, "truncated", 1.0, finish="length", latency=3.0, attempts=1, usage={"completion_tokens": 20}),
        rec(2, "ok", 0.0, finish="stop", attempts=2, usage={"completion_tokens": 5}),  # no latency (an older log)
        rec(3, "http_500", 0.0, latency=4.0, attempts=5, error="fake error 500"),
        rec(4, "connection", 0.0, attempts=0, error=ne._NOT_SENT),
        rec(5, "ok", 1.0, finish="stop", latency=50.0, attempts=1, reused=True, usage={"completion_tokens": 1000}),
    ]
    result = ne._aggregate(TASK, records, planned=8, elapsed=2.0, revisions=["abc"])
    assert (result["num_samples"], result["num_ok"], result["num_truncated"]) == (6, 3, 1)
    assert result["failures"] == {"connection": 1, "http_500": 1} and result["num_failed"] == 2
    assert result["num_not_sent"] == 1 and result["num_reused"] == 1
    assert result["finish_reasons"] == {"length": 1, "stop": 3}
    assert result["metrics"][STRICT] == 0.5  # over every sample, the failed ones scoring 0
    assert result["metrics"][f"{STRICT},valid"] == 0.75  # over ok and truncated
    assert result["complete"] is False and result["num_planned"] == 8
    # sent by this run: rows 0-3 (row 4 was not sent, row 5 reused), 35 completion tokens, in 2 s
    assert (result["requests_per_second"], result["output_tokens_per_second"]) == (2.0, 17.5)
    assert (result["latency_p50"], result["latency_p95"]) == (3.0, 4.0)  # of 1, 3, 4: row 2 has none
    assert result["usage"] == {"prompt_tokens": 100, "completion_tokens": 1035}
    assert result["dataset"]["revision"] == "abc"
    two = ne._aggregate(TASK, records, planned=6, elapsed=2.0, revisions=["a", "b"])
    assert two["dataset"]["revision"] == ["a", "b"]
    assert ne._aggregate(TASK, records, planned=6, elapsed=2.0)["complete"] is True
    assert _mean_stderr([]) == (None, "N/A")

    flagged = [rec(i, "ok", 1.0, latency=i + 1.0, attempts=1, reasoning_flags=["answer_only_in_reasoning"])
               for i in range(51)]
    result = ne._aggregate(TASK, flagged, planned=51, elapsed=1.0)
    assert result["reasoning"] == {"answer_only_in_reasoning": 51}
    assert result["reasoning_rows"] == {"answer_only_in_reasoning": list(range(50))}  # the first 50
    assert (result["latency_p50"], result["latency_p95"]) == (26.0, 49.0)  # nearest rank: the 26th and 49th of 51
    assert "num_planned" not in result and "num_not_sent" not in result

    chart = [ne._Logged.of({"task": "chartqa", "doc_hash": "0", "row_idx": 0, "status": "ok",
                           "image": {"format": "png"}}),
             ne._Logged.of({"task": "chartqa", "doc_hash": "1", "row_idx": 1, "status": "http_500",
                           "image": {"format": "jpeg"}})]
    assert ne._aggregate(ne.TASKS["chartqa"], chart, planned=2, elapsed=1.0)["images"] == {
        "formats": {"png": 1, "jpeg": 1}, "jpeg_reencoded": 1}  # what was sent, answered or not


def test_aggregate_over_repeats_of_an_interrupted_run():
    # doc 0: right then wrong; doc 1: right then failed; doc 2: its first repeat only; doc 3: right twice
    def rec(row, repeat, status, strict, content=None):
        return ne._Logged.of({"task": TASK.name, "doc_hash": str(row), "row_idx": row, "repeat": repeat,
                             "status": status, "response": {"content": content},
                             "scores": {STRICT: strict, FLEX: strict}})
    records = [rec(0, 0, "ok", 1.0, "a"), rec(1, 0, "ok", 1.0, "c"), rec(2, 0, "ok", 0.0, "d"),
               rec(3, 0, "ok", 1.0, "e"),
               rec(0, 1, "ok", 0.0, "b"), rec(1, 1, "http_500", 0.0), rec(3, 1, "ok", 1.0, "e")]
    result = ne._aggregate(TASK, records, planned=8, elapsed=1.0, repeats=2)
    assert result["num_documents"] == 4
    assert result["metrics"][STRICT] == 0.5  # each document's mean over its own repeats: 1/2, 1/2, 0, 1
    # a document with a failed repeat is left out of the agreement: docs 0 and 3, of which 3 agrees
    assert result["repeats"]["self_agreement"] == {"documents": 2, "responses": 0.5, "scores": 0.5}
    # a third pass never started: two passes are summarised
    result = ne._aggregate(TASK, records, planned=12, elapsed=1.0, repeats=3)
    assert result["metrics"][STRICT] == 0.5
    assert result["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([0.75, 1 / 3])
    assert result["repeats"]["self_agreement"] == {"documents": 0, "responses": None, "scores": None}


def test_repeat_summary_counts_self_agreement_over_documents_with_all_repeats():
    # doc 0: same text twice; doc 1: two texts, same scores; doc 2: only its first repeat (interrupted)
    def rec(row, repeat, content, strict):
        return ne._Logged.of({"task": TASK.name, "doc_hash": str(row), "row_idx": row, "repeat": repeat,
                             "status": "ok", "response": {"content": content}, "scores": {STRICT: strict, FLEX: strict}})
    records = [rec(0, 0, "a", 1.0), rec(1, 0, "b", 1.0), rec(2, 0, "c", 0.0),
               rec(1, 1, "b'", 1.0), rec(0, 1, "a", 1.0)]
    documents = list(ne._by_document(records).values())
    assert [[(r.row_idx, r.repeat) for r in d] for d in documents] == [[(0, 0), (0, 1)], [(1, 0), (1, 1)],
                                                                             [(2, 0)]]
    summary = ne._repeat_summary(TASK, records, documents, 2, 0)
    # pass 0: 1, 1, 0 -> 2/3; pass 1: 1, 1 -> 1; mean 5/6, SEM |1 - 2/3| / 2 = 1/6
    assert summary["metrics"][STRICT]["per_repeat"] == pytest.approx([2 / 3, 1.0])
    assert summary["metrics"][STRICT]["mean"] == pytest.approx(5 / 6)
    assert summary["metrics"][STRICT]["sem"] == pytest.approx(1 / 6)
    # doc 2 has one repeat only: not counted
    assert summary["self_agreement"] == {"documents": 2, "responses": 0.5, "scores": 1.0}
    assert (summary["k"], summary["temperature"]) == (2, 0)


# --------------------------------------------------------------------------------------------
# Warnings: reasoning accounting
# --------------------------------------------------------------------------------------------


def cli_one_sample(tmp_path, reply: Reply) -> tuple[int, dict, dict, str]:
    """(exit code, result, the sample record, stderr) of a one-sample CLI run answered with `reply`."""
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1, "--log_samples", tmp_path / "l")
    (record,) = read_log(tmp_path / "l" / "samples_gsm8k_cot_llama.jsonl")
    return code, json.loads(out)["results"]["gsm8k_cot_llama"], record, err


def test_truncated_reasoning_without_an_answer_is_a_budget_problem(isolated_env, tmp_path):
    code, result, record, err = cli_one_sample(
        tmp_path, Reply(content="", reasoning_content="thinking... hmm", finish_reason="length"))
    assert code == 1  # the one sample is empty: a failure
    assert record["status"] == "empty"
    assert record["reasoning_flags"] == ["budget_ran_out_in_reasoning"]
    assert "answer_only_in_reasoning" not in result.get("reasoning", {})
    assert result["reasoning"] == {"budget_ran_out_in_reasoning": 1}
    assert result["finish_reasons"] == {"length": 1}
    assert result["num_truncated"] == 1
    budget = [line for line in warning_lines(err) if "ran out of tokens" in line]
    assert len(budget) == 1 and "max_tokens" in budget[0]
    assert not [line for line in warning_lines(err) if "reasoning channel" in line]


def test_null_content_keeps_its_finish_reason(isolated_env, tmp_path):
    code, result, record, err = cli_one_sample(tmp_path, Reply(content=None, finish_reason="stop"))
    assert record["status"] == "empty" and record["response"]["finish_reason"] == "stop"
    assert result["finish_reasons"] == {"stop": 1}
    assert result["num_truncated"] == 0
    assert record["reasoning_flags"] == [] and "reasoning" not in result


def test_an_answer_only_in_the_reasoning_is_flagged_without_max_tokens_advice(isolated_env, tmp_path):
    code, result, record, err = cli_one_sample(
        tmp_path, Reply(content="", reasoning_content="The final answer is 18", finish_reason="stop"))
    assert record["reasoning_flags"] == ["answer_only_in_reasoning"]
    assert result["reasoning"] == {"answer_only_in_reasoning": 1}
    assert result["finish_reasons"] == {"stop": 1} and result["num_truncated"] == 0
    advice = [line for line in warning_lines(err) if "reasoning channel" in line]
    assert len(advice) == 1 and "max_tokens" not in advice[0]
    assert not [line for line in warning_lines(err) if "ran out of tokens" in line]


# --------------------------------------------------------------------------------------------
# --expect
# --------------------------------------------------------------------------------------------


HALF = [0.0] * 5 + [1.0] * 5  # a run of 10 with half right
HALF_STDERR = 0.5 / 3
assert sem(HALF) == pytest.approx(HALF_STDERR)


@pytest.mark.parametrize("expect, tolerance, reference, metric, verdict, code", [
    # difference -0.3, within 0.34667
    ("gsm8k_cot_llama=0.8", None, 0.8, "exact_match", "consistent", 0),
    # difference -0.4 < -0.34667
    ("gsm8k_cot_llama=0.9", None, 0.9, "exact_match", "below", 6),
    # difference +0.4 > 0.34667: above is not a failure
    ("gsm8k_cot_llama=0.1", None, 0.1, "exact_match", "above", 0),
    # difference -0.35 just beyond 0.34667 ...
    ("gsm8k_cot_llama=0.85", None, 0.85, "exact_match", "below", 6),
    # ... and within 0.32667 + 0.03 = 0.35667
    ("gsm8k_cot_llama=0.85", 0.03, 0.85, "exact_match", "consistent", 0),
    # the percentage form: 84.5% = 0.845, difference -0.345 within 0.34667
    ("gsm8k_cot_llama=84.5%", None, 0.845, "exact_match", "consistent", 0),
    # 85% with tolerance 0: margin 0.32667 < 0.35
    ("gsm8k_cot_llama=85%", 0.0, 0.85, "exact_match", "below", 6),
    # +0.35 > 0.32667 with tolerance 0
    ("gsm8k_cot_llama=0.15", 0.0, 0.15, "exact_match", "above", 0),
    # a named metric: strict-match is the headline, same numbers
    ("gsm8k_cot_llama:exact_match,strict-match=0.9", None, 0.9, STRICT, "below", 6),
])
def test_expect_verdicts(isolated_env, tmp_path, expect, tolerance, reference, metric, verdict, code):
    extra = ["--expect", expect] + (["--expect_tolerance", tolerance] if tolerance is not None else [])
    with FakeOpenAI(responder=ByRow(wrong=range(5))) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10, *extra))
    assert rc == code, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["metrics"]["exact_match"] == pytest.approx(0.5)
    tol = 0.02 if tolerance is None else tolerance
    margin = 1.96 * HALF_STDERR + tol
    e = result["expectation"]
    assert set(e) == {"metric", "reference", "observed", "difference", "stderr", "tolerance", "margin", "verdict",
                      "source"}
    assert e["metric"] == metric and e["verdict"] == verdict and e["source"] == "--expect"
    assert e["reference"] == pytest.approx(reference, abs=1e-12)
    assert e["observed"] == pytest.approx(0.5)
    assert e["difference"] == pytest.approx(0.5 - reference, abs=1e-6)
    assert e["stderr"] == pytest.approx(HALF_STDERR)
    assert e["tolerance"] == pytest.approx(tol)
    assert e["margin"] == pytest.approx(margin, abs=1e-6)
    assert "informational" not in e
    lines = [line for line in err.splitlines() if "vs expected" in line]
    assert lines == [f"nano-eval: gsm8k_cot_llama: {metric} 0.5000 vs expected {reference:.4f} (--expect), "
                     f"difference {0.5 - reference:+.4f}, allowed +-{margin:.4f}: {verdict}"]
    gate = "nano-eval: error: gsm8k_cot_llama scored significantly below --expect"
    assert (gate in err.splitlines()) == (verdict == "below")


def test_expect_below_writes_everything_before_exiting_6(isolated_env, tmp_path):
    output = tmp_path / "results.json"
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow(wrong=range(5))) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10, "--expect", "gsm8k_cot_llama=0.9", "--output", output, "--log_samples", log_dir))
        assert len(srv.chat_requests) == 10
    assert rc == ne._EXIT_GATE == 6
    document = json.loads(out)  # stdout is the whole results JSON, nothing else
    assert json.loads(output.read_text("utf-8")) == document
    assert document["complete"] is True
    result = document["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 10 and result["expectation"]["verdict"] == "below"
    assert sorted(r["row_idx"] for r in read_log(log_dir, sort=False)) == list(range(10))
    assert error_lines(err) == ["nano-eval: error: gsm8k_cot_llama scored significantly below --expect"]


def test_expect_a_named_metric_uses_its_own_stderr(isolated_env, tmp_path):
    # rows 0-3: the gold number without "The final answer is": strict 0, flexible 1
    # rows 4-5: wrong (0, 0); rows 6-9: right (1, 1)
    # strict = 4/10 = 0.4; flexible = 8/10 = 0.8, stderr sqrt(0.8 * 0.2 / 9) = 0.13333
    # --expect flexible 0.5: difference +0.3 > 1.96 * 0.13333 + 0.02 = 0.28133 -> above
    plan = {r: f"I computed {GSM8K_GOLD[r]} in the end" for r in range(4)}
    with FakeOpenAI(responder=ByRow(plan, wrong={4, 5})) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10, "--expect", "gsm8k_cot_llama:exact_match,flexible-extract=0.5"))
    assert rc == 0, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["metrics"][STRICT] == pytest.approx(0.4) and result["metrics"][FLEX] == pytest.approx(0.8)
    flex_stderr = sem([1.0] * 4 + [0.0] * 2 + [1.0] * 4)
    assert flex_stderr == pytest.approx(math.sqrt(0.16 / 9))
    e = result["expectation"]
    assert (e["metric"], e["verdict"]) == (FLEX, "above")
    assert e["observed"] == pytest.approx(0.8) and e["difference"] == pytest.approx(0.3, abs=1e-6)
    assert e["stderr"] == pytest.approx(flex_stderr)
    assert e["margin"] == pytest.approx(1.96 * flex_stderr + 0.02, abs=1e-6)
    # the headline against 0.5 instead: -0.1 within 1.96 * sqrt(0.24 / 9) + 0.02 = 0.34006
    head = ne.expectation(result, 0.5)
    assert (head["metric"], head["verdict"]) == ("exact_match", "consistent")
    assert head["observed"] == pytest.approx(0.4) and head["stderr"] == pytest.approx(math.sqrt(0.24 / 9))


@pytest.mark.parametrize("expect", [
    "nosuch=0.5",                                # no such task
    "chartqa=0.5",                               # a task, but not one of --tasks
    "gsm8k_cot_llama:accuracy=0.5",              # no such metric
    "gsm8k_cot_llama:exact_match,valid=0.5",     # not a metric --expect can gate on
    "gsm8k_cot_llama=1.5",                       # a fraction above 1 without %
    "gsm8k_cot_llama=150%",                      # above 100%
    "gsm8k_cot_llama=-0.1",                      # negative
    "gsm8k_cot_llama=abc",                       # not a number
    "gsm8k_cot_llama=",                          # no value
    "gsm8k_cot_llama",                           # no =
])
def test_expect_bad_forms_exit_2_before_any_request(isolated_env, fake_hf, expect):
    with FakeOpenAI(responder=ByRow()) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 3, "--expect", expect))
        assert srv.requests == []
    assert rc == ne._EXIT_USAGE == 2
    assert out == ""
    assert len(error_lines(err)) == 1 and len(err.strip().splitlines()) == 1, err
    assert repr(expect) in error_lines(err)[0]
    assert fake_hf.requests == []  # not even the dataset was fetched


def test_expect_tolerance_out_of_range_is_a_usage_error(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 3, "--expect", "gsm8k_cot_llama=0.5", "--expect_tolerance", "1.5"))
        assert srv.requests == []
    assert rc == 2 and out == "" and len(error_lines(err)) == 1


@pytest.mark.parametrize("metrics, reference, kwargs, verdict, margin", [
    # stderr 0.1: margin 0.196 + 0.02 = 0.216; 0.5 - 0.8 = -0.3 -> below
    ({"exact_match": 0.5, "exact_match_stderr": 0.1}, 0.8, {}, "below", 0.216),
    ({"exact_match": 0.5, "exact_match_stderr": 0.1}, 0.7, {}, "consistent", 0.216),
    ({"exact_match": 0.5, "exact_match_stderr": 0.1}, 0.25, {}, "above", 0.216),
    ({"exact_match": 0.5, "exact_match_stderr": 0.1}, 0.8, {"tolerance": 0.11}, "consistent", 0.306),
    # one sample: stderr "N/A" counts as 0, only the tolerance is left: 0.03 > 0.02
    ({"exact_match": 1.0, "exact_match_stderr": "N/A"}, 0.97, {}, "above", 0.02),
    ({"exact_match": 1.0, "exact_match_stderr": "N/A"}, 0.99, {}, "consistent", 0.02),
])
def test_expectation_arithmetic(metrics, reference, kwargs, verdict, margin):
    e = ne.expectation({"metrics": metrics, "headline": "exact_match"}, reference, **kwargs)
    assert e["verdict"] == verdict
    assert e["margin"] == pytest.approx(margin)
    assert e["difference"] == pytest.approx(metrics["exact_match"] - reference)


def test_expectation_without_a_score():
    assert ne.expectation({"error": "server down"}, 0.5) is None
    assert ne.expectation({"metrics": {"exact_match": None}, "headline": "exact_match"}, 0.5) is None


def test_several_servers_each_checked_against_expect(isolated_env):
    # A: 10/10, stderr 0, +0.1 > 0.02 -> above; B: 5/10, -0.4 < -0.34667 -> below -> exit 6
    with FakeOpenAI(responder=ByRow()) as srv_a, FakeOpenAI(responder=ByRow(wrong=range(5))) as srv_b:
        rc, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv_a.base_url, "--base_url", srv_b.base_url,
                           "--max_samples", 10, "--no_progress", "--expect", "gsm8k_cot_llama=0.9")
    assert rc == 6, err
    runs = json.loads(out)["runs"]
    assert [run["results"]["gsm8k_cot_llama"]["expectation"]["verdict"] for run in runs] == ["above", "below"]
    assert runs[0]["results"]["gsm8k_cot_llama"]["expectation"]["margin"] == pytest.approx(0.02)


# --------------------------------------------------------------------------------------------
# Published reference scores
# --------------------------------------------------------------------------------------------


# 10 rows, rows 0-6 wrong: observed 0.3, stderr sqrt(0.3 * 0.7 / 9) = 0.15275,
# margin 1.96 * 0.15275 + 0.02 = 0.31940
THIRTY_STDERR = math.sqrt(0.21 / 9)


def test_known_reference_is_information_only(isolated_env):
    # Llama 3.1 8B Instruct: 0.845; 0.3 - 0.845 = -0.545 < -0.31940 -> below, but no --expect: exit 0
    with FakeOpenAI(models=["meta-llama/Llama-3.1-8B-Instruct"], responder=ByRow(wrong=range(7))) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10))
    assert rc == 0, err
    e = json.loads(out)["results"]["gsm8k_cot_llama"]["expectation"]
    assert e["reference"] == 0.845 and e["informational"] is True and e["verdict"] == "below"
    assert e["observed"] == pytest.approx(0.3) and e["difference"] == pytest.approx(-0.545, abs=1e-6)
    assert e["stderr"] == pytest.approx(THIRTY_STDERR)
    assert e["margin"] == pytest.approx(1.96 * THIRTY_STDERR + 0.02, abs=1e-6)
    assert "Llama 3.1" in e["source"]
    assert error_lines(err) == []
    assert sum("vs expected 0.8450" in line for line in err.splitlines()) == 1


def test_known_reference_consistent(isolated_env):
    # Llama 3.2 1B Instruct: 0.444; 0.3 - 0.444 = -0.144 within 0.31940
    with FakeOpenAI(models=["meta-llama/Llama-3.2-1B-Instruct"], responder=ByRow(wrong=range(7))) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10))
    assert rc == 0, err
    e = json.loads(out)["results"]["gsm8k_cot_llama"]["expectation"]
    assert (e["reference"], e["verdict"], e["informational"]) == (0.444, "consistent", True)
    assert e["difference"] == pytest.approx(-0.144, abs=1e-6)


def test_expect_overrides_the_known_reference_and_gates(isolated_env):
    with FakeOpenAI(models=["meta-llama/Llama-3.1-8B-Instruct"], responder=ByRow(wrong=range(7))) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10, "--expect", "gsm8k_cot_llama=84.5%"))
    assert rc == 6, err
    e = json.loads(out)["results"]["gsm8k_cot_llama"]["expectation"]
    assert (e["source"], e["verdict"]) == ("--expect", "below") and "informational" not in e
    assert e["reference"] == pytest.approx(0.845)


def test_chartqa_known_reference_with_repeats(isolated_env, fixtures_dir):
    # Qwen2.5-VL-7B-Instruct: 0.855. 10 chart rows, rows 0 and 2 answered "0" (labels 14 and 3), twice each:
    # relaxed accuracy 8/10 = 0.8, stderr sqrt(0.8 * 0.2 / 9) = 0.13333 over the 10 documents;
    # 0.8 - 0.855 = -0.055 within 1.96 * 0.13333 + 0.02 = 0.28133 -> consistent
    rows = [json.loads(line) for line in (fixtures_dir / "chartqa" / "rows.jsonl").read_text("utf-8").splitlines()]
    answers = {r["query"]: r["label"][0] for r in rows[:10] if r["row_idx"] not in (0, 2)}
    with FakeOpenAI(models=["Qwen/Qwen2.5-VL-7B-Instruct"], answers=answers) as srv:
        rc, out, err = cli("--tasks", "chartqa", "--base_url", srv.base_url, "--max_samples", 10, "--no_progress",
                           "--repeats", 2)
        assert len(srv.chat_requests) == 20
    assert rc == 0, err
    result = json.loads(out)["results"]["chartqa"]
    assert result["metrics"]["relaxed_accuracy"] == pytest.approx(0.8)
    assert result["metrics"]["relaxed_accuracy,human"] == pytest.approx(0.8)
    assert result["metrics"]["relaxed_accuracy_stderr"] == pytest.approx(math.sqrt(0.16 / 9))
    assert result["repeats"]["self_agreement"] == {"documents": 10, "responses": 1.0, "scores": 1.0}
    assert result["repeats"]["metrics"]["relaxed_accuracy"]["per_repeat"] == pytest.approx([0.8, 0.8])
    e = result["expectation"]
    assert (e["metric"], e["reference"], e["verdict"], e["informational"]) == \
        ("relaxed_accuracy", 0.855, "consistent", True)
    assert e["difference"] == pytest.approx(-0.055, abs=1e-6)
    assert e["margin"] == pytest.approx(1.96 * math.sqrt(0.16 / 9) + 0.02, abs=1e-6)


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B-Instruct-AWQ", "my-model"])
def test_unknown_model_gets_no_expectation(isolated_env, model):
    with FakeOpenAI(models=[model], responder=ByRow(wrong=range(7))) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10))
    assert rc == 0, err
    assert "expectation" not in json.loads(out)["results"]["gsm8k_cot_llama"]
    assert "vs expected" not in err


@pytest.mark.parametrize("model, key", [
    ("Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("LLAMA-3.1-8B-INSTRUCT", "llama-3.1-8b-instruct"),
    ("Llama-3.1-8B-Instruct-bf16", "llama-3.1-8b-instruct"),
    ("Llama-3.1-8B-Instruct-BF16", "llama-3.1-8b-instruct"),
    ("Llama-3.1-8B-Instruct-fp16", "llama-3.1-8b-instruct"),
    ("Llama-3.1-8B-Instruct_f32", "llama-3.1-8b-instruct"),
    ("Llama-3.1-8B-Instruct-fp8", "llama-3.1-8b-instruct-fp8"),
    ("Llama-3.1-8B-Instruct-AWQ", "llama-3.1-8b-instruct-awq"),
    ("Llama-3.1-8B-Instruct-q4", "llama-3.1-8b-instruct-q4"),
    ("Llama-3.1-8B-Instruct-Q4_K_M", "llama-3.1-8b-instruct-q4_k_m"),
    ("my-model", "my-model"),
    ("llama3.1:8b-instruct-fp16", "llama3.1:8b-instruct"),  # an Ollama tag: not the table's spelling
])
def test_reference_key(model, key):
    assert ne._reference_key(model) == key


def test_reference_key_of_a_served_path_with_a_trailing_slash():
    assert ne._reference_key("/models/Llama-3.1-8B-Instruct/") == "llama-3.1-8b-instruct"


@pytest.mark.parametrize("task, model, score", [
    ("gsm8k_cot_llama", "meta-llama/Llama-3.1-8B-Instruct", 0.845),
    ("gsm8k_cot_llama", "meta-llama/Llama-3.1-70B-Instruct", 0.951),
    ("gsm8k_cot_llama", "meta-llama/Llama-3.2-1B-Instruct", 0.444),
    ("gsm8k_cot_llama", "Llama-3.2-3B-Instruct", 0.777),
    ("chartqa", "Qwen/Qwen2.5-VL-7B-Instruct", 0.855),
    ("chartqa", "meta-llama/Llama-3.2-11B-Vision-Instruct", 0.834),
    ("chartqa", "meta-llama/Llama-3.2-90B-Vision-Instruct", 0.855),
    ("gsm8k_cot_llama", "Meta-Llama-3.1-8B-Instruct-bf16", 0.845),
    ("gsm8k_cot_llama", "Llama-3.1-8B-Instruct-fp8", None),
    ("gsm8k_cot_llama", "Llama-3.1-8B-Instruct-AWQ", None),
    ("gsm8k_cot_llama", "Llama-3.1-8B-Instruct-q4", None),
    ("gsm8k_cot_llama", "Qwen/Qwen2.5-VL-7B-Instruct", None),  # a model known for another task only
    ("chartqa", "meta-llama/Llama-3.1-8B-Instruct", None),
    ("gsm8k_cot_llama", "llama3.1:8b-instruct-fp16", None),
    ("gsm8k_cot_llama", "meta-llama/Llama-3.1-8B-Instruct-GPTQ-Int4", None),
    ("gsm8k_cot_llama", None, None),
])
def test_reference_score(task, model, score):
    found = ne.reference_score(task, model)
    if score is None:
        assert found is None
    else:
        assert found[0] == score and isinstance(found[1], str) and found[1]


def test_python_api_repeats_and_expectation(isolated_env, tmp_path):
    # 4 rows x 2 repeats; row 3 wrong on its second repeat only
    # pass 0: 1.0, pass 1: 0.75 -> mean 0.875, SEM 0.125; documents 1, 1, 1, 0.5
    with FakeOpenAI(responder=ByRow({3: [right(3), WRONG]})) as srv:
        result = run_inproc(srv, None, 4, repeats=2, num_concurrent=1)[0]
        assert len(srv.chat_requests) == 8
    assert result["num_samples"] == 8 and result["num_documents"] == 4
    strict = result["repeats"]["metrics"][STRICT]
    assert strict["per_repeat"] == pytest.approx([1.0, 0.75])
    assert strict["mean"] == pytest.approx(0.875) and strict["sem"] == pytest.approx(0.125)
    assert result["repeats"]["self_agreement"] == {"documents": 4, "responses": 0.75, "scores": 0.75}
    stderr = sem([1, 1, 1, 0.5])
    assert stderr == pytest.approx(0.125)  # deviations 1/8, 1/8, 1/8, -3/8: var (12/64)/3 = 1/16, /4
    assert result["metrics"]["exact_match_stderr"] == pytest.approx(stderr)
    # 0.875 - 0.5 = 0.375 > 1.96 * 0.125 + 0.02 = 0.265 -> above
    e = ne.expectation(result, 0.5)
    assert (e["metric"], e["verdict"], e["source"]) == ("exact_match", "above", None)
    assert e["difference"] == pytest.approx(0.375) and e["margin"] == pytest.approx(0.265)
    # with a tolerance of 0.12: 0.245 + 0.12 = 0.365 < 0.375, still above; 0.14: 0.385 > 0.375, consistent
    assert ne.expectation(result, 0.5, tolerance=0.12)["verdict"] == "above"
    assert ne.expectation(result, 0.5, tolerance=0.14)["verdict"] == "consistent"
    # 0.875 vs 1.0: -0.125 within 0.265
    assert ne.expectation(result, 1.0, STRICT)["verdict"] == "consistent"


# --------------------------------------------------------------------------------------------
# The results JSON
# --------------------------------------------------------------------------------------------


def test_output_file_equals_stdout(isolated_env, fake_openai, tmp_path, capsys):
    out = tmp_path / "res.json"
    code, doc, _ = main_json(["--tasks", GSM, "--base_url", fake_openai.base_url, "--max_samples", "3", "--output", out], capsys)
    assert code == 0
    assert json.loads(out.read_text("utf-8")) == doc
    log = tmp_path / "res_samples" / f"samples_{GSM}.jsonl"  # the sample log defaults beside it
    records = [json.loads(line) for line in log.read_text("utf-8").splitlines()]
    assert sorted(r["row_idx"] for r in records) == [0, 1, 2]
    assert doc["config"]["log_samples"] == str(tmp_path / "res_samples")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_results_reach_a_cp1252_stdout(isolated_env, tmp_path):
    instruction = "请一步一步思考"
    model = "fake-model-\U0001f680-ü"
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=ByRow()) as srv:
        proc = subprocess.run([sys.executable, str(NANO_EVAL), *GSM_ARGS, "--base_url", srv.base_url, "--max_samples", "2",
                               "--system_instruction", instruction, "--model", model, "--output", str(output)],
                              capture_output=True, timeout=60, env={**os.environ, "PYTHONIOENCODING": "cp1252"})
        chat = srv.chat_requests
    err = proc.stderr.decode("cp1252", "replace")
    assert proc.returncode == 0, err
    assert "internal error" not in err and "Traceback" not in err
    document = json.loads(proc.stdout.decode("cp1252"))
    assert document["config"]["system_instruction"] == instruction
    assert document["config"]["model"] == model
    assert document["results"]["gsm8k_cot_llama"]["num_ok"] == 2
    assert json.loads(output.read_text("utf-8")) == document  # the file is UTF-8 whatever stdout is
    assert instruction in output.read_text("utf-8")
    assert [r["body"]["messages"][0] for r in chat] == [{"role": "system", "content": instruction}] * 2
    assert all(r["body"]["model"] == model for r in chat)
    table = [line for line in err.splitlines() if line.startswith("task ") or line.startswith("gsm8k_cot_llama ")]
    assert len(table) >= 2 and "metric" in table[0] and "exact_match" in table[1]


# --------------------------------------------------------------------------------------------
# Exit codes and their severity
# --------------------------------------------------------------------------------------------


def test_fail_rate_above_the_limit_exits_1_after_writing_results(isolated_env, tmp_path):
    output = tmp_path / "res.json"
    with FakeOpenAI(responder=ByRow({3: Reply(status=400), 11: Reply(content="")})) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv.base_url, "--max_samples", 20,
                             "--max_fail_rate", 0.05, "--output", output, "--no_progress")
    assert code == 1
    document = json.loads(out)
    assert json.loads(output.read_text("utf-8")) == document
    result = document["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 20 and result["num_failed"] == 2
    assert result["failures"] == {"empty": 1, "http_400": 1}
    assert document["complete"] is True
    assert result["metrics"]["exact_match"] == pytest.approx(18 / 20)
    assert result["metrics"]["exact_match,valid"] == 1.0
    lines = error_lines(err)
    assert len(lines) == 1 and "2 of 20" in lines[0] and "max_fail_rate" in lines[0]
    assert "Traceback" not in err


def test_no_samples_is_no_failure_rate():
    assert ne._fail_rate_exit({GSM: {"num_failed": 0, "num_samples": 0}}, 0.05) == ne._EXIT_OK
    assert ne._fail_rate_exit({GSM: {"num_failed": 1, "num_samples": 20}}, 0.05) == ne._EXIT_OK  # 5% is not more
    assert ne._fail_rate_exit({GSM: {"num_failed": 2, "num_samples": 20}}, 0.05) == ne._EXIT_FAILURES


@pytest.mark.parametrize("codes, expected", [
    ([], 0),
    ([0, 6], 6),        # a failed gate when nothing else went wrong
    ([6, 0, 6], 6),
    ([6, 1], 1),        # too many failed samples outranks the gate
    ([1, 6], 1),
    ([3, 6, 0], 3),     # an unusable server outranks it too
    ([6, 5], 5),
    ([6, 130, 3], 130),  # an interruption first
])
def test_most_severe_ranks_the_gate_below_real_errors(codes, expected):
    assert ne._most_severe(codes) == expected
