"""Config: what a run is configured with, and what of it is never written.

APIConfig and its validation; base URLs normalised to .../v1 and its chat URL; lm-eval's
``k=v,k=v`` arguments (--model_args, --gen_kwargs) parsed as lm-eval parses them; the API key from
--api_key, --model_args, OPENAI_API_KEY or a file, and extra headers: sent where they belong,
redacted from everything nano-eval writes (stdout, stderr, results, the sample log, temporary files).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st


import nano_eval  # noqa: E402
from fakes import (ByRow, FakeOpenAI, GSM, GSM_ARGS, Reply, SECRET, TASK_ARGS, cli, cli_env, error_lines,  # noqa: E402
                   free_port, main_json, one_error)
from nano_eval import APIConfig, TASKS, UsageError, _normalize_base_url, _parse_kv, _parse_value, run_task  # noqa: E402


# --------------------------------------------------------------------------------------------
# Base URLs
# --------------------------------------------------------------------------------------------


def test_normalize_base_url():
    assert _normalize_base_url("http://h:1/v1/chat/completions") == ("http://h:1/v1", "http://h:1/v1/chat/completions")
    assert _normalize_base_url(" https://h/api/v1/ ") == ("https://h/api/v1", "https://h/api/v1/chat/completions")
    assert _normalize_base_url("http://h:8000") == ("http://h:8000/v1", "http://h:8000/v1/chat/completions")
    for bad in ("localhost:8000", "ftp://h/v1", "http:///v1", "http://h:99999999/v1", "", None):
        with pytest.raises(UsageError):
            _normalize_base_url(bad)


@pytest.mark.parametrize("suffix", ["/v1/chat/completions", "/v1/chat/completions/", "/v1/", "/v1", ""])
def test_base_url_forms_accepted(suffix, isolated_env, fake_openai, capsys):
    code, doc, err = main_json(["--tasks", GSM, "--base_url", fake_openai.url + suffix, "--max_samples", "2"], capsys)
    assert code == 0, err
    assert {r["path"] for r in fake_openai.chat_requests} == {"/v1/chat/completions"}
    assert doc["config"]["base_url"] == fake_openai.base_url
    assert doc["config"]["chat_url"] == fake_openai.base_url + "/chat/completions"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/vé1", "http://user:pw@127.0.0.1:8000/v1"])
def test_non_ascii_or_credentials_in_the_url_are_usage_errors(isolated_env, url):
    code, out, err = cli(*GSM_ARGS, "--base_url", url)
    one_error(code, err, 2)
    assert "pw@" not in err


# --------------------------------------------------------------------------------------------
# lm-eval's k=v,k=v arguments
# --------------------------------------------------------------------------------------------


def test_parse_kv_examples():
    assert _parse_kv(None, "--x") == {} and _parse_kv("", "--x") == {} and _parse_kv("  ", "--x") == {}
    assert _parse_kv("a=1,b=2.5,c=true,d=None,e=hello, f = x y ", "--x") == {
        "a": 1, "b": 2.5, "c": True, "d": "None", "e": "hello", "f": "x y"}
    assert _parse_kv("a=,b=2", "--x") == {"a": "", "b": 2}
    assert _parse_kv(" a = 1 , b=x,,c=b=c ", "--gen_kwargs") == {"a": 1, "b": "x", "c": "b=c"}  # empty items skipped
    for bad in ("a", "a,b", "=x", "=1", "a=1,b", " =1"):
        with pytest.raises(UsageError):
            _parse_kv(bad, "--x")


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.one_of(st.text(max_size=60), st.text(alphabet=",= ab1.\t\n", max_size=30)))
@example("a,b")
@example("=x")
@example(",,,")
@example("a==b")
@example(" = ")
def test_parse_kv_only_raises_usage_error(text):
    try:
        result = _parse_kv(text, "--gen_kwargs")
    except UsageError as exc:
        assert "--gen_kwargs" in str(exc)
    else:
        assert isinstance(result, dict)
        assert all(isinstance(k, str) and k and k == k.strip() for k in result)


safe_key = st.text(alphabet=st.characters(exclude_characters=",=", exclude_categories=("Cs",)),
                   min_size=1, max_size=12).map(str.strip).filter(bool)

plain_string = st.text(alphabet=st.characters(exclude_characters=",=", exclude_categories=("Cs",)),
                       min_size=1, max_size=12).map(str.strip).filter(lambda s: s and _parse_value(s) == s)

simple_value = st.one_of(st.integers(min_value=0), st.booleans(),
                         st.floats(allow_nan=False, allow_infinity=False), plain_string)


@FAST
@given(st.dictionaries(safe_key, simple_value, max_size=6))
def test_parse_kv_round_trips_simple_dicts(mapping):
    text = ",".join(f"{k}={v}" for k, v in mapping.items())
    parsed = _parse_kv(text, "--model_args")
    assert parsed == mapping
    for key, value in mapping.items():
        assert type(parsed[key]) is type(value)


@pytest.mark.parametrize("text, value", [
    # lm-eval's handle_arg_string: no None, and only digit strings become int ("-3" -> -3.0)
    ("true", True), ("False", False), ("NONE", "NONE"), ("12", 12), ("-3", -3.0), ("0.5", 0.5), ("1e3", 1000.0),
    ("abc", "abc"), ("", ""), ("0.1.2", "0.1.2"),
    ("True", True), ("TRUE", True), ("false", False), ("none", "none"), ("None", "None"),
])
def test_parse_value(text, value):
    parsed = _parse_value(text)
    assert parsed == value and type(parsed) is type(value)


@FAST
@given(st.integers())
def test_parse_value_int(i):
    value = _parse_value(str(i))  # lm-eval: digits only -> int; "-5" -> -5.0
    assert (value, type(value)) == ((i, int) if i >= 0 else (float(i), float))


@FAST
@given(st.floats(allow_nan=False))
def test_parse_value_float(f):
    value = _parse_value(repr(f))
    assert type(value) is float and value == f


def test_parse_value_nan():
    assert math.isnan(_parse_value("nan"))


@FAST
@given(st.text(max_size=40))
def test_parse_value_types(text):
    value = _parse_value(text)
    assert value is None or type(value) in (bool, int, float, str)
    if type(value) is str:
        assert value == text  # a string comes back unchanged
    if type(value) is bool:
        assert text.lower() in ("true", "false")


@pytest.mark.parametrize("arg", ["eos_string=</s>", "eos_string=<|eot_id|>"])
def test_model_args_that_would_change_lm_evals_behaviour_are_refused(isolated_env, fake_openai, arg):
    code, out, err = cli(*GSM_ARGS, "--base_url", fake_openai.base_url, "--model_args", arg)
    assert "unsupported key" in one_error(code, err, 2)


def test_python_api_rejects_bad_config():
    with pytest.raises(UsageError):
        APIConfig(url="http://127.0.0.1:9/v1", num_concurrent=0)
    with pytest.raises(UsageError):
        APIConfig(url="not a url")
    with pytest.raises(UsageError):
        asyncio.run(run_task(TASKS[GSM], APIConfig(url="http://127.0.0.1:9/v1", model="m"), max_samples=0))


@pytest.mark.parametrize("field, value", [
    ("num_concurrent", "8"), ("num_concurrent", True), ("num_concurrent", 2.0), ("max_retries", 0),
    ("timeout", "60"), ("timeout", True), ("timeout", math.inf), ("timeout", math.nan), ("timeout", -1),
    ("seed", "5"), ("seed", 1.5), ("max_gen_toks", 0), ("max_response_mb", 0), ("verify_certificate", "false"),
])
def test_python_api_checks_each_field_like_the_command_line(field, value):
    """A parsed value of the wrong type is refused, text included (the command line parses its text
    before the same check), and so are bools, NaN and infinity."""
    with pytest.raises(UsageError, match=field):
        APIConfig(url="http://127.0.0.1:9/v1", **{field: value})


def test_python_api_keeps_the_values_it_was_given():
    config = APIConfig(url="http://127.0.0.1:9/v1", timeout=60, max_response_mb=16, seed=None, max_gen_toks=None)
    assert (config.timeout, type(config.timeout), config.max_response_mb, type(config.max_response_mb)) == \
        (60, int, 16, int)
    assert config.seed is None and config.max_gen_toks is None  # a null seed; each task's own max_tokens


@pytest.mark.parametrize("field, value", [
    ("max_samples", 0), ("max_samples", "3"), ("repeats", 0), ("max_fail_rate", 1.5), ("expect_tolerance", -0.1),
    ("logprob_tolerance", 0), ("fail_if", "better"),
])
def test_run_options_check_each_field_like_the_command_line(field, value):
    with pytest.raises(UsageError, match=field):
        nano_eval.RunOptions(**{field: value})


def test_every_option_is_a_flag_a_model_arg_or_both_and_its_check_is_the_fields():
    """The one table of options: each has a --help text or is a --model_args key; what it fills
    is a field of APIConfig or RunOptions of its name; argparse, --model_args and the Python API
    use its check."""
    fields = {"api": {f.name for f in nano_eval.dataclasses.fields(APIConfig)},
              "run": {f.name for f in nano_eval.dataclasses.fields(nano_eval.RunOptions)}}
    for option in nano_eval._OPTIONS:
        assert option.help or option.model_arg, option.name
        assert option.into is None or option.name in fields[option.into], option.name
    parser = nano_eval._build_parser()
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags - {"version"} == {o.name for o in nano_eval._OPTIONS if o.help}


def test_the_recorded_config_reads_each_option_from_the_carrier_it_sets():
    """The results file's config: every recorded option's value is the one its carrier holds
    (not a default), in the table's order; the key is never among them."""
    config = APIConfig(url="http://127.0.0.1:9/v1", model="m", api_key="sk-recorded-never",
                       num_concurrent=3, seed=7, timeout=9, max_retries=2, logprobs=4,
                       system_instruction="s", fewshot_as_multiturn=False, keep_think=True,
                       think_end_token="</t>")
    options = nano_eval.RunOptions(tasks=[TASKS[GSM]], max_samples=5, max_fail_rate=0.5, repeats=2)
    record = nano_eval._config_record(config, options)
    assert list(record) == list(nano_eval._RECORDED)
    assert {k: record[k] for k in ("num_concurrent", "seed", "timeout", "max_retries", "logprobs",
                                   "system_instruction", "fewshot_as_multiturn", "keep_think",
                                   "think_end_token", "max_samples", "max_fail_rate", "repeats")} == \
        {"num_concurrent": 3, "seed": 7, "timeout": 9, "max_retries": 2, "logprobs": 4,
         "system_instruction": "s", "fewshot_as_multiturn": False, "keep_think": True,
         "think_end_token": "</t>", "max_samples": 5, "max_fail_rate": 0.5, "repeats": 2}
    assert (record["model"], record["chat_url"]) == ("m", "http://127.0.0.1:9/v1/chat/completions")
    assert "sk-recorded-never" not in json.dumps(record)


