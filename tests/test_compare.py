"""Compare (issue 5, issue 15): mcnemar_exact, paired_bootstrap, compare_runs / `nano-eval
compare`, the --fail_if gate, and several --base_url servers run and compared in one command.

The sample logs here are mostly written by hand, record by record, in the sample-log format of the
contract, with planted differences whose exact p-values and intervals are known.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from fakes import GSM8K_ROWS, ROOT  # noqa: E402

import nano_eval as ne  # noqa: E402
from fakes import (ByRow, FakeOpenAI, GSM8K_GOLD, OTHER_RIGHT, TASK, WRONG, cli, error_lines, one_error,  # noqa: E402
                   right, run_inproc, run_main)


# --------------------------------------------------------------------------------------------
# mcnemar_exact, paired_bootstrap, compare_runs and `nano-eval compare`
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a_only, b_only, expected", [
    # no discordant pairs: nothing to test
    (0, 0, 1.0),
    # n=5, tail = C(5,0) = 1 -> 2 * 1/32 = 0.0625
    (0, 5, 0.0625),
    (5, 0, 0.0625),
    # n=10, tail = C(10,0) + C(10,1) = 1 + 10 = 11 -> 2 * 11/1024 = 22/1024 = 0.021484375
    (1, 9, 22 / 1024),
    (9, 1, 22 / 1024),
    # n=10, tail = 1+10+45+120+210+252 = 638 -> 2 * 638/1024 > 1 -> capped at 1.0
    (5, 5, 1.0),
    # n=8, tail = 1 + 8 + 28 = 37 -> 2 * 37/256 = 74/256 = 0.2890625
    (6, 2, 74 / 256),
    # n=1, tail = C(1,0) = 1 -> 2 * 1/2 = 1.0
    (1, 0, 1.0),
    # n=4, tail = 1 + 4 = 5 -> 2 * 5/16 = 0.625
    (3, 1, 0.625),
    # n=35, tail = 1 + 35 + 595 + 6545 + 52360 + 324632 = 384168 -> 2 * 384168 / 2^35
    (30, 5, 2 * 384168 / 2 ** 35),
])
def test_mcnemar_exact_known_values(a_only, b_only, expected):
    assert ne._mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-12, abs=0)


def binomial_two_sided(a: int, b: int) -> Fraction:
    """Exact two-sided sign-test p at 1/2, computed without math.comb: the pmf by the recurrence
    P(k+1) = P(k) * (n-k)/(k+1), starting at P(0) = 1/2^n; p = min(1, 2 * P(X <= min(a, b)))."""
    n = a + b
    if n == 0:
        return Fraction(1)
    pmf, tail = Fraction(1, 2 ** n), Fraction(0)
    for k in range(min(a, b) + 1):
        tail += pmf
        pmf = pmf * (n - k) / (k + 1)
    return min(Fraction(1), 2 * tail)


def test_mcnemar_exact_large_case_against_direct_sum():
    # n = 250: p = 2 * sum_{k<=100} C(250, k) / 2^250, summed exactly then converted once
    a, b = 150, 100
    direct = Fraction(2 * sum(math.comb(250, k) for k in range(101)), 2 ** 250)
    assert ne._mcnemar_exact(a, b) == pytest.approx(float(direct), rel=1e-12)
    assert ne._mcnemar_exact(a, b) == pytest.approx(float(binomial_two_sided(a, b)), rel=1e-12)
    assert 0.0 < ne._mcnemar_exact(a, b) < 0.01  # 150 vs 100 is clearly significant (about 0.0019)
    # a very large n must not overflow (2 ** 6000 does not fit a float)
    assert ne._mcnemar_exact(3000, 3000) == 1.0
    assert ne._mcnemar_exact(1100, 900) == pytest.approx(float(binomial_two_sided(1100, 900)), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 120), st.integers(0, 120))
def test_mcnemar_exact_property(a, b):
    p = ne._mcnemar_exact(a, b)
    assert p == ne._mcnemar_exact(b, a)  # symmetric
    assert 0.0 < p <= 1.0
    assert p == pytest.approx(float(binomial_two_sided(a, b)), rel=1e-9)
    if a != b:  # moving one discordant pair to the larger side (same n) never raises p
        hi, lo = max(a, b), min(a, b)
        if lo > 0:
            assert ne._mcnemar_exact(hi + 1, lo - 1) <= p


def planted_differences(n: int, seed: int = 7) -> list:
    """Per-pair score differences B - A: B alone right on 15% of pairs, A alone on 5%,
    so the true mean difference is 0.15 - 0.05 = 0.10 (B is right on 10% more)."""
    diffs = [1.0] * (15 * n // 100) + [-1.0] * (5 * n // 100)
    diffs += [0.0] * (n - len(diffs))
    random.Random(seed).shuffle(diffs)
    return diffs


def test_paired_bootstrap_is_deterministic_for_a_seed():
    diffs = planted_differences(500)
    first = ne._paired_bootstrap(diffs, 2000, seed=3)
    assert ne._paired_bootstrap(diffs, 2000, seed=3) == first
    assert ne._paired_bootstrap(list(diffs), 2000, seed=3) == first
    assert ne._paired_bootstrap(diffs, 2000, seed=4) != first  # the seed is actually used
    # the default seed is fixed too (compare's CI must be the same every time it is run)
    assert ne._paired_bootstrap(diffs, 2000) == ne._paired_bootstrap(diffs, 2000)


def test_paired_bootstrap_covers_planted_difference():
    diffs = planted_differences(1000)
    assert sum(diffs) / len(diffs) == pytest.approx(0.10)
    low, high = ne._paired_bootstrap(diffs, 10_000, seed=0)
    assert low < 0.10 < high
    assert low > 0.0  # a 10-point difference on 1000 pairs is clearly non-zero
    # sd of the differences: E[d^2] - mean^2 = 0.20 - 0.01 = 0.19 -> sd 0.436; se = 0.436/sqrt(1000)
    # = 0.0138; a 95% interval is about 2 * 1.96 * 0.0138 = 0.054 wide
    assert 0.040 < high - low < 0.070
    assert low == pytest.approx(0.10 - 1.96 * math.sqrt(0.19 / 1000), abs=0.006)
    assert high == pytest.approx(0.10 + 1.96 * math.sqrt(0.19 / 1000), abs=0.006)


def test_paired_bootstrap_width_shrinks_with_n():
    widths = []
    for n in (100, 400, 1600):
        low, high = ne._paired_bootstrap(planted_differences(n), 2000, seed=1)
        assert low <= 0.10 <= high
        widths.append(high - low)
    # the width goes as 1/sqrt(n): quadrupling n about halves it
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.3)
    assert widths[1] / widths[2] == pytest.approx(2.0, rel=0.3)


def test_paired_bootstrap_all_equal_and_empty():
    assert ne._paired_bootstrap([0.0] * 300, 1000) == (0.0, 0.0)  # every pair agrees
    assert ne._paired_bootstrap([], 1000) == (0.0, 0.0)
    assert ne._paired_bootstrap([1.0] * 50, 1000) == (1.0, 1.0)  # B right everywhere A is wrong



HEADLINE = "exact_match,strict-match"

# Hand values for planted_runs() (n = 200 pairs; row 200 is unmatched):
#   accuracy A = 130/200 = 0.65, accuracy B = (100 + 5)/200 = 0.525, B - A = -0.125
#   a_only = 30 (rows 100-129), b_only = 5 (rows 130-134)
#   McNemar: n = 35, tail = sum_{k<=5} C(35,k) = 384168 -> p = 2 * 384168 / 2^35 = 2.2362e-05
#   identical text: rows 0-79 and 135-199 -> 80 + 65 = 145 of 200 = 72.5%
#   first difference: 20 rows at 5, 29 rows at 34, 1 row at 0, 5 rows at 34
#       -> (20*5 + 29*34 + 0 + 5*34) / 55 = (100 + 986 + 170) / 55 = 1256 / 55 = 22.836
#   output tokens: A 10.0; B (189*12 + 10*256) / 199 (the timed-out row has no usage) = 4828/199 = 24.26
P_PLANTED = 2 * 384168 / 2 ** 35

WRONG_NUMBER = "-1"  # no GSM8K test target starts with "-", so "-1" always differs at PREFIX's end

PREFIX = "Let me think. The final answer is "  # 34 characters: "Let me think." (13) + " The final answer is " (21)


def gsm8k_record(sample: ne._Sample, content: str | None, *, status: str = "ok", finish: str | None = "stop",
                 prompt_tokens: int | None = 900, completion_tokens: int | None = 10,
                 url: str = "http://127.0.0.1:9/v1/chat/completions") -> dict:
    """One sample-log line, as the contract describes it."""
    valid = status in ("ok", "truncated")
    if valid:
        extracted, scores = ne.score_gsm8k(content or "", sample.target)
    else:
        extracted, scores = None, {name: 0.0 for name in TASK.metric_names}
    usage = None if prompt_tokens is None else {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens}
    return {
        "task": "gsm8k_cot_llama", "row_idx": sample.row_idx, "doc_hash": sample.doc_hash,
        "body_hash": sample.body_hash, "url": url, "request": sample.body,
        "response": {"content": content, "reasoning_content": None, "finish_reason": finish, "usage": usage,
                     "http_status": 200 if valid else None},
        "status": status, "error": None if valid else "no answer within the timeout", "target": sample.target,
        "extracted": extracted, "scores": scores, "group": None, "image": None, "latency": 1.0,
        "attempts": 1, "reasoning_flags": [],
    }


def gsm8k_sample(row_idx: int, model: str, **config_kwargs) -> ne._Sample:
    config = ne.APIConfig("http://127.0.0.1:9/v1", model=model, **config_kwargs)
    return TASK.build({"row_idx": row_idx, "row": GSM8K_ROWS[row_idx]}, config)


def planted_runs() -> tuple[list, list]:
    """Run A (rows 0-200) and run B (rows 0-199) of gsm8k_cot_llama, with planted differences.

    rows 0-79    both right, identical text
    rows 80-99   both right, texts "Step one. ..." vs "Step two. ..." (first difference at char 5)
    rows 100-128 A right, B answers -1                      (first difference at char 34)
    row  129     A right, B timed out (no content)          (first difference at char 0)
    rows 130-134 A answers -1, B right                      (first difference at char 34)
    rows 135-199 both answer -1, identical text; B's rows 190-199 are cut by max_tokens
                 (finish_reason length, status truncated, 256 completion tokens)
    row  200     in A only (unmatched)
    usage: A 900 prompt / 10 completion tokens everywhere; B 12 completion tokens (256 when cut,
    none when timed out) and 905 prompt tokens on rows 140-146 (a different chat template).
    """
    run_a, run_b = [], []
    for i in range(201):
        sa, sb = gsm8k_sample(i, "model-a"), gsm8k_sample(i, "model-b")
        t = sa.target
        assert not t.startswith("-")
        right, wrong = PREFIX + t, PREFIX + WRONG_NUMBER
        if i < 80:
            text_a = text_b = right
        elif i < 100:
            text_a, text_b = f"Step one. The final answer is {t}", f"Step two. The final answer is {t}"
        elif i < 130:
            text_a, text_b = right, wrong
        elif i < 135:
            text_a, text_b = wrong, right
        else:
            text_a = text_b = wrong
        run_a.append(gsm8k_record(sa, text_a))
        if i == 200:
            continue
        if i == 129:
            run_b.append(gsm8k_record(sb, None, status="timeout", finish=None, prompt_tokens=None))
        elif 190 <= i < 200:
            run_b.append(gsm8k_record(sb, text_b, status="truncated", finish="length", completion_tokens=256))
        else:
            run_b.append(gsm8k_record(sb, text_b, prompt_tokens=905 if 140 <= i <= 146 else 900,
                                      completion_tokens=12))
    # sanity: the planted correctness is what the scorer says
    assert [r["scores"][HEADLINE] for r in run_a[:201]] == [1.0] * 130 + [0.0] * 71
    assert [r["scores"][HEADLINE] for r in run_b] == [1.0] * 100 + [0.0] * 30 + [1.0] * 5 + [0.0] * 65
    return run_a, run_b


def write_log(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    run_a, run_b = planted_runs()
    folder = tmp_path_factory.mktemp("planted")
    return (write_log(folder / "a" / "samples_gsm8k_cot_llama.jsonl", run_a),
            write_log(folder / "b" / "samples_gsm8k_cot_llama.jsonl", run_b))


def test_compare_runs_planted_numbers(planted):
    comparison = ne._compare_runs(ne._load_run(str(planted[0])), ne._load_run(str(planted[1])))
    assert list(comparison) == ["gsm8k_cot_llama"]
    c = comparison["gsm8k_cot_llama"]
    assert c["metric"] == HEADLINE
    assert c["n"] == 200
    assert c["unmatched"] == 1
    assert c["accuracy_a"] == pytest.approx(0.65)
    assert c["accuracy_b"] == pytest.approx(0.525)
    assert c["difference"] == pytest.approx(-0.125)
    assert c["a_only_correct"] == 30
    assert c["b_only_correct"] == 5
    assert c["mcnemar_p"] == pytest.approx(P_PLANTED, rel=1e-12)
    assert c["verdict"] == "B is lower by 0.1250, p=2.24e-05"
    low, high = c["ci95"]
    assert low < -0.125 < high < 0
    assert c["response_agreement"] == pytest.approx(145 / 200)
    assert c["mean_first_difference"] == pytest.approx(1256 / 55)
    assert c["prompt_tokens_mismatch"] == 7
    assert c["first_prompt_mismatch"] == {"row_idx": 140, "a": 900, "b": 905}
    assert c["finish_reasons_a"] == {"stop": 200}
    assert c["finish_reasons_b"]["stop"] == 189 and c["finish_reasons_b"]["length"] == 10
    assert sum(c["finish_reasons_b"].values()) == 200
    assert c["status_a"] == {"ok": 200}
    assert c["status_b"] == {"ok": 189, "timeout": 1, "truncated": 10}
    assert c["mean_output_tokens_a"] == pytest.approx(10.0)
    assert c["mean_output_tokens_b"] == pytest.approx(4828 / 199)
    # the top 10 flipped samples, in row order: rows 100-109, A right, B answered -1
    assert len(c["flips"]) == 10
    for flip, i in zip(c["flips"], range(100, 110)):
        target = ne._gsm8k_target(GSM8K_ROWS[i])
        assert flip == {"row_idx": i, "target": target, "a": target, "b": WRONG_NUMBER, "a_correct": True,
                        "b_correct": False}


def test_compare_runs_all_flips_listed_with_both_answers(planted):
    c = ne._compare_runs(ne._load_run(str(planted[0])), ne._load_run(str(planted[1])), top=100)["gsm8k_cot_llama"]
    assert [f["row_idx"] for f in c["flips"]] == list(range(100, 135))
    timed_out = c["flips"][29]
    assert timed_out["row_idx"] == 129 and timed_out["b"] == "<timeout>" and timed_out["a_correct"]
    for flip in c["flips"][30:]:  # B-only right
        assert flip["a"] == WRONG_NUMBER and flip["b"] == flip["target"]
        assert (flip["a_correct"], flip["b_correct"]) == (False, True)


def test_compare_text_output(planted, capsys):
    a, b = map(str, planted)
    code, out, err = run_main(["compare", a, b], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:4] == [f"A = {a}", f"B = {b}", "", "gsm8k_cot_llama (exact_match,strict-match, n=200, 1 unmatched)"]
    text = "\n".join(lines)
    assert "  accuracy        A 0.6500   B 0.5250   B-A -0.1250 [95% CI " in text
    assert "  McNemar         p=2.24e-05   A-only correct 30   B-only correct 5" in lines
    assert "  verdict         B is lower by 0.1250, p=2.24e-05" in lines
    assert "  identical text  72.5%   first difference at char 23 on average" in lines
    assert "(row 140: A 900 vs B 905: the chat templates differ)" in text
    assert "7 differ" in text
    assert "  output tokens   A 10.0   B 24.3" in lines
    assert "  flipped samples (row: target | A | B):" in lines
    t100 = ne._gsm8k_target(GSM8K_ROWS[100])
    assert f"    100: {t100} | {t100} ok | {WRONG_NUMBER}" in lines
    assert sum(1 for line in lines if line.startswith("    1")) == 10  # --top defaults to 10
    # --top N lists N
    code, out, _ = run_main(["compare", a, b, "--top", "35"], capsys)
    t130 = ne._gsm8k_target(GSM8K_ROWS[130])
    assert f"    129: {ne._gsm8k_target(GSM8K_ROWS[129])} | {ne._gsm8k_target(GSM8K_ROWS[129])} ok | <timeout>" in out
    assert f"    130: {t130} | {WRONG_NUMBER} | {t130} ok" in out.splitlines()


def test_compare_json_matches_text_numbers(planted):
    a, b = map(str, planted)
    proc = cli("compare", a, b, "--json")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["a"] == a and document["b"] == b
    c = document["comparison"]["gsm8k_cot_llama"]
    expected = ne._compare_runs(ne._load_run(a), ne._load_run(b))["gsm8k_cot_llama"]
    assert c == json.loads(json.dumps(expected))  # the same numbers, CI included (seeded)
    assert (c["n"], c["a_only_correct"], c["b_only_correct"]) == (200, 30, 5)
    assert c["mcnemar_p"] == pytest.approx(P_PLANTED, rel=1e-12)
    assert c["accuracy_a"] == pytest.approx(0.65) and c["accuracy_b"] == pytest.approx(0.525)
    # the text form prints the same numbers
    text = cli("compare", a, b).stdout
    assert f"p={c['mcnemar_p']:.3g}" in text
    assert f"[95% CI {c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" in text


def test_compare_folders_and_python_m(planted, tmp_path):
    a_dir, b_dir = planted[0].parent, planted[1].parent
    proc = subprocess.run([sys.executable, "-m", "nano_eval", "compare", str(a_dir), str(b_dir), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)["comparison"]["gsm8k_cot_llama"]
    assert (c["n"], c["unmatched"], c["a_only_correct"], c["b_only_correct"]) == (200, 1, 30, 5)
    # a folder mixed with a file works too
    c2 = ne._compare_runs(ne._load_run(str(a_dir)), ne._load_run(str(planted[1])))["gsm8k_cot_llama"]
    assert c2 == ne._compare_runs(ne._load_run(str(planted[0])), ne._load_run(str(planted[1])))["gsm8k_cot_llama"]


def chartqa_record(row_idx: int, answer: str, label: str) -> dict:
    content = f"Let me look at the chart.\nFinal Answer: {answer}"
    extracted = {"none": content, "final_answer": answer}
    right = float(answer == label)
    return {"task": "chartqa", "row_idx": row_idx, "doc_hash": f"chartqa-doc-{row_idx}", "body_hash": f"b{row_idx}",
            "url": "http://127.0.0.1:9/v1/chat/completions",
            "request": {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"<image sha256={'0' * 64} bytes=10 format=png>"}},
                {"type": "text", "text": f"query {row_idx}"}]}], "model": "m", "max_tokens": 512,
                "temperature": 0.0, "stop": [], "seed": 1234},
            "response": {"content": content, "reasoning_content": None, "finish_reason": "stop",
                         "usage": {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59},
                         "http_status": 200},
            "status": "ok", "error": None, "target": label, "extracted": extracted,
            "scores": {"exact_match": right, "relaxed_accuracy": right, "anywhere_accuracy": right},
            "group": "human", "image": {"sha256": "0" * 64, "bytes": 10, "format": "png"}, "latency": 0.5,
            "attempts": 1, "reasoning_flags": []}


def test_compare_run_logged_with_images_against_one_without(tmp_path):
    import base64
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 2  # 10 bytes; only its hash and size matter here
    image = {"sha256": ne._sha256(png), "bytes": len(png), "format": "png"}
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    stub = f"<image sha256={image['sha256']} bytes={image['bytes']} format=png>"
    run_a, run_b = [], []
    for i in range(4):
        a, b = chartqa_record(i, str(10 * i), str(10 * i)), chartqa_record(i, "no", str(10 * i))
        for record, url in ((a, data_url), (b, stub)):
            record["image"] = image
            record["request"]["messages"][0]["content"][0]["image_url"]["url"] = url
        run_a.append(a)
        run_b.append(b)
    c = ne._compare_runs(ne._load_run(str(write_log(tmp_path / "a.jsonl", run_a))),
                        ne._load_run(str(write_log(tmp_path / "b.jsonl", run_b))))["chartqa"]
    assert (c["n"], c["a_only_correct"]) == (4, 4)


def test_compare_folder_with_two_tasks(tmp_path, capsys):
    # chartqa: 10 rows, A right on rows 0-7, B right on rows 0-4 and 8:
    #   A 8/10, B 6/10; a_only = rows 5,6,7 = 3; b_only = row 8 = 1
    #   McNemar n=4: tail = C(4,0) + C(4,1) = 5 -> p = 2*5/16 = 0.625
    labels = [str(10 * i) for i in range(10)]
    a_answers = [labels[i] if i < 8 else "x" for i in range(10)]
    b_answers = [labels[i] if i < 5 or i == 8 else "y" for i in range(10)]
    for name, answers in (("a", a_answers), ("b", b_answers)):
        write_log(tmp_path / name / "samples_chartqa.jsonl",
                  [chartqa_record(i, answers[i], labels[i]) for i in range(10)])
        sample = gsm8k_sample(0, f"model-{name}")
        write_log(tmp_path / name / "samples_gsm8k_cot_llama.jsonl", [gsm8k_record(sample, PREFIX + sample.target)])
    comparison = ne._compare_runs(ne._load_run(str(tmp_path / "a")), ne._load_run(str(tmp_path / "b")))
    assert list(comparison) == ["chartqa", "gsm8k_cot_llama"]
    c = comparison["chartqa"]
    assert c["metric"] == "relaxed_accuracy"
    assert (c["n"], c["a_only_correct"], c["b_only_correct"]) == (10, 3, 1)
    assert c["accuracy_a"] == pytest.approx(0.8) and c["accuracy_b"] == pytest.approx(0.6)
    assert c["mcnemar_p"] == pytest.approx(0.625)
    assert c["verdict"] == "no significant difference at n=10 (p=0.625)"
    assert [(f["row_idx"], f["a"], f["b"]) for f in c["flips"]] == [
        (5, "50", "y"), (6, "60", "y"), (7, "70", "y"), (8, "x", "80")]
    g = comparison["gsm8k_cot_llama"]
    assert (g["n"], g["a_only_correct"], g["b_only_correct"], g["mcnemar_p"]) == (1, 0, 0, 1.0)
    assert g["verdict"] == "no significant difference at n=1 (p=1)"
    code, out, _ = run_main(["compare", str(tmp_path / "a"), str(tmp_path / "b")], capsys)
    assert code == 0
    assert "chartqa (relaxed_accuracy, n=10)" in out and "gsm8k_cot_llama (exact_match,strict-match, n=1)" in out


def test_compare_b_higher_verdict(tmp_path):
    # 12 rows: both right on rows 0-1; B alone right on rows 2-10 (9), A alone right on row 11 (1)
    # A 3/12, B 11/12: B - A = 8/12 = +0.6667; McNemar(1, 9) = 22/1024 = 0.0215
    run_a, run_b = [], []
    for i in range(12):
        sa, sb = gsm8k_sample(i, "a"), gsm8k_sample(i, "b")
        a_right, b_right = i < 2 or i == 11, i < 11
        run_a.append(gsm8k_record(sa, PREFIX + (sa.target if a_right else WRONG_NUMBER)))
        run_b.append(gsm8k_record(sb, PREFIX + (sb.target if b_right else WRONG_NUMBER)))
    c = ne._compare_runs(ne._load_run(str(write_log(tmp_path / "a.jsonl", run_a))),
                        ne._load_run(str(write_log(tmp_path / "b.jsonl", run_b))))["gsm8k_cot_llama"]
    assert (c["a_only_correct"], c["b_only_correct"]) == (1, 9)
    assert c["mcnemar_p"] == pytest.approx(22 / 1024)
    assert c["verdict"] == "B is higher by 0.6667, p=0.0215"
    assert c["ci95"][0] > 0
    assert c["response_agreement"] == pytest.approx(2 / 12)
    assert c["mean_first_difference"] == pytest.approx(34.0)
    assert "first_prompt_mismatch" not in c
    assert (c["prompt_tokens_equal"], c["prompt_tokens_mismatch"]) == (12, 0)


def test_template_mismatch_counted(tmp_path, capsys):
    # 20 rows, identical answers; B's usage.prompt_tokens differs on rows 3, 7, 8 (e.g. a chat
    # template adding a default system prompt)
    run_a, run_b = [], []
    for i in range(20):
        sa, sb = gsm8k_sample(i, "a"), gsm8k_sample(i, "b")
        run_a.append(gsm8k_record(sa, PREFIX + sa.target, prompt_tokens=1000 + i))
        run_b.append(gsm8k_record(sb, PREFIX + sb.target, prompt_tokens=1000 + i + (12 if i in (3, 7, 8) else 0)))
    a, b = write_log(tmp_path / "a.jsonl", run_a), write_log(tmp_path / "b.jsonl", run_b)
    c = ne._compare_runs(ne._load_run(str(a)), ne._load_run(str(b)))["gsm8k_cot_llama"]
    assert (c["prompt_tokens_equal"], c["prompt_tokens_mismatch"]) == (17, 3)
    assert c["first_prompt_mismatch"] == {"row_idx": 3, "a": 1003, "b": 1015}
    assert c["response_agreement"] == 1.0 and c["mean_first_difference"] is None
    assert c["verdict"] == "no significant difference at n=20 (p=1)"
    assert c["ci95"] == [0.0, 0.0]
    code, out, _ = run_main(["compare", str(a), str(b)], capsys)
    assert code == 0
    assert "  prompt tokens   17 equal, 3 differ   (row 3: A 1003 vs B 1015: the chat templates differ)" \
        in out.splitlines()
    assert "  identical text  100.0%" in out.splitlines()
    assert "flipped samples" not in out


@pytest.mark.parametrize("config_b, field", [
    ({"gen_kwargs": {"max_gen_toks": 512}}, "max_tokens"),  # max_tokens 256 vs 512
    ({"gen_kwargs": {"temperature": 0.6}}, "temperature"),
    ({"seed": 42}, "seed"),
    ({"system_instruction": "Be brief."}, "messages"),
])
def test_compare_refuses_runs_with_different_requests(tmp_path, capsys, config_b, field):
    run_a = [gsm8k_record(gsm8k_sample(i, "model-a"), PREFIX + "1") for i in range(5)]
    run_b = [gsm8k_record(gsm8k_sample(i, "model-b", **config_b), PREFIX + "1") for i in range(5)]
    assert run_a[0]["doc_hash"] == run_b[0]["doc_hash"]
    a, b = write_log(tmp_path / "a.jsonl", run_a), write_log(tmp_path / "b.jsonl", run_b)
    code, out, err = run_main(["compare", str(a), str(b)], capsys)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("nano-eval: error: gsm8k_cot_llama row 0: the runs sent different ")
    assert f"'{field}'" in err
    assert "Traceback" not in err


def test_compare_ignores_only_the_model_name(tmp_path):
    run_a = [gsm8k_record(gsm8k_sample(i, "model-a"), PREFIX + "1") for i in range(3)]
    run_b = [gsm8k_record(gsm8k_sample(i, "totally-different-model"), PREFIX + "1") for i in range(3)]
    assert run_a[0]["request"]["model"] != run_b[0]["request"]["model"]
    c = ne._compare_runs(ne._load_run(str(write_log(tmp_path / "a.jsonl", run_a))),
                        ne._load_run(str(write_log(tmp_path / "b.jsonl", run_b))))["gsm8k_cot_llama"]
    assert c["n"] == 3


def test_compare_uses_the_last_record_of_a_resumed_log(tmp_path):
    # a resumed log: row 0 first timed out, then was answered (right) on the rerun; a crash left a
    # half-written line in between, which is skipped
    sa, sb = gsm8k_sample(0, "a"), gsm8k_sample(0, "b")
    a = write_log(tmp_path / "a.jsonl", [gsm8k_record(sa, None, status="timeout", finish=None, prompt_tokens=None)])
    with open(a, "a", encoding="utf-8") as f:
        f.write('{"task": "gsm8k_cot_llama", "row_id\n')
        f.write(json.dumps(gsm8k_record(sa, PREFIX + sa.target)) + "\n")
    b = write_log(tmp_path / "b.jsonl", [gsm8k_record(sb, PREFIX + WRONG_NUMBER)])
    c = ne._compare_runs(ne._load_run(str(a)), ne._load_run(str(b)))["gsm8k_cot_llama"]
    assert (c["n"], c["accuracy_a"], c["a_only_correct"], c["status_a"]) == (1, 1.0, 1, {"ok": 1})


def test_compare_no_samples_in_common(tmp_path, capsys):
    a = write_log(tmp_path / "a.jsonl", [gsm8k_record(gsm8k_sample(i, "a"), PREFIX + "1") for i in range(3)])
    b = write_log(tmp_path / "b.jsonl", [gsm8k_record(gsm8k_sample(i, "b"), PREFIX + "1") for i in range(3, 5)])
    c = ne._compare_runs(ne._load_run(str(a)), ne._load_run(str(b)))["gsm8k_cot_llama"]
    assert c == {"n": 0, "unmatched": 5, "verdict": "no samples in common"}
    code, out, _ = run_main(["compare", str(a), str(b)], capsys)
    assert code == 0 and "gsm8k_cot_llama: no samples in common" in out


def test_compare_missing_and_empty_inputs(tmp_path, planted, capsys):
    missing = tmp_path / "nope.jsonl"
    code, out, err = run_main(["compare", str(missing), str(planted[1])], capsys)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("nano-eval: error: ") and str(missing) in err
    proc = cli("compare", str(planted[0]), str(missing))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("nano-eval: error: ")
    assert "Traceback" not in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(["compare", str(empty), str(planted[1])], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "samples_" in err
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n[1, 2]\n{\"no\": \"task\"}\n")
    code, _, err = run_main(["compare", str(junk), str(planted[1])], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"{junk}:2: not a nano-eval sample record" in err
    junk.write_text("not json\n")  # only lines cut short: nothing to compare
    code, _, err = run_main(["compare", str(junk), str(planted[1])], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "no sample records" in err
    code, _, err = run_main(["compare", str(planted[0])], capsys)  # one run only: usage error
    assert code == 2 and len(err.splitlines()) == 1


def test_compare_of_a_non_utf8_file(isolated_env, tmp_path):
    path = tmp_path / "samples_gsm8k_cot_llama.jsonl"
    path.write_bytes(b"\xff\xfe\x00{not a record}\n")
    code, out, err = cli("compare", str(path), str(path))
    one_error(code, err, 2)


# --------------------------------------------------------------------------------------------
# Repeated runs
# --------------------------------------------------------------------------------------------




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


# --------------------------------------------------------------------------------------------
# --fail_if
# --------------------------------------------------------------------------------------------


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
    assert ne._gate_exit(better, "worse") == 0 and ne._gate_exit(better, "different") == 6


def test_compare_fail_if_text_output_still_printed(gate_logs):
    rc, out, err = cli("compare", gate_logs["right"], gate_logs["wrong"], "--fail_if", "worse")
    assert rc == 6
    assert "  verdict         B is lower by 1.0000, p=1.86e-09" in out.splitlines()  # 2/2^30


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
    ({"n": 0, "unmatched": 4, "verdict": "no samples in common"}, "different", ["t"]),  # nothing to judge: fails
    ({"n": 0, "unmatched": 4, "verdict": "no samples in common"}, "worse", ["t"]),
    ({"n": 1, "unmatched": 39, "mcnemar_p": 1.0, "difference": 0.0}, "worse", ["t"]),  # a crashed candidate
    ({"n": 36, "unmatched": 4, "mcnemar_p": 1.0, "difference": 0.0}, "worse", []),  # 90% in both: judged
    ({"n": 35, "unmatched": 5, "mcnemar_p": 1.0, "difference": 0.0}, "worse", ["t"]),
    ({"n": 0, "unmatched": 4, "verdict": "no samples in common"}, None, []),
])
def test_gate_failures(c, fail_if, failed):
    assert ne.gate_failures({"t": c}, fail_if) == failed
    assert ne._gate_exit({"t": c}, fail_if) == (6 if failed else 0)


# --------------------------------------------------------------------------------------------
# Several servers in one command, compared
# --------------------------------------------------------------------------------------------


def test_several_servers_run_and_compare(tmp_path, isolated_env, gsm8k_answers):
    # first 20 GSM8K rows: server A is wrong on rows 0-1, server B on rows 2-7
    # -> A 18/20 = 0.9, B 14/20 = 0.7; a_only = 6 (rows 2-7), b_only = 2 (rows 0-1)
    # McNemar n=8: tail = C(8,0)+C(8,1)+C(8,2) = 1+8+28 = 37 -> p = 74/256 = 0.2890625
    questions = [row["question"] for row in GSM8K_ROWS[:20]]
    answers_a = {**gsm8k_answers, **{q: WRONG_NUMBER for q in questions[0:2]}}
    answers_b = {**gsm8k_answers, **{q: WRONG_NUMBER for q in questions[2:8]}}
    log_dir = tmp_path / "logs"
    with FakeOpenAI(models=["model-a"], answers=answers_a, server_header="uvicorn") as srv_a, \
            FakeOpenAI(models=["model-b"], answers=answers_b,
                       extra_routes={"/version": (200, {"version": "0.9.1"})}) as srv_b:
        proc = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv_a.base_url, "--base-url", srv_b.base_url, "--max_samples", "20", "--log_samples", str(log_dir), "--no_progress")
        assert len(srv_a.chat_requests) == 20 and len(srv_b.chat_requests) == 20
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)  # stdout is the JSON only
    assert set(document) == {"runs", "comparisons", "total_seconds"}
    assert len(document["runs"]) == 2
    run_a, run_b = document["runs"]
    for run, srv, model, accuracy in ((run_a, srv_a, "model-a", 0.9), (run_b, srv_b, "model-b", 0.7)):
        assert set(run) >= {"results", "config", "complete"}
        result = run["results"]["gsm8k_cot_llama"]
        assert result["num_samples"] == 20 and result["num_ok"] == 20
        assert result["metrics"]["exact_match"] == pytest.approx(accuracy)
        assert run["config"]["model"] == model
        assert run["config"]["chat_url"] == srv.base_url + "/chat/completions"
        run_dir = log_dir / f"{0 if srv is srv_a else 1}_127.0.0.1_{srv.port}"
        assert run["config"]["log_samples"] == str(run_dir)
        records = [json.loads(line) for line in (run_dir / "samples_gsm8k_cot_llama.jsonl").read_text().splitlines()]
        assert sorted(r["row_idx"] for r in records) == list(range(20))
        assert {r["request"]["model"] for r in records} == {model}
    assert run_a["config"]["server"]["name"] == "uvicorn"
    assert (run_b["config"]["server"]["name"], run_b["config"]["server"]["version"]) == ("vLLM", "0.9.1")
    assert sorted(p.name for p in log_dir.iterdir()) == [f"0_127.0.0.1_{srv_a.port}", f"1_127.0.0.1_{srv_b.port}"]

    assert len(document["comparisons"]) == 1
    comparison = document["comparisons"][0]
    assert comparison["a"] == srv_a.base_url + "/chat/completions"
    assert comparison["b"] == srv_b.base_url + "/chat/completions"
    c = comparison["comparison"]["gsm8k_cot_llama"]
    assert (c["n"], c["unmatched"], c["a_only_correct"], c["b_only_correct"]) == (20, 0, 6, 2)
    assert c["accuracy_a"] == pytest.approx(0.9) and c["accuracy_b"] == pytest.approx(0.7)
    assert c["difference"] == pytest.approx(-0.2)
    assert c["mcnemar_p"] == pytest.approx(74 / 256)
    assert c["verdict"] == "no significant difference at n=20 (p=0.289)"
    assert sorted(f["row_idx"] for f in c["flips"]) == list(range(8))
    # the comparison text goes to stderr, not stdout
    assert f"A = {comparison['a']}" in proc.stderr and f"B = {comparison['b']}" in proc.stderr
    assert "  verdict         no significant difference at n=20 (p=0.289)" in proc.stderr
    assert "verdict" not in proc.stdout.replace('"verdict"', "")
    # and it equals what `compare` says about the two logged runs
    again = ne._compare_runs(ne._load_run(str(log_dir / f"0_127.0.0.1_{srv_a.port}")),
                            ne._load_run(str(log_dir / f"1_127.0.0.1_{srv_b.port}")))
    assert json.loads(json.dumps(again)) == comparison["comparison"]

    # the same command again resumes each server's run from its own folder: nothing is resent
    with FakeOpenAI(models=["model-a"], answers=answers_a) as srv_a2, \
            FakeOpenAI(models=["model-b"], answers=answers_b) as srv_b2:
        log_dir2 = tmp_path / "logs2"
        for i, srv in enumerate((srv_a, srv_b)):
            old = log_dir / f"{i}_127.0.0.1_{srv.port}" / "samples_gsm8k_cot_llama.jsonl"
            new = log_dir2 / f"{i}_127.0.0.1_{(srv_a2, srv_b2)[i].port}" / "samples_gsm8k_cot_llama.jsonl"
            new.parent.mkdir(parents=True)
            new.write_text(old.read_text().replace(srv.url, (srv_a2, srv_b2)[i].url))
        proc2 = cli("--tasks", "gsm8k_cot_llama", "--base_url", srv_a2.base_url, "--base_url", srv_b2.base_url, "--max_samples", "20", "--log_samples", str(log_dir2), "--no_progress")
        assert proc2.returncode == 0, proc2.stderr
        assert srv_a2.chat_requests == [] and srv_b2.chat_requests == []
    c2 = json.loads(proc2.stdout)["comparisons"][0]["comparison"]["gsm8k_cot_llama"]
    assert {k: c2[k] for k in ("n", "a_only_correct", "b_only_correct", "mcnemar_p", "ci95")} == \
        {k: c[k] for k in ("n", "a_only_correct", "b_only_correct", "mcnemar_p", "ci95")}


def test_several_servers_without_log_samples(isolated_env, gsm8k_answers, capsys):
    # no --log_samples: the runs are still logged (to a temporary folder) and compared
    with FakeOpenAI(models=["m"], answers=gsm8k_answers) as srv_a, FakeOpenAI(models=["m"]) as srv_b:
        code, out, err = run_main(["--tasks", "gsm8k_cot_llama", "--base_url", srv_a.base_url,
                                   "--base_url", srv_b.base_url, "--max_samples", "5", "--no_progress"], capsys)
    assert code == 0, err
    document = json.loads(out)
    c = document["comparisons"][0]["comparison"]["gsm8k_cot_llama"]
    # B answers "The final answer is 0" to everything: A-only right on all 5 -> McNemar(5, 0) = 2/32
    assert (c["n"], c["a_only_correct"], c["b_only_correct"]) == (5, 5, 0)
    assert c["mcnemar_p"] == pytest.approx(0.0625)
    assert [run["results"]["gsm8k_cot_llama"]["metrics"]["exact_match"] for run in document["runs"]] == [1.0, 0.0]


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


# --------------------------------------------------------------------------------------------
# Numerics: logprob parity (issue 22)
# --------------------------------------------------------------------------------------------

from fakes import LogprobModel, openai_token  # noqa: E402

GSM = "gsm8k_cot_llama"
ROWS = 20
# A wrong RoPE base on the real servers: max |delta| per sample ~0.27 (median), p99 ~0.4; float
# noise between two correct backends: p99 0.033 (tests/real_server/README.md). Gaussian noise of
# sd 0.2 nats on one side gives p99 ~0.5; sd 0.005 on each gives p99 ~0.02.
ROPE_NOISE, FLOAT_NOISE = 0.2, 0.005


def logprob_run(tmp_path, name, model, k=5, n=ROWS, *extra):
    log_dir = tmp_path / name
    with FakeOpenAI(responder=model) as srv:
        proc = cli("--tasks", GSM, "--base_url", srv.base_url, "--max_samples", n, "--no_progress",
                   "--log_samples", log_dir, *(["--logprobs", k] if k else []), *extra)
    assert proc.returncode == 0, proc.stderr
    return log_dir


def numerics_of(log_a, log_b, *flags):
    proc = cli("compare", log_a, log_b, "--json", *flags)
    return proc, json.loads(proc.stdout)["comparison"][GSM] if proc.stdout else None


def test_numerics_near_tie_partings_are_equivalent_and_a_wrong_rope_is_different(tmp_path):
    """The issue's 'done when': two runs whose texts part at near-ties (each side's token the
    other's rank 2, 0.01 nats behind) are `equivalent`; logprobs that differ by a wrong RoPE's
    amount are `different`, with the logprob distance named; accuracy says nothing either way."""
    ties = {row: 4 for row in range(ROWS)}
    ref = logprob_run(tmp_path, "ref", LogprobModel(noise=FLOAT_NOISE, seed=1, ties=ties))
    tie = logprob_run(tmp_path, "tie", LogprobModel(noise=FLOAT_NOISE, seed=2, ties=ties, parts={3, 7, 11}))
    rope = logprob_run(tmp_path, "rope", LogprobModel(noise=ROPE_NOISE, seed=3, ties=ties))
    proc, c = numerics_of(ref, tie)
    assert proc.returncode == 0, proc.stderr
    nm = c["numerics"]
    assert nm["verdict"] == "equivalent", nm
    assert (nm["samples"], nm["divergences"], nm["unexplained"]) == (ROWS, 3, 0)
    assert [(p["row_idx"], p["token"], p["rank_of_b_in_a"], p["rank_of_a_in_b"]) for p in nm["partings"]] == \
        [(3, 4, 2, 2), (7, 4, 2, 2), (11, 4, 2, 2)]
    assert all(p["near_tie"] and p["gap_a"] == pytest.approx(0.01, abs=0.03) for p in nm["partings"])
    assert nm["p99_abs_logprob_diff"] < 0.05 and nm["shared_tokens"] == 17 * 10 + 3 * 4
    assert c["response_agreement"] == pytest.approx(17 / 20)
    assert "numerics equivalent" in c["verdict"]
    proc, c = numerics_of(ref, rope)
    nm = c["numerics"]
    assert nm["verdict"] == "different", nm
    assert nm["p99_abs_logprob_diff"] > 0.3 and nm["divergences"] == 0 and c["response_agreement"] == 1.0
    assert len(nm["evidence"]) == 1 and nm["evidence"][0].startswith("logprob distance: p99 |delta|")
    # the accuracy verdict alone would read "no significant difference"; the line says more
    assert c["verdict"].startswith("no significant difference") and "the implementations differ: logprob " \
        "distance" in c["verdict"]
    # the text view carries the same verdict and evidence
    text = cli("compare", ref, rope).stdout
    assert "  numerics        different: logprob distance: p99 |delta|" in text
    assert cli("compare", ref, tie).stdout.count("-> near-tie") == 3


def test_numerics_confident_partings_and_prompt_tokens_are_different(tmp_path):
    ties = {row: 2 for row in range(ROWS)}
    ref = logprob_run(tmp_path, "ref", LogprobModel(seed=1, ties=ties, gap=1.0))
    # the same logprobs, but 3 of 20 samples part where the runner-up is 1 nat behind: no coin flip
    bold = logprob_run(tmp_path, "bold", LogprobModel(seed=1, ties=ties, gap=1.0, parts={5, 6, 9}))
    nm = numerics_of(ref, bold)[1]["numerics"]
    assert (nm["verdict"], nm["divergences"], nm["unexplained"], nm["unexplained_allowed"]) == \
        ("different", 3, 3, 2)
    assert nm["evidence"] == ["3 of 20 samples part at a confident token (not a near-tie; at most 2 allowed)"]
    assert nm["p99_abs_logprob_diff"] == 0.0
    # two confident partings in 20 are allowed (10%, at least one): correct backends showed one
    two = logprob_run(tmp_path, "two", LogprobModel(seed=1, ties=ties, gap=1.0, parts={5, 6}))
    assert numerics_of(ref, two)[1]["numerics"]["verdict"] == "equivalent"


def test_numerics_names_prompt_tokens_when_the_servers_see_different_prompts(tmp_path):
    runs = []
    for name, offset in (("a", 0), ("b", 1)):
        model = LogprobModel(seed=1)
        def respond(body, n, model=model, offset=offset):
            reply = model(body, n)
            reply.usage = {"prompt_tokens": 1254 + offset, "completion_tokens": 10, "total_tokens": 1264 + offset}
            return reply
        runs.append(logprob_run(tmp_path, name, respond, 5, 6))
    nm = numerics_of(*runs)[1]["numerics"]
    assert nm["verdict"] == "different"
    assert nm["evidence"] == ["prompt tokens differ on 6 of 6 samples: the servers do not see the same input "
                              "(chat template, BOS)"]


def logged_pair(row, text_a, tokens_a, text_b, tokens_b):
    """Two records of one row with their logged logprobs: tokens [token, logprob, [[token, logprob], ...]]."""
    def rec(text, tokens):
        return ne._Logged.of({"task": GSM, "doc_hash": str(row), "row_idx": row, "status": "ok",
                             "response": {"content": text, "logprobs": tokens}})
    return rec(text_a, tokens_a), rec(text_b, tokens_b)


def test_numerics_verdict_arithmetic():
    """Hand-made logprobs: which tokens the distances are over, their statistics, the partings."""
    words = ["A", " B", " C", " D", " E"]
    pairs = [
        # the same text, the first token 0.25 nats apart (-0.5 and -0.25 are exact in binary)
        logged_pair(0, "A B C D E", [[w, -0.5 if i == 0 else -1.0, []] for i, w in enumerate(words)],
                    "A B C D E", [[w, -0.25 if i == 0 else -1.0, []] for i, w in enumerate(words)]),
        logged_pair(1, "C", [["C", -0.5, []]], "C", [["C", -0.25, []]]),
        # part at a near-tie after two shared tokens (at character 6)
        logged_pair(2, "I say Yes",
                    [["I", -0.1, []], [" say", -0.2, []], [" Yes", -0.3, [[" Yes", -0.3], [" No", -0.35]]]],
                    "I say No",
                    [["I", -0.1, []], [" say", -0.2, []], [" No", -0.3, [[" No", -0.3], [" Yes", -0.32]]]]),
        # part at once, confidently (the other's choice is 1.9 nats behind)
        logged_pair(3, "Z", [["Z", -0.1, [["Z", -0.1], ["Q", -2.0]]]], "Q", [["Q", -0.1, [["Q", -0.1], ["Z", -2.0]]]]),
        logged_pair(4, "E", [["E", -0.5, []]], "E", [["E", -0.25, []]]),
    ]
    # distances: 0.25 three times, 0 six times; each sample's largest: 0.25, 0.25, 0, 0.25
    nm = ne._numerics_verdict(pairs, [], 5, 0, tolerance=0.25)
    assert (nm["shared_tokens"], nm["max_abs_logprob_diff"], nm["p99_abs_logprob_diff"]) == (9, 0.25, 0.25)
    assert nm["median_abs_logprob_diff"] == 0.0 and nm["median_sample_max_abs_logprob_diff"] == 0.25
    assert nm["mean_abs_logprob_diff"] == pytest.approx(0.75 / 9)
    assert [(p["row_idx"], p["token"], p["char"], p["near_tie"]) for p in nm["partings"]] == \
        [(2, 2, 6, True), (3, 0, 0, False)]
    assert nm["mean_parting_char"] == 3.0
    # p99 equal to the tolerance is within it; one confident parting in 5 is allowed (at least one is)
    assert (nm["divergences"], nm["unexplained"], nm["unexplained_allowed"]) == (2, 1, 1)
    assert nm["verdict"] == "equivalent", nm
    assert ne._numerics_verdict(pairs, [], 5, 0, tolerance=0.2499)["verdict"] == "different"
    # texts that part at their first token share no token, but a near-tie parting is still evidence
    (only,) = [logged_pair(0, "Yes", [["Yes", -0.1, [["Yes", -0.1], ["No", -0.15]]]],
                           "No", [["No", -0.1, [["No", -0.1], ["Yes", -0.12]]]])]
    nm = ne._numerics_verdict([only], [], 1, 0)
    assert (nm["verdict"], nm["shared_tokens"], nm["divergences"]) == ("equivalent", 0, 1), nm
    assert nm["max_abs_logprob_diff"] is None and nm["p99_abs_logprob_diff"] is None


def test_numerics_unknown_without_logprobs_and_gate(tmp_path):
    ref = logprob_run(tmp_path, "ref", LogprobModel(seed=1))
    plain = logprob_run(tmp_path, "plain", LogprobModel(seed=1), 0)
    rope = logprob_run(tmp_path, "rope", LogprobModel(noise=ROPE_NOISE, seed=3))
    proc, c = numerics_of(ref, plain)
    assert proc.returncode == 0  # the logprobs asked for are no request difference
    assert c["numerics"] == {"samples": 0, "tolerance": 0.05, "verdict": "unknown",
                             "evidence": ["no logprobs from B (run both with --logprobs K)"]}
    assert "numerics" not in c["verdict"]
    # --fail_if different fails on a `different` numerics verdict, naming it; worse does not
    proc = cli("compare", ref, rope, "--fail_if", "different")
    assert proc.returncode == 6
    assert error_lines(proc.stderr) == [l for l in error_lines(proc.stderr) if "B's numerics differ from A's on "
                                        f"{GSM}: logprob distance" in l] != []
    assert cli("compare", ref, rope, "--fail_if", "worse").returncode == 0
    assert cli("compare", ref, plain, "--fail_if", "different").returncode == 0
    # the tolerance is the user's: a loose one calls the RoPE pair equivalent
    assert numerics_of(ref, rope, "--logprob_tolerance", "5")[1]["numerics"]["verdict"] == "equivalent"


def test_several_servers_with_logprobs_judge_numerics_and_gate(tmp_path):
    with FakeOpenAI(responder=LogprobModel(seed=1)) as a, \
            FakeOpenAI(responder=LogprobModel(noise=ROPE_NOISE, seed=2)) as b:
        proc = cli("--tasks", GSM, "--base_url", a.base_url, "--base_url", b.base_url, "--max_samples", 10,
                   "--no_progress", "--logprobs", 3, "--fail_if", "different")
        assert all(r["body"]["top_logprobs"] == 3 for r in a.chat_requests + b.chat_requests)
    assert proc.returncode == 6, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["comparisons"][0]["comparison"][GSM]["numerics"]["verdict"] == "different"
    assert "  numerics        different: logprob distance" in proc.stderr


def test_token_keys_match_across_spellings():
    """Special tokens and parts of a character are spelled differently by each server (llama.cpp
    "" with an id, or the valid prefix " " with the raw bytes; vLLM the text, or "" with no bytes;
    MAX ""): they share one key, so a final EOS or a split character is no parting, and where one
    side stops and the other goes on (measured: llama.cpp's EOS {"id": 2} against vLLM's
    "<|im_end|>", its rank 2) the parting is a near-tie, not "not in the other's top K"."""
    keys = [ne._token_key(ne._logged_token(e)) for e in (
        {"token": "", "id": 2, "bytes": []}, {"token": "<|im_end|>", "bytes": list(b"<|im_end|>")},
        {"token": " ", "bytes": [32, 195]}, {"token": "", "bytes": []}, {"token": " caf", "bytes": list(b" caf")})]
    assert keys == [ne._UNSPELLED, ne._UNSPELLED, ne._UNSPELLED, ne._UNSPELLED, " caf"]
    # MAX spells a part of a character as the replacement character itself, with its bytes
    assert ne._token_key(ne._logged_token({"token": "\ufffd", "bytes": [239, 191, 189]})) == ne._UNSPELLED
    assert [ne._token_key(t) for t in ("<|eot_id|>", "</s>", "<end_of_turn>", "<|", "a<|im_end|>")] == \
        [ne._UNSPELLED] * 3 + ["<|", "a<|im_end|>"]
    assert ne._logged_token({"token": "", "id": 2}) == {"id": 2}
    assert ne._logged_token({"token": " ", "bytes": [32, 195]}) == {"bytes": "20c3"}
    # the same text, the EOS spelled two ways: every token pair compared, no parting
    a = [["Hi", -0.5, []], [" there", -0.25, []], [{"id": 2}, -0.001, []]]
    b = [["Hi", -0.5, []], [" there", -0.26, []], ["<|im_end|>", -0.003, []]]
    diffs, parting = ne._token_pair(a, b, same_text=True)
    assert parting is None and diffs == pytest.approx([0.0, 0.01, 0.002])


def test_classify_response_keeps_logprobs_compactly():
    body = {"choices": [{"message": {"content": "Hi"}, "finish_reason": "stop", "logprobs": {"content": [
        openai_token("Hi", -0.1234567891, top_logprobs=[openai_token("Hi", -0.1234567891),
                                                         openai_token("Hello", -2.5)]),
        {"token": "", "id": 2, "bytes": [], "logprob": float("-inf"), "top_logprobs": []}]}}]}
    outcome = ne._classify_response(ne._HTTPResponse(200, {}, json.dumps(body).encode()))
    assert outcome.logprobs == [["Hi", -0.1234568, [["Hi", -0.1234568], ["Hello", -2.5]]], [{"id": 2}, None, []]]
    for broken in ({"content": None}, None, {"content": "x"}, {"content": [1]}):
        body["choices"][0]["logprobs"] = broken
        assert ne._classify_response(ne._HTTPResponse(200, {}, json.dumps(body).encode())).logprobs is None


@pytest.mark.parametrize("line, problem", [
    ('{"task": "gsm8k_cot_llama", "doc_hash": "x"}', "no 'status'"),
    ('{"task": "gsm8k_cot_llama", "doc_hash": "x", "status": "ok", "scores": 5}', "'scores' is not of type dict"),
    ('{"task": "gsm8k_cot_llama", "doc_hash": "x", "status": "ok", "response": "a"}',
     "'response' is not of type dict"),
    ('{"task": "gsm8k_cot_llama", "doc_hash": "x", "status": "ok", "scores": {"m": "1"}}', "a score is not a number"),
    ('[1, 2]', "not a JSON object"),
])
@pytest.mark.parametrize("command", ["compare", "report"])
def test_a_malformed_sample_log_is_one_line_error(tmp_path, line, problem, command):
    """Issue 23, item 12: no internal error, exit 2, the file and line named."""
    log = tmp_path / "samples_gsm8k_cot_llama.jsonl"
    good = json.dumps({"task": GSM, "doc_hash": "y", "status": "ok", "row_idx": 0, "scores": {}})
    log.write_text(good + "\n" + line + "\n", encoding="utf-8")
    args = [command, log, log] if command == "compare" else [command, log, "-o", tmp_path / "r.html"]
    proc = cli(*args)
    one_error(proc.returncode, proc.stderr, 2, f"{log}:2: not a nano-eval sample record ({problem})")


@pytest.mark.parametrize("document, problem", [
    ({"results": {GSM: 5}, "config": 3}, "'results' is not an object of task results"),
    ({"results": {GSM: {}}, "config": 3}, "'config' is not an object"),
    ({"runs": [1], "comparisons": []}, "run 0: not an object"),
    ({"runs": [], "comparisons": 2}, "'runs' and 'comparisons' are not lists"),
])
def test_a_malformed_results_json_is_one_line_error(tmp_path, document, problem):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    proc = cli("report", path, "-o", tmp_path / "r.html")
    one_error(proc.returncode, proc.stderr, 2, f"is not a results JSON nano-eval wrote ({problem})")


def test_fail_if_refuses_to_pass_a_candidate_that_stopped_early(gate_logs, tmp_path):
    """Issue 23, item 8: 1 of 30 samples in common is no pass."""
    source = Path(gate_logs["right"])
    log = source if source.is_file() else next(source.glob("samples_*.jsonl"))
    crashed = tmp_path / "samples_gsm8k_cot_llama.jsonl"
    crashed.write_text(log.read_text("utf-8").splitlines()[0] + "\n", encoding="utf-8")
    for flag in ("worse", "different"):
        proc = cli("compare", gate_logs["right"], crashed, "--fail_if", flag)
        one_error(proc.returncode, proc.stderr, 6, f"--fail_if {flag}: gsm8k_cot_llama: only 1 of 30 samples are in "
                  "both runs (at least 90% needed)")
    assert cli("compare", gate_logs["right"], crashed).returncode == 0  # without a gate: just the comparison


def test_binomial_draws_follow_the_binomial_distribution():
    """The bootstrap's resampling draws (issue 23, item 15): chi-square against the exact pmf."""
    rng = random.Random(5)
    for n, p in ((100, 0.3), (40, 0.5), (12, 0.05), (30, 0.9)):
        draws = 100_000
        counts = [0] * (n + 1)
        for _ in range(draws):
            counts[ne._binomial(n, p, rng)] += 1
        expected = [draws * math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]
        cells = [(c, e) for c, e in zip(counts, expected) if e >= 5]
        chi2, df = sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1
        assert chi2 < df + 5 * math.sqrt(2 * df), (n, p, chi2, df)
    assert ne._binomial(0, 0.3, rng) == 0 and ne._binomial(7, 1.0, rng) == 7 and ne._binomial(7, 0.0, rng) == 0


