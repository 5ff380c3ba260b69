"""Issue 12: reach every real deployment. TLS options against a local HTTPS fake with the
self-signed test certificate in fixtures/tls/, extra headers (secret like the key), HTTP(S)_PROXY
and NO_PROXY through a local forward proxy (fakes.ForwardProxy), the Python API, and a wheel
installed into a fresh venv running gsm8k offline from the shipped split.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fakes import cli, error_lines
from fakes import TLS_CERT, ByRow, FakeOpenAI, ForwardProxy, Reply, free_port, gsm8k_row_of, serve_https

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nano_eval import APIConfig, TASKS, UsageError, run_task  # noqa: E402

NANO_EVAL = ROOT / "nano_eval.py"
GSM = ["--tasks", "gsm8k_cot_llama", "--no_progress"]
VERIFICATION_OFF = "verification is off"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy")






def env_with(**values) -> dict:
    """os.environ without any proxy or CA variable, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env.update(values)
    return env


@pytest.fixture
def https_fake():
    with serve_https(FakeOpenAI(responder=ByRow())) as srv:
        yield srv


@pytest.fixture
def proxy():
    with ForwardProxy() as px:
        yield px


# --- TLS -------------------------------------------------------------------------------------

TLS_WAYS = {
    "default": ([], {}, 3),
    "verify_certificate=false": (["--model_args", "verify_certificate=false"], {}, 0),
    "--insecure": (["--insecure"], {}, 0),
    "--ca_cert": (["--ca_cert", TLS_CERT], {}, 0),
    "ca_cert_path=": (["--model_args", f"ca_cert_path={TLS_CERT}"], {}, 0),
    "SSL_CERT_FILE": ([], {"SSL_CERT_FILE": str(TLS_CERT)}, 0),
}


@pytest.mark.parametrize("way", list(TLS_WAYS))
def test_tls_options_against_a_self_signed_server(isolated_env, https_fake, way):
    args, extra_env, expected = TLS_WAYS[way]
    assert https_fake.base_url.startswith("https://127.0.0.1:")
    code, out, err = cli(*GSM, "--base_url", https_fake.base_url, "--max_samples", 3, *args,
                         env=env_with(**extra_env), timeout=30)
    chat = https_fake.chat_requests
    assert code == expected, err
    off = [line for line in err.splitlines() if VERIFICATION_OFF in line]
    if expected:
        (line,) = error_lines(err)
        assert "certificate" in line and "--insecure" in line and out == "" and chat == []
        return
    result = json.loads(out)["results"]["gsm8k_cot_llama"]
    assert result["num_ok"] == 3 and result["failures"] == {}
    assert sorted(gsm8k_row_of(r["body"]) for r in chat) == [0, 1, 2]
    if way in ("verify_certificate=false", "--insecure"):
        assert len(off) == 1 and off[0].startswith("nano-eval: warning:")
    else:
        assert off == []  # verified: nothing to warn about


def test_verification_off_is_warned_once_per_run(isolated_env, https_fake, tmp_path):
    """Two https servers (the same one twice), verification off: one warning line, not one per server."""
    code, out, err = cli(*GSM, "--base_url", https_fake.base_url, "--base_url", https_fake.base_url + "/chat/completions",
                         "--max_samples", 2, "--insecure", "--log_samples", tmp_path / "l", env=env_with(), timeout=60)
    assert code == 0, err
    assert [run["results"]["gsm8k_cot_llama"]["num_ok"] for run in json.loads(out)["runs"]] == [2, 2]
    assert len([line for line in err.splitlines() if VERIFICATION_OFF in line]) == 1


def test_no_warning_for_plain_http_with_insecure(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 1, "--insecure")
    assert code == 0, err
    assert VERIFICATION_OFF not in err


def test_a_missing_ca_file_is_a_usage_error(isolated_env, https_fake, tmp_path):
    code, out, err = cli(*GSM, "--base_url", https_fake.base_url, "--max_samples", 1,
                         "--ca_cert", tmp_path / "nope.pem", env=env_with())
    assert code == 2, err
    (line,) = error_lines(err)
    assert "CA certificate file" in line and "nope.pem" in line and "does not exist" in line
    assert https_fake.requests == []