def test_a_null_seed_in_json_model_args_sends_a_null_seed(isolated_env, fake_openai):
    code, out, err = cli(*TASK_ARGS, "--base_url", fake_openai.base_url, "--model_args", '{"seed": null}')
    assert code == 0, err
    assert [r["body"]["seed"] for r in fake_openai.chat_requests] == [None, None]


@pytest.mark.parametrize("keyword", [{"repeats": "2"}, {"repeats": 0}, {"max_samples": "3"}, {"max_samples": True}])
def test_run_task_checks_its_counts(keyword):
    with pytest.raises(UsageError, match=next(iter(keyword))):
        asyncio.run(run_task(TASKS[GSM], APIConfig(url="http://127.0.0.1:9/v1", model="m"), **keyword))


@pytest.mark.parametrize("args", [
    ["--model_args", '{"timeout": null}'],
    ["--model_args", '{"num_concurrent": "8"}'],
    ["--model_args", "verify_certificate=maybe", "--insecure"],
    ["--model_args", "timeout=inf"],
])
def test_a_bad_model_arg_is_refused_before_any_server_is_looked_for(isolated_env, args):
    """No --base_url: the model_args are checked before the local ports are probed (exit 2, not 3)."""
    code, out, err = cli("--tasks", GSM, *args)
    assert out == ""
    one_error(code, err, 2)
    assert "no server answered" not in err