def test_the_statistics_of_a_100000_pair_comparison():
    """McNemar on 50,000 discordant pairs and the bootstrap of 100,000 differences: both were
    minutes (n-digit binomials; 10,000 x n draws) and are now well under a second (timed in
    bench/README.md, not here): the figures are still the exact p and the bootstrap interval."""
    p = ne._mcnemar_exact(25_000, 25_500)
    low, high = ne._paired_bootstrap([1.0] * 15_000 + [-1.0] * 5_000 + [0.0] * 80_000, 10_000)
    assert p == pytest.approx(0.02638245, rel=1e-6)  # 2 P(X <= 25000), X ~ Bin(50500, 1/2)
    se = math.sqrt((0.2 - 0.1 ** 2) / 100_000)
    assert low == pytest.approx(0.1 - 1.96 * se, abs=3e-4) and high == pytest.approx(0.1 + 1.96 * se, abs=3e-4)


# --------------------------------------------------------------------------------------------
# Big logs (issue 23, item 15): read in batches, requests kept as a digest, compared fast
# --------------------------------------------------------------------------------------------


def test_a_log_read_in_batches_keeps_every_record_and_its_line_number(planted, tmp_path):
    """Lines are parsed READ_BATCH bytes at a time as one JSON array (its records then share their
    key strings); a batch with a torn line, a non-object or two values on one line is read line
    by line, and nothing after it shifts."""
    lines = planted[0].read_text().splitlines()
    assert len(lines) == 201
    torn, listed, two = lines[60][:700], "[1, 2]", lines[80] + ", " + lines[81]
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines[:60] + [torn] + lines[61:70] + [listed] + lines[71:80] + [two] + lines[82:]) + "\n")
    rows = [r["row_idx"] for r in ne._read_records(log)]
    assert rows == [i for i in range(201) if i not in (60, 70, 80, 81)]
    with pytest.raises(ne.UsageError, match=r"log.jsonl:71: not a nano-eval sample record \(not a JSON object\)"):
        ne._load_repeats(str(log))
    first, second = list(ne._read_records(planted[0]))[:2]
    assert all(x is y for x, y in zip(first, second))  # one key object for every record of a batch
    assert ne._READ_BATCH > 5 * len(lines[0])


