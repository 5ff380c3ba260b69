"""Stable outputs: what nano-eval prints and writes, byte for byte, for a fixed set of commands.

A safety net for reorganising nano_eval.py: every user-visible output of the commands below (stdout,
stderr and the exit code, the --output results JSON, the sample logs, the HTML reports) must stay
exactly as its golden copy in tests/fixtures/stable_outputs/ says. Only what genuinely varies from
run to run is normalised first, in one function, `normalise`: timings (elapsed, latencies, rates,
the table's seconds), dates, the fake servers' random ports, the temporary work folder, the random
part of nano-eval's temporary folder names and the Python patch version. The normalised TEXT is
compared, not re-parsed JSON: key order, indentation and float formatting count.

The scenarios (the golden files are named `<scenario>.<what>` or `<scenario>_<variant>.<what>`):
  gsm8k_faults  gsm8k_cot_llama, 12 rows of a fake server, 2 wrong and 9 with planted faults: HTTP
                500 until --max_retries 2 is spent, HTTP 400, a non-JSON body, a 200 carrying
                {"error"}, finish_reason length, empty content, a 500 then a timeout, the answer
                only in reasoning_content, a <think> block; --expect, --output, --log_samples
  logprobs_ab   two --base_url fakes with bf16-like logprobs (--logprobs 5; the second is "vLLM"
                by /version, wrong on row 3 and with a planted logit fault): the comparison and
                its numerics on stderr and in the JSON; --fail_if different (exit 6)
  chartqa       chartqa on 4 synthetic charts from a fake datasets-server, --repeats 2
  check         --check (the conformance preflight) against the fake, --output
  compare       `compare` and `compare --json` on real bf16 logs (tests/fixtures/numerics_bf16, rows
                0-9): vLLM c=1 vs c=8 (batch noise), the same with --noise_floor (a second c=1
                run), and vs llama.cpp with a q4_0 KV cache (a fault; --top 3 --fail_if different)
  report        `report` (HTML) of gsm8k_faults' log, of logprobs_ab's results JSON, of two bf16 logs
  replay        `replay --curl` of a bf16 log's line, and `replay` of it sent to a fake
  errors        one-line errors of bad input, each with its exit code
  help          --help of nano-eval, compare, report and replay (COLUMNS=100)

Each command is a process of its own running nano_eval.main() with real stdout and stderr files:
to be quick, a small fork server imports nano_eval once and forks a child per command
(STABLE_OUTPUTS_SUBPROCESS=1 runs `python nano_eval.py ...` instead: slower, the same bytes). The
fake servers run in the test process; the runs read the shipped gsm8k split in data/ beside
nano_eval.py, and the scenarios run in order (report, replay and errors read earlier files).

The goldens are of one Python minor version (python.txt; other versions are skipped: from 3.12
sum() of floats differs in the last digit, and argparse's help differs in 3.9 and 3.13).

Run the check (~5 s):

    python -m pytest tests/test_stable_outputs.py -q

against another copy of nano_eval.py, e.g. the committed one while the working copy is mid-edit
(the copy must sit in a checkout, whose data/ holds the shipped gsm8k split):

    git worktree add --detach /tmp/golden_wt HEAD
    STABLE_OUTPUTS_NANO_EVAL=/tmp/golden_wt/nano_eval.py python -m pytest tests/test_stable_outputs.py -q

Regenerate the goldens ONLY when an output is meant to change, and only from a clean checkout of
the commit whose outputs are the truth, so that uncommitted edits never leak into them:

    git worktree add --detach /tmp/golden_wt HEAD
    python tests/test_stable_outputs.py --regenerate /tmp/golden_wt/nano_eval.py
    git worktree remove /tmp/golden_wt

(`--regenerate` without a path uses the repository's nano_eval.py.) Then review `git diff
tests/fixtures/stable_outputs`: every changed line should be a change you meant.
"""

from __future__ import annotations

import difflib
import gzip
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

if __name__ == "__main__":  # run as a script (--regenerate): the imports pytest's conftest.py sets up
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import pytest  # noqa: E402