def test_model_args_numbers_are_recorded_as_given(isolated_env, fake_openai, capsys):
    code, doc, err = main_json([*GSM_ARGS, "--base_url", fake_openai.base_url, "--model_args", "timeout=60"], capsys)
    assert code == 0, err
    assert doc["config"]["timeout"] == 60 and isinstance(doc["config"]["timeout"], int)


# --------------------------------------------------------------------------------------------
# The API key: where it comes from, and never written anywhere
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "model_args", "env"])
def test_api_key_sources(how, isolated_env, monkeypatch, capsys):
    with FakeOpenAI(api_key="sk-right") as server:
        argv = ["--tasks", GSM, "--base_url", server.base_url, "--max_samples", "1"]
        if how == "flag":
            monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-env")
            argv += ["--api_key", "sk-right", "--model_args", "api_key=sk-wrong-args"]
        elif how == "model_args":
            monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-env")
            argv += ["--model_args", "api_key=sk-right"]
        else:
            monkeypatch.setenv("OPENAI_API_KEY", "sk-right")
        code, doc, err = main_json(argv, capsys)
        assert code == 0, err
        assert server.chat_requests[0]["headers"]["Authorization"] == "Bearer sk-right"
    assert "sk-right" not in json.dumps(doc) and "sk-right" not in err


