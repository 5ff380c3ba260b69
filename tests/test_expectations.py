"""Issue 15: --expect verdicts and published references, the --fail_if gate (compare and several
--base_url), --repeats with self-agreement, resume in the middle of a repeated run, and the Python API.

The fakes answer each gsm8k row by a per-row script (fakes.ByRow): plan[row] is a list of answers
for the successive requests of that row, so with --num_concurrent 1 (or when a row is sent once per
pass) the k-th request of a row is its repeat k. Every expected number below is worked out by hand
from the script, in the comments, never copied from nano-eval's output.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakes import cli, error_lines, gsm8k_args, read_log, run_inproc
from fakes import GSM8K_GOLD, ByRow, FakeOpenAI, Reply, gsm8k_row_of

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nano_eval as ne  # noqa: E402

NANO_EVAL = ROOT / "nano_eval.py"
TASK = ne.TASKS["gsm8k_cot_llama"]
LOG_NAME = "samples_gsm8k_cot_llama.jsonl"
STRICT, FLEX = "exact_match,strict-match", "exact_match,flexible-extract"
WRONG = "Let me think. The final answer is 0"  # no gold answer of the first 40 rows is 0
OTHER_RIGHT = "Let me see. The final answer is {}"  # right, but other text than ByRow's default

assert "0" not in GSM8K_GOLD[:40]
assert GSM8K_GOLD[:3] == ["18", "3", "70000"]


def right(row: int) -> str:
    """ByRow's own right answer for a row (the default when a row has no plan)."""
    return f"Let me think. The final answer is {GSM8K_GOLD[row]}"


# --- helpers ---------------------------------------------------------------------------------




def sem(values) -> float:
    """lm-eval's stderr of a mean, by hand: sample stdev (n - 1) / sqrt(n)."""
    n = len(values)
    m = sum(values) / n
    return math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def rows_of(srv) -> list[int]:
    return [gsm8k_row_of(r["body"]) for r in srv.chat_requests]


# =============================================================================================
# 1. --expect verdicts
# =============================================================================================

# 10 rows, rows 0-4 wrong: scores [0]*5 + [1]*5 -> observed 0.5
# stderr = sqrt(10 * 0.25 / 9) / sqrt(10) = sqrt(0.25 / 9) = 0.5 / 3 = 0.16667
# margin = 1.96 * 0.16667 + tolerance = 0.32667 + tolerance (0.34667 at the default 0.02)
HALF = [0.0] * 5 + [1.0] * 5
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
    assert rc == ne.EXIT_GATE == 6
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
    assert rc == ne.EXIT_USAGE == 2
    assert out == ""
    assert len(error_lines(err)) == 1 and len(err.strip().splitlines()) == 1, err
    assert repr(expect) in error_lines(err)[0]
    assert fake_hf.requests == []  # not even the dataset was fetched


def test_expect_tolerance_out_of_range_is_a_usage_error(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 3, "--expect", "gsm8k_cot_llama=0.5", "--expect_tolerance", "1.5"))
        assert srv.requests == []
    assert rc == 2 and out == "" and len(error_lines(err)) == 1


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
    assert ne.most_severe(codes) == expected


# =============================================================================================
# 2. Known references
# =============================================================================================

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
    assert ne.reference_key(model) == key


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


# =============================================================================================
# 3. --fail_if
# =============================================================================================


@pytest.fixture
def gate_logs(isolated_env, tmp_path):
    """Sample logs of 30 rows: all right, all wrong, and right but for rows 0-2."""
    logs = {}
    for name, wrong in (("right", ()), ("wrong", range(30)), ("three", range(3))):
        with FakeOpenAI(responder=ByRow(wrong=wrong)) as srv:
            run_inproc(srv, None, 30, log_dir=tmp_path / name)[0]
        logs[name] = tmp_path / name
    return logs