def test_a_logged_request_is_kept_as_a_digest_and_read_again_whole_for_the_report(planted, tmp_path):
    record = next(ne._read_records(planted[0]))
    messages = record["request"]["messages"]
    slim = ne._slim_request(record["request"], record.get("image"))
    assert slim["messages"] == [{"sha256": ne._messages_digest(messages)}]
    kept = ne._load_run(str(planted[0]))[("gsm8k_cot_llama", record["doc_hash"])]
    assert kept.request == slim and kept.at == (str(planted[0]), 0)
    assert ne._full_record(kept) == ne._Logged.of(record, kept.at)  # the report shows what the log holds
    assert ne._full_record(kept).request == record["request"]
    log = tmp_path / "log.jsonl"
    shutil.copy(planted[0], log)
    kept = next(iter(ne._load_run(str(log)).values()))
    log.write_text("\n".join(planted[0].read_text().splitlines()[1:]) + "\n")  # another sample now on that line
    assert ne._full_record(kept) is kept
    log.unlink()
    assert ne._full_record(kept) is kept
    assert "model" not in slim and slim["max_tokens"] == record["request"]["max_tokens"]
    changed = [
        [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + " "}],  # one character
        [*messages[:-1], {**messages[-1], "name": "x"}],                              # one more field
        [{"role": m["content"][:5], "content": m["role"]} for m in messages],          # roles and text swapped
        messages[:-1], [*messages, messages[-1]],
        [*messages[:-1], {"role": "user", "content": [{"type": "text", "text": messages[-1]["content"]}]}],
    ]
    digests = {ne._messages_digest(m) for m in [messages, *changed]}
    assert len(digests) == 1 + len(changed)
    assert ne._messages_digest(json.loads(json.dumps(messages))) == ne._messages_digest(messages)
    digest = ne._MessagesDigest()  # as a log is read: the turns before the question hashed once while they repeat
    for m in [messages, *changed, messages, changed[0], [], [{"role": "user"}], messages[:1], messages]:
        assert digest(m) == ne._messages_digest(m)


