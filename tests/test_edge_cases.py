"""Edge cases found in review: secrets vs structured output, lm-eval's gen_kwargs semantics, short
dataset pages, hung servers, unsupported model_args, where the cache goes, and several servers
with --check only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fakes import cli, one_error
from fakes import GSM8K, Dataset, FakeDatasetsServer, FakeOpenAI, Reply

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nano_eval  # noqa: E402
from nano_eval import APIConfig, TASKS, _relaxed_preprocess, resolve_data_dir  # noqa: E402

NANO_EVAL = ROOT / "nano_eval.py"
GSM = ["--tasks", "gsm8k_cot_llama", "--no_progress"]




# --- secrets ---------------------------------------------------------------------------------


def test_a_short_key_does_not_corrupt_results_or_the_log(isolated_env, fake_openai, tmp_path):
    """The key 1234 equals the request seed: redaction must not touch structured data."""
    code, out, err = cli(*GSM, "--base_url", fake_openai.base_url, "--max_samples", 3, "--api_key", "1234",
                         "--log_samples", tmp_path / "logs")
    assert code == 0, err
    document = json.loads(out)
    assert document["config"]["seed"] == 1234
    lines = (tmp_path / "logs" / "samples_gsm8k_cot_llama.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line)["request"]["seed"] for line in lines] == [1234] * 3


@pytest.mark.parametrize("key", ["sk-\x01abc", "sk-a\nbc", "sk-é"])
def test_a_key_that_cannot_be_a_header_is_a_usage_error(isolated_env, fake_openai, key):
    code, out, err = cli(*GSM, "--base_url", fake_openai.base_url, "--max_samples", 2,
                         env={**nano_eval.os.environ, "OPENAI_API_KEY": key})
    assert "HTTP header" in one_error(code, err, 2)
    assert "sk-" not in err and fake_openai.chat_requests == []


def test_a_key_read_from_a_windows_file_is_stripped(isolated_env):
    with FakeOpenAI(api_key="sk-abc") as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 1,
                             env={**nano_eval.os.environ, "OPENAI_API_KEY": "sk-abc\r\n"})
    assert code == 0, err


def test_a_key_echoed_in_a_server_error_is_scrubbed_from_the_log(isolated_env, tmp_path):
    key = "sk-echoed-secret-42"
    with FakeOpenAI(responder=lambda body, n: Reply(status=400, json_body={"error": {"message": f"bad {key}"}})) as srv:
        cli(*GSM, "--base_url", srv.base_url, "--max_samples", 2, "--api_key", key, "--log_samples", tmp_path / "l")
    assert key not in (tmp_path / "l" / "samples_gsm8k_cot_llama.jsonl").read_text("utf-8")


# --- request bodies: lm-eval's gen_kwargs semantics -----------------------------------------


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


def test_a_lone_quote_label_is_emptied_as_lm_eval_does():
    assert _relaxed_preprocess('"') == "" and _relaxed_preprocess("'Japan'") == "Japan"
    assert _relaxed_preprocess('"Japan') == '"Japan'


# --- base URL and model_args ----------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/vé1", "http://user:pw@127.0.0.1:8000/v1"])
def test_non_ascii_or_credentials_in_the_url_are_usage_errors(isolated_env, url):
    code, out, err = cli(*GSM, "--base_url", url)
    one_error(code, err, 2)
    assert "pw@" not in err


@pytest.mark.parametrize("arg", ["eos_string=</s>", "eos_string=<|eot_id|>"])
def test_model_args_that_would_change_lm_evals_behaviour_are_refused(isolated_env, fake_openai, arg):
    code, out, err = cli(*GSM, "--base_url", fake_openai.base_url, "--model_args", arg)
    assert "unsupported key" in one_error(code, err, 2)


def test_think_end_token_model_arg(isolated_env, tmp_path):
    reply = "draft: The final answer is 1 [END] The final answer is 18"
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 1,
                             "--model_args", "think_end_token=[END]")
    assert code == 0, err
    assert json.loads(out)["results"]["gsm8k_cot_llama"]["metrics"]["exact_match,flexible-extract"] == 1.0


# --- datasets --------------------------------------------------------------------------------


def test_a_short_page_is_an_error_not_a_smaller_denominator(tmp_path, monkeypatch, gsm8k_spec, fake_openai):
    rows = [row for i, row in enumerate(gsm8k_spec.rows[:150]) if i != 5]
    monkeypatch.setattr(nano_eval, "BUNDLED_DATA", tmp_path / "none")
    with FakeDatasetsServer({GSM8K: Dataset(gsm8k_spec.features, rows)}) as hf:
        # the fake renumbers rows densely, so tamper with what it sends: drop row 5 from page 0
        original = hf._route

        def route(request):
            response = original(request)
            if request["path"] == "/rows" and request["query"].get("offset") == "0":
                body = json.loads(response.body)
                body["rows"] = [r for r in body["rows"] if r["row_idx"] != 5]
                response.body = json.dumps(body).encode()
            return response

        monkeypatch.setattr(hf, "_route", route)
        monkeypatch.setenv("NANO_EVAL_DATASETS_SERVER", hf.url)
        code = nano_eval.main([*GSM, "--base_url", fake_openai.base_url, "--max_samples", "20",
                               "--data_dir", str(tmp_path / "d")])
    assert code == 5
    assert not list((tmp_path / "d").rglob("rows-00000.jsonl"))  # nothing cached


def test_a_pip_installed_module_caches_in_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("NANO_EVAL_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    installed = tmp_path / "lib" / "site-packages" / "data"
    installed.parent.mkdir(parents=True)
    monkeypatch.setattr(nano_eval, "BUNDLED_DATA", installed)
    assert resolve_data_dir(None) == [tmp_path / "cache" / "nano-eval", installed]
    copied = tmp_path / "box" / "data"
    copied.parent.mkdir()
    monkeypatch.setattr(nano_eval, "BUNDLED_DATA", copied)  # nano_eval.py copied alone: data/ beside it
    assert resolve_data_dir(None) == [copied]


# --- servers ---------------------------------------------------------------------------------


def test_a_hung_server_is_given_up_like_a_dead_one(isolated_env):
    with FakeOpenAI(responder=lambda body, n: Reply(hang=True)) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 10, "--num_concurrent", 1,
                             "--timeout", "0.3", "--max_retries", 1, timeout=60)
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert code == 1 and result["num_samples"] == 10
    assert result["failures"] == {"connection": 6, "timeout": 4}  # 4 timeouts in a row, then not sent
    assert len(srv.chat_requests) == 4 and "stopped answering" in err


def test_check_alone_against_two_servers(isolated_env, fake_openai, tmp_path):
    with FakeOpenAI() as other:
        code, out, err = cli("--check", "--base_url", fake_openai.base_url, "--base_url", other.base_url,
                             "--output", tmp_path / "o.json")
    document = json.loads(out)
    assert code in (0, 1) and "Traceback" not in err
    assert [len(run["results"]["api_conformance"]["checks"]) for run in document["runs"]] == [12, 12]
    assert document["comparisons"] == [] and json.loads((tmp_path / "o.json").read_text()) == document


def test_requests_per_second_counts_only_what_was_sent(isolated_env, tmp_path):
    with FakeOpenAI() as srv:
        port = srv.port
        cli(*GSM, "--base_url", srv.base_url, "--max_samples", 5, "--log_samples", tmp_path / "l")
    with FakeOpenAI(port=port) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 5, "--log_samples", tmp_path / "l")
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert code == 0 and result["num_reused"] == 5 and srv.chat_requests == []
    assert result["requests_per_second"] == 0 and result["latency_p50"] is None


def test_until_must_be_text(isolated_env, fake_openai):
    code, out, err = cli(*GSM, "--base_url", fake_openai.base_url, "--gen_kwargs", "until=5")
    assert "until must be text" in one_error(code, err, 2)
    assert fake_openai.chat_requests == []


def test_unicode_digits_parse_as_lm_eval_does():
    assert nano_eval.parse_value("١٢") == 12 and nano_eval.parse_value("½") == "½"


def test_a_bad_hf_token_does_not_stop_an_offline_run(isolated_env, fake_openai, monkeypatch):
    monkeypatch.delenv("NANO_EVAL_DATA_DIR")  # gsm8k from the shipped data/: nothing is fetched
    code, out, err = cli(*GSM, "--base_url", fake_openai.base_url, "--max_samples", 2,
                         env={**nano_eval.os.environ, "HF_TOKEN": "hf_\x01bad"})
    assert code == 0, err


def test_one_unusable_server_does_not_lose_the_others(isolated_env, fake_openai, tmp_path):
    with FakeOpenAI(responder=lambda body, n: Reply(status=404)) as broken:
        code, out, err = cli(*GSM, "--base_url", fake_openai.base_url, "--base_url", broken.base_url,
                             "--max_samples", 3, "--output", tmp_path / "o.json")
    document = json.loads(out)
    assert code == 3 and "Traceback" not in err
    assert document["runs"][0]["results"]["gsm8k_cot_llama"]["num_samples"] == 3
    assert "answered 404" in document["runs"][1]["error"] and document["comparisons"] == []
    assert json.loads((tmp_path / "o.json").read_text()) == document