from fakes import (CHARTQA, FIXTURES, GSM8K_GOLD, ROOT, ByRow, FakeDatasetsServer, FakeOpenAI,  # noqa: E402
                   GridModel, Reply, answers_responder, cli_env, gsm8k_row_of, synthetic_chartqa_dataset)

GOLDEN = FIXTURES / "stable_outputs"
SCRIPT = Path(os.environ.get("STABLE_OUTPUTS_NANO_EVAL") or ROOT / "nano_eval.py").resolve()
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"  # the goldens' is in GOLDEN/python.txt
GSM = "gsm8k_cot_llama"
BF16 = 0.125
TIMEOUT = 1.5  # --timeout of the faults run: only its hanging row waits for it (once); every other
# request is answered by the fake in milliseconds, so even a busy machine stays well inside it


# --------------------------------------------------------------------------------------------
# What varies from run to run, and nothing else
# --------------------------------------------------------------------------------------------

NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
# Values that differ from one run of the same command to the next, wherever they appear
VARYING = [
    # the date of a run (results "date", shown in a report too) and a report page's footer
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"), "<date>"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"), "<date>"),
    # the interpreter that ran it (results "python", the report's settings table)
    (re.compile(r'"python": "\d+\.\d+\.\d+[^"]*"'), '"python": "<python>"'),
    (re.compile(r"<th>python</th><td>\d+\.\d+\.\d+[^<]*</td>"), "<th>python</th><td><python></td>"),
    # the random part of a temporary folder's name (`replay --curl` names its body file's)
    (re.compile(r"(nano-eval-[a-z]+-)[a-z0-9_]{8}\b"), r"\1<random>"),
]
# How long the requests of a run took (seconds and rates), where they are shown; only for outputs
# of runs made here: the latencies recorded in the fixture logs are fixed text
TIMINGS = [
    # the results JSON and the sample log: "elapsed": 4.606
    (re.compile(r'"(elapsed|total_seconds|latency|latency_p50|latency_p95|requests_per_second|'
                r'output_tokens_per_second)": ' + NUMBER), r'"\1": "<timing>"'),
    # the seconds column of the summary table on stderr (the last column of a metric row)
    (re.compile(r"(?m)^((?:gsm8k_cot_llama|chartqa)? +\S+ +\S+ +\S* +\d+ +\d+) +" + NUMBER + "$"),
     r"\1 <seconds>"),
    # a sample's latency in the report: <span class="muted">ok · ... · 8 tokens · 0.01 s</span>
    (re.compile(r"(?<= · )\d+\.\d\d s(?=</span>)"), "<latency> s"),
]