@given(st.text(alphabet="ab", max_size=12), st.text(alphabet="ab", max_size=12))
def test_first_difference_is_the_common_prefix_length(a, b):
    expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert ne._first_difference(a, b) == expected


# --------------------------------------------------------------------------------------------
# Numerics at the precision users serve (issue 30): the logit grid, the near-tie, NaN and
# coverage edge cases, and the noise floor of the user's own server
# --------------------------------------------------------------------------------------------

from fakes import GridModel  # noqa: E402

BF16, FP16 = 0.125, 1 / 64  # the grid steps of logits in [16, 32)


def grid_run(tmp_path, name, model, n=ROWS, k=5, *extra):
    return logprob_run(tmp_path, name, model, k, n, *extra)


@pytest.mark.parametrize("step, label", [(BF16, "bf16-like"), (FP16, "fp16-like"), (0.0, "float32-like")])
def test_each_sides_precision_is_read_from_its_own_log(tmp_path, step, label):
    """The gaps between a position's top-K logprobs are the gaps between logits: on bf16's
    grid (0.125 for logits in [16, 32)), fp16's (1/64) or none."""
    a = grid_run(tmp_path, "a", GridModel(step=step, seed=1))
    b = grid_run(tmp_path, "b", GridModel(step=0.0, seed=2))
    proc, c = numerics_of(a, b)
    nm = c["numerics"]
    assert nm["precision"]["a"]["label"] == label and nm["precision"]["b"]["label"] == "float32-like", nm["precision"]
    assert nm["precision"]["a"]["step"] == (step or None) and nm["precision"]["a"]["positions"] == ROWS * 9
    text = cli("compare", a, b).stdout
    assert f"  precision       A {label}" in text and ", B float32-like;" in text