@pytest.mark.parametrize("a, b, flag, code", [
    # B wrong on 30 rows A gets right: a_only 30, b_only 0, McNemar p = 2 / 2^30 -> significant, B lower
    ("right", "wrong", ["--fail_if", "worse"], 6),
    ("right", "wrong", ["--fail-if", "different"], 6),
    ("right", "wrong", [], 0),
    # B better: not worse, but different
    ("wrong", "right", ["--fail_if", "worse"], 0),
    ("wrong", "right", ["--fail_if", "different"], 6),
    # 3 discordant rows: p = 2 / 2^3 = 0.25, not significant either way
    ("right", "three", ["--fail_if", "worse"], 0),
    ("right", "three", ["--fail_if", "different"], 0),
    ("three", "right", ["--fail_if", "different"], 0),
])
def test_compare_fail_if(gate_logs, a, b, flag, code):
    rc, out, err = cli("compare", gate_logs[a], gate_logs[b], "--json", *flag)
    assert rc == code, err
    c = json.loads(out)["comparison"]["gsm8k_cot_llama"]
    discordant = {"right": set(), "wrong": set(range(30)), "three": {0, 1, 2}}
    a_only = len(discordant[b] - discordant[a])
    b_only = len(discordant[a] - discordant[b])
    assert (c["n"], c["a_only_correct"], c["b_only_correct"]) == (30, a_only, b_only)
    assert c["mcnemar_p"] == pytest.approx(2 / 2 ** (a_only + b_only), rel=1e-9)
    if code == 6:
        word = "worse" if flag[1] == "worse" else "different"
        assert error_lines(err) == [f"nano-eval: error: --fail_if {flag[1]}: B is significantly {word} "
                                    "on gsm8k_cot_llama"]
    else:
        assert error_lines(err) == []


def test_fail_if_from_python(gate_logs):
    worse = ne.compare_paths(str(gate_logs["right"]), str(gate_logs["wrong"]))
    assert ne.gate_failures(worse, "worse") == ["gsm8k_cot_llama"]
    assert ne.gate_failures(worse, "different") == ["gsm8k_cot_llama"]
    better = ne.compare_paths(str(gate_logs["wrong"]), str(gate_logs["right"]))
    assert ne.gate_failures(better, "worse") == [] and ne.gate_failures(better, "different") == ["gsm8k_cot_llama"]
    assert ne.gate_exit(better, "worse") == 0 and ne.gate_exit(better, "different") == 6


def test_compare_fail_if_text_output_still_printed(gate_logs):
    rc, out, err = cli("compare", gate_logs["right"], gate_logs["wrong"], "--fail_if", "worse")
    assert rc == 6
    assert "  verdict         B is lower by 100.0 points, p=1.86e-09" in out.splitlines()  # 2/2^30


def test_compare_fail_if_bad_choice(gate_logs):
    rc, out, err = cli("compare", gate_logs["right"], gate_logs["wrong"], "--fail_if", "better")
    assert rc == 2 and out == "" and len(error_lines(err)) == 1


@pytest.mark.parametrize("c, fail_if, failed", [
    ({"n": 30, "mcnemar_p": 0.01, "difference": -0.2}, "worse", ["t"]),
    ({"n": 30, "mcnemar_p": 0.01, "difference": 0.2}, "worse", []),
    ({"n": 30, "mcnemar_p": 0.01, "difference": 0.2}, "different", ["t"]),
    ({"n": 30, "mcnemar_p": 0.05, "difference": -0.2}, "different", []),  # p < 0.05, strictly
    ({"n": 30, "mcnemar_p": 0.0499, "difference": -0.2}, "worse", ["t"]),
    ({"n": 30, "mcnemar_p": 0.01, "difference": -0.2}, None, []),
    ({"n": 0, "unmatched": 4, "verdict": "no samples in common"}, "different", []),
])
def test_gate_failures(c, fail_if, failed):
    assert ne.gate_failures({"t": c}, fail_if) == failed
    assert ne.gate_exit({"t": c}, fail_if) == (6 if failed else 0)