def normalise(text: str, names: dict[str, str], timings: bool = True) -> str:
    """`text` with only what genuinely varies between two runs of the same command replaced:
    `names` maps values this run picked to stable placeholders (the temporary work folder, each
    fake server's random port: "127.0.0.1:41234" and the log folder "0_127.0.0.1_41234"), then
    VARYING's dates, Python version and temporary names, and (timings=True) TIMINGS' seconds.
    Everything else is left byte for byte."""
    for value, placeholder in sorted(names.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(value, placeholder)
    for pattern, replacement in VARYING + (TIMINGS if timings else []):
        text = pattern.sub(replacement, text)
    return text


def by_row(jsonl: str) -> str:
    """A sample log's lines in (task, row, repeat) order: requests in flight finish in any order,
    and so are logged in any order. The lines themselves are kept as they are."""
    lines = jsonl.splitlines(keepends=True)
    try:
        key = [(r["task"], r["row_idx"], r["repeat"], i) for i, r in enumerate(map(json.loads, lines))]
    except (ValueError, KeyError, TypeError):  # not a sample log (any more): compared as it is
        return jsonl
    return "".join(lines[i] for *_, i in sorted(key))


# --------------------------------------------------------------------------------------------
# Running nano-eval: a fresh process per command
# --------------------------------------------------------------------------------------------

class Run(NamedTuple):
    code: int
    out: str
    err: str


# The fork server: imports nano_eval once, then for each request (a JSON line on stdin) forks a child
# that becomes `python nano_eval.py ARGS` (its own cwd, environment, stdout and stderr files, fresh
# random state) and leaves by sys.exit(main()), as the script does; replies "<pid>" then "<exit code>".
FORK_SERVER = r"""
import json, os, random, sys
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(script))
import nano_eval

class Child(Exception):
    pass

def serve():
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            raise Child(request)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)

request = None
try:
    serve()
except Child as child:
    request = child.args[0]
if request is None:  # stdin closed: the tests are done
    sys.exit(0)
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
sys.argv = [script, *request["argv"]]
random.seed()
sys.exit(nano_eval.main())
"""


class NanoEval:
    """Runs `python SCRIPT ARGS` in `cwd` with `env`, through the fork server (or, with
    subprocess_mode, as a plain child process each time)."""

    def __init__(self, script: Path, env: dict, workdir: Path, subprocess_mode: bool = False):
        self.script, self.env, self.workdir, self.subprocess_mode = script, env, workdir, subprocess_mode
        self.count = 0
        self.server = None
        self.replies = b""  # what the fork server said and _reply() has not returned yet
        if not subprocess_mode:
            self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(script)], cwd=str(workdir),
                                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def __call__(self, *args, cwd: Path | None = None, env: dict | None = None, timeout: float = 60) -> Run:
        cwd, env, args = cwd or self.workdir, env or self.env, [str(a) for a in args]
        if self.subprocess_mode:
            proc = subprocess.run([sys.executable, str(self.script), *args], cwd=str(cwd), env=env,
                                  capture_output=True, timeout=timeout)
            return Run(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))
        self.count += 1
        out, err = self.workdir / f".stdout{self.count}", self.workdir / f".stderr{self.count}"
        request = {"argv": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(request).encode() + b"\n")
        pid = int(self._reply(10))
        try:
            code = int(self._reply(timeout))
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._reply(10)  # its exit status
            raise TimeoutError(f"nano-eval {' '.join(args)} did not finish in {timeout} s") from None
        texts = [path.read_bytes().decode("utf-8", "replace") for path in (out, err)]
        out.unlink()
        err.unlink()
        return Run(code, *texts)

    def _reply(self, timeout: float) -> str:
        """The fork server's next line (read unbuffered: both of a quick command's lines may already
        have arrived)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.server.stdout], [], [], remaining)[0]:
                raise TimeoutError("the fork server did not answer in time")
            chunk = os.read(self.server.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the fork server exited ({self.server.wait()}): could {self.script} be "
                                   "imported? (its error is on stderr)")
            self.replies += chunk
        line, _, self.replies = self.replies.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


# --------------------------------------------------------------------------------------------
# The scenarios: each runs commands and returns {golden file name: its normalised text}
# --------------------------------------------------------------------------------------------

class FakeServer(FakeOpenAI):
    """FakeOpenAI with a stopped clock: every completion's "created" is 2026-01-01 (the fake's
    own clock is no output of nano-eval's, but --check and replay show the server's answer), and
    a Server header that does not name this Python's version."""

    def __init__(self, *args, server_header="fake-server/1.0", **kwargs):
        super().__init__(*args, server_header=server_header, **kwargs)

    def _reply_response(self, reply, body, n):
        response = super()._reply_response(reply, body, n)
        response.body = re.sub(rb'"created":\d+', b'"created":1767225600', response.body)
        return response


class Session:
    """What the scenarios share: the runner, the work folder (every command's cwd; paths are
    given relative to it) and the placeholders of what this session picked.

    An output is normalised as `made_here` (the default): the output of a run against the fakes,
    whose ports and timings vary; or not: an output of the fixed logs of numerics_bf16 alone,
    whose recorded ports and latencies are fixed text and stay (only the work folder, dates and
    the like are replaced there)."""

    def __init__(self, nano_eval: NanoEval, workdir: Path):
        self.run, self.workdir = nano_eval, workdir
        self.folders = {str(workdir): "<workdir>", str(nano_eval.script.parent): "<nano_eval_dir>"}
        self.ports: dict[str, str] = {}

    def server(self, server, name: str):
        """Name a fake server's port in every output ("127.0.0.1:<port-a>")."""
        for sep in (":", "_"):
            self.ports[f"127.0.0.1{sep}{server.port}"] = f"127.0.0.1{sep}<port-{name}>"
        return server

    def outputs(self, prefix: str, run: Run, stdout_ext: str = "txt", made_here: bool = True) -> dict[str, str]:
        """A command's stdout, and its exit code and stderr in one file."""
        return {f"{prefix}.stdout.{stdout_ext}": self.norm(run.out, made_here),
                f"{prefix}.stderr.txt": self.norm(f"# exit code {run.code}\n{run.err}", made_here)}

    def file(self, relative: str, made_here: bool = True) -> str:
        """A file a command wrote (if it wrote none, a line saying so: the diff then shows it, beside
        the command's stderr)."""
        path = self.workdir / relative
        if not path.is_file():
            return f"<no such file: {relative}>\n"
        return self.norm(path.read_bytes().decode("utf-8"), made_here)

    def norm(self, text: str, made_here: bool = True) -> str:
        return normalise(text, {**self.folders, **(self.ports if made_here else {})}, timings=made_here)