@pytest.mark.parametrize("key", ["sk-\x01abc", "sk-a\nbc", "sk-é"])
def test_a_key_that_cannot_be_a_header_is_a_usage_error(isolated_env, fake_openai, key):
    code, out, err = cli(*GSM_ARGS, "--base_url", fake_openai.base_url, "--max_samples", 2,
                         env={**nano_eval.os.environ, "OPENAI_API_KEY": key})
    assert "HTTP header" in one_error(code, err, 2)
    assert "sk-" not in err and fake_openai.chat_requests == []


def test_a_key_read_from_a_windows_file_is_stripped(isolated_env):
    with FakeOpenAI(api_key="sk-abc") as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1,
                             env={**nano_eval.os.environ, "OPENAI_API_KEY": "sk-abc\r\n"})
    assert code == 0, err


ENV_KEY = "sk-ENVSECRET-456"

FLAG_KEY = "sk-SECRET-123"

HF_KEY = "hf_TOKENSECRET789"


def all_bytes_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_no_secret(out: str, err: str, folder: Path, *secrets: str):
    files = all_bytes_under(folder)
    assert files, "nothing was written"
    for secret in secrets:
        assert secret not in out, f"{secret} on stdout"
        assert secret not in err, f"{secret} on stderr"
        for path, data in files.items():
            assert secret.encode() not in data, f"{secret} in {path}"


@pytest.fixture
def secret_env(isolated_env, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_KEY)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # temporary files land where they are searched too
    return tmp_path


def test_api_key_never_written(secret_env, fake_hf):
    tmp_path = secret_env
    with FakeOpenAI(api_key=FLAG_KEY) as srv:
        code, out, err = cli("--tasks", "gsm8k_cot_llama,chartqa", "--base_url", srv.base_url,
                             "--api_key", FLAG_KEY, "--max_samples", "3", "--no_progress",
                             "--output", str(tmp_path / "results.json"),
                             "--log_samples", str(tmp_path / "logs"), "--log_images",
                             "--data_dir", str(tmp_path / "data"), "--max_fail_rate", "1")
        auth = {r["headers"].get("Authorization") for r in srv.chat_requests}
    assert code == 0, err
    assert auth == {f"Bearer {FLAG_KEY}"}  # the flag's key was used (and won over the env)
    document = json.loads(out)
    assert set(document["results"]) == {"gsm8k_cot_llama", "chartqa"}
    assert (tmp_path / "data").is_dir() and (tmp_path / "logs" / "samples_chartqa.jsonl").exists()
    assert_no_secret(out, err, tmp_path, FLAG_KEY, ENV_KEY, HF_KEY)


def test_env_api_key_never_written(secret_env):
    tmp_path = secret_env
    with FakeOpenAI(api_key=ENV_KEY) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url, "--output", str(tmp_path / "results.json"))
        auth = {r["headers"].get("Authorization") for r in srv.chat_requests}
    assert code == 0, err
    assert auth == {f"Bearer {ENV_KEY}"}
    assert_no_secret(out, err, tmp_path, ENV_KEY, HF_KEY)


