"""Shared pytest fixtures: fixture files, a fake OpenAI server, a fake datasets-server, an isolated env."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Test modules import the fakes ("from fakes import ...") and nano_eval as top-level modules: tests/
# and the repository on sys.path, for plain `pytest` and --import-mode=importlib alike.
for folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from fakes import (ANSWERS, CHARTQA, FIXTURES, GSM8K, GSM8K_GOLD, GSM8K_ROWS, Dataset,  # noqa: E402
                   FakeDatasetsServer, FakeOpenAI, answers_responder, chartqa_dataset, gsm8k_dataset)


def clear_env(monkeypatch, *names: str) -> None:
    """Every NANO_EVAL_* variable and `names` out of the environment, for one test."""
    for name in [n for n in os.environ if n.startswith("NANO_EVAL_")] + list(names):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures (see its README.md for what each file is and where it came from)."""
    return FIXTURES


@pytest.fixture(scope="session")
def gsm8k_spec() -> Dataset:
    """openai/gsm8k main/test: all 1319 rows of tests/fixtures/gsm8k/test.jsonl. Shared: don't mutate."""
    return gsm8k_dataset(FIXTURES / "gsm8k" / "test.jsonl")


@pytest.fixture(scope="session")
def chartqa_spec() -> Dataset:
    """HuggingFaceM4/ChartQA default/test: the 40-row slice in tests/fixtures/chartqa (rows 16 and 17
    have a null image). Shared: don't mutate."""
    return chartqa_dataset(FIXTURES / "chartqa" / "rows.jsonl")


@pytest.fixture(scope="session")
def gsm8k_answers() -> dict[str, str]:
    """{question: gold answer} for the first 50 gsm8k test questions."""
    return {row["question"]: gold for row, gold in zip(GSM8K_ROWS[:50], GSM8K_GOLD)}


@pytest.fixture
def fake_openai(gsm8k_answers):
    """A running FakeOpenAI (model "fake-model") that answers the first 50 gsm8k test questions
    correctly and everything else with "The final answer is 0"."""
    with FakeOpenAI(answers=gsm8k_answers) as server:
        yield server


@pytest.fixture
def fake_hf(gsm8k_spec, chartqa_spec):
    """A running FakeDatasetsServer with openai/gsm8k main/test (1319 rows) and
    HuggingFaceM4/ChartQA default/test (the 40-row fixture slice)."""
    with FakeDatasetsServer({GSM8K: gsm8k_spec, CHARTQA: chartqa_spec}) as server:
        yield server


@pytest.fixture
def isolated_env(monkeypatch, tmp_path, fake_hf) -> Path:
    """Point nano-eval at fake_hf and a fresh data dir; drop credentials from the environment.

    Sets NANO_EVAL_DATASETS_SERVER=fake_hf.url and NANO_EVAL_DATA_DIR=tmp_path/"data" (not
    created), removes OPENAI_API_KEY, HF_TOKEN and any other NANO_EVAL_* variable, and keeps
    127.0.0.1 off any proxy. Returns the data dir.
    """
    clear_env(monkeypatch, "OPENAI_API_KEY", "HF_TOKEN")
    data_dir = tmp_path / "data"
    monkeypatch.setenv("NANO_EVAL_DATASETS_SERVER", fake_hf.url)
    monkeypatch.setenv("NANO_EVAL_DATA_DIR", str(data_dir))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return data_dir


@pytest.fixture
def raw_bodies(monkeypatch) -> list[bytes]:
    """Every non-empty request body the fakes receive, as the exact bytes (the fakes themselves keep
    only the parsed body)."""
    import fakes

    captured: list[bytes] = []
    original = fakes._parse_body

    def capture(raw):
        if raw:
            captured.append(bytes(raw))
        return original(raw)

    monkeypatch.setattr(fakes, "_parse_body", capture)
    return captured


@pytest.fixture
def no_datasets_server(monkeypatch):
    """No NANO_EVAL_* or OPENAI_API_KEY from the environment; the datasets-server is a dead port."""
    clear_env(monkeypatch, "OPENAI_API_KEY")
    monkeypatch.setenv("NANO_EVAL_DATASETS_SERVER", "http://127.0.0.1:9")  # gsm8k ships in data/


@pytest.fixture
def chart_server():
    with FakeOpenAI(responder=answers_responder(ANSWERS)) as server:
        yield server


@pytest.fixture
def no_env(monkeypatch):
    """No NANO_EVAL_*, HF_TOKEN or OPENAI_API_KEY from the environment."""
    clear_env(monkeypatch, "HF_TOKEN", "OPENAI_API_KEY")