def gsm8k_faults(s: Session) -> dict[str, str]:
    """12 gsm8k rows; rows 1 and 9 wrong, the others right unless a fault is planted."""
    retry_now = {"Retry-After": "0"}  # retried at once: no backoff wait
    plan = {
        2: [Reply(status=500, headers=retry_now)] * 2,  # exhausts --max_retries 2
        3: Reply(raw=b"<html><body>502 Bad Gateway</body></html>"),  # not JSON
        4: Reply(status=400),  # not retried
        5: Reply(content="Let me think. The final answer", finish_reason="length"),  # truncated
        6: Reply(json_body={"error": {"message": "model overloaded", "type": "server_error"}}),  # a 200 with an error
        7: [Reply(status=500, headers=retry_now), Reply(hang=True)],  # a 500, then a timeout
        8: Reply(content=None),  # empty
        10: Reply(content="", reasoning_content=f"Let me think. The final answer is {GSM8K_GOLD[10]}"),
        11: Reply(content=f"<think>The final answer is 1</think>Let me think. The final answer is {GSM8K_GOLD[11]}"),
    }
    with s.server(FakeServer(responder=ByRow(plan, wrong={1, 9})), "a") as srv:
        run = s.run("--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 12, "--num_concurrent", 4,
                    "--max_retries", 2, "--timeout", TIMEOUT, "--expect", f"{GSM}=0.9", "--no_progress",
                    "--log_samples", "faults_log", "--output", "faults.json")
    return {**s.outputs("gsm8k_faults", run, "json"),
            "gsm8k_faults.output.json": s.file("faults.json"),
            "gsm8k_faults.samples.jsonl": by_row(s.file(f"faults_log/samples_{GSM}.jsonl"))}


def answers_wrong_on(model: GridModel, rows: set[int]):
    """`model`, but answering 0 on `rows`: the answer's token (with its top logprobs) says 0."""
    def respond(body, n):
        reply = model(body, n)
        row = gsm8k_row_of(body)
        if row in rows:
            right = f" {GSM8K_GOLD[row]}"
            reply.content = reply.content[:-len(right)] + " 0"
            for entry in [reply.logprobs["content"][-2], *reply.logprobs["content"][-2]["top_logprobs"]]:
                if entry["token"] == right:
                    entry.update(token=" 0", bytes=list(b" 0"))
        return reply
    return respond


def logprobs_ab(s: Session) -> dict[str, str]:
    """8 rows against two bf16-like servers: B answers row 3 wrong and its logits carry a fault."""
    a = FakeServer(responder=GridModel(step=BF16, moved=0.05, seed=1))
    b = FakeServer(responder=answers_wrong_on(GridModel(step=BF16, moved=0.05, seed=2, fault=0.15), {3}),
                   models=["fake-model-b"], extra_routes={"/version": (200, {"version": "0.9.1"})})
    with s.server(a, "a"), s.server(b, "b"):
        run = s.run("--tasks", GSM, "--base_url", a.base_url, "--base_url", b.base_url, "--max_samples", 8,
                    "--logprobs", 5, "--fail_if", "different", "--no_progress", "--log_samples", "ab_logs",
                    "--output", "ab.json")
    logs = [f"ab_logs/{i}_127.0.0.1_{server.port}/samples_{GSM}.jsonl" for i, server in enumerate((a, b))]
    return {**s.outputs("logprobs_ab", run, "json"),
            "logprobs_ab.output.json": s.file("ab.json"),
            **{f"logprobs_ab.samples_{i}.jsonl": by_row(s.file(log)) for i, log in enumerate(logs)}}