def test_a_ca_that_did_not_sign_the_certificate_still_fails(isolated_env, https_fake, tmp_path):
    """--ca_cert replaces trust, it does not switch verification off: another CA is refused."""
    other = tmp_path / "other.pem"
    other.write_text(_other_ca_pem(), "ascii")
    code, out, err = cli(*GSM, "--base_url", https_fake.base_url, "--max_samples", 1, "--ca_cert", other,
                         env=env_with(), timeout=30)
    assert code == 3, err
    assert "certificate" in error_lines(err)[0] and https_fake.chat_requests == []


def _other_ca_pem() -> str:
    """Some CA certificate that is not the test one: the first of the system bundle, or skip."""
    import ssl
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            text = Path(candidate).read_text("ascii", "replace")
            start = text.find("-----BEGIN CERTIFICATE-----")
            end = text.find("-----END CERTIFICATE-----", start)
            if start >= 0 and end > start:
                return text[start:end + len("-----END CERTIFICATE-----")] + "\n"
    pytest.skip("no system CA bundle to take another CA certificate from")


# --- proxies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_plain_http_goes_through_the_proxy_in_absolute_form(isolated_env, proxy, variable):
    num_concurrent = 2
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 20, "--num_concurrent", num_concurrent,
                             env=env_with(**{variable: proxy.url}))
        direct = srv.requests
    assert code == 0, err
    assert json.loads(out)["results"]["gsm8k_cot_llama"]["num_ok"] == 20
    chat = [r for r in proxy.requests if r["path"] == "/v1/chat/completions"]
    assert len(chat) == 20 and all(r["method"] == "POST" for r in chat)
    assert all(r["url"] == srv.base_url + "/chat/completions" for r in chat)  # absolute form
    assert any(r["url"] == srv.base_url + "/models" for r in proxy.requests)
    assert len(proxy.requests) == len(direct)  # everything the server got came through the proxy
    assert proxy.tunnels == []
    # keep-alive on the client side: the 20 chat requests came on at most num_concurrent connections,
    # and all the run's connections (model, the 8 identity probes, chat) are few
    assert len({r["client"] for r in chat}) <= num_concurrent
    assert proxy.connections <= num_concurrent + 10, proxy.connections


def test_https_goes_through_a_connect_tunnel(isolated_env, proxy, https_fake):
    num_concurrent = 2
    code, out, err = cli(*GSM, "--base_url", https_fake.base_url, "--max_samples", 20, "--num_concurrent",
                         num_concurrent, "--ca_cert", TLS_CERT, env=env_with(HTTPS_PROXY=proxy.url), timeout=30)
    assert code == 0, err
    assert json.loads(out)["results"]["gsm8k_cot_llama"]["num_ok"] == 20
    assert proxy.requests == []  # nothing in the clear
    assert proxy.tunnels and {t["target"] for t in proxy.tunnels} == {f"127.0.0.1:{https_fake.port}"}
    assert len(https_fake.chat_requests) == 20
    assert https_fake.connections == len(proxy.tunnels)  # every connection the server saw was a tunnel
    assert len(proxy.tunnels) <= num_concurrent + 10 < len(https_fake.requests)  # tunnels were kept alive


def test_no_proxy_bypasses_the_proxy(isolated_env, proxy):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 3,
                             env=env_with(HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, NO_PROXY="127.0.0.1"))
        chat = len(srv.chat_requests)
    assert code == 0, err
    assert chat == 3
    assert proxy.requests == [] and proxy.tunnels == [] and proxy.connections == 0