def test_a_noise_pair_in_bf16_is_equivalent_and_names_the_resolution(tmp_path):
    """The same bf16 server twice, a batch moving the chosen logit by one step on 5% of the
    tokens: p99 |delta| is 0.9 of a step, as on every real vLLM bf16 noise pair (0.104-0.117 >
    0.05: `different` before this issue); now `equivalent within bf16 resolution`, while the
    same distance between float32 servers is still caught."""
    a = grid_run(tmp_path, "a", GridModel(step=BF16, moved=0.05, seed=1))
    b = grid_run(tmp_path, "b", GridModel(step=BF16, moved=0.05, seed=2))
    proc, c = numerics_of(a, b)
    nm = c["numerics"]
    assert 0.1 < nm["p99_abs_logprob_diff"] < BF16
    assert nm["verdict"] == "equivalent", nm
    assert (nm["tolerance"], nm["requested_tolerance"], nm["confident_gap"]) == (1.5 * BF16, 0.05, 3 * BF16)
    assert nm["resolution"] == {"precision": "bf16-like", "nats": 1.5 * BF16}
    assert nm["evidence"][1] == ("equivalent within bf16 resolution (0.19 nats): faults smaller than this are "
                                 "invisible at this precision; compare in float32 for a sharp check")
    assert "at bf16 resolution: a smaller fault may hide" in c["verdict"]
    assert cli("compare", a, b, "--fail_if", "different").returncode == 0
    # a fault well above the grid stays `different`
    fault = grid_run(tmp_path, "fault", GridModel(step=BF16, moved=0.05, seed=3, fault=0.3))
    nm = numerics_of(a, fault)[1]["numerics"]
    assert nm["verdict"] == "different" and nm["evidence"][0].startswith("logprob distance: p99 |delta| ")
    assert "> 0.188 (bf16 resolution) over" in nm["evidence"][0]
    assert cli("compare", a, fault, "--fail_if", "different").returncode == 6
    # float32 logits moved by 0.125 nats on 5% of the tokens: that is no rounding, it is different
    f32 = [grid_run(tmp_path, f"f32_{i}", GridModel(step=0.0, moved=0.05, steps=12, seed=i)) for i in (1, 2)]
    nm = numerics_of(*f32)[1]["numerics"]
    assert (nm["verdict"], nm["tolerance"], nm["resolution"]) == ("different", 0.05, None), nm
    assert 0.1 < nm["p99_abs_logprob_diff"] < BF16