def test_model_args_api_key_never_written(secret_env, monkeypatch):
    tmp_path = secret_env
    monkeypatch.delenv("OPENAI_API_KEY")
    with FakeOpenAI(api_key=FLAG_KEY) as srv:
        code, out, err = cli(*TASK_ARGS, "--model_args", f"base_url={srv.base_url},api_key={FLAG_KEY}",
                             "--output", str(tmp_path / "results.json"))
    assert code == 0, err
    assert_no_secret(out, err, tmp_path, FLAG_KEY)


@pytest.mark.parametrize("where", ["models", "chat"])
def test_rejected_api_key_never_written(secret_env, where):
    tmp_path = secret_env
    models = {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}
    routes = {"/v1/models": (200, models)} if where == "chat" else {}
    with FakeOpenAI(api_key="sk-the-right-one", extra_routes=routes) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url, "--api_key", FLAG_KEY,
                             "--output", str(tmp_path / "results.json"), "--log_samples", str(tmp_path / "logs"))
    one_error(code, err, 4, "authentication failed")
    for secret in (FLAG_KEY, ENV_KEY, HF_KEY):
        assert secret not in out and secret not in err
        for path, data in all_bytes_under(tmp_path).items():
            assert secret.encode() not in data, f"{secret} in {path}"


def test_api_key_in_an_error_message_is_redacted(secret_env):
    # a server that echoes the Authorization header back in its error message
    def echo(body, n):
        return Reply(status=400, json_body={"error": {"message": f"bad request with key {FLAG_KEY}"}})

    tmp_path = secret_env
    with FakeOpenAI(responder=echo) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url, "--api_key", FLAG_KEY,
                             "--output", str(tmp_path / "results.json"), "--max_fail_rate", "1")
    assert code == 0, err
    assert_no_secret(out, err, tmp_path, FLAG_KEY)


def test_secret_key_not_printed_on_failure(tmp_path):
    """An unreachable server: the error line names the URL but never the key."""
    proc = cli("--tasks", GSM, "--base_url", f"http://127.0.0.1:{free_port()}/v1", env=cli_env(tmp_path, OPENAI_API_KEY=SECRET))
    assert proc.returncode == 3
    assert SECRET not in proc.stderr and SECRET not in proc.stdout


def test_a_key_echoed_in_a_server_error_is_scrubbed_from_the_log(isolated_env, tmp_path):
    key = "sk-echoed-secret-42"
    with FakeOpenAI(responder=lambda body, n: Reply(status=400, json_body={"error": {"message": f"bad {key}"}})) as srv:
        cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2, "--api_key", key, "--log_samples", tmp_path / "l")
    assert key not in (tmp_path / "l" / "samples_gsm8k_cot_llama.jsonl").read_text("utf-8")