def chartqa(s: Session) -> dict[str, str]:
    """4 synthetic charts, each sent twice (--repeats 2); row 2 answered wrong."""
    charts = synthetic_chartqa_dataset(4, width=48, height=32)
    answers = {charts.rows[i]["query"]: charts.rows[i]["label"][0] for i in (0, 1, 3)}
    with s.server(FakeDatasetsServer({CHARTQA: charts}), "hf") as hf, \
            s.server(FakeServer(responder=answers_responder(answers)), "a") as srv:
        env = {**s.run.env, "NANO_EVAL_DATASETS_SERVER": hf.url}
        run = s.run("--tasks", "chartqa", "--base_url", srv.base_url, "--max_samples", 4, "--repeats", 2,
                    "--no_progress", "--log_samples", "chartqa_log", "--output", "chartqa.json", env=env)
    return {**s.outputs("chartqa", run, "json"),
            "chartqa.output.json": s.file("chartqa.json"),
            "chartqa.samples.jsonl": by_row(s.file("chartqa_log/samples_chartqa.jsonl"))}


def check(s: Session) -> dict[str, str]:
    with s.server(FakeServer(), "a") as srv:
        run = s.run("--check", "--base_url", srv.base_url, "--output", "check.json")
    return {**s.outputs("check", run, "json"), "check.output.json": s.file("check.json")}


BF16_LOGS = FIXTURES / "numerics_bf16"
BF16_RUNS = ["vllm_bf16_c1", "vllm_bf16_c8", "vllm_bf16_c1_again", "llama_bf16_kv_q4_0"]


def compare(s: Session) -> dict[str, str]:
    """The real bf16 logs (rows 0-9 of each run), as files of the work folder."""
    for name in BF16_RUNS:
        (s.workdir / f"{name}.jsonl").write_bytes(gzip.decompress((BF16_LOGS / f"{name}.jsonl.gz").read_bytes()))
    a, noise, again, fault = (f"{name}.jsonl" for name in BF16_RUNS)
    commands = {
        "noise": [a, noise],
        "noise_floor": [a, noise, "--noise_floor", again],
        "fault": [a, fault, "--top", 3, "--fail_if", "different"],
    }
    out = {}
    for name, args in commands.items():
        out.update(s.outputs(f"compare_{name}", s.run("compare", *args), made_here=False))
        out.update(s.outputs(f"compare_{name}_json", s.run("compare", "--json", *args), "json", made_here=False))
    return out


def report(s: Session) -> dict[str, str]:
    """Needs gsm8k_faults, logprobs_ab and compare's files."""
    commands = {  # name: (arguments, made_here)
        "run": (["faults_log", "-o", "report_run.html"], True),
        "ab": (["ab.json", "-o", "report_ab.html"], True),
        "bf16": (["vllm_bf16_c1.jsonl", "llama_bf16_kv_q4_0.jsonl", "-o", "report_bf16.html"], False),
    }
    out = {}
    for name, (args, made_here) in commands.items():
        out.update(s.outputs(f"report_{name}", s.run("report", *args), made_here=made_here))
        out[f"report_{name}.html"] = s.file(args[-1], made_here)
    return out


def replay(s: Session) -> dict[str, str]:
    """Needs compare's files."""
    out = s.outputs("replay_curl", s.run("replay", "vllm_bf16_c1.jsonl:3", "--curl"), made_here=False)
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1767225600, "model": "smollm2-135m-instruct",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "The final answer is 70000"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1170, "completion_tokens": 6, "total_tokens": 1176}}
    server = FakeServer(responder=lambda body, n: Reply(json_body=answer), models=["smollm2-135m-instruct"])
    with s.server(server, "a") as srv:
        out.update(s.outputs("replay_sent", s.run("replay", "vllm_bf16_c1.jsonl:3", "--base_url", srv.base_url)))
    return out