def test_a_precision_difference_is_named_and_judged_at_the_coarser_side(tmp_path):
    a = grid_run(tmp_path, "a", GridModel(step=BF16, moved=0.05, seed=1))
    b = grid_run(tmp_path, "b", GridModel(step=0.0, seed=2))
    nm = numerics_of(a, b)[1]["numerics"]
    assert nm["verdict"] == "equivalent" and nm["tolerance"] == 1.5 * BF16
    assert "the precisions differ: A bf16-like, B float32-like (judged at the coarser)" in nm["evidence"]
    # the report shows both sides' precision and the resolution, as the text does
    page = tmp_path / "page.html"
    assert cli("report", a, b, "-o", page).returncode == 0
    html_text = page.read_text("utf-8")
    assert "<th>precision</th><td>A bf16-like (grid 0.125 nats), B float32-like; tolerance 0.188 nats" in html_text
    assert "equivalent within bf16 resolution (0.19 nats)" in html_text


@pytest.mark.parametrize("k_a, k_b", [(1, 1), (5, 1), (1, 5)])
def test_a_parting_whose_margin_k_cannot_show_is_no_evidence(tmp_path, k_a, k_b):
    """The hostile run's case: samples part at a 0.01-nat near-tie, with --logprobs 1 on one side
    or both: the other's token is not in a top 1, so its lead is unknown, not large. Before:
    `different: 3 of 20 samples part at a confident token`, and --fail_if exited 6."""
    ties = {row: 4 for row in range(ROWS)}
    a = logprob_run(tmp_path, "a", LogprobModel(noise=FLOAT_NOISE, seed=1, ties=ties), k_a)
    b = logprob_run(tmp_path, "b", LogprobModel(noise=FLOAT_NOISE, seed=2, ties=ties, parts={3, 7, 11}), k_b)
    nm = numerics_of(a, b)[1]["numerics"]
    assert (nm["verdict"], nm["divergences"], nm["unexplained"], nm["unknown_margin"]) == \
        ("equivalent", 3, 0, 3), nm
    assert {p["margin"] for p in nm["partings"]} == {"unknown"}
    assert "3 of unknown margin (a longer --logprobs K shows it)" in nm["evidence"][0]
    assert cli("compare", a, b, "--fail_if", "different").returncode == 0
    assert "-> margin unknown (the top K is too short to show it)" in cli("compare", a, b).stdout
    # the same partings with the runner-up 1 nat behind and a top 1 that shows it is at least that far
    # behind: a top K that ends far below the chosen token still proves a confident parting
    ties_far = {row: 2 for row in range(ROWS)}
    ref = logprob_run(tmp_path, "ref", LogprobModel(seed=1, ties=ties_far, gap=1.0), 2)
    bold = logprob_run(tmp_path, "bold", LogprobModel(seed=1, ties=ties_far, gap=1.0, parts={5, 6, 9}), 1)
    nm = numerics_of(ref, bold)[1]["numerics"]
    assert (nm["verdict"], nm["unexplained"]) == ("different", 3), nm