def test_a_short_key_does_not_corrupt_results_or_the_log(isolated_env, fake_openai, tmp_path):
    """The key 1234 equals the request seed: redaction must not touch structured data."""
    code, out, err = cli(*GSM_ARGS, "--base_url", fake_openai.base_url, "--max_samples", 3, "--api_key", "1234",
                         "--log_samples", tmp_path / "logs")
    assert code == 0, err
    document = json.loads(out)
    assert document["config"]["seed"] == 1234
    lines = (tmp_path / "logs" / "samples_gsm8k_cot_llama.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line)["request"]["seed"] for line in lines] == [1234] * 3


# --------------------------------------------------------------------------------------------
# Extra headers: sent on every request, secret like the key
# --------------------------------------------------------------------------------------------


SECRETS = {"X-Gateway-Token": "s3cr3t-value", "X-Second": "s3cond-s3cr3t", "X-Other": "v2-0th3r-s3cr3t"}


def test_extra_headers_reach_every_request_and_are_never_written(isolated_env, tmp_path):
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 3, "--output", output,
                             "--header", f"X-Gateway-Token: {SECRETS['X-Gateway-Token']}",
                             "--header", f"X-Second:{SECRETS['X-Second']}",
                             "--model_args", f"header=X-Other: {SECRETS['X-Other']}")
        requests = srv.requests
    assert code == 0, err
    assert json.loads(out)["results"]["gsm8k_cot_llama"]["num_ok"] == 3
    paths = {r["path"] for r in requests}
    assert {"/v1/models", "/v1/chat/completions", "/version", "/props"} <= paths  # models, identity, chat
    for r in requests:
        assert {name: r["headers"].get(name) for name in SECRETS} == SECRETS, r["path"]
    written = [out, err, output.read_text("utf-8")]
    log_dir = tmp_path / "o_samples"
    logs = list(log_dir.glob("*.jsonl"))
    assert logs
    written += [p.read_text("utf-8") for p in logs]
    for text in written:
        for value in SECRETS.values():
            assert value not in text

    # replay prints the header's name with a placeholder, never its value
    code, out, err = cli("replay", f"{logs[0]}:1", "--curl", "--header", f"X-Gateway-Token: {SECRETS['X-Gateway-Token']}")
    assert code == 0, err
    assert "X-Gateway-Token" in out
    assert SECRETS["X-Gateway-Token"] not in out and SECRETS["X-Gateway-Token"] not in err


def test_an_authorization_header_replaces_the_key(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2, "--api_key", "sk-plain-key",
                             "--header", "Authorization: Bearer gw-issued-token")
        seen = {r["headers"].get("Authorization") for r in srv.requests}
    assert code == 0, err
    assert seen == {"Bearer gw-issued-token"}
    assert "gw-issued-token" not in out + err


def test_json_model_args_header_dict(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2,
                             "--model_args", json.dumps({"header": {"X-J": "jv-s3cr3t", "X-K": "kv-s3cr3t"},
                                                         "num_concurrent": 2}))
        requests = srv.requests
    assert code == 0, err
    assert json.loads(out)["config"]["num_concurrent"] == 2
    assert requests and all(r["headers"].get("X-J") == "jv-s3cr3t" and r["headers"].get("X-K") == "kv-s3cr3t"
                            for r in requests)
    assert "jv-s3cr3t" not in out + err and "kv-s3cr3t" not in out + err


def test_a_header_value_echoed_by_the_server_is_scrubbed(isolated_env, tmp_path):
    value = "echoed-gateway-s3cr3t"
    reply = Reply(status=400, json_body={"error": {"message": f"gateway refused token {value}"}})
    with FakeOpenAI(responder=lambda body, n: reply) as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 2, "--max_fail_rate", 1,
                             "--header", f"X-Gateway-Token: {value}", "--log_samples", tmp_path / "l")
    assert code == 0, err
    log = (tmp_path / "l" / "samples_gsm8k_cot_llama.jsonl").read_text("utf-8")
    assert "gateway refused token" in log
    assert value not in log and value not in out and value not in err


@pytest.mark.parametrize("header", ["novalue", ": value", "Bad Name: v"])
def test_a_malformed_header_is_one_usage_error(isolated_env, header):
    with FakeOpenAI() as srv:
        code, out, err = cli(*GSM_ARGS, "--base_url", srv.base_url, "--max_samples", 1, "--header", header)
        requests = srv.requests
    assert code == 2, err
    assert len(error_lines(err)) == 1 and "Traceback" not in err
    assert "header" in error_lines(err)[0] and "'Name: value'" in error_lines(err)[0]
    assert out == "" and requests == []


# --------------------------------------------------------------------------------------------
# What a server echoes back is redacted too; short secrets do not mangle messages (issue 23, 9-10)
# --------------------------------------------------------------------------------------------