def errors(s: Session) -> dict[str, str]:
    """Bad input: one line on stderr and an exit code each, all in one file (and a compare of two
    runs that do not match: the faults run and a bf16 log)."""
    commands = [
        ["--tasks", "nope", "--base_url", "http://127.0.0.1:9/v1"],
        ["--tasks", GSM, "--base_url", "ftp://127.0.0.1/v1"],
        ["--tasks", GSM, "--logprobs", 30, "--base_url", "http://127.0.0.1:9/v1"],
        ["--tasks", GSM, "--base_url", "http://127.0.0.1:9/v1", "--no_progress"],
        ["--tasks", GSM, "--noise_floor", "--base_url", "http://127.0.0.1:9/v1"],
        ["compare", "missing.jsonl", "vllm_bf16_c1.jsonl"],
        ["compare", "vllm_bf16_c1.jsonl", "faults_log"],
        ["replay", "vllm_bf16_c1.jsonl:99"],
        ["report", "nothing_here"],
    ]
    text = []
    for args in commands:
        run = s.run(*args)
        text.append(f"$ nano-eval {' '.join(map(str, args))}\n# exit code {run.code}\n# stdout\n{run.out}"
                    f"# stderr\n{run.err}\n")
    return {"errors.txt": s.norm("".join(text), made_here=False)}


def help_texts(s: Session) -> dict[str, str]:
    out = {}
    for name, args in {"main": [], "compare": ["compare"], "report": ["report"], "replay": ["replay"]}.items():
        out.update(s.outputs(f"help_{name}", s.run(*args, "--help")))
    return out


SCENARIOS: dict[str, Callable[[Session], dict[str, str]]] = {
    "gsm8k_faults": gsm8k_faults, "logprobs_ab": logprobs_ab, "chartqa": chartqa, "check": check,
    "compare": compare, "report": report, "replay": replay, "errors": errors, "help": help_texts,
}


