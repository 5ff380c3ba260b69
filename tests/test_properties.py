"""Property tests (hypothesis): the k=v parser, lm-eval's value parsing, and the scorers never raise and
always return 0.0/1.0 floats, whatever text a model (or a dataset row) throws at them."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nano_eval import UsageError, chartqa_target, parse_kv, parse_value, score_chartqa, score_gsm8k  # noqa: E402

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

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


# --- parse_kv / parse_value ------------------------------------------------------------------


@FAST
@given(st.one_of(st.text(max_size=60), st.text(alphabet=",= ab1.\t\n", max_size=30)))
@example("a,b")
@example("=x")
@example(",,,")
@example("a==b")
@example(" = ")
def test_parse_kv_only_raises_usage_error(text):
    try:
        result = parse_kv(text, "--gen_kwargs")
    except UsageError as exc:
        assert "--gen_kwargs" in str(exc)
    else:
        assert isinstance(result, dict)
        assert all(isinstance(k, str) and k and k == k.strip() for k in result)


def test_parse_kv_examples():
    assert parse_kv(None, "--x") == {} and parse_kv("", "--x") == {} and parse_kv("  ", "--x") == {}
    assert parse_kv("a=1,b=2.5,c=true,d=None,e=hello, f = x y ", "--x") == {
        "a": 1, "b": 2.5, "c": True, "d": "None", "e": "hello", "f": "x y"}
    assert parse_kv("a=,b=2", "--x") == {"a": "", "b": 2}
    for bad in ("a,b", "=x", "a=1,b", " =1"):
        with pytest.raises(UsageError):
            parse_kv(bad, "--x")


safe_key = st.text(alphabet=st.characters(exclude_characters=",=", exclude_categories=("Cs",)),
                   min_size=1, max_size=12).map(str.strip).filter(bool)
plain_string = st.text(alphabet=st.characters(exclude_characters=",=", exclude_categories=("Cs",)),
                       min_size=1, max_size=12).map(str.strip).filter(lambda s: s and parse_value(s) == s)
simple_value = st.one_of(st.integers(min_value=0), st.booleans(),
                         st.floats(allow_nan=False, allow_infinity=False), plain_string)


@FAST
@given(st.dictionaries(safe_key, simple_value, max_size=6))
def test_parse_kv_round_trips_simple_dicts(mapping):
    text = ",".join(f"{k}={v}" for k, v in mapping.items())
    parsed = parse_kv(text, "--model_args")
    assert parsed == mapping
    for key, value in mapping.items():
        assert type(parsed[key]) is type(value)


@FAST
@given(st.integers())
def test_parse_value_int(i):
    value = parse_value(str(i))  # lm-eval: digits only -> int; "-5" -> -5.0
    assert (value, type(value)) == ((i, int) if i >= 0 else (float(i), float))


@FAST
@given(st.floats(allow_nan=False))
def test_parse_value_float(f):
    value = parse_value(repr(f))
    assert type(value) is float and value == f


@pytest.mark.parametrize("text,expected", [("true", True), ("True", True), ("TRUE", True), ("false", False),
                                           ("False", False), ("none", "none"), ("None", "None")])
def test_parse_value_keywords(text, expected):
    assert parse_value(text) == expected and type(parse_value(text)) is type(expected)


def test_parse_value_nan():
    assert math.isnan(parse_value("nan"))


@FAST
@given(st.text(max_size=40))
def test_parse_value_types(text):
    value = parse_value(text)
    assert value is None or type(value) in (bool, int, float, str)
    if type(value) is str:
        assert value == text  # a string comes back unchanged
    if type(value) is bool:
        assert text.lower() in ("true", "false")


# --- scorers ---------------------------------------------------------------------------------


def assert_binary(scores: dict, names: set):
    assert set(scores) == names
    for value in scores.values():
        assert type(value) is float and value in (0.0, 1.0)


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


# --- chartqa_target --------------------------------------------------------------------------


@FAST
@given(st.one_of(tricky_text, st.text(alphabet="[]()'\",0123456789 ae", max_size=40),
                 st.integers(0, 400).map(lambda n: "[" * n + "]" * n)))
def test_chartqa_target_never_raises(label):
    for doc in ({"label": [label]}, {"label": label}, {"label": [label, "other"]}):
        assert isinstance(chartqa_target(doc), str)


def test_chartqa_target_examples():
    assert chartqa_target({"label": ["Yes"]}) == "Yes"
    assert chartqa_target({"label": ["[1, 2]"]}) == "[1, 2]"
    assert chartqa_target({"label": ["['a', 'b']"]}) == "['a', 'b']"
    assert chartqa_target({"label": ["[not python]"]}) == "[not python]"
    assert chartqa_target({"label": []}) == "[]"


@pytest.mark.parametrize("element", [None, 5, 2.5, True], ids=["null", "int", "float", "bool"])
def test_chartqa_target_non_string_label_element(element):
    assert chartqa_target({"label": [element]}) == str(element)