def rewrite_log(log_dir: Path, change) -> None:
    """Rewrite each record of a sample log folder with change(record) (the records of another tool)."""
    path = log_dir / f"samples_{GSM}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(r)) + "\n" for r in records))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_non_finite_logprobs_are_never_equivalent(tmp_path, bad):
    """NaN, an infinity or null in place of a logprob (another tool's log, or a server's NaN that
    the sample log keeps as null): before, `equivalent: p99 nan` and the gate passed."""
    a = logprob_run(tmp_path, "a", LogprobModel(seed=1))
    b = logprob_run(tmp_path, "b", LogprobModel(seed=1))

    def broken(record):
        if record["row_idx"] == 3:
            record["response"]["logprobs"][2][1] = bad
        return record

    rewrite_log(b, broken)
    proc, c = numerics_of(a, b)
    assert proc.returncode == 0, proc.stderr
    nm = c["numerics"]
    assert nm["verdict"] == "different" and nm["non_finite_logprobs"] == 1, nm
    assert nm["evidence"] == ["1 generated tokens carry a logprob that is not a finite number (NaN, infinity or "
                              "null): broken numerics, not float noise"]
    assert all(math.isfinite(nm[k]) for k in ("p99_abs_logprob_diff", "max_abs_logprob_diff"))
    assert cli("compare", a, b, "--fail_if", "different").returncode == 6