def produce(script: Path, workdir: Path, subprocess_mode: bool = False, keep_going: bool = False) -> dict:
    """Every scenario's outputs, in order (later ones read earlier ones' files): {scenario: {file:
    text}}; keep_going: a scenario that raises gets its exception instead, and the others still run."""
    (workdir / "tmp").mkdir()  # nano-eval's temporary folders (replay --curl leaves its body file)
    env = cli_env(workdir, COLUMNS="100", LINES="40", PYTHONIOENCODING="utf-8", TZ="UTC", TMPDIR=str(workdir / "tmp"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    runner = NanoEval(script, env, workdir, subprocess_mode)
    produced: dict = {}
    try:
        session = Session(runner, workdir)
        for name, scenario in SCENARIOS.items():
            try:
                produced[name] = scenario(session)
            except Exception as exc:
                if not keep_going:
                    raise
                produced[name] = exc
    finally:
        runner.close()
    return produced


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------

def clip(line: str, column: int = 0, width: int = 150) -> str:
    """One line for a diff: a long one as the `width` characters around `column`, with where they are."""
    line = line.rstrip("\n") + ("" if line.endswith("\n") else "  [no newline at end]")
    if len(line) <= width:
        return line
    lo = max(0, min(column - width // 3, len(line) - width))
    before, after = "..." * (lo > 0), "..." * (lo + width < len(line))
    return f"{before}{line[lo:lo + width]}{after}  [columns {lo + 1}-{lo + width} of {len(line)}]"


def first_difference(x: str, y: str) -> int:
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


def difference(name: str, golden: str | None, actual: str | None, max_lines: int = 40) -> str:
    """How `actual` differs from `golden`, readably: a unified diff of at most `max_lines` lines
    in which a changed line is shown beside its new version, a long one clipped around its first
    differing character (sample-log lines are ~7,000 characters)."""
    if golden is None:
        return f"--- {name}: produced now, but there is no golden file (regenerate?)"
    if actual is None:
        return f"--- {name}: a golden file, but nothing produced it now"
    a, b = golden.splitlines(keepends=True), actual.splitlines(keepends=True)
    lines = [f"--- golden/{name}", f"+++ now/{name}"]
    for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(1):
        (_, i1, _, j1, _), (_, _, i2, _, j2) = group[0], group[-1]
        lines.append(f"@@ -{i1 + 1},{i2 - i1} +{j1 + 1},{j2 - j1} @@")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                lines += [" " + clip(x) for x in a[i1:i2]]
                continue
            old, new = a[i1:i2], b[j1:j2]
            for k in range(max(len(old), len(new))):
                x, y = (old[k] if k < len(old) else None), (new[k] if k < len(new) else None)
                column = first_difference(x, y) if x is not None and y is not None else 0
                lines += [sign + clip(z, column) for sign, z in (("-", x), ("+", y)) if z is not None]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more diff lines)"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    x, y = (a[first] if first < len(a) else ""), (b[first] if first < len(b) else "")
    column = first_difference(x, y)
    lines.append(f"first difference: line {first + 1}, column {column + 1}: golden {x[column:column + 40]!r}, "
                 f"now {y[column:column + 40]!r}")
    return "\n".join(lines) + "\n"


def owner(name: str) -> str | None:
    """The scenario whose output the golden file `name` is: its name up to the first dot is the
    scenario's, or starts with it and "_" (compare_noise.stdout.txt is compare's)."""
    stem = name.split(".")[0]
    return next((s for s in SCENARIOS if stem == s or stem.startswith(s + "_")), None)


def golden_files(scenario: str) -> dict[str, str]:
    return {p.name: p.read_bytes().decode("utf-8") for p in GOLDEN.iterdir() if owner(p.name) == scenario}


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict:
    subprocess_mode = os.environ.get("STABLE_OUTPUTS_SUBPROCESS") == "1"
    return produce(SCRIPT, tmp_path_factory.mktemp("stable_outputs").resolve(), subprocess_mode, keep_going=True)


GOLDEN_PYTHON = (GOLDEN / "python.txt").read_text().strip() if (GOLDEN / "python.txt").exists() else None


@pytest.mark.skipif(GOLDEN_PYTHON not in (None, PYTHON), reason=(
    f"the goldens are of Python {GOLDEN_PYTHON}, this is {PYTHON}: float sums differ in the last digit "
    "from 3.12 (sum() compensates), argparse's help layout in 3.10 and 3.13"))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_output_is_byte_identical_to_the_golden_copy(scenario, produced):
    actual = produced[scenario]
    if isinstance(actual, Exception):
        pytest.fail(f"{scenario} could not run with {SCRIPT}:\n"
                    + "".join(traceback.format_exception(type(actual), actual, actual.__traceback__)), pytrace=False)
    golden = golden_files(scenario)
    assert golden, f"no golden files for {scenario}: python tests/test_stable_outputs.py --regenerate"
    differing = [name for name in sorted(set(golden) | set(actual)) if golden.get(name) != actual.get(name)]
    differing.sort(key=lambda name: not name.endswith(".stderr.txt"))  # what the command said first
    problems = [difference(name, golden.get(name), actual.get(name)) for name in differing]
    if problems:
        pytest.fail(f"{scenario}: {len(problems)} output(s) of {SCRIPT} differ from tests/fixtures/stable_outputs "
                    f"(a deliberate change? see this module's docstring)\n\n" + "\n".join(problems[:4])
                    + (f"\n... and {len(problems) - 4} more" if len(problems) > 4 else ""), pytrace=False)


def test_every_golden_file_belongs_to_a_scenario():
    stray = [p.name for p in GOLDEN.iterdir() if owner(p.name) is None and p.name != "python.txt"]
    assert not stray, f"golden files no scenario produces: {sorted(stray)}"


def regenerate(script: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="stable_outputs-") as tmp:
        outputs = produce(script.resolve(), Path(tmp).resolve())
    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    GOLDEN.mkdir(parents=True)
    (GOLDEN / "python.txt").write_text(PYTHON + "\n")
    for files in outputs.values():
        for name, text in files.items():
            (GOLDEN / name).write_bytes(text.encode("utf-8"))
    total = sum(p.stat().st_size for p in GOLDEN.iterdir())
    print(f"wrote {len(list(GOLDEN.iterdir()))} files ({total:,} bytes) to {GOLDEN} from {script}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] != "--regenerate":
        sys.exit(f"usage: python {sys.argv[0]} --regenerate [PATH/TO/nano_eval.py]")
    regenerate(Path(sys.argv[2]) if len(sys.argv) == 3 else ROOT / "nano_eval.py")