@pytest.mark.parametrize("wrong_a, wrong_b, fail_if, code", [
    # B wrong everywhere A is right: a_only 30, p = 2 / 2^30
    ((), range(30), "worse", 6),
    # B right everywhere A is wrong: better, so not worse ... but different
    (range(30), (), "worse", 0),
    (range(30), (), "different", 6),
    # 3 discordant rows, p = 0.25
    ((), range(3), "different", 0),
])
def test_several_servers_fail_if(isolated_env, tmp_path, wrong_a, wrong_b, fail_if, code):
    output = tmp_path / "results.json"
    with FakeOpenAI(responder=ByRow(wrong=wrong_a)) as srv_a, FakeOpenAI(responder=ByRow(wrong=wrong_b)) as srv_b:
        rc, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv_a.base_url, "--base_url", srv_b.base_url,
                           "--max_samples", 30, "--no_progress", "--fail_if", fail_if, "--output", output)
        assert len(srv_a.chat_requests) == 30 and len(srv_b.chat_requests) == 30
    assert rc == code, err
    document = json.loads(out)
    assert json.loads(output.read_text("utf-8")) == document  # written before the exit code
    accuracy = [1 - len(list(w)) / 30 for w in (wrong_a, wrong_b)]
    assert [run["results"]["gsm8k_cot_llama"]["metrics"]["exact_match"] for run in document["runs"]] == \
        pytest.approx(accuracy)
    c = document["comparisons"][0]["comparison"]["gsm8k_cot_llama"]
    assert c["n"] == 30 and c["difference"] == pytest.approx(accuracy[1] - accuracy[0])
    if code == 6:
        assert error_lines(err) == [f"nano-eval: error: --fail_if {fail_if}: B is significantly {fail_if} "
                                    "on gsm8k_cot_llama"]
    else:
        assert error_lines(err) == []


def test_several_servers_each_checked_against_expect(isolated_env):
    # A: 10/10, stderr 0, +0.1 > 0.02 -> above; B: 5/10, -0.4 < -0.34667 -> below -> exit 6
    with FakeOpenAI(responder=ByRow()) as srv_a, FakeOpenAI(responder=ByRow(wrong=range(5))) as srv_b:
        rc, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv_a.base_url, "--base_url", srv_b.base_url,
                           "--max_samples", 10, "--no_progress", "--expect", "gsm8k_cot_llama=0.9")
    assert rc == 6, err
    runs = json.loads(out)["runs"]
    assert [run["results"]["gsm8k_cot_llama"]["expectation"]["verdict"] for run in runs] == ["above", "below"]
    assert runs[0]["results"]["gsm8k_cot_llama"]["expectation"]["margin"] == pytest.approx(0.02)


# =============================================================================================
# 4. --repeats
# =============================================================================================