def test_coverage_is_named_and_required(tmp_path):
    """Logprobs on only some samples: the verdict says how many, and calls nothing equivalent
    below 90% (before: computed from the subset, silently)."""
    a = logprob_run(tmp_path, "a", LogprobModel(seed=1))
    b = logprob_run(tmp_path, "b", LogprobModel(seed=1))
    rewrite_log(b, lambda r: {**r, "response": {k: v for k, v in r["response"].items() if k != "logprobs"}}
                if r["row_idx"] % 2 else r)
    nm = numerics_of(a, b)[1]["numerics"]
    assert (nm["verdict"], nm["coverage"]) == ("unknown", {"with_logprobs": 10, "paired": 20}), nm
    assert nm["evidence"] == ["logprobs on 10 of 20 paired samples: at least 90% are needed to call them "
                              "equivalent (did one run lose logprobs on some samples?)"]
    # evidence of a fault on the covered ones is still a fault, with the coverage named
    rope = logprob_run(tmp_path, "rope", LogprobModel(noise=ROPE_NOISE, seed=3))
    rewrite_log(rope, lambda r: {**r, "response": {k: v for k, v in r["response"].items() if k != "logprobs"}}
                if r["row_idx"] % 2 else r)
    nm = numerics_of(a, rope)[1]["numerics"]
    assert nm["verdict"] == "different" and nm["evidence"][-1] == "logprobs on 10 of 20 paired samples"
    # 18 of 20 is enough
    full = logprob_run(tmp_path, "full", LogprobModel(seed=1))
    rewrite_log(full, lambda r: {**r, "response": {k: v for k, v in r["response"].items() if k != "logprobs"}}
                if r["row_idx"] in (0, 1) else r)
    assert numerics_of(a, full)[1]["numerics"]["verdict"] == "equivalent"


def test_a_positive_logprob_is_warned_about(tmp_path):
    a = logprob_run(tmp_path, "a", LogprobModel(seed=1))
    b = logprob_run(tmp_path, "b", LogprobModel(seed=1))
    rewrite_log(b, lambda r: (r["response"]["logprobs"][0].__setitem__(1, 0.5), r)[1] if r["row_idx"] == 0 else r)
    nm = numerics_of(a, b)[1]["numerics"]
    assert nm["warnings"] == ["1 generated tokens have a logprob above 0, which no probability has: the "
                              "server's logprobs are wrong"]
    assert "  warning         1 generated tokens have a logprob above 0" in cli("compare", a, b).stdout


def test_compare_takes_a_second_reference_log_as_the_noise_floor(tmp_path):
    """A GPU server whose batch noise is larger than the grid: two steps on 5% of the tokens
    (p99 0.23 > 1.5 steps). Without a floor `different`; with the reference's second run as
    the floor `equivalent`, the floor printed and in --json; a fault above it stays different."""
    ref = GridModel(step=BF16, moved=0.05, steps=2, seed=1)
    a, a2 = grid_run(tmp_path, "a", ref), grid_run(tmp_path, "a2", ref, ROWS, 5, "--num_concurrent", 1)
    b = grid_run(tmp_path, "b", GridModel(step=BF16, moved=0.05, steps=2, seed=2))
    assert numerics_of(a, b)[1]["numerics"]["verdict"] == "different"
    proc, c = numerics_of(a, b, "--noise_floor", a2)
    nm = c["numerics"]
    assert nm["verdict"] == "equivalent", nm
    assert json.loads(proc.stdout)["noise_floor"] == str(a2)
    floor = nm["floor"]["p99_abs_logprob_diff"]
    assert 0.2 < floor < 2 * BF16 and nm["floor"]["samples"] == ROWS
    assert nm["floor"]["source"] == str(a2) and nm["tolerance"] == pytest.approx(1.5 * floor)
    assert nm["resolution"] == {"precision": "noise floor", "nats": pytest.approx(1.5 * floor)}
    assert f"equivalent within the reference's own noise floor ({1.5 * floor:.2g} nats" in nm["evidence"][1]
    assert f"noise floor p99 {floor:.3g} over {nm['floor']['shared_tokens']} tokens ({a2})" in \
        cli("compare", a, b, "--noise_floor", a2).stdout
    fault = grid_run(tmp_path, "fault", GridModel(step=BF16, moved=0.05, steps=2, seed=3, fault=0.6))
    assert numerics_of(a, fault, "--noise_floor", a2)[1]["numerics"]["verdict"] == "different"
    # a floor log without logprobs is a one-line error
    plain = logprob_run(tmp_path, "plain", LogprobModel(seed=1), 0)
    proc = cli("compare", a, b, "--noise_floor", plain)
    assert f"{plain}: no sample with logprobs in common" in one_error(proc.returncode, proc.stderr, 2)


def test_several_servers_with_noise_floor_run_the_reference_twice(tmp_path):
    """One command on two servers: the first runs again at another concurrency and its own
    noise calibrates the verdict; the floor run is in the results document and logged."""
    with FakeOpenAI(responder=GridModel(step=BF16, moved=0.05, steps=2, seed=1)) as a, \
            FakeOpenAI(responder=GridModel(step=BF16, moved=0.05, steps=2, seed=2)) as b:
        proc = cli("--tasks", GSM, "--base_url", a.base_url, "--base_url", b.base_url, "--max_samples", ROWS,
                   "--no_progress", "--logprobs", 5, "--noise_floor", "--fail_if", "different",
                   "--log_samples", tmp_path / "runs")
        assert len(a.chat_requests) == 2 * ROWS and len(b.chat_requests) == ROWS
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    floor = doc["noise_floor"]
    assert floor["config"]["num_concurrent"] == 1 and floor["results"][GSM]["num_samples"] == ROWS
    assert Path(floor["config"]["log_samples"]).name.endswith("_floor")
    nm = doc["comparisons"][0]["comparison"][GSM]["numerics"]
    assert nm["verdict"] == "equivalent" and nm["floor"]["source"] == floor["config"]["log_samples"], nm
    assert "noise floor: " in proc.stderr and "again at --num_concurrent 1 (it ran at 8)" in proc.stderr
    for flags in (["--logprobs", 5], ["--base_url", "http://127.0.0.1:9/v1"]):  # one server; no logprobs
        bad = cli("--tasks", GSM, "--base_url", "http://127.0.0.1:9/v1", "--noise_floor", *flags)
        assert "--noise_floor calibrates a comparison of logprobs" in one_error(bad.returncode, bad.stderr, 2)


BF16_LOGS = ROOT / "tests" / "fixtures" / "numerics_bf16"  # rows 0-9 of real runs (tests/fixtures/README.md)


def real_log(tmp_path, name):
    import gzip
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"samples_{GSM}.jsonl").write_bytes(gzip.decompress((BF16_LOGS / f"{name}.jsonl.gz").read_bytes()))
    return folder


@pytest.mark.parametrize("b, verdict, label, p99_above", [
    ("vllm_bf16_c8", "equivalent", "bf16-like", 0.05),  # the same server, a batch of 8: 0.086
    ("vllm_f32_c1", "equivalent", "float32-like", 0.05),  # a precision difference: 0.094
    ("vllm_fp16_c1", "equivalent", "fp16-like", 0.05),
    ("llama_bf16_c1", "equivalent", "float32-like", 0.05),  # another correct backend (f32 activations)
    ("llama_bf16_kv_q8_0", "equivalent", "float32-like", 0.1),  # a fault that hides in bf16 noise: named
    ("llama_bf16_rope50000", "different", "float32-like", 0.4),
    ("llama_bf16_kv_q4_0", "different", "float32-like", 1.0),
    ("vllm_bf16_kv_fp8", "different", "bf16-like", 0.7),
])
def test_real_bf16_logs_against_vllm_bf16(tmp_path, b, verdict, label, p99_above):
    """Logs of real servers on the same bf16 weights (vLLM 0.32.0 --dtype bfloat16 at c=1 the
    reference; rows 0-9, --logprobs 5): every noise and precision pair was `different` under the
    float32 rule (p99 > 0.05) and is `equivalent` now, within bf16 resolution; the faults above
    the grid stay `different`; KV q8_0 is inside bf16 noise and said to be."""
    nm = numerics_of(real_log(tmp_path, "vllm_bf16_c1"), real_log(tmp_path, b))[1]["numerics"]
    assert nm["verdict"] == verdict, nm["evidence"]
    assert nm["p99_abs_logprob_diff"] > p99_above and nm["samples"] == 10
    assert nm["precision"]["a"] == {"label": "bf16-like", "step": 0.125, "positions": nm["precision"]["a"]["positions"]}
    assert nm["precision"]["b"]["label"] == label
    assert nm["resolution"] == {"precision": "bf16-like", "nats": 0.1875}
    if verdict == "equivalent":
        assert "equivalent within bf16 resolution (0.19 nats)" in nm["evidence"][1]