def test_the_datasets_server_goes_through_the_proxy(isolated_env, proxy, fake_hf):
    """chartqa is not shipped: its rows and images are fetched, through HTTP_PROXY."""
    with FakeOpenAI() as srv:
        code, out, err = cli("--tasks", "chartqa", "--no_progress", "--base_url", srv.base_url, "--max_samples", 2,
                             "--max_fail_rate", 1, env=env_with(HTTP_PROXY=proxy.url))
    assert code == 0, err
    assert json.loads(out)["results"]["chartqa"]["num_samples"] == 2
    rows = [r for r in proxy.requests if r["path"] == "/rows"]
    assert rows and len(rows) == len(fake_hf.rows_requests)
    assert all(r["url"].startswith(fake_hf.url + "/rows?") and "HuggingFaceM4%2FChartQA" in r["url"] for r in rows)
    assets = [r for r in proxy.requests if r["path"].startswith("/cached-assets/")]
    assert len(assets) == len(fake_hf.asset_requests) >= 1


def test_proxy_credentials_go_to_the_proxy_only(isolated_env, https_fake):
    import base64
    expected = "Basic " + base64.b64encode(b"proxy-user:pa@ss-s3cr3t").decode()
    proxy = ForwardProxy(credentials="proxy-user:pa@ss-s3cr3t").start()
    url = proxy.url.replace("http://", "http://proxy-user:pa%40ss-s3cr3t@")
    with FakeOpenAI(responder=ByRow()) as plain:
        code, out, err = cli(*GSM, "--base_url", plain.base_url, "--max_samples", 2, env=env_with(HTTP_PROXY=url))
        origin_headers = [r["headers"] for r in plain.requests]
    assert code == 0, err
    assert proxy.requests and all(r["headers"].get("Proxy-Authorization") == expected for r in proxy.requests)
    assert origin_headers and not any("Proxy-Authorization" in h for h in origin_headers)
    code, out2, err2 = cli(*GSM, "--base_url", https_fake.base_url, "--max_samples", 2, "--ca_cert", TLS_CERT,
                           env=env_with(HTTPS_PROXY=url), timeout=30)
    assert code == 0, err2
    assert proxy.tunnels and all(t["headers"].get("Proxy-Authorization") == expected for t in proxy.tunnels)
    assert not any("Proxy-Authorization" in r["headers"] for r in https_fake.requests)
    proxy.close()
    assert proxy.refused == []
    for text in (out, err, out2, err2):
        assert "pa@ss-s3cr3t" not in text and "pa%40ss-s3cr3t" not in text


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_wants_credentials_is_named_in_the_error(isolated_env, https_fake, scheme):
    """HTTP(S)_PROXY without user:password@ for a proxy that requires them: the error must say it is
    the proxy (407), not send the user after --model or --api_key."""
    with ForwardProxy(credentials="u:p") as proxy, FakeOpenAI(responder=ByRow()) as plain:
        target = plain if scheme == "http" else https_fake
        code, out, err = cli(*GSM, "--base_url", target.base_url, "--max_samples", 2, "--ca_cert", TLS_CERT,
                             env=env_with(HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url), timeout=30)
        refused = len(proxy.refused)
    assert refused >= 1 and target.requests == []
    assert code == 3, err
    (line,) = error_lines(err)
    assert "407" in line and "proxy" in line.lower()
    assert "--model" not in line and "--api_key" not in line


# --- extra headers ---------------------------------------------------------------------------

SECRETS = {"X-Gateway-Token": "s3cr3t-value", "X-Second": "s3cond-s3cr3t", "X-Other": "v2-0th3r-s3cr3t"}


def test_extra_headers_reach_every_request_and_are_never_written(isolated_env, tmp_path):
    output = tmp_path / "o.json"
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 3, "--output", output,
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


def test_replay_sends_the_header(isolated_env, tmp_path):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 1, "--log_samples", tmp_path / "l")
        assert code == 0, err
        code, out, err = cli("replay", f"{tmp_path / 'l' / 'samples_gsm8k_cot_llama.jsonl'}:1",
                             "--header", "X-Gateway-Token: s3cr3t-value")
        last = srv.chat_requests[-1]
    assert code == 0, err
    assert last["headers"].get("X-Gateway-Token") == "s3cr3t-value"
    assert "s3cr3t-value" not in out + err