def test_repeats_deterministic_server(isolated_env, tmp_path):
    # 6 rows, rows 1 and 4 wrong, 3 repeats: every pass scores 4/6
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow(wrong={1, 4})) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 6, "--repeats", 3, "--log_samples", log_dir))
        bodies = [(gsm8k_row_of(r["body"]), r["body"]) for r in srv.chat_requests]
    assert rc == 0, err
    document = json.loads(out)
    assert document["config"]["repeats"] == 3
    result = document["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 18 and result["num_documents"] == 6 and result["num_ok"] == 18
    assert result["complete"] is True
    # the metrics are over the 6 documents (each the mean of its 3 repeats), not over 18 samples
    doc_scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert result["metrics"]["exact_match"] == pytest.approx(4 / 6)
    assert result["metrics"]["exact_match_stderr"] == pytest.approx(sem(doc_scores))
    assert sem(doc_scores) == pytest.approx(math.sqrt(4 / 90))  # var (4/3)/5 = 4/15, / 6
    repeats = result["repeats"]
    assert repeats["k"] == 3 and repeats["temperature"] == 0
    for name in (STRICT, FLEX):
        m = repeats["metrics"][name]
        assert m["per_repeat"] == pytest.approx([4 / 6] * 3)
        assert m["mean"] == pytest.approx(4 / 6) and m["sem"] == pytest.approx(0.0, abs=1e-12)
    assert repeats["self_agreement"] == {"documents": 6, "responses": 1.0, "scores": 1.0}
    assert "not deterministic" not in err
    # every row sent 3 times, with the very same body (temperature 0: same seed too)
    assert sorted(row for row, _ in bodies) == sorted(list(range(6)) * 3)
    for row in range(6):
        sent = [body for r, body in bodies if r == row]
        assert len(sent) == 3 and sent[0] == sent[1] == sent[2] and sent[0]["seed"] == 1234
    records = read_log(log_dir, sort=False)
    assert sorted((r["row_idx"], r["repeat"]) for r in records) == [(row, k) for row in range(6) for k in range(3)]


# Per-row script over 3 repeats (R right, W wrong, R' right with other text):
#   row 0: W R W     row 1: W W W     row 2: R W R     row 3: R W R
#   row 4: R R W     row 5: R R' R    rows 6-9: R R R
# pass 0 wrong {0, 1} -> 0.8; pass 1 wrong {1, 2, 3} -> 0.7; pass 2 wrong {0, 1, 4} -> 0.7
# mean 2.2 / 3 = 0.73333; SEM: deviations +1/15, -1/30, -1/30 -> var (1/225 + 2/900) / 2 = 1/300,
#   SEM = sqrt(1/300 / 3) = 1/30
# identical responses: rows 1, 6-9 -> 5/10; identical scores: rows 1, 5-9 -> 6/10
# document means: 1/3, 0, 2/3, 2/3, 2/3, 1, 1, 1, 1, 1 -> 7.3333 / 10 = 0.73333
FLAKY_PLAN = {0: [WRONG, right(0), WRONG], 1: [WRONG] * 3, 2: [right(2), WRONG, right(2)],
              3: [right(3), WRONG, right(3)], 4: [right(4), right(4), WRONG],
              5: [right(5), OTHER_RIGHT.format(GSM8K_GOLD[5]), right(5)]}


def test_repeats_flaky_server(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow(FLAKY_PLAN)) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 10, "--repeats", 3, "--num_concurrent", 1))
        assert len(srv.chat_requests) == 30
    assert rc == 0, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 30 and result["num_documents"] == 10
    repeats = result["repeats"]
    strict = repeats["metrics"][STRICT]
    assert strict["per_repeat"] == pytest.approx([0.8, 0.7, 0.7])
    assert strict["mean"] == pytest.approx(2.2 / 3)
    assert strict["sem"] == pytest.approx(1 / 30)
    assert repeats["metrics"][FLEX]["per_repeat"] == pytest.approx([0.8, 0.7, 0.7])
    assert repeats["self_agreement"] == {"documents": 10, "responses": 0.5, "scores": 0.6}
    doc_means = [1 / 3, 0, 2 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1, 1]
    assert result["metrics"]["exact_match"] == pytest.approx(2.2 / 3)
    assert result["metrics"]["exact_match_stderr"] == pytest.approx(sem(doc_means))
    warnings = [line for line in err.splitlines() if "not deterministic" in line]
    assert warnings == ["nano-eval: warning: gsm8k_cot_llama: at temperature 0, only 50.0% of documents got the "
                        "same response in all 3 repeats: this backend is not deterministic at this concurrency; "
                        "read any comparison against this floor"]


def test_a_failed_request_is_not_reported_as_nondeterminism(isolated_env):
    # 4 rows x 2 repeats; every answer that comes back is the same text both times, but the second
    # request of row 0 fails (HTTP 500, no retry). The failure is reported as a failure; it says
    # nothing about whether the backend is deterministic, so the temperature-0 warning must not fire.
    with FakeOpenAI(responder=ByRow({0: [right(0), Reply(status=500)]})) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 4, "--repeats", 2, "--max_retries", 1, "--max_fail_rate", 1))
    assert rc == 0, err
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["failures"] == {"http_500": 1}
    assert "1 of 8 samples failed (http_500: 1)" in err
    assert [line for line in err.splitlines() if "not deterministic" in line] == []


def test_repeats_at_temperature_above_0_use_seed_plus_repeat(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    plan = {0: [right(0), WRONG, right(0)]}  # different answers, but sampling: no warning
    with FakeOpenAI(responder=ByRow(plan)) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 2, "--repeats", 3, "--gen_kwargs", "temperature=0.7", "--num_concurrent", 1, "--log_samples", log_dir))
        sent = [(gsm8k_row_of(r["body"]), r["body"]) for r in srv.chat_requests]
    assert rc == 0, err
    for row in (0, 1):
        bodies = [body for r, body in sent if r == row]
        assert [b["seed"] for b in bodies] == [1234, 1235, 1236]
        assert {b["temperature"] for b in bodies} == {0.7}
        # nothing else differs between the repeats
        assert [{k: v for k, v in b.items() if k != "seed"} for b in bodies] == \
            [{k: v for k, v in bodies[0].items() if k != "seed"}] * 3
    records = read_log(log_dir, sort=False)
    assert sorted((r["row_idx"], r["repeat"], r["request"]["seed"]) for r in records) == \
        [(row, k, 1234 + k) for row in (0, 1) for k in range(3)]
    assert len({r["body_hash"] for r in records}) == 6  # each repeat its own body
    repeats = json.loads(out)["results"]["gsm8k_cot_llama"]["repeats"]
    assert repeats["temperature"] == 0.7
    assert repeats["self_agreement"] == {"documents": 2, "responses": 0.5, "scores": 0.5}
    assert "not deterministic" not in err


