"""Scoring parity with lm-eval: every golden case (computed with lm-eval 0.4.13's own filters and
metrics), the chartqa list-literal label rule, the stderr aggregation of a real run, think stripping."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fakes import FakeOpenAI, Reply, question_of  # noqa: E402
from nano_eval import (  # noqa: E402
    TASKS,
    APIConfig,
    answer_text,
    chartqa_target,
    gsm8k_target,
    mean_stderr,
    run_task,
    score_chartqa,
    score_gsm8k,
)

GOLDEN = ROOT / "tests" / "fixtures" / "golden"
GSM8K_CASES = json.loads((GOLDEN / "gsm8k_scoring.json").read_text("utf-8"))
CHARTQA_CASES = json.loads((GOLDEN / "chartqa_scoring.json").read_text("utf-8"))


def test_golden_files_are_complete():
    assert len(GSM8K_CASES) == 47
    assert len(CHARTQA_CASES) == 63


# --------------------------------------------------------------------------------------------
# gsm8k_cot_llama
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", GSM8K_CASES, ids=[f"{i}:{c['note']}" for i, c in enumerate(GSM8K_CASES)])
def test_gsm8k_golden_case(case):
    target = gsm8k_target({"question": "q", "answer": case["target"]})
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


# --------------------------------------------------------------------------------------------
# chartqa
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CHARTQA_CASES, ids=[f"{i}:{c['note']}" for i, c in enumerate(CHARTQA_CASES)])
def test_chartqa_golden_case(case):
    target = chartqa_target({"label": case["target"]})
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
    assert chartqa_target({"label": [label]}) == target
    assert TASKS["chartqa"].target({"label": [label], "query": "q"}) == target


def test_chartqa_only_first_label_is_used():
    assert chartqa_target({"label": ["7", "8"]}) == "7"
    _, scores = score_chartqa("Final Answer: 8", chartqa_target({"label": ["7", "8"]}))
    assert scores["exact_match"] == 0.0


# --------------------------------------------------------------------------------------------
# aggregation: mean and stderr of a real run
# --------------------------------------------------------------------------------------------


def gsm8k_first(n: int) -> list[dict]:
    with open(ROOT / "tests" / "fixtures" / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def responder_for(correct_rows: set, rows: list, fail_rows: set = frozenset(), wrap=None):
    """Answer rows in ``correct_rows`` right, rows in ``fail_rows`` with HTTP 400, the rest wrong."""
    by_question = {r["question"]: (i, r["answer"].split("####")[-1].strip()) for i, r in enumerate(rows)}

    def respond(body, n):
        found = question_of(body)
        i, gold = by_question[found[1]]
        if i in fail_rows:
            return Reply(status=400)
        text = f"Let me think. The final answer is {gold}" if i in correct_rows else "The final answer is -1"
        return wrap(text) if wrap else text

    return respond


def run(config: APIConfig, n: int, tmp_path: Path) -> dict:
    return asyncio.run(run_task(TASKS["gsm8k_cot_llama"], config, max_samples=n, data_dir=str(tmp_path / "data"),
                                progress=False))


def test_stderr_is_sample_stdev_over_sqrt_n(isolated_env, tmp_path):
    rows = gsm8k_first(10)
    correct = {0, 2, 3, 7}
    with FakeOpenAI(responder=responder_for(correct, rows)) as server:
        result = run(APIConfig(url=server.base_url, model="fake-model"), 10, tmp_path)
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
        result = run(APIConfig(url=server.base_url, model="fake-model"), 1, tmp_path)
    assert result["num_samples"] == 1
    assert result["metrics"]["exact_match"] == 1.0
    assert result["metrics"]["exact_match_stderr"] == "N/A"
    assert result["metrics"]["exact_match_stderr,flexible-extract"] == "N/A"
    assert mean_stderr([1.0]) == (1.0, "N/A")
    assert mean_stderr([0.0, 1.0])[1] == pytest.approx(0.5)


def test_failed_samples_score_zero_over_all_samples(isolated_env, tmp_path):
    """A failed sample (HTTP 400, not retried) counts as wrong; ",valid" excludes it."""
    rows = gsm8k_first(8)
    correct, failed = {0, 1, 2, 5}, {3}
    with FakeOpenAI(responder=responder_for(correct, rows, failed)) as server:
        config = APIConfig(url=server.base_url, model="fake-model", retry_base_delay=0.01)
        result = run(config, 8, tmp_path)
        assert len(server.chat_requests) == 8  # 400 is never retried
    m = result["metrics"]
    values = [1.0 if i in correct else 0.0 for i in range(8)]
    assert m["exact_match"] == pytest.approx(4 / 8)
    assert m["exact_match_stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(8))
    assert m["exact_match,valid"] == pytest.approx(4 / 7)
    assert result["failures"] == {"http_400": 1}
    assert result["num_failed"] == 1 and result["num_ok"] == 7


# --------------------------------------------------------------------------------------------
# think stripping
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
    assert answer_text(content, keep) == expected


@pytest.mark.parametrize("keep_think", [False, True])
def test_think_stripping_in_a_run(isolated_env, tmp_path, keep_think):
    """The answer only inside <think>...</think>: dropped (wrong) unless keep_think."""
    rows = gsm8k_first(3)
    wrap = lambda text: f"<think>{text}</think>\n"  # noqa: E731
    with FakeOpenAI(responder=responder_for({0, 1, 2}, rows, wrap=wrap)) as server:
        config = APIConfig(url=server.base_url, model="fake-model", keep_think=keep_think)
        result = run(config, 3, tmp_path)
    expected = 1.0 if keep_think else 0.0
    assert result["metrics"]["exact_match,strict-match"] == expected
    assert result["metrics"]["exact_match,flexible-extract"] == expected
    assert result["num_ok"] == 3  # the content is not empty: still an ok sample


def test_think_stripped_answer_after_think_is_scored(isolated_env, tmp_path):
    rows = gsm8k_first(2)
    wrap = lambda text: f"<think>The final answer is 123456 maybe 99</think>\n\n{text}"  # noqa: E731
    with FakeOpenAI(responder=responder_for({0, 1}, rows, wrap=wrap)) as server:
        result = run(APIConfig(url=server.base_url, model="fake-model"), 2, tmp_path)
    assert result["metrics"]["exact_match"] == 1.0
    assert result["metrics"]["exact_match,flexible-extract"] == 1.0