def test_replay_does_not_print_a_header_value_the_server_echoes(isolated_env, tmp_path):
    """Header values are never printed: not even when a gateway quotes the token in its error."""
    value = "replayed-gateway-s3cr3t"
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 1, "--log_samples", tmp_path / "l")
        assert code == 0, err
        srv.responder = lambda body, n: Reply(status=401, json_body={"error": {"message": f"bad token {value}"}})
        code, out, err = cli("replay", f"{tmp_path / 'l' / 'samples_gsm8k_cot_llama.jsonl'}:1",
                             "--header", f"X-Gateway-Token: {value}")
        got = srv.chat_requests[-1]["headers"].get("X-Gateway-Token")
    assert got == value  # it was sent
    assert "bad token" in out + err  # the server's answer is shown
    assert value not in out and value not in err


def test_an_authorization_header_replaces_the_key(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 2, "--api_key", "sk-plain-key",
                             "--header", "Authorization: Bearer gw-issued-token")
        seen = {r["headers"].get("Authorization") for r in srv.requests}
    assert code == 0, err
    assert seen == {"Bearer gw-issued-token"}
    assert "gw-issued-token" not in out + err


def test_the_preflight_sends_the_headers(isolated_env):
    with FakeOpenAI() as srv:
        code, out, err = cli("--check", "--no_progress", "--base_url", srv.base_url, "--header", "X-Gw: pf-s3cr3t")
        requests = srv.requests
    assert json.loads(out)["results"]["api_conformance"]["checks"], err
    chat = [r for r in requests if r["path"] == "/v1/chat/completions"]
    assert len(chat) >= 3
    assert all(r["headers"].get("X-Gw") == "pf-s3cr3t" for r in requests)
    assert "pf-s3cr3t" not in out + err


def test_json_model_args_header_dict(isolated_env):
    with FakeOpenAI(responder=ByRow()) as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 2,
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
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 2, "--max_fail_rate", 1,
                             "--header", f"X-Gateway-Token: {value}", "--log_samples", tmp_path / "l")
    assert code == 0, err
    log = (tmp_path / "l" / "samples_gsm8k_cot_llama.jsonl").read_text("utf-8")
    assert "gateway refused token" in log
    assert value not in log and value not in out and value not in err


@pytest.mark.parametrize("header", ["novalue", ": value", "Bad Name: v"])
def test_a_malformed_header_is_one_usage_error(isolated_env, header):
    with FakeOpenAI() as srv:
        code, out, err = cli(*GSM, "--base_url", srv.base_url, "--max_samples", 1, "--header", header)
        requests = srv.requests
    assert code == 2, err
    assert len(error_lines(err)) == 1 and "Traceback" not in err
    assert "header" in error_lines(err)[0] and "'Name: value'" in error_lines(err)[0]
    assert out == "" and requests == []


# --- Python API ------------------------------------------------------------------------------


def test_python_api_tls_and_headers(isolated_env, https_fake, tmp_path, monkeypatch):
    for name in PROXY_VARS[3:] + ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    task = TASKS["gsm8k_cot_llama"]

    def run(**config):
        cfg = APIConfig(url=https_fake.base_url, model="fake-model", max_retries=1, retry_base_delay=0.01, **config)
        return asyncio.run(run_task(task, cfg, max_samples=2, progress=False))

    before = len(https_fake.chat_requests)
    verified = run(ca_cert=str(TLS_CERT), headers={"X-Api-Gw": "gw-s3cr3t"})
    assert verified["num_ok"] == 2
    sent = https_fake.chat_requests[before:]
    assert len(sent) == 2 and all(r["headers"].get("X-Api-Gw") == "gw-s3cr3t" for r in sent)

    unverified = run(verify_certificate=False, headers=["X-From-List: listed"])
    assert unverified["num_ok"] == 2
    assert https_fake.chat_requests[-1]["headers"].get("X-From-List") == "listed"

    count = len(https_fake.chat_requests)
    refused = run()  # the default verifies, and the test certificate is not trusted
    assert refused["num_ok"] == 0 and refused["failures"] == {"connection": 2}
    assert len(https_fake.chat_requests) == count

    with pytest.raises(UsageError):
        APIConfig(url=https_fake.base_url, headers=["no colon"])
    with pytest.raises(UsageError):
        APIConfig(url=https_fake.base_url, ca_cert=str(tmp_path / "missing.pem"))
    assert "gw-s3cr3t" not in repr(APIConfig(url=https_fake.base_url, headers={"X-Api-Gw": "gw-s3cr3t"}))