def test_repeats_with_an_explicit_seed(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 1, "--repeats", 2, "--gen_kwargs", "temperature=1", "--seed", 7, "--num_concurrent", 1))
        assert [r["body"]["seed"] for r in srv.chat_requests] == [7, 8]
    assert rc == 0, err


def test_repeat_summary_counts_self_agreement_over_documents_with_all_repeats():
    # doc 0: same text twice; doc 1: two texts, same scores; doc 2: only its first repeat (interrupted)
    def rec(row, repeat, content, strict):
        return {"row_idx": row, "repeat": repeat, "status": "ok", "response": {"content": content},
                "scores": {STRICT: strict, FLEX: strict}}
    records = [rec(0, 0, "a", 1.0), rec(1, 0, "b", 1.0), rec(2, 0, "c", 0.0),
               rec(1, 1, "b'", 1.0), rec(0, 1, "a", 1.0)]
    documents = list(ne.by_document(records).values())
    assert [[(r["row_idx"], r["repeat"]) for r in d] for d in documents] == [[(0, 0), (0, 1)], [(1, 0), (1, 1)],
                                                                             [(2, 0)]]
    summary = ne.repeat_summary(TASK, records, documents, 2, 0)
    # pass 0: 1, 1, 0 -> 2/3; pass 1: 1, 1 -> 1; mean 5/6, SEM |1 - 2/3| / 2 = 1/6
    assert summary["metrics"][STRICT]["per_repeat"] == pytest.approx([2 / 3, 1.0])
    assert summary["metrics"][STRICT]["mean"] == pytest.approx(5 / 6)
    assert summary["metrics"][STRICT]["sem"] == pytest.approx(1 / 6)
    # doc 2 has one repeat only: not counted
    assert summary["self_agreement"] == {"documents": 2, "responses": 0.5, "scores": 1.0}
    assert (summary["k"], summary["temperature"]) == (2, 0)