def test_credentials_echoed_by_the_server_are_never_written(secret_env):
    """A /version that echoes the request headers, and completions that echo them: the key and the
    --header value reach neither stdout, nor --output, nor the sample log, nor a report of it."""
    tmp_path = secret_env
    header = "team-secret-7f3a9c"
    seen = {}

    class Echo(FakeOpenAI):
        def _route(self, request):
            seen.update((k.lower(), v) for k, v in request["headers"].items())
            return super()._route(request)

    echo = f"Authorization: Bearer {FLAG_KEY}, X-Team: {header}"
    # the reasoning channel echoes them too: it is logged beside the content
    with Echo(responder=lambda body, n: Reply(content=f"{echo}. The final answer is 7", reasoning_content=echo),
              extra_routes={"/version": (200, {"version": echo})}) as srv:
        code, out, err = cli(*TASK_ARGS, "--base_url", srv.base_url, "--api_key", FLAG_KEY, "--header",
                             f"X-Team: {header}", "--output", tmp_path / "results.json", "--log_samples",
                             tmp_path / "logs")
    assert code in (0, 1), err
    assert seen.get("x-team") == header  # the header was sent, so the server could echo it
    assert json.loads(out)["config"]["server"]["version"] == "Authorization: Bearer ***, X-Team: ***"
    report = cli("report", tmp_path / "logs", "-o", tmp_path / "report.html")
    assert report.returncode == 0, report.stderr
    assert_no_secret(out, err + report.stderr, tmp_path, FLAG_KEY, header)
    assert "Authorization: Bearer ***" in (tmp_path / "logs" / f"samples_{GSM}.jsonl").read_text("utf-8")


@pytest.mark.parametrize("env, flags", [({"OPENAI_API_KEY": "a"}, []), ({}, ["--header", "X-Debug: 1"])])
def test_a_one_character_secret_does_not_mangle_messages(tmp_path, env, flags):
    proc = cli("--tasks", GSM, "--base_url", f"http://127.0.0.1:{free_port()}/v1", *flags,
               env=cli_env(tmp_path, **env))
    assert proc.returncode == 3
    assert error_lines(proc.stderr)[0].startswith("nano-eval: error: cannot reach http://127.0.0.1:"), proc.stderr
    assert "***" not in proc.stderr
    # where it stands as a credential it is still replaced
    assert nano_eval._redact("Authorization: Bearer a; X-Debug: 1; key=a", ["a", "1"]) == \
        "Authorization: Bearer ***; X-Debug: ***; key=***"


def test_redact_long_secrets_anywhere_longest_first():
    # SHORT_SECRET (8) characters or more: replaced wherever it stands
    assert nano_eval._redact("token:abcdefgh;", ["abcdefgh"]) == "token:***;"
    assert nano_eval._redact("token:abcdefg;", ["abcdefg"]) == "token:abcdefg;"  # 7: only as a credential
    # a secret that begins another is replaced after it: no tail of the longer one is left
    assert nano_eval._redact("key abcdefgh12345678 end", ["abcdefgh", "abcdefgh12345678"]) == "key *** end"


# --------------------------------------------------------------------------------------------
# Bad input is the user's (exit 2, one line), not the server's (issue 23, item 12)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, fragment", [
    (["--base_url", "http://h:1/v 1"], "no spaces or control characters"),
    (["--ca_cert", "{garbage}"], "holds no PEM certificate"),
    (["--timeout", "1e300"], "--timeout: expected a positive number up to 1e9"),
    (["--gen_kwargs", "temperature=nan"], "temperature=nan is not a finite number"),
    (["--gen_kwargs", "temperature=inf"], "temperature=inf is not a finite number"),
    (["--header", "Content-Length: 5"], "header Content-Length is set by nano-eval"),
    (["--header", "Transfer-Encoding: chunked"], "header Transfer-Encoding is set by nano-eval"),
])
def test_bad_input_is_a_usage_error(tmp_path, flags, fragment):
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    flags = [f.format(garbage=garbage) for f in flags]
    base = [] if "--base_url" in flags else ["--base_url", f"http://127.0.0.1:{free_port()}/v1"]
    proc = cli("--tasks", GSM, *base, *flags, env=cli_env(tmp_path))
    one_error(proc.returncode, proc.stderr, 2, fragment)
    assert proc.stdout == ""


def test_a_query_in_the_base_url_is_sent_with_every_chat_request(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        proc = cli(*GSM_ARGS, "--base_url", srv.base_url + "?api-version=2024-06-01", "--max_samples", 2)
        queries = [r["query"] for r in srv.chat_requests]
    assert proc.returncode == 0, proc.stderr
    assert queries == [{"api-version": "2024-06-01"}] * 2