# --- an installed wheel runs gsm8k offline -----------------------------------------------------


def test_the_wheel_runs_gsm8k_offline_from_the_shipped_split(tmp_path):
    """Build the wheel, install it into a fresh venv, run it from elsewhere with no datasets-server
    and no data dir: gsm8k must come from the split the wheel carries (slow-ish: ~10 s)."""
    # build from a clean copy of what the build reads, so no build/ dir of the checkout is reused or left
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "nano_eval.py", *(p.name for p in ROOT.glob("LICENSE*"))):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "data" / "openai__gsm8k", source / "data" / "openai__gsm8k")
    shutil.copy2(ROOT / "data" / "README.md", source / "data" / "README.md")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", ".", "-w", str(wheels)],
                           cwd=source, capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        text = build.stdout + build.stderr
        if any(s in text for s in ("No matching distribution", "Could not find a version", "NewConnectionError",
                                   "Network is unreachable", "Temporary failure in name resolution",
                                   "ProxyError", "connection broken", "ConnectTimeoutError")):
            pytest.skip(f"cannot build the wheel without the package index: {text.strip().splitlines()[-1]}")
        pytest.fail(f"pip wheel failed:\n{text}")
    (wheel,) = wheels.glob("nano_eval-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nano_eval.py" in names
    shipped = sorted(n for n in names if n.startswith("nano_eval_data/openai__gsm8k/main/test/"))
    assert "nano_eval_data/openai__gsm8k/main/test/manifest.json" in shipped and len(shipped) == 15
    assert not [n for n in names if "chartqa" in n.lower() or n.startswith("tests/")]  # no GPL test data

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                              "--no-index", "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANO_EVAL_") and k not in PROXY_VARS
           and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "cache"),
               NANO_EVAL_DATASETS_SERVER=f"http://127.0.0.1:{free_port()}", NO_PROXY="127.0.0.1,localhost")
    where = subprocess.run([str(python), "-c", "import nano_eval; print(nano_eval.__file__); "
                            "print(nano_eval.BUNDLED_DATA)"], capture_output=True, text=True, cwd=home, env=env,
                           timeout=60)
    module_file, bundled = where.stdout.split()
    assert Path(module_file).is_relative_to(venv) and Path(bundled).is_relative_to(venv), where.stdout
    assert Path(bundled).name == "nano_eval_data"

    responder = ByRow()
    with FakeOpenAI(responder=responder) as srv:
        proc = subprocess.run([str(venv / "bin" / "nano-eval"), *GSM, "--base_url", srv.base_url, "--max_samples", "3"],
                              capture_output=True, text=True, cwd=home, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    result = document["results"]["gsm8k_cot_llama"]
    assert result["num_samples"] == 3 and result["num_ok"] == 3 and result["metrics"]["exact_match"] == 1.0
    assert sorted(responder.rows) == [0, 1, 2]  # the first 3 test rows, in dataset order
    shipped_manifest = json.loads((ROOT / "data" / "openai__gsm8k" / "main" / "test" / "manifest.json").read_text())
    revision = shipped_manifest["pages"]["0"].get("revision") or shipped_manifest.get("source")
    assert result["dataset"]["revision"] == revision
    assert not (home / "cache" / "nano-eval" / "openai__gsm8k" / "main" / "test" / "rows-00000.jsonl").exists()