def test_no_repeats_records_repeat_0_and_no_summary(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        result = run_inproc(srv, None, 3, log_dir=tmp_path / "logs")[0]
    assert "repeats" not in result and "num_documents" not in result
    assert [r["repeat"] for r in read_log(tmp_path / "logs", sort=False)] == [0, 0, 0]


def test_repeats_must_be_positive(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        with pytest.raises(ne.UsageError):
            run_inproc(srv, None, 3, log_dir=tmp_path / "logs", repeats=0)[0]
        rc, out, err = cli(*gsm8k_args(srv, 3, "--repeats", 0))
        assert srv.chat_requests == []
    assert rc == 2 and len(error_lines(err)) == 1


# =============================================================================================
# 5. Resume in the middle of a repeated run
# =============================================================================================

# 10 rows x 2 repeats, one at a time. Row 0 always wrong; repeat 1 of rows 2 and 7 wrong.
# pass 0: 9/10 = 0.9; pass 1: 7/10 = 0.7 -> mean 0.8, SEM |0.9 - 0.7| / 2 = 0.1
# document means 0, 1, 0.5, 1, 1, 1, 1, 0.5, 1, 1 -> 0.8; identical responses and scores: 8/10
RESUME_DOCS = [0, 1, 0.5, 1, 1, 1, 1, 0.5, 1, 1]


def check_resume_result(result):
    assert result["num_samples"] == 20 and result["num_documents"] == 10 and result["num_ok"] == 20
    assert result["num_failed"] == 0 and result["complete"] is True
    assert result["metrics"]["exact_match"] == pytest.approx(0.8)
    assert result["metrics"]["exact_match_stderr"] == pytest.approx(sem(RESUME_DOCS))
    strict = result["repeats"]["metrics"][STRICT]
    assert strict["per_repeat"] == pytest.approx([0.9, 0.7])
    assert strict["mean"] == pytest.approx(0.8) and strict["sem"] == pytest.approx(0.1)
    assert result["repeats"]["self_agreement"] == {"documents": 10, "responses": 0.8, "scores": 0.8}


def test_resume_in_the_middle_of_a_repeated_run(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    # the first run: the second pass fails (HTTP 500) from row 5 on
    first_plan = {2: [right(2), WRONG], **{r: [right(r), Reply(status=500)] for r in range(5, 10)}}
    with FakeOpenAI(responder=ByRow(first_plan, wrong={0})) as srv:
        port = srv.port
        first = run_inproc(srv, None, 10, log_dir=log_dir, repeats=2, num_concurrent=1, max_retries=1)[0]
        assert len(srv.chat_requests) == 20
    assert first["num_samples"] == 20 and first["num_failed"] == 5 and first["failures"] == {"http_500": 5}
    assert first["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([0.9, 0.3])  # wrong 0, 2, 5-9
    logged = read_log(log_dir, sort=False)
    assert sorted((r["row_idx"], r["repeat"]) for r in logged if r["status"] != "ok") == \
        [(r, 1) for r in range(5, 10)]

    # the rerun sends only repeat 1 of rows 5-9; row 7 now answers wrong there
    responder = ByRow({7: WRONG}, wrong={0})
    with FakeOpenAI(responder=responder, port=port) as srv:  # the same URL: the log is this server's
        again = run_inproc(srv, None, 10, log_dir=log_dir, repeats=2, num_concurrent=1, max_retries=1)[0]
        assert len(srv.chat_requests) == 5
    assert sorted(responder.rows) == [5, 6, 7, 8, 9]
    assert again["num_reused"] == 15
    check_resume_result(again)
    records = read_log(log_dir, sort=False)
    assert len(records) == 25 and all("repeat" in r for r in records)
    last = {(r["row_idx"], r["repeat"]): r for r in records}
    assert sorted(last) == [(row, k) for row in range(10) for k in range(2)]
    assert all(r["status"] == "ok" for r in last.values())

    # the same numbers as a run that was never interrupted
    with FakeOpenAI(responder=ByRow({2: [right(2), WRONG], 7: [right(7), WRONG]}, wrong={0})) as srv:
        whole = run_inproc(srv, None, 10, log_dir=tmp_path / "whole", repeats=2, num_concurrent=1)[0]
    check_resume_result(whole)
    assert whole["num_reused"] == 0
    assert again["metrics"] == pytest.approx(whole["metrics"])
    assert again["repeats"] == whole["repeats"]


def test_sigint_in_the_second_pass_then_resume(isolated_env, tmp_path):
    # 6 rows x 2 repeats, 2 at a time; row 1 always wrong. The second requests of rows 3-5 hang, so at
    # the signal pass 0 is done (rows 0-5) and pass 1 has rows 0-2: 9 samples of 12.
    log_dir = tmp_path / "logs"
    hang = Reply(hang=True)
    responder = ByRow({r: [right(r), hang] for r in (3, 4, 5)}, wrong={1})
    with FakeOpenAI(responder=responder) as srv:
        port = srv.port
        proc = subprocess.Popen([sys.executable, str(NANO_EVAL), *map(str, gsm8k_args(srv, 6, "--repeats", 2, "--num_concurrent", 2, "--log_samples", log_dir))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not ((log_dir / LOG_NAME).exists() and len(read_log(log_dir, sort=False)) >= 9 and srv.in_flight >= 2):
                assert time.monotonic() < deadline, "the run did not reach the second pass"
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    assert proc.returncode == 130, err
    partial = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert partial["complete"] is False and partial["num_samples"] == 9 and partial["num_planned"] == 12
    # pass 0: 5/6; pass 1 so far (rows 0-2): 2/3; only rows 0-2 have both repeats
    assert partial["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([5 / 6, 2 / 3])
    assert partial["repeats"]["self_agreement"] == {"documents": 3, "responses": 1.0, "scores": 1.0}
    assert sorted((r["row_idx"], r["repeat"]) for r in read_log(log_dir, sort=False)) == \
        [(row, k) for row in range(6) for k in range(2) if (row, k) not in {(3, 1), (4, 1), (5, 1)}]

    again = ByRow(wrong={1})
    with FakeOpenAI(responder=again, port=port) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 6, "--repeats", 2, "--num_concurrent", 2, "--log_samples", log_dir))
    assert rc == 0, err
    assert sorted(again.rows) == [3, 4, 5]
    final = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert final["complete"] is True and final["num_samples"] == 12 and final["num_reused"] == 9
    assert final["metrics"]["exact_match"] == pytest.approx(5 / 6)
    assert final["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([5 / 6, 5 / 6])
    assert final["repeats"]["self_agreement"] == {"documents": 6, "responses": 1.0, "scores": 1.0}


def test_resume_a_smaller_run_with_more_rows_and_repeats(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow(wrong={1})) as srv:
        port = srv.port
        rc, out, err = cli(*gsm8k_args(srv, 4, "--log_samples", log_dir))
        assert len(srv.chat_requests) == 4
    assert rc == 0, err
    # 6 rows x 2 repeats: rows 0-3 of repeat 0 are in the log; 12 - 4 = 8 requests remain
    responder = ByRow(wrong={1})
    with FakeOpenAI(responder=responder, port=port) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 6, "--log_samples", log_dir, "--repeats", 2))
        assert len(srv.chat_requests) == 8
    assert rc == 0, err
    assert responder.attempts == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2}
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_reused"] == 4 and result["num_samples"] == 12 and result["num_documents"] == 6
    records = read_log(log_dir, sort=False)
    assert sorted((r["row_idx"], r["repeat"]) for r in records) == [(row, k) for row in range(6) for k in range(2)]
    # equal to an uninterrupted run: 5/6 each pass
    with FakeOpenAI(responder=ByRow(wrong={1})) as srv:
        rc, out2, err2 = cli(*gsm8k_args(srv, 6, "--log_samples", tmp_path / "whole", "--repeats", 2))
    assert rc == 0, err2
    whole = json.loads(out2)["results"]["gsm8k_cot_llama"]
    assert result["metrics"] == whole["metrics"]
    assert result["metrics"]["exact_match"] == pytest.approx(5 / 6)
    assert result["repeats"] == whole["repeats"]
    assert result["repeats"]["metrics"][STRICT]["per_repeat"] == pytest.approx([5 / 6, 5 / 6])


def test_resume_a_log_written_before_repeats_existed(isolated_env, tmp_path):
    # an older log has no "repeat" in its records: they are repeat 0
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        port = srv.port
        run_inproc(srv, None, 3, log_dir=log_dir)[0]
    path = log_dir / LOG_NAME
    old = [{k: v for k, v in r.items() if k != "repeat"} for r in read_log(log_dir, sort=False)]
    path.write_text("".join(json.dumps(r) + "\n" for r in old), "utf-8")
    responder = ByRow()
    with FakeOpenAI(responder=responder, port=port) as srv:
        result = run_inproc(srv, None, 3, log_dir=log_dir, repeats=2)[0]
    assert sorted(responder.rows) == [0, 1, 2]
    assert result["num_reused"] == 3 and result["num_samples"] == 6


def test_replay_a_later_repeat_resends_its_own_seed(isolated_env, tmp_path):
    log_dir = tmp_path / "logs"
    with FakeOpenAI(responder=ByRow()) as srv:
        rc, out, err = cli(*gsm8k_args(srv, 1, "--repeats", 2, "--gen_kwargs", "temperature=0.5", "--log_samples", log_dir))
        assert rc == 0, err
        records = read_log(log_dir, sort=False)
        line = 1 + next(i for i, r in enumerate(records) if r["repeat"] == 1)
        rc, out, err = cli("replay", f"{log_dir / LOG_NAME}:{line}")
        assert rc == 0, err
        assert len(srv.chat_requests) == 3 and srv.chat_requests[-1]["body"]["seed"] == 1235
        assert srv.chat_requests[-1]["body"] == records[line - 1]["request"]


# =============================================================================================
# 6. compare of repeated runs
# =============================================================================================


@pytest.fixture
def repeated_logs(isolated_env, tmp_path):
    """A: row 0 wrong, deterministic. B: all right on the first pass; on the second, row 2 is wrong and
    row 5 right with other text. 10 rows x 2 repeats each."""
    with FakeOpenAI(responder=ByRow(wrong={0})) as srv:
        run_inproc(srv, None, 10, log_dir=tmp_path / "a", repeats=2)[0]
    plan = {2: [right(2), WRONG], 5: [right(5), OTHER_RIGHT.format(GSM8K_GOLD[5])]}
    with FakeOpenAI(responder=ByRow(plan)) as srv:
        run_inproc(srv, None, 10, log_dir=tmp_path / "b", repeats=2, num_concurrent=1)[0]
    with FakeOpenAI(responder=ByRow(wrong={0})) as srv:
        run_inproc(srv, None, 10, log_dir=tmp_path / "single")[0]
    return tmp_path


def test_compare_repeated_runs_json(repeated_logs):
    rc, out, err = cli("compare", repeated_logs / "a", repeated_logs / "b", "--json")
    assert rc == 0, err
    c = json.loads(out)["comparison"]["gsm8k_cot_llama"]
    # the paired comparison is over the first repeat: A 9/10, B 10/10, one discordant row (0)
    assert (c["n"], c["a_only_correct"], c["b_only_correct"]) == (10, 0, 1)
    assert c["accuracy_a"] == pytest.approx(0.9) and c["accuracy_b"] == pytest.approx(1.0)
    assert c["self_agreement_a"] == {"documents": 10, "responses": 1.0, "scores": 1.0}
    # B: rows 2 and 5 differ in text (8/10), only row 2 in score (9/10)
    assert c["self_agreement_b"] == {"documents": 10, "responses": 0.8, "scores": 0.9}


def test_compare_repeated_runs_text(repeated_logs):
    rc, out, err = cli("compare", repeated_logs / "a", repeated_logs / "b")
    assert rc == 0, err
    assert ("  self-agreement  A 100.0% identical over its repeats   B 80.0% identical over its repeats   "
            "(the noise floor for identical text)") in out.splitlines()


def test_compare_one_repeated_run_and_one_single(repeated_logs):
    rc, out, err = cli("compare", repeated_logs / "single", repeated_logs / "b", "--json")
    assert rc == 0, err
    c = json.loads(out)["comparison"]["gsm8k_cot_llama"]
    assert "self_agreement_a" not in c
    assert c["self_agreement_b"] == {"documents": 10, "responses": 0.8, "scores": 0.9}
    rc, out, err = cli("compare", repeated_logs / "single", repeated_logs / "single")
    assert rc == 0 and "self-agreement" not in out


def test_several_servers_with_repeats_show_self_agreement(isolated_env, tmp_path):
    plan = {2: [right(2), WRONG], 5: [right(5), OTHER_RIGHT.format(GSM8K_GOLD[5])]}
    with FakeOpenAI(responder=ByRow()) as srv_a, FakeOpenAI(responder=ByRow(plan)) as srv_b:
        rc, out, err = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv_a.base_url, "--base_url", srv_b.base_url,
                           "--max_samples", 10, "--no_progress", "--repeats", 2, "--num_concurrent", 1)
    assert rc == 0, err
    c = json.loads(out)["comparisons"][0]["comparison"]["gsm8k_cot_llama"]
    assert c["self_agreement_a"] == {"documents": 10, "responses": 1.0, "scores": 1.0}
    assert c["self_agreement_b"] == {"documents": 10, "responses": 0.8, "scores": 0.9}
    assert "  self-agreement  A 100.0% identical over its repeats   B 80.0% identical over its repeats" in err


# =============================================================================================
# 7. Python API
# =============================================================================================


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


def test_fail_if_needs_several_servers(isolated_env, fake_openai):
    proc = subprocess.run([sys.executable, str(ROOT / "nano_eval.py"), "--tasks", "gsm8k_cot_llama", "--base_url",
                           fake_openai.base_url, "--fail_if", "worse"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "several --base_url" in proc.stderr
    assert fake_openai.chat_requests == []


def test_reference_key_of_a_served_path_with_a_trailing_slash():
    assert ne.reference_key("/models/Llama-3.1-8B-Instruct/") == "llama-3.1-8b-instruct"
