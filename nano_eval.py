#!/usr/bin/env python3
"""nano-eval: check that an OpenAI-compatible chat server is correctly implemented.

Runs lm-evaluation-harness's `gsm8k_cot_llama` and `chartqa` exactly as lm-eval's
`local-chat-completions` model does (same request bodies, same scoring, same metric
names) against any `/v1/chat/completions` endpoint, with the standard library only.

The map, in the order data flows. The core (sections 1-9) is one run from the command
line to the printed JSON; it calls the optional tools only when asked to (--check,
several --base_url, --report, --logprobs in a comparison). Start at main() at the end
of the core, then read it from the top. Inside every section, and every class, helpers
come before their callers; a section's entry point is last.
   1. Config          constants, errors and exit codes, Status (how a sample ends), one
                      table of options and their value checks, APIConfig (where and how
                      requests go), RunOptions (how a run goes)
   2. HTTP            every JSON document from outside read once; a keep-alive connection
                      per worker thread (TLS, proxies, a deadline per attempt); responses
                      classified (logprobs included); retries and an adaptive limiter
   3. Finding the     the local port probe, the model /v1/models lists, which backend
      server          answers
   4. Datasets        the datasets-server `/rows` client and a verified cache in data/
                      (rows, images, sha256 manifest)
   5. Tasks           gsm8k_cot_llama and chartqa: prompts, request bodies, lm-eval's
                      filters and metrics (score_gsm8k, score_chartqa), the TASKS table
   6. The sample log  one JSON line per sample, written as it ends; every record checked
                      once and read one way (results, resume, compare, report)
   7. Runner          run_task(): asyncio drives a ThreadPoolExecutor of blocking workers
                      that build, send, score and log each sample
   8. Results         aggregation, warnings, the summary table, expectation() against
                      reference_score(), the results JSON and the exit code
   9. CLI             arguments -> APIConfig + RunOptions -> evaluate() (one server, or
                      several compared with the first) -> the results written; main()
The optional tools, each a section ending in its entry point:
  10. Preflight       conformance checks (--check)
  11. Compare         paired comparison of two runs, accuracy and numerics (logprob
                      parity, judged at each side's precision read from its own log, and
                      at a measured noise floor): compare_paths(), gate_failures(),
                      `nano-eval compare`
  12. Replay          resend one logged request: `nano-eval replay`
  13. HTML report     one page of a run or a comparison: `nano-eval report`
And last:
  14. Speed           the tricks that keep nano-eval from limiting a run, each with the test
                      of its invariant and its gain measured in bench/

The public API is __all__; every other name is private (a leading underscore).
    import asyncio
    from nano_eval import APIConfig, run_task, TASKS
    result = asyncio.run(run_task(TASKS["gsm8k_cot_llama"],
                                  APIConfig(url="http://localhost:8000/v1", num_concurrent=8),
                                  max_samples=100))
    # the whole run of the command line, its results document and exit code:
    document, exit_code = evaluate([APIConfig(url=...), APIConfig(url=...)],
                                   RunOptions(tasks=[TASKS["gsm8k_cot_llama"]], max_samples=100))
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import codecs
import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import html
import http.client
import itertools
import json
import marshal
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import string
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple

__version__ = "0.2.0"
__all__ = [
    "APIConfig", "RunOptions", "TASKS", "Task", "Status", "run_task", "evaluate", "main",
    "score_gsm8k", "score_chartqa", "expectation", "reference_score", "compare_paths",
    "gate_failures", "NanoEvalError", "UsageError", "ServerError", "AuthError", "DatasetError",
    "__version__",
]


# ============================================================================
# 1. Config
# ============================================================================

# Defaults: each is also a flag or one of lm-eval's model_args
_DEFAULT_SEED = 1234  # lm-eval's `seed` model_arg default, sent in every request body
_DEFAULT_TIMEOUT = 600.0  # seconds per attempt; long chain-of-thought must not time out
_DEFAULT_MAX_RETRIES = 5  # total attempts per request
_DEFAULT_CONCURRENCY = 8
# a larger response body is a failed sample (`too_large`), read no further
_DEFAULT_MAX_RESPONSE_MB = 16
_DEFAULT_MAX_FAIL_RATE = 0.05  # more failed samples than this exits 1
# absolute: what prompt, extraction and image-encoding differences between harnesses move
_DEFAULT_TOLERANCE = 0.02
# lm-eval's think_end_token: only the text after its last occurrence is scored
_THINK_END = "</think>"
_MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit for top_logprobs (--logprobs K)
# The numerics verdict of a comparison (--logprobs), from noise floors and planted bugs measured
# on real servers (tests/real_server/README.md, "Issue 22: the planted-bug zoo"):
# nats: p99 |delta logprob| over shared tokens that correct backends stay under
_DEFAULT_LOGPROB_TOLERANCE = 0.05
# nats: a parting token that leads the other side's choice by this much is no near-tie
_CONFIDENT_GAP = 0.3
# share of the samples (at least 1) that may part confidently before it is a bug
_CONFIDENT_PARTINGS = 0.1
_POSITIVE_LOGPROB = 1e-4  # nats: a logprob above this is impossible, not a rounding of 0
# of the paired samples, the share that must carry logprobs on both sides for `equivalent`
_LOGPROB_COVERAGE = 0.9
# In bf16 or fp16 the logits lie on a grid whose step doubles with each power of two of the logit
# (bf16: 0.125 for logits in [16, 32)); a change of batch moves a logit by one step on >1% of the
# tokens (reference/bf16-numerics.md: p99 0.104-0.117 on every vLLM bf16 noise pair). The verdict
# widens with the coarser side's step and with a measured noise floor:
# x the step (or the floor's p99): the p99 |delta logprob| that is still noise
_GRID_TOLERANCE = 1.5
_GRID_GAP = 3.0  # x the step (or the floor's p99): the lead that makes a parting confident
# a grid this coarse or coarser is bf16-like (fp16 reaches it only for logits >= 64)
_BF16_STEP = 2.0 ** -4

# Waits and limits
_MAX_RETRY_AFTER = 300.0  # seconds: a longer Retry-After is waited for this long only
_LONG_WAIT = 5.0  # seconds: a retry wait at least this long is announced on stderr
_LOADING_WAIT = 120.0  # seconds to wait for a server that answers 503 while it loads its model
_FLUSH_EVERY = 0.2  # seconds: how often finished records are appended to the sample log
_DOWNLOADS = 8  # dataset pages fetched at once; images too, over all pages
# a larger datasets-server answer (a page of rows, an image) is refused unread
_DATASETS_MAX_MB = 64

# What a response is
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_THROTTLE_STATUS = {429, 503}  # these also halve the requests in flight
_INVALID = "[invalid]"  # lm-eval's regex filter when nothing matches
_NOT_SENT = "not sent: the server had stopped answering"


class Status:
    """Every sample ends in exactly one status, logged and counted in `failures` (the README's
    table). Only OK and TRUNCATED carry a response that is scored; every other counts as wrong."""

    OK = "ok"  # a response
    TRUNCATED = "truncated"  # finish_reason "length": scored as it is, with a warning
    EMPTY = "empty"  # content null or blank
    BAD_RESPONSE = "bad_response"  # an answer nano-eval cannot read
    TIMEOUT = "timeout"  # no whole answer within --timeout
    CONNECTION = "connection"  # refused, reset, dropped, or cut short
    TOO_LARGE = "too_large"  # a body over --max_response_mb (not retried)
    MISSING_IMAGE = "missing_image"  # (chartqa) no whole image for the row: nothing is sent
    SCORED = (OK, TRUNCATED)
    NETWORK = (TIMEOUT, CONNECTION)  # no HTTP answer after every retry

    @staticmethod
    def http(code: int) -> str:
        """Any other HTTP status, e.g. http_500."""
        return f"http_{code}"

# Where things are
_DATASETS_SERVER = "https://datasets-server.huggingface.co"
_PAGE_SIZE = 100  # the datasets-server maximum for /rows
# data/ beside this file in a checkout or a copy; nano_eval_data/ beside it when pip-installed
_BUNDLED_DATA = Path(__file__).resolve().parent / "nano_eval_data"
if not _BUNDLED_DATA.is_dir():
    _BUNDLED_DATA = _BUNDLED_DATA.with_name("data")
_KNOWN_PORTS = ((8000, "vLLM/MAX"), (8080, "llama.cpp"), (30000, "SGLang"), (11434, "Ollama"),
                (1234, "LM Studio"))

# The command line (its options: _OPTIONS, after the value checks)
# lm-eval model_args that have no meaning here (no tokenizer, no batching); accepted and ignored
_IGNORED_MODEL_ARGS = {"tokenizer_backend", "tokenized_requests", "tokenizer", "batch_size",
                       "max_length", "trust_remote_code"}
_CONFORMANCE = "api_conformance"  # the preflight, also runnable as a task
_FAIL_IF = ("worse", "different")

# Messages given in more than one place
_TLS_WAYS_OUT = ("pass --ca_cert FILE (or set SSL_CERT_FILE) to trust the CA that signed it, "
                 "or --insecure to skip verification")
_PROXY_AUTH = ("the HTTP proxy wants credentials (HTTP 407 Proxy Authentication Required): "
               "put them in the proxy URL (HTTP_PROXY=http://user:password@host:port), "
               "or list the server in NO_PROXY")

# Exit codes
_EXIT_OK = 0
_EXIT_FAILURES = 1  # finished, but more than --max_fail_rate of the samples failed
_EXIT_USAGE = 2  # bad command line or input
_EXIT_SERVER = 3  # the inference server could not be reached or used
_EXIT_AUTH = 4  # the server refused the API key
_EXIT_DATASET = 5  # the dataset could not be fetched
# everything ran, but a quality gate failed: a score below --expect, or compare's --fail_if
_EXIT_GATE = 6
_EXIT_INTERRUPTED = 130


class NanoEvalError(Exception):
    """An error reported to the user as one line, with an exit code."""

    exit_code = 1


class UsageError(NanoEvalError):
    exit_code = _EXIT_USAGE


class ServerError(NanoEvalError):
    exit_code = _EXIT_SERVER


class AuthError(NanoEvalError):
    exit_code = _EXIT_AUTH


class DatasetError(NanoEvalError):
    exit_code = _EXIT_DATASET


_SHORT_SECRET = 8  # characters: a shorter secret is replaced only where it stands as a credential


def _redact(text: str, secrets: Iterable[str | None], json_text: bool = False) -> str:
    """`text` with each secret replaced by ***: anywhere when it is _SHORT_SECRET characters or
    longer; a shorter one only as a whole value after "Bearer ", ": " or "=" (replaced
    everywhere, a 1-character key would mangle every word and so reveal itself). In JSON text
    (`json_text`), a ": " right after a quote is the document's own and a short key there could
    be a number (a seed of 1234): it is left alone."""
    colon = r'(?<=[^"]: )' if json_text else r"(?<=: )"
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        if len(secret) >= _SHORT_SECRET:
            text = text.replace(secret, "***")
        elif secret in text:
            text = re.sub(rf"(?<=Bearer ){re.escape(secret)}(?![\w-])"
                          rf"|{colon}{re.escape(secret)}(?![\w-])"
                          rf"|(?<==){re.escape(secret)}(?![\w-])", "***", text)
    return text


class _Secrets:
    """The secrets of this process, scrubbed from every text nano-eval prints or writes: each
    message, and each sample log line, results JSON and report page whole, just before it is
    written, so that a secret a server echoes anywhere (a model id, a finish_reason, a token)
    never reaches a file. Registered where they enter: an APIConfig's key and header values when
    it is made (so no way of using one can print them), HF_TOKEN and the environment's key by
    the commands that read them. Each is also scrubbed as JSON and HTML write it."""

    def __init__(self) -> None:
        self.values: set[str] = set()

    def add(self, *values: str | None) -> None:
        for value in filter(None, values):
            self.values.update({value, json.dumps(value)[1:-1],
                                json.dumps(value, ensure_ascii=False)[1:-1], html.escape(value)})

    def scrub(self, text: str) -> str:
        return _redact(text, self.values) if text and self.values else text

    def scrub_json(self, text: str) -> str:
        return _redact(text, self.values, json_text=True) if text and self.values else text


_SECRETS = _Secrets()


# What a terminal would obey rather than show: control characters (clear screen, colours, BEL)
# and the bidirectional controls that reverse the rest of a line (U+202E, ...)
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """Text from a server or a file, safe to print: each control shown as its escape (\\x1b)."""
    return _TERMINAL_CONTROLS.sub(lambda m: ascii(m.group())[1:-1], text)


def _info(message: str) -> None:
    print(_printable(_SECRETS.scrub(f"nano-eval: {message}")), file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    _info(f"warning: {message}")


def _parse_value(text: str) -> Any:
    """lm-eval's `handle_arg_string`, so that the same --gen_kwargs give the same body:
    true/false, digits only -> int, else float if it parses ("-1" -> -1.0), else the text."""
    if text.lower() == "true":
        return True
    if text.lower() == "false":
        return False
    try:
        return int(text) if text.isnumeric() else float(text)
    except ValueError:  # (lm-eval fails on numerics int() cannot read, like "½")
        return text


def _parse_kv(text: str | None, flag: str) -> dict:
    """Parses lm-eval's `k=v,k=v` syntax (`--model_args`, `--gen_kwargs`). Unlike lm-eval,
    spaces around keys and values are dropped (`a=1, b=2` gives the key "b", not " b")."""
    result: dict = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{flag}: {item.strip()!r} is not key=value (expected k=v,k=v)")
        result[key] = _parse_value(value.strip())
        if isinstance(result[key], float) and not math.isfinite(result[key]):
            raise UsageError(f"{flag}: {key}={value.strip()} is not a finite number "
                             "(JSON has no NaN or infinity)")
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_digits(text: str) -> bool:
    """0-9 only: str.isdigit() also takes digits that int() refuses (superscript two)."""
    return text.isascii() and text.isdigit()


def _is_finite(value: Any) -> bool:
    """A number that is neither NaN nor infinite, nor an integer too large for a float."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


# The value checks. Each takes a parsed value (a model_arg, an APIConfig field) and refuses
# text; argparse reaches the same checks through _from_text(), so every way in is checked alike.
# Their messages say what is expected; the caller adds what it got, as the user wrote it.
def _positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return value


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise argparse.ArgumentTypeError("expected an integer")
    return value


def _positive_float(value: Any) -> float:
    if not _is_number(value) or not 0 < value <= 1e9:
        raise argparse.ArgumentTypeError("expected a positive number up to 1e9")
    return value


def _fraction(value: Any) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("expected a number from 0 to 1")
    return value


def _top_logprobs(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_TOP_LOGPROBS:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {_MAX_TOP_LOGPROBS}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError("expected true or false")
    return value


def _from_text(kind: Callable[[Any], Any],
               parse: Callable[[str], Any] = _parse_value) -> Callable[[str], Any]:
    """An argparse type: the flag's text parsed (by default as lm-eval parses model_args), then
    checked by `kind`; text that does not parse is refused by `kind` with its own message."""
    def convert(text: str) -> Any:
        try:
            try:
                return kind(parse(text))
            except ValueError:
                return kind(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None
    return convert


def _checked(name: str, kind: Callable[[Any], Any], value: Any) -> Any:
    """`kind(value)`, or a UsageError naming `name`."""
    try:
        return kind(value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{name}: {exc}, got {value!r}") from None


def _check_secret(value: str | None, name: str) -> str | None:
    """A token goes into an HTTP header: refuse what cannot (a stray newline from a key file)."""
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isprintable():
        raise UsageError(f"{name} contains characters that cannot go into an HTTP header")
    return value or None


# framing: ours
_OWN_HEADERS = {"content-length", "transfer-encoding", "host", "connection", "content-type"}


def _parse_headers(headers: dict | Iterable[str]) -> dict:
    """Extra request headers, from a dict or from `Name: value` strings, checked like a key."""
    if not isinstance(headers, dict):
        malformed = [h for h in headers if ":" not in h]
        if malformed:
            raise UsageError(f"header {malformed[0]!r} is not 'Name: value'")
    items = (headers.items() if isinstance(headers, dict)
             else (h.partition(":")[::2] for h in headers))
    result = {}
    for name, value in items:
        name = str(name).strip()
        if not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise UsageError(f"header {name!r} is not a valid header name (expected 'Name: value')")
        if name.lower() in _OWN_HEADERS:
            raise UsageError(f"header {name} is set by nano-eval for each request "
                             "and cannot be given")
        result[name] = _check_secret(str(value), f"the value of header {name}") or ""
    return result


def _normalize_base_url(url: str) -> tuple[str, str]:
    """Returns (api_root, chat_url): `http://h:p/v1` and `http://h:p/v1/chat/completions`."""
    parsed = urllib.parse.urlsplit(url.strip()) if isinstance(url, str) else None
    if not parsed or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"invalid base URL {url!r}: expected http(s)://host:port/v1")
    try:
        parsed.port
    except ValueError:
        raise UsageError(f"invalid base URL {url!r}: bad port") from None
    if parsed.username is not None:  # not echoed: it holds a password
        raise UsageError("invalid base URL: no user:password@ in it (use --api_key)")
    if not url.isascii():
        raise UsageError(f"invalid base URL {url!r}: ASCII only")
    if re.search(r"[\s\x00-\x1f\x7f]", url.strip()):
        raise UsageError(f"invalid base URL {url!r}: no spaces or control characters "
                         "(write a space as %20)")
    if parsed.fragment:
        raise UsageError(f"invalid base URL {url!r}: no #fragment")
    path = parsed.path.rstrip("/").removesuffix("/chat/completions") or "/v1"
    root = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))
    # e.g. Azure's ?api-version=: sent on every request
    query = f"?{parsed.query}" if parsed.query else ""
    return root, root + "/chat/completions" + query


@dataclasses.dataclass(frozen=True)
class _Option:
    """One setting of a run: a flag, a key of lm-eval's --model_args, or both; its value check
    (argparse, --model_args, APIConfig and RunOptions all apply the same one) and default."""

    name: str
    help: str = ""  # "" for a --model_args key without a flag
    check: Callable[[Any], Any] | None = None  # None: any value (text from the command line)
    parse: Callable[[str], Any] = _parse_value  # how a flag's text is read before its check
    default: Any = None
    into: str | None = None  # the APIConfig ("api") or RunOptions ("run") field it sets as it is
    model_arg: bool = False  # also set by --model_args, under the same name
    # None is a value of its own: the task's max_tokens, a null seed, no logprobs
    nullable: bool = False
    argparse: tuple = ()  # more of add_argument's keywords: (("metavar", "K"),)


_SWITCH = (("action", "store_true"),)
# In --help order; a flag's value wins over --model_args, which wins over the default
_OPTIONS = (
    _Option("tasks", "comma-separated tasks: {tasks} (the preflight of --check)"),
    _Option("base_url", "http://host:port/v1 or the full .../v1/chat/completions; repeat it "
            "to run the same samples against several servers and compare them "
            "(default: probe 127.0.0.1)", model_arg=True, argparse=(("action", "append"),)),
    _Option("model", "model name sent in each request (default: the only model /v1/models lists)",
            model_arg=True),
    _Option("model_args",
            "lm-eval style model=..,base_url=..,api_key=..,num_concurrent=..,seed=.."),
    _Option("api_key", "bearer token (default: env OPENAI_API_KEY)", model_arg=True),
    _Option("num_concurrent", f"requests in flight (default {_DEFAULT_CONCURRENCY})", _positive_int,
            default=_DEFAULT_CONCURRENCY, into="api", model_arg=True),
    _Option("gen_kwargs", "k=v,... merged into each request body (max_gen_toks means max_tokens)"),
    _Option("max_samples", "first N rows of each task, like lm-eval's --limit", _positive_int,
            into="run", nullable=True),
    _Option("seed", f"the request 'seed' (default {_DEFAULT_SEED}, lm-eval's)", _integer, int,
            _DEFAULT_SEED, "api", model_arg=True, nullable=True),
    _Option("output", "write the results JSON here too (and the sample log beside it)"),
    _Option("log_samples", "append one JSON line per sample to DIR/samples_<task>.jsonl; "
            "rerunning with the same DIR resumes", argparse=(("metavar", "DIR"),)),
    _Option("log_images", "keep the base64 images in the sample log", into="run", argparse=_SWITCH),
    _Option("timeout", "seconds per request attempt, all of it: a server that trickles its answer "
            f"is cut there (default {_DEFAULT_TIMEOUT:.0f})", _positive_float, float,
            _DEFAULT_TIMEOUT, "api", model_arg=True),
    _Option("max_retries", f"attempts per request (default {_DEFAULT_MAX_RETRIES})", _positive_int,
            default=_DEFAULT_MAX_RETRIES, into="api", model_arg=True),
    _Option("max_fail_rate", f"exit 1 when more than this fraction of samples failed (default "
            f"{_DEFAULT_MAX_FAIL_RATE})", _fraction, float, _DEFAULT_MAX_FAIL_RATE, "run"),
    _Option("keep_think", "score the content as is, without dropping <think>...</think>",
            into="api", argparse=_SWITCH),
    _Option("no_resume", "send every sample again, even those the sample log already has",
            argparse=_SWITCH),
    _Option("data_dir", "dataset cache folder (default: data/ beside nano_eval.py; "
            "env NANO_EVAL_DATA_DIR)", into="run"),
    _Option("system_instruction", "a system message put first, like lm-eval's --system_instruction",
            into="api"),
    _Option("fewshot_as_multiturn", "few-shots as chat turns (default true, as lm-eval with "
            "--apply_chat_template)", _boolean, default=True, into="api"),
    _Option("header", "an extra request header for the inference server (repeatable); "
            "its value is a secret, like the key", model_arg=True,
            argparse=(("action", "append"), ("metavar", "'NAME: VALUE'"))),
    _Option("insecure", "do not verify the server's TLS certificate", argparse=_SWITCH),
    _Option("ca_cert", "verify the server's TLS certificate with this CA bundle (PEM)",
            argparse=(("metavar", "FILE"),)),
    _Option("max_response_mb", "a larger response is a failed sample, status too_large "
            f"(default {_DEFAULT_MAX_RESPONSE_MB})", _positive_float, float,
            _DEFAULT_MAX_RESPONSE_MB, "api"),
    _Option("logprobs", "also ask for the top K (1-20) logprobs of every generated token and log "
            "them: compare then judges numerics (logprob parity) too", _top_logprobs, into="api",
            model_arg=True, nullable=True, argparse=(("metavar", "K"),)),
    _Option("repeats", "send every sample K times and report the mean, its SEM and the "
            "self-agreement (at temperature > 0, repeat i uses seed + i)", _positive_int,
            default=1, into="run"),
    _Option("expect", "the score you expect (repeatable); a score significantly below it exits "
            f"{_EXIT_GATE}", argparse=(("action", "append"), ("metavar", "TASK[:METRIC]=VALUE"))),
    _Option("expect_tolerance", "absolute slack added to 1.96 x stderr for --expect (default "
            f"{_DEFAULT_TOLERANCE})", _fraction, float, _DEFAULT_TOLERANCE, "run"),
    _Option("fail_if", f"with several --base_url: exit {_EXIT_GATE} when a server is "
            "significantly worse than the first (or different either way, in accuracy or, "
            "with --logprobs, in numerics)", into="run", argparse=(("choices", _FAIL_IF),)),
    _Option("logprob_tolerance", "the p99 |delta logprob| over shared tokens above which two "
            f"servers' numerics differ (default {_DEFAULT_LOGPROB_TOLERANCE}; "
            "widened at bf16 or fp16, see the README)",
            _positive_float, float, _DEFAULT_LOGPROB_TOLERANCE, "run"),
    _Option("noise_floor", "with several --base_url and --logprobs: run the first server a "
            "second time at another --num_concurrent (1, or 8 if it ran at 1) and allow its own "
            "logprob noise in every numerics verdict (the calibration a GPU server needs)",
            into="run", argparse=_SWITCH),
    _Option("report", "also write a self-contained HTML report of the run (and of the comparison, "
            "with several --base_url)", argparse=(("metavar", "FILE"),)),
    _Option("check", "run the server conformance preflight first; "
            "without --tasks, only the preflight", argparse=_SWITCH),
    _Option("no_progress", "no progress line on stderr", argparse=_SWITCH),
    # lm-eval model_args without a flag of their own
    _Option("max_gen_toks", check=_positive_int, into="api", model_arg=True, nullable=True),
    _Option("think_end_token", check=str, default=_THINK_END, into="api", model_arg=True,
            nullable=True),
    _Option("verify_certificate", check=_boolean, default=True, model_arg=True),
    _Option("ca_cert_path", model_arg=True),
)
_OPTION = {option.name: option for option in _OPTIONS}
_MODEL_ARGS = {option.name for option in _OPTIONS if option.model_arg}


def _check_fields(settings: Any) -> None:
    """Every field of an APIConfig or a RunOptions that an option checks, checked as the flag
    and --model_args are (UsageError naming the field)."""
    for field in dataclasses.fields(settings):
        option = _OPTION.get(field.name)
        value = getattr(settings, field.name)
        if option and option.check and (value is not None or not option.nullable):
            setattr(settings, field.name, _checked(field.name, option.check, value))


@dataclasses.dataclass
class APIConfig:
    """Where and how to send requests. `url` is `http://host:port/v1` or the full
    `.../v1/chat/completions`; `model=None` means: ask `/v1/models`."""

    url: str
    model: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    num_concurrent: int = _DEFAULT_CONCURRENCY
    timeout: float = _DEFAULT_TIMEOUT
    max_retries: int = _DEFAULT_MAX_RETRIES
    seed: int = _DEFAULT_SEED
    gen_kwargs: dict = dataclasses.field(default_factory=dict)
    max_gen_toks: int | None = None  # lm-eval's model_arg: default max_tokens for tasks without one
    server: dict | None = None  # what answered (_identify_server), recorded in the results
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = True
    keep_think: bool = False
    think_end_token: str = _THINK_END
    retry_base_delay: float = 1.0  # first backoff step in seconds (tests make it small)
    # sent on every request; secret
    headers: dict = dataclasses.field(default_factory=dict, repr=False)
    verify_certificate: bool = True  # lm-eval's model_arg; False: any certificate is accepted
    ca_cert: str | None = None  # a CA bundle (PEM) to verify the server's certificate with
    max_response_mb: float = _DEFAULT_MAX_RESPONSE_MB
    logprobs: int | None = None  # K: every request also asks for the top K logprobs of each token

    def __post_init__(self):
        self.api_root, self.chat_url = _normalize_base_url(self.url)
        _check_fields(self)
        self.headers = _parse_headers(self.headers)
        if self.ca_cert is not None:
            if not Path(self.ca_cert).expanduser().is_file():
                raise UsageError(f"CA certificate file {self.ca_cert} does not exist")
            try:
                _tls_context(self.verify_certificate, self.ca_cert)
            except (ssl.SSLError, OSError) as exc:
                raise UsageError(f"CA certificate file {self.ca_cert} holds no PEM certificate "
                                 f"({exc})") from None
        _SECRETS.add(self.api_key, *self.headers.values())


@dataclasses.dataclass
class RunOptions:
    """How a run goes, apart from where its requests go (APIConfig): which samples, where
    they are logged, what fails it. The CLI fills one from its flags; evaluate() takes one."""

    tasks: list = dataclasses.field(default_factory=list)  # Task objects, run one after the other
    check: bool = False  # the conformance preflight first
    max_samples: int | None = None  # the first N rows of each task
    data_dir: str | None = None  # the dataset cache (None: data/ beside this file, or env)
    log_dir: Path | None = None  # the sample logs, resumed from; None: not kept
    log_images: bool = False
    progress: bool | None = None  # None: a progress line only on a terminal
    resume: bool = True
    repeats: int = 1
    max_fail_rate: float = _DEFAULT_MAX_FAIL_RATE
    # task -> (metric or None, value): --expect
    expected: dict = dataclasses.field(default_factory=dict)
    expect_tolerance: float = _DEFAULT_TOLERANCE
    fail_if: str | None = None  # with several servers: "worse" or "different"
    logprob_tolerance: float = _DEFAULT_LOGPROB_TOLERANCE
    noise_floor: bool = False  # with several servers: run the first one twice

    def __post_init__(self):
        _check_fields(self)
        if self.fail_if not in (None, *_FAIL_IF):
            raise UsageError(f"fail_if: expected one of {', '.join(_FAIL_IF)}, "
                             f"got {self.fail_if!r}")


# ============================================================================
# 2. HTTP
# ============================================================================


# Every JSON document from outside (an inference server, a datasets-server) is read by _read_json,
# once, where it enters: what comes out can be kept, counted and written. An integer too long for
# a float (10**400) becomes None; a lone surrogate (the escape "\ud800", valid JSON that no UTF-8
# file can hold) becomes U+FFFD; nesting deeper than the parser's recursion is a ValueError.
_LONGEST_INTEGER = 18  # characters, sign included: counts, ids and timestamps fit; 10**400 does not
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins the escapes of a valid pair


def _bounded_int(text: str) -> int | None:
    return int(text) if len(text) <= _LONGEST_INTEGER else None


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def _read_json(data: bytes | str) -> Any:
    """A JSON document from outside, safe to keep (see above). ValueError if it is not JSON,
    UnicodeDecodeError if it is not UTF-8."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    return _without_lone_surrogates(value) if "\\ud" in text.lower() else value


@dataclasses.dataclass
class _HTTPResponse:
    status: int
    headers: dict  # lower-cased names
    body: bytes


class _ResponseTooLarge(Exception):
    """A response body over the client's cap: not read further."""


class _ProxyFailed(OSError):
    """The HTTP proxy, not the server, could not be reached or refused the tunnel."""


@functools.lru_cache(maxsize=None)
def _tls_context(verify: bool, ca_cert: str | None) -> ssl.SSLContext:
    """One context per settings for the whole run, made on the first https connection
    (loading the CA store costs ~40 ms). It also reads SSL_CERT_FILE and SSL_CERT_DIR."""
    context = ssl.create_default_context(cafile=os.path.expanduser(ca_cert) if ca_cert else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _proxy_auth(proxy: urllib.parse.SplitResult) -> dict:
    """The Proxy-Authorization header for a proxy URL with user:password@ in it."""
    if proxy.username is None:
        return {}
    credentials = (f"{urllib.parse.unquote(proxy.username)}:"
                   f"{urllib.parse.unquote(proxy.password or '')}")
    return {"Proxy-Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


class _AttemptDeadlines:
    """What makes a client's timeout bound a whole attempt, not each read from the socket (a
    server sending one byte every half second would otherwise hold a request for ever): one
    thread, started on the first request, that shuts the socket of any request still running
    past its deadline. A request registers on the way in and out (two dict operations). The
    same registry lets a stopped run end the requests it no longer wants (cut)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict = {}  # id -> (deadline, connection, owner)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, conn: http.client.HTTPConnection, seconds: float, owner: Any = None) -> int:
        key = next(self._ids)
        with self._lock:
            self._running[key] = (time.monotonic() + seconds, conn, owner)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="nano-eval-deadlines",
                                                daemon=True)
                self._thread.start()
        return key

    def end(self, key: int) -> bool:
        """False when the attempt ran past its deadline (and its socket was shut)."""
        with self._lock:
            deadline, _, _ = self._running.pop(key)
        return time.monotonic() <= deadline

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                late = [conn for deadline, conn, _ in self._running.values() if deadline < now]
            self._shut(late)

    def cut(self, owner: Any) -> None:
        """Shuts the socket of every request of `owner` still running."""
        with self._lock:
            running = [conn for _, conn, who in self._running.values() if who is owner]
        self._shut(running)

    @staticmethod
    def _shut(connections: list) -> None:
        for conn in connections:
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)


_DEADLINES = _AttemptDeadlines()
# how a keep-alive connection the server closed while idle fails the next request on it
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                     http.client.BadStatusLine)


class _HTTPClient:
    """Blocking HTTP/1.1 with one persistent connection per (thread, host).

    Call it from a thread pool: each worker thread keeps its own keep-alive
    connection, so N workers make N connections for the whole run. HTTP(S)_PROXY and
    NO_PROXY are read as urllib reads them: plain http goes through the proxy in
    absolute form, https through a CONNECT tunnel; both connections are kept alive.
    """

    def __init__(self, timeout: float, connect_timeout: float = 10.0, verify: bool = True,
                 ca_cert: str | None = None, max_body: int | None = None):
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.verify, self.ca_cert, self.max_body = verify, ca_cert, max_body
        self.proxies = urllib.request.getproxies_environment()
        self._local = threading.local()
        self.aborted = False

    def proxy_for(self, scheme: str, host: str) -> urllib.parse.SplitResult | None:
        proxy = self.proxies.get(scheme)
        if not proxy or urllib.request.proxy_bypass_environment(host, self.proxies):
            return None
        return urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)

    def _connection(self,
                    parts: urllib.parse.SplitResult) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to the host, and whether an earlier request left it open."""
        pool = self._local.__dict__.setdefault("connections", {})
        key = (parts.scheme, parts.netloc)
        if key in pool:
            return pool[key], True
        proxy = self.proxy_for(parts.scheme, parts.netloc)  # host:port, as urllib matches NO_PROXY
        netloc = f"{proxy.hostname}:{proxy.port or 80}" if proxy else parts.netloc
        if parts.scheme == "https":
            conn = _TLSConnection(netloc, timeout=self.connect_timeout,
                                  context=_tls_context(self.verify, self.ca_cert))
            if proxy:
                conn.set_tunnel(parts.hostname, parts.port or 443, headers=_proxy_auth(proxy))
        else:
            conn = _Connection(netloc, timeout=self.connect_timeout)
        conn.proxy = proxy if parts.scheme == "http" else None  # absolute-form request targets
        try:
            conn.connect()
        except OSError as exc:
            if proxy is None or isinstance(exc, ssl.SSLError):
                raise
            where = (f"the HTTP proxy {proxy.hostname}:{proxy.port or 80} "
                     f"({parts.scheme.upper()}_PROXY)")
            if "407" in str(exc):
                raise _ProxyFailed(_PROXY_AUTH) from None
            if str(exc).startswith("Tunnel connection failed"):
                raise _ProxyFailed(f"{where} refused the tunnel to {parts.netloc} "
                                   f"({exc})") from None
            reason = ("connection refused" if isinstance(exc, ConnectionRefusedError)
                      else (exc.strerror or str(exc)))
            raise _ProxyFailed(f"cannot reach {where}: {reason}; the server was "
                               "not tried (list it in NO_PROXY to bypass the proxy)") from None
        conn.sock.settimeout(self.timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pool[key] = conn
        return conn, False

    def _read(self, resp: http.client.HTTPResponse) -> bytes:
        """The whole body; a connection that closes before Content-Length bytes is an
        IncompleteRead (http.client's read(n) returns what came, short, without a word)."""
        declared = resp.getheader("Content-Length")
        declared = int(declared) if declared and _is_digits(declared) else None
        if self.max_body is None:
            data = resp.read()
        else:
            if declared is not None and declared > self.max_body:
                raise _ResponseTooLarge(f"Content-Length {declared:,}")
            data = resp.read(self.max_body + 1)
            if len(data) > self.max_body:
                raise _ResponseTooLarge(f"more than {self.max_body:,} bytes")
        if (declared is not None and len(data) < declared
                and resp.getheader("Transfer-Encoding") is None):
            raise http.client.IncompleteRead(data, declared - len(data))
        return data

    def _drop(self, parts: urllib.parse.SplitResult) -> None:
        conn = self._local.__dict__.get("connections", {}).pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: dict | None = None) -> _HTTPResponse:
        parts = urllib.parse.urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        all_headers = {"User-Agent": f"nano-eval/{__version__}", "Accept": "application/json",
                       **(headers or {})}
        while True:  # at most twice: a resend goes on a new connection, which is not `reused`
            conn, reused = self._connection(parts)
            watch = _DEADLINES.start(conn, self.timeout, self)
            try:
                try:
                    if conn.proxy:
                        conn.request(method, url, body=body,
                                     headers={**all_headers, **_proxy_auth(conn.proxy)})
                    else:
                        conn.request(method, target, body=body, headers=all_headers)
                    resp = conn.getresponse()
                    data = self._read(resp)
                finally:
                    in_time = _DEADLINES.end(watch)
            except BaseException as exc:
                self._drop(parts)
                if not in_time and isinstance(exc, Exception):
                    raise TimeoutError(f"the attempt took longer than {self.timeout:g} s") from None
                if reused and not self.aborted and isinstance(exc, _STALE_CONNECTION):
                    continue  # the server closed an idle keep-alive connection: resend once
                raise
            # not in time: the watchdog may have shut it after the last byte
            if resp.will_close or not in_time:
                self._drop(parts)
            return _HTTPResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)

    def abort(self) -> None:
        """Ends the requests of this client still waiting for an answer, and resends none."""
        self.aborted = True
        _DEADLINES.cut(self)


def _auth_headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _server_headers(config: APIConfig) -> dict:
    """Authorization (with a key) and the user's extra headers, which win."""
    return {**_auth_headers(config.api_key), **config.headers}


def _server_client(config: APIConfig, timeout: float | None = None,
                   connect_timeout: float = 10.0) -> _HTTPClient:
    """An _HTTPClient for the inference server, with the config's TLS settings; every answer,
    the preflight's and the identification's too, is read up to --max_response_mb only."""
    return _HTTPClient(timeout=timeout or config.timeout, connect_timeout=connect_timeout,
                       verify=config.verify_certificate, ca_cert=config.ca_cert,
                       max_body=int(config.max_response_mb * 2 ** 20))


def _describe_network_error(exc: BaseException) -> tuple[str, str]:
    """(status, one-line reason) for an exception raised by _HTTPClient.request."""
    if isinstance(exc, _ProxyFailed):
        return Status.CONNECTION, str(exc)
    if isinstance(exc, _ResponseTooLarge):
        return (Status.TOO_LARGE,
                f"response body too large ({exc}; --max_response_mb raises the cap)")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Status.TIMEOUT, "no answer within the timeout"
    if isinstance(exc, ConnectionRefusedError):
        return Status.CONNECTION, "connection refused"
    if isinstance(exc, socket.gaierror):
        return Status.CONNECTION, f"cannot resolve host ({exc.strerror or exc})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (Status.CONNECTION,
                f"the server's TLS certificate failed verification ({exc.verify_message}); "
                f"{_TLS_WAYS_OUT}")
    if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
        return Status.CONNECTION, "the server speaks plain http, not https: use an http:// URL"
    if isinstance(exc, ssl.SSLError):
        return Status.CONNECTION, f"TLS error: {exc.reason or exc}"
    if isinstance(exc, http.client.IncompleteRead):
        got = len(exc.partial)
        return Status.CONNECTION, ("the connection closed mid-response "
                                   f"({got:,} of {got + (exc.expected or 0):,} bytes)")
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return Status.CONNECTION, f"{type(exc).__name__}: {exc}".rstrip(": ")
    # not its message: it may quote a header, and so a key
    return Status.CONNECTION, type(exc).__name__


def _http_json(client: _HTTPClient, url: str, headers: dict | None = None) -> tuple[int, Any, dict]:
    """GET a JSON document: (status, parsed JSON or None, headers). Network errors propagate."""
    resp = client.request("GET", url, headers=headers)
    try:
        return resp.status, _read_json(resp.body), resp.headers
    except (ValueError, UnicodeDecodeError):
        return resp.status, None, resp.headers


def _error_message(body: bytes, limit: int = 200) -> str:
    """The one-line error a server put in its body (JSON `error.message`, else text)."""
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            err = err.get("message") or err.get("detail") or json.dumps(err)
        text = str(err)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace")
        text = re.sub(r"<[^>]+>", " ", text)  # an HTML error page: keep its words
    return " ".join(text.split())[:limit]


def _retry_after_seconds(headers: dict) -> float | None:
    try:
        return max(0.0, float(headers.get("retry-after") or ""))
    except ValueError:
        return None  # none, or an HTTP date: fall back to our own backoff


def _backoff(attempt: int, base_delay: float, retry_after: float | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`: the server's Retry-After (at most
    _MAX_RETRY_AFTER), else exponential from `base_delay`, capped at 60 s, with jitter."""
    if retry_after is not None:
        return min(retry_after, _MAX_RETRY_AFTER)
    return min(base_delay * 2 ** (attempt - 1), 60.0) * random.uniform(0.5, 1.0)


_last_wait_notice = [0.0]  # when a long retry wait was last announced (one line per 30 s at most)


def _announce_wait(what: str, why: str, delay: float, retry_after: float | None, attempt: int,
                   attempts: int) -> None:
    """Say on stderr why the run is about to sit still, so a long wait is never silent."""
    now = time.monotonic()
    if delay < _LONG_WAIT or now - _last_wait_notice[0] < 30:
        return
    _last_wait_notice[0] = now
    if retry_after is None:
        cause = "exponential backoff, capped at 60 s"
    elif retry_after > _MAX_RETRY_AFTER:
        cause = f"Retry-After: {retry_after:.0f} s, capped at {_MAX_RETRY_AFTER:.0f} s"
    else:
        cause = f"Retry-After: {retry_after:.0f} s"
    said = f"answered {why}" if why.startswith("HTTP ") else f"did not answer ({why})"
    _info(f"{what} {said}: waiting {delay:.0f} s ({cause}) "
          f"before attempt {attempt + 1} of {attempts}; "
          "Ctrl-C stops the run and keeps what finished")


@dataclasses.dataclass
class _Outcome:
    """What one chat request ended as; `status` is one of Status's."""

    status: str
    content: str | None = None
    reasoning: str | None = None
    # reasoning_content or reasoning: the message field it came in
    reasoning_field: str | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    http_status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    latency: float = 0.0
    attempts: int = 1
    # per generated token [token, logprob, [[token, logprob], ...]] (_logged_logprobs)
    logprobs: list | None = None

    @property
    def retryable(self) -> bool:
        return self.status in Status.NETWORK or (
            self.status.startswith("http_") and self.http_status in _RETRYABLE_STATUS)

    @property
    def valid(self) -> bool:
        """A response we can score (a truncated one is scored too)."""
        return self.status in Status.SCORED


def _logged_token(entry: dict) -> str | dict:
    """A token as the sample log keeps it: its text where its bytes (if given) are whole UTF-8;
    else {"bytes": hex} (part of a character) or {"id": n} (a special token llama.cpp spells "")."""
    raw = entry.get("bytes")
    if isinstance(raw, list) and raw and all(type(b) is int and 0 <= b < 256 for b in raw):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return {"bytes": bytes(raw).hex()}
    text = entry.get("token")
    if isinstance(text, str) and text:
        return text
    return {"id": entry["id"]} if type(entry.get("id")) is int else ""


def _logged_logprob(value: Any) -> float | None:
    return round(float(value), 7) if _is_finite(value) else None


def _logged_logprobs(choice: dict) -> list | None:
    """`choices[0].logprobs.content` in the sample log's compact form: per generated token
    [token, logprob, [[token, logprob], ...the top K]]; None when the server sent none, or
    sent them malformed (the run warns that they are missing). A logprob that is not a finite
    number is logged as null, which the numerics verdict counts as broken."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not all(
            isinstance(e, dict) and isinstance(e.get("top_logprobs") or [], list) for e in content):
        return None
    return [[_logged_token(e), _logged_logprob(e.get("logprob")),
             [[_logged_token(t), _logged_logprob(t.get("logprob"))]
              for t in e.get("top_logprobs") or [] if isinstance(t, dict)]]
            for e in content]


def _classify_response(resp: _HTTPResponse) -> _Outcome:
    """Turns an HTTP response into an _Outcome, reading content, reasoning, usage and logprobs.
    Whatever a server sends, an answer it cannot read is `bad_response`, never an exception
    (which the runner would take for a network error)."""
    try:
        return _read_response(resp)
    except Exception as exc:  # noqa: BLE001 -- a shape _read_response did not foresee
        return _Outcome(Status.BAD_RESPONSE, http_status=resp.status,
                        error=f"malformed response ({type(exc).__name__})")


def _read_response(resp: _HTTPResponse) -> _Outcome:
    if resp.status != 200:
        return _Outcome(Status.http(resp.status), http_status=resp.status,
                        error=_error_message(resp.body),
                        retry_after=_retry_after_seconds(resp.headers))
    try:
        data = _read_json(resp.body)
    except UnicodeDecodeError:
        return _Outcome(Status.BAD_RESPONSE, http_status=200, error="response is not UTF-8")
    except ValueError:
        return _Outcome(Status.BAD_RESPONSE, http_status=200,
                        error=f"response is not JSON: {_error_message(resp.body, 80)}")
    if not isinstance(data, dict):
        return _Outcome(Status.BAD_RESPONSE, http_status=200, error="response is not a JSON object")
    choices = data.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        if "error" in data:
            return _Outcome(Status.BAD_RESPONSE, http_status=200,
                            error=f"error in a 200 response: {_error_message(resp.body)}")
        return _Outcome(Status.BAD_RESPONSE, http_status=200, error="response has no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        return _Outcome(Status.BAD_RESPONSE, http_status=200, error="response has no message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return _Outcome(Status.BAD_RESPONSE, http_status=200,
                        error="message content is not a string")
    field = "reasoning_content" if message.get("reasoning_content") else "reasoning"
    reasoning = message.get(field) if isinstance(message.get(field), str) else None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
    outcome = _Outcome(Status.OK, content=content, reasoning=reasoning,
                       reasoning_field=field if reasoning else None, finish_reason=finish,
                       usage=usage, http_status=200, logprobs=_logged_logprobs(choice))
    if not content or not content.strip():
        outcome.status = Status.EMPTY
    elif finish == "length":
        outcome.status = Status.TRUNCATED
    return outcome


class _AdaptiveLimiter:
    """Caps requests in flight; halves the cap on 429/503 and grows it back by one
    after every `cap` successes (additive increase, multiplicative decrease). Worker
    threads wait in acquire(); close() wakes them all and refuses further slots."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.limit = maximum
        self._in_flight = 0
        self._successes = 0
        self._closed = False
        self._changed = threading.Condition(threading.Lock())

    def acquire(self) -> bool:
        """Blocks until a request may be sent; False if the limiter was closed instead."""
        with self._changed:
            while self._in_flight >= self.limit and not self._closed:
                self._changed.wait()
            if self._closed:
                return False
            self._in_flight += 1
            return True

    def release(self, throttled: bool = False, success: bool = False) -> None:
        with self._changed:
            self._in_flight -= 1
            if throttled:
                self.limit = max(1, self.limit // 2)
                self._successes = 0
            elif success and self.limit < self.maximum:
                self._successes += 1
                if self._successes >= self.limit:
                    self.limit += 1
                    self._successes = 0
            free = self.limit - self._in_flight
            if free > 0:
                self._changed.notify(free)  # as many waiters as there are free slots

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class _Stopped(Exception):
    """The run was stopped (Ctrl-C, SIGTERM, an error elsewhere) while a worker waited."""


class _Counter:
    """Counts threads inside a blocking request, so an interrupted run can exit
    without waiting for answers it no longer wants. No lock: list append and pop
    are atomic."""

    def __init__(self):
        self._calls: list = []

    @property
    def value(self) -> int:
        return len(self._calls)

    def __enter__(self):
        self._calls.append(None)

    def __exit__(self, *exc):
        self._calls.pop()


_BLOCKED_CALLS = _Counter()


def _allow_open_files(count: int) -> None:
    """Raises the soft limit on open files to `count` (within the hard limit) when it is
    lower: 1024 connections do not fit the common default of 1024 (256 on macOS)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < count:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (count if hard == resource.RLIM_INFINITY else min(count, hard),
                                hard))
    except (ImportError, ValueError, OSError):
        pass


class _ChatClient:
    """Sends chat requests as blocking calls from the runner's worker threads: `send_blocking`,
    with retries, backoff and the adaptive limiter."""

    def __init__(self, config: APIConfig):
        self.config = config
        self.http = _server_client(config)
        self.limiter = _AdaptiveLimiter(config.num_concurrent)
        self.headers = {"Content-Type": "application/json", **_server_headers(config)}
        self.stopped = threading.Event()  # set by close(): waits end at once, nothing more is sent
        _allow_open_files(config.num_concurrent + 64)  # a connection each, and some to spare

    def _post(self, payload: bytes) -> _Outcome:
        start = time.perf_counter()
        with _BLOCKED_CALLS:
            try:
                resp = self.http.request("POST", self.config.chat_url, payload, self.headers)
            except Exception as exc:  # network errors become an outcome; nothing escapes a worker
                status, reason = _describe_network_error(exc)
                outcome = _Outcome(status, error=reason)
            else:
                outcome = _classify_response(resp)
        outcome.latency = time.perf_counter() - start
        return outcome

    def send_blocking(self, payload: bytes) -> _Outcome:
        """One request with retries: backoff with jitter, honouring Retry-After. Call it in
        a worker thread; raises _Stopped when the client is closed while it waits."""
        for attempt in range(1, self.config.max_retries + 1):
            if not self.limiter.acquire():
                raise _Stopped()
            outcome = None
            try:
                outcome = self._post(payload)
            finally:
                status = outcome.http_status if outcome else None
                self.limiter.release(throttled=status in _THROTTLE_STATUS, success=status == 200)
            outcome.attempts = attempt
            if not outcome.retryable or attempt == self.config.max_retries:
                break
            delay = _backoff(attempt, self.config.retry_base_delay, outcome.retry_after)
            _announce_wait(self.config.chat_url, outcome.error if outcome.http_status is None else
                           f"HTTP {outcome.http_status}", delay, outcome.retry_after, attempt,
                           self.config.max_retries)
            if self.stopped.wait(delay):
                raise _Stopped()
        return outcome

    def close(self) -> None:
        """Nothing more is sent; waits end at once, and so do requests still in flight."""
        self.stopped.set()
        self.limiter.close()
        self.http.abort()


# ============================================================================
# 3. Finding the server
# ============================================================================

_OWNED_BY = {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama.cpp", "modular": "MAX",
             "ollama": "Ollama", "library": "Ollama", "tgi": "TGI", "lmstudio": "LM Studio",
             "organization_owner": "LM Studio"}


def _probe_local_server() -> str:
    """The first usual inference port on 127.0.0.1 whose /v1/models answers."""
    client = _HTTPClient(timeout=2.0, connect_timeout=1.0)

    def answers(port: int) -> bool:
        try:
            return (client.request("GET", f"http://127.0.0.1:{port}/v1/models").status
                    in (200, 401, 403))
        except Exception:
            return False

    with ThreadPoolExecutor(max_workers=len(_KNOWN_PORTS)) as pool:
        alive = list(pool.map(answers, [port for port, _ in _KNOWN_PORTS]))
    for (port, name), ok in zip(_KNOWN_PORTS, alive):
        if ok:
            _info(f"no --base_url given: using http://127.0.0.1:{port}/v1 "
                  f"(the {name} port answered /v1/models)")
            return f"http://127.0.0.1:{port}/v1"
    ports = ", ".join(f"{port} ({name})" for port, name in _KNOWN_PORTS)
    raise ServerError(f"no --base_url given and no server answered on 127.0.0.1 ports {ports}")


def _refusal(status: int | None, url: str) -> NanoEvalError | None:
    """The error for an HTTP status after which no request to this server can succeed."""
    if status in (401, 403):
        return AuthError(f"authentication failed (HTTP {status} from {url}): check --api_key")
    if status == 407:
        return ServerError(_PROXY_AUTH)
    return None


def _listed_models(data: Any) -> list | None:
    """The `data` list of a /v1/models answer; None when it has none."""
    return data["data"] if isinstance(data, dict) and isinstance(data.get("data"), list) else None


def _resolve_model(config: APIConfig, model: str | None) -> str:
    """The model to ask for: `model` if given (after checking the server answers),
    else the only one `/v1/models` lists. A dead server is reported in seconds."""
    client = _server_client(config, timeout=30.0, connect_timeout=5.0)
    url = config.api_root + "/models"
    deadline = time.monotonic() + _LOADING_WAIT
    while True:
        try:
            status, data, _ = _http_json(client, url, _server_headers(config))
        except Exception as exc:
            hint = ("; is the server running?"
                    if isinstance(exc, (ConnectionRefusedError, socket.gaierror, socket.timeout,
                                        TimeoutError)) else "")
            raise ServerError(f"cannot reach {config.api_root}: "
                              f"{_describe_network_error(exc)[1]}{hint}") from None
        if status != 503:
            break
        if time.monotonic() > deadline:
            raise ServerError(f"{url} still answers HTTP 503 after {_LOADING_WAIT:.0f} s: "
                              "the server has not finished loading its model")
        if deadline - time.monotonic() > _LOADING_WAIT - 1:
            _info(f"{url} answers 503: waiting up to {_LOADING_WAIT:.0f} s "
                  "for the server to finish loading")
        time.sleep(1.0)
    if (error := _refusal(status, url)):
        raise error
    if model:
        return model
    models = _listed_models(data)
    if status != 200 or models is None:
        raise ServerError(f"{url} answered HTTP {status} without a model list; pass --model")
    ids = [m.get("id") for m in models if isinstance(m, dict) and m.get("id")]
    odd = next((i for i in ids if not isinstance(i, str)), None)
    if odd is not None:
        raise ServerError(f"{url} lists a model id that is not text "
                          f"({json.dumps(odd)[:60]}); pass --model")
    if not ids:
        raise ServerError(f"{url} lists no models; pass --model")
    if len(ids) > 1:
        raise ServerError(f"{url} lists several models, pick one with --model: {', '.join(ids)}")
    return ids[0]


def _identify_server(config: APIConfig, timeout: float = 3.0) -> dict:
    """Which backend answered, from the endpoints each one has: vLLM /version, MAX /version
    with the title "MAX Serve" in /openapi.json, SGLang /get_server_info, llama.cpp /props,
    Ollama /api/version, TGI /info; else the `owned_by` of /v1/models and the Server header."""
    api_root = config.api_root
    parts = urllib.parse.urlsplit(api_root)
    origin = f"{parts.scheme}://{parts.netloc}"
    client = _server_client(config, timeout=timeout, connect_timeout=timeout)
    paths = {"props": f"{origin}/props", "sglang": f"{origin}/get_server_info",
             "sglang_new": f"{origin}/server_info", "ollama": f"{origin}/api/version",
             "tgi": f"{origin}/info", "version": f"{origin}/version",
             "models": f"{api_root}/models", "openapi": f"{origin}/openapi.json",
             "control": f"{origin}/nano-eval-no-such-path"}

    def fetch(url: str) -> tuple[int, Any, dict]:
        try:
            return _http_json(client, url, _server_headers(config))
        except Exception:
            return 0, None, {}

    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        answers = dict(zip(paths, pool.map(fetch, paths.values())))
    # A server that answers every path alike (a catch-all) tells nothing through those answers.
    control = answers.pop("control")[:2]
    ok = {name: data for name, (status, data, _) in answers.items()
          if status == 200 and isinstance(data, dict) and (status, data) != control}
    ok.setdefault("sglang", ok.pop("sglang_new", {}))
    models = _listed_models(ok.get("models")) or [{}]
    owned_by = models[0].get("owned_by") if isinstance(models[0], dict) else None
    owner = _OWNED_BY.get(str(owned_by).lower())
    identity: dict = {"server_header": answers["models"][2].get("server"), "owned_by": owned_by}
    props, sglang, tgi = ok.get("props", {}), ok.get("sglang", {}), ok.get("tgi", {})
    only_version = {name: data["version"] for name, data in ok.items() if set(data) == {"version"}}
    if {"build_info", "default_generation_settings", "total_slots"} & set(props):
        identity.update(name="llama.cpp", version=props.get("build_info"), evidence="/props")
    elif {"tp_size", "model_path", "served_model_name"} & set(sglang):
        identity.update(name="SGLang", version=sglang.get("version") or only_version.get("version"),
                        evidence="/get_server_info")
    elif "ollama" in only_version:
        identity.update(name="Ollama", version=only_version["ollama"], evidence="/api/version")
    elif "model_id" in tgi and "version" in tgi:
        identity.update(name="TGI", version=tgi["version"], evidence="/info")
    elif ("version" in only_version
          and (ok.get("openapi", {}).get("info") or {}).get("title") == "MAX Serve"):
        identity.update(name="MAX", version=only_version["version"],
                        evidence="/version, /openapi.json")
    elif "version" in only_version:
        identity.update(name=owner or "vLLM", version=only_version["version"], evidence="/version")
    elif owner:
        identity.update(name=owner, version=None, evidence="owned_by")
    else:
        identity.update(name=identity["server_header"] or "unknown", version=None,
                        evidence="Server header")
    return identity


def _find_server(config: APIConfig, model: str | None) -> None:
    """The model to ask for and which backend answers (AuthError/ServerError if unusable);
    what the server said is recorded redacted (a /version may echo the request's headers)."""
    config.model = _resolve_model(config, model)
    config.server = {key: _SECRETS.scrub(value) if isinstance(value, str) else value
                     for key, value in _identify_server(config).items()}


# ============================================================================
# 4. Datasets
# ============================================================================

_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
    (b"\xff\xd8\xff", "jpeg", "image/jpeg"),
    (b"GIF87a", "gif", "image/gif"),
    (b"GIF89a", "gif", "image/gif"),
)


def _sniff_image(data: bytes) -> tuple[str, str] | None:
    """(format, mime type) from the magic bytes, or None."""
    for magic, fmt, mime in _IMAGE_MAGIC:
        if data.startswith(magic):
            return fmt, mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return None


def _image_is_whole(data: bytes, fmt: str) -> bool:
    """Whether an image ends as its format ends (a download cut short does not): PNG's IEND
    chunk, JPEG's end-of-image marker, GIF's trailer, WebP's RIFF length."""
    if fmt == "png":
        return data.endswith(b"IEND\xaeB`\x82")
    if fmt == "jpeg":
        return b"\xff\xd9" in data[-64:]
    if fmt == "gif":
        return data.rstrip(b"\x00").endswith(b";")
    return len(data) >= int.from_bytes(data[4:8], "little") + 8  # webp


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        # the umask applies, as for open()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nano-eval"


def _is_writable_dir(path: Path) -> bool:
    """Whether `path`, or the nearest folder above it that exists, is a writable folder."""
    probe = next((p for p in (path, *path.parents) if p.exists()), None)
    return probe is not None and probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _resolve_data_dir(explicit: str | None) -> list[Path]:
    """Folders to read the cache from, the first one written to.

    An explicit `--data_dir`/NANO_EVAL_DATA_DIR must be writable. The default is the
    data/ folder beside this file (which ships the gsm8k split); for a pip-installed
    module, or when that folder is not writable, the user cache dir (data/ still read).
    When neither is writable, data/ alone: the shipped split needs no writing, and a split
    that must be fetched says then that it cannot be cached."""
    chosen = explicit or os.environ.get("NANO_EVAL_DATA_DIR")
    if chosen:
        path = Path(chosen).expanduser()
        if not _is_writable_dir(path):
            raise UsageError(f"data dir {path} is not writable")
        return [path] + ([_BUNDLED_DATA] if path.resolve() != _BUNDLED_DATA else [])
    # pip install, not a copy
    installed = _BUNDLED_DATA.parent.name in ("site-packages", "dist-packages")
    if not installed and _is_writable_dir(_BUNDLED_DATA):
        return [_BUNDLED_DATA]
    fallback = _user_cache_dir()
    return [fallback, _BUNDLED_DATA] if _is_writable_dir(fallback) else [_BUNDLED_DATA]


@dataclasses.dataclass(frozen=True)
class _DatasetRef:
    dataset: str
    config: str
    split: str
    text_columns: tuple = ()  # each row's text the task reads
    image_column: str | None = None
    label_columns: tuple = ()  # text, or a list of texts (ChartQA's label)

    @property
    def folder(self) -> str:
        return "/".join((self.dataset.replace("/", "__"), self.config, self.split))


# the splits in data/ beside nano_eval.py, and their size
_SHIPPED_ROWS = {"openai__gsm8k/main/test": 1319}


class _DatasetCache:
    """Pages of rows and images of one split, verified by a manifest of sha256 sums.

    Layout: <root>/<dataset>/<config>/<split>/{manifest.json, rows-00000.jsonl,
    images/<row_idx>.<ext>}. Every file is written atomically; a file whose size or
    sha256 does not match the manifest is ignored (and so fetched again)."""

    def __init__(self, roots: list[Path], ref: _DatasetRef):
        self.ref = ref
        self.dirs = [root / ref.folder for root in roots]
        self.write_dir = self.dirs[0]
        self.manifests = [self._load_manifest(d) for d in self.dirs]
        self._lock = threading.Lock()  # pages and images are written from several threads
        self._changed = False

    @staticmethod
    def _load_manifest(folder: Path) -> dict:
        try:
            manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
        except (OSError, ValueError):
            manifest = None
        return {"pages": {}, "images": {}, **(manifest if isinstance(manifest, dict) else {})}

    @property
    def manifest(self) -> dict:
        return self.manifests[0]

    def num_rows_total(self) -> int | None:
        return next((m["num_rows_total"] for m in self.manifests
                     if isinstance(m.get("num_rows_total"), int)), None)

    def check(self) -> None:
        """A manifest must agree with itself and with what is known of the split: its pages tile
        the first rows of num_rows_total (full pages of _PAGE_SIZE, the last one shorter), and the
        shipped split has its known size. Else it was edited or damaged: never a smaller
        denominator from it (DatasetError)."""
        for folder, manifest in zip(self.dirs, self.manifests):
            total = manifest.get("num_rows_total")
            if total is None and not manifest["pages"]:
                continue
            problem = None
            known = (_SHIPPED_ROWS.get(self.ref.folder)
                     if folder.resolve().is_relative_to(_BUNDLED_DATA) else None)
            if type(total) is not int or total < 1:
                problem = f"num_rows_total is {total!r}"
            else:
                for offset, entry in manifest["pages"].items():
                    rows = entry.get("rows") if isinstance(entry, dict) else None
                    if (not _is_digits(offset) or int(offset) % _PAGE_SIZE
                            or rows != min(_PAGE_SIZE, total - int(offset))):
                        problem = (f"page {offset} holds {rows!r} rows, "
                                   f"which does not fit num_rows_total {total}")
                        break
            if not problem and known is not None and total != known:
                problem = f"num_rows_total is {total}, but the shipped split has {known} rows"
            if problem:
                raise DatasetError(f"the dataset cache {folder / 'manifest.json'} does not agree "
                                   f"with itself ({problem}): it was edited or damaged; "
                                   "delete that folder to fetch the split again")

    def revisions(self, offsets: Iterable[int]) -> list[str]:
        found = set()
        for offset in offsets:
            for manifest in self.manifests:
                entry = manifest["pages"].get(str(offset))
                if entry:
                    found.add(entry.get("revision") or manifest.get("source") or "unknown")
                    break
        return sorted(found)

    def _verified(self, kind: str, key: int) -> Iterator[tuple[bytes, dict]]:
        """Each copy of a page or an image (`kind`) whose size and sha256 match its manifest."""
        for folder, manifest in zip(self.dirs, self.manifests):
            entry = manifest[kind].get(str(key))
            if not entry:
                continue
            try:
                data = (folder / entry["file"]).read_bytes()
            except (OSError, KeyError, TypeError):
                continue
            if len(data) == entry.get("bytes") and _sha256(data) == entry.get("sha256"):
                yield data, entry

    def read_page(self, offset: int) -> list[dict] | None:
        for data, entry in self._verified("pages", offset):
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
            if len(rows) == entry.get("rows"):
                return rows
        return None

    def save(self) -> None:
        """Writes the manifest if a page or an image was added since the last save."""
        with self._lock:
            if self._changed:
                self.write("manifest.json",
                           json.dumps(self.manifest, indent=1, sort_keys=True).encode())
                self._changed = False

    def write(self, name: str, data: bytes) -> None:
        try:
            _atomic_write(self.write_dir / name, data)
        except OSError as exc:
            raise DatasetError(f"cannot write the dataset cache in {self.write_dir} "
                               f"({exc.strerror or exc}): "
                               "pass a writable --data_dir (or set NANO_EVAL_DATA_DIR)") from None

    def write_page(self, offset: int, rows: list[dict], num_rows_total: int,
                   revision: str | None) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        name = f"rows-{offset:05d}.jsonl"
        self.write(name, data)
        with self._lock:
            self.manifest.update(dataset=self.ref.dataset, config=self.ref.config,
                                 split=self.ref.split, num_rows_total=num_rows_total)
            self.manifest["pages"][str(offset)] = {"file": name, "rows": len(rows),
                                                   "bytes": len(data), "sha256": _sha256(data),
                                                   "revision": revision}
            self._changed = True
        self.save()

    def read_image(self, row_idx: int) -> tuple[bytes, dict] | None:
        return next(self._verified("images", row_idx), None)

    def write_image(self, row_idx: int, data: bytes, fmt: str) -> dict:
        name = f"images/{row_idx}.{'jpg' if fmt == 'jpeg' else fmt}"
        self.write(name, data)
        entry = {"file": name, "bytes": len(data), "sha256": _sha256(data), "format": fmt}
        with self._lock:
            self.manifest["images"][str(row_idx)] = entry
            self._changed = True
        return entry


def _is_texts(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(v, str) for v in value))


def _page_problem(body: Any, ref: _DatasetRef) -> str | None:
    """What makes a `/rows` answer unusable (checked before anything of it is used or cached):
    its shape, a positive num_rows_total, each row's index, its text columns and image cell."""
    if not isinstance(body, dict) or not isinstance(body.get("rows"), list):
        return "no list of rows"
    total = body.get("num_rows_total")
    if type(total) is not int or total <= 0:
        return f"num_rows_total is {json.dumps(total)}, not a positive number of rows"
    for i, row in enumerate(body["rows"]):
        if (not isinstance(row, dict) or type(row.get("row_idx")) is not int
                or not isinstance(row.get("row"), dict)):
            return f"its row {i} is not {{\"row_idx\": number, \"row\": {{...}}}}"
        missing = [name for name in ref.text_columns if not isinstance(row["row"].get(name), str)]
        missing += [name for name in ref.label_columns if not _is_texts(row["row"].get(name))]
        if missing:
            return f"row {row['row_idx']} has no text in {', '.join(map(repr, missing))}"
        image = row["row"].get(ref.image_column) if ref.image_column else None
        if image is not None and not (isinstance(image, dict)
                                      and isinstance(image.get("src", ""), str)):
            return f"row {row['row_idx']}'s {ref.image_column!r} is not an image cell"
    return None


class _DatasetsClient:
    """A minimal client for the HuggingFace datasets-server `/rows` API."""

    def __init__(self, base_url: str | None = None, token: str | None = None, retries: int = 6,
                 retry_base_delay: float = 1.0):
        self.base_url = (base_url or os.environ.get("NANO_EVAL_DATASETS_SERVER")
                         or _DATASETS_SERVER).rstrip("/")
        self.token = token if token is not None else os.environ.get("HF_TOKEN")  # checked when sent
        self.retries = retries
        self.retry_base_delay = retry_base_delay
        self.http = _HTTPClient(timeout=120.0, connect_timeout=15.0,
                                max_body=_DATASETS_MAX_MB * 2 ** 20)

    def _wait(self, attempt: int, why: str, retry_after: float | None) -> None:
        delay = _backoff(attempt, self.retry_base_delay, retry_after)
        _announce_wait(f"the datasets-server {self.base_url}", why, delay, retry_after, attempt,
                       self.retries)
        time.sleep(delay)

    def _get(self, url: str, headers: dict, what: str) -> _HTTPResponse:
        """GET with retries on 429/5xx and network errors (the server is sometimes busy).
        Counted as a blocked call, retry waits included: an interrupted run does not wait."""
        with _BLOCKED_CALLS:
            for attempt in range(1, self.retries + 1):
                try:
                    resp = self.http.request("GET", url, headers=headers)
                except Exception as exc:
                    _, reason = _describe_network_error(exc)
                    if (isinstance(exc, (socket.gaierror, _ResponseTooLarge))
                            or attempt == self.retries):
                        raise DatasetError(f"cannot fetch {what} from {self.base_url}: {reason}; "
                                           "set NANO_EVAL_DATASETS_SERVER to a mirror, or give "
                                           "--data_dir a copy of a data/ folder that holds the "
                                           "split") from None
                    self._wait(attempt, reason, None)
                    continue
                if resp.status in _RETRYABLE_STATUS and attempt < self.retries:
                    self._wait(attempt, f"HTTP {resp.status}", _retry_after_seconds(resp.headers))
                    continue
                return resp
        raise AssertionError("unreachable")

    def rows(self, ref: _DatasetRef, offset: int,
             length: int = _PAGE_SIZE) -> tuple[dict, str | None]:
        """One page of `/rows`: (the JSON body, X-Revision)."""
        query = urllib.parse.urlencode({"dataset": ref.dataset, "config": ref.config,
                                        "split": ref.split, "offset": offset, "length": length})
        what = f"{ref.dataset} rows {offset}-{offset + length - 1}"
        resp = self._get(f"{self.base_url}/rows?{query}",
                         _auth_headers(_check_secret(self.token, "HF_TOKEN")), what)
        if resp.status != 200:
            hint = " (set HF_TOKEN for a gated or private dataset)" if resp.status == 401 else ""
            raise DatasetError(f"datasets-server answered {resp.status} for {what}: "
                               f"{_error_message(resp.body)}{hint}")
        try:
            body = _read_json(resp.body)
        except (ValueError, UnicodeDecodeError):
            raise DatasetError(f"datasets-server sent a body that is not JSON for {what}") from None
        problem = _page_problem(body, ref)
        if problem:
            raise DatasetError(f"datasets-server sent an unexpected page for {what}: {problem}; "
                               "not caching it")
        return body, resp.headers.get("x-revision")

    def download(self, url: str) -> _HTTPResponse:
        """An image asset. Signed URLs carry their own auth; Hub resolve URLs need the token."""
        on_hub = (urllib.parse.urlsplit(url).hostname or "") == "huggingface.co"
        headers = _auth_headers(_check_secret(self.token, "HF_TOKEN")) if on_hub else {}
        return self._get(url, headers, "an image")


def _fetch_images(cache: _DatasetCache, server: _DatasetsClient, ref: _DatasetRef, offset: int,
                  rows: list[dict], image_column: str, fresh: bool,
                  pool: ThreadPoolExecutor) -> None:
    """Downloads the images of `rows` concurrently. Signed URLs expire: a page read
    from the cache is fetched again for fresh URLs first, and a 403/404 on download
    fetches the page again (twice at most)."""
    urls = {r["row_idx"]: (r["row"][image_column] or {}).get("src") for r in rows}

    def download(item: tuple[int, str | None]) -> int | None:
        """The row index when its URL has expired, else None (the image is cached)."""
        row_idx, url = item
        if not url:
            return None
        resp = server.download(url)
        if resp.status in (403, 404):
            return row_idx
        if resp.status != 200:
            raise DatasetError(f"image of row {row_idx} of {ref.dataset}: HTTP {resp.status}")
        kind = _sniff_image(resp.body)
        if kind is None:
            raise DatasetError(f"image of row {row_idx} of {ref.dataset} is not PNG, JPEG, WebP "
                               "or GIF")
        if not _image_is_whole(resp.body, kind[0]):
            _warn(f"the image of row {row_idx} of {ref.dataset} is truncated "
                  f"({len(resp.body):,} bytes of {kind[0].upper()}): not cached, "
                  "and that sample fails as missing_image")
            return None
        cache.write_image(row_idx, resp.body, kind[0])
        return None

    for attempt in range(3):
        if not fresh or attempt > 0:
            body, _ = server.rows(ref, offset)
            urls = {r["row_idx"]: (r["row"].get(image_column) or {}).get("src")
                    for r in body["rows"] if r["row_idx"] in urls}
        expired = [i for i in pool.map(download, urls.items()) if i is not None]
        if not expired:
            return
        urls = {i: None for i in expired}
    raise DatasetError(f"images of {ref.dataset} rows {sorted(urls)} stay unavailable (403/404) "
                       "after refetching")


def _load_page(cache: _DatasetCache, server: _DatasetsClient, ref: _DatasetRef, offset: int,
               wanted: int, image_column: str | None, prefetched: tuple[dict, str | None] | None,
               images: ThreadPoolExecutor | None) -> list[dict]:
    """One page of rows plus the images its needed rows lack (runs in a worker thread)."""
    rows = cache.read_page(offset)
    fresh = rows is None
    if fresh:
        body, revision = prefetched or server.rows(ref, offset)
        cached_total = cache.num_rows_total()
        # the run counts on cached_total
        if cached_total is not None and body["num_rows_total"] != cached_total:
            raise DatasetError(f"the dataset cache says {ref.dataset} {ref.split} has "
                               f"{cached_total} rows, the datasets-server "
                               f"{body['num_rows_total']}: the cache is stale or was edited; "
                               f"delete {cache.write_dir} to fetch the split again")
        rows = [{"row_idx": r["row_idx"], "row": r["row"]} for r in body["rows"]]
        expected = list(range(offset, min(offset + _PAGE_SIZE, body["num_rows_total"])))
        got = [r["row_idx"] for r in rows]
        if got != expected:
            what = "a short page" if len(got) < len(expected) else ("rows out of place" + next(
                (f", row_idx {g} where {e} belongs" for g, e in zip(got, expected) if g != e), ""))
            raise DatasetError(f"datasets-server sent {len(got)} rows ({got[0] if got else '-'}-"
                               f"{got[-1] if got else '-'}) for rows "
                               f"{offset}-{expected[-1] if expected else '-'} of {ref.dataset}: "
                               f"{what}; not caching it")
        cache.write_page(offset, rows, body["num_rows_total"], revision)
    if image_column:
        needed = [r for r in rows if r["row_idx"] < wanted]
        missing = [r for r in needed
                   if r["row"].get(image_column) and cache.read_image(r["row_idx"]) is None]
        if missing:
            _fetch_images(cache, server, ref, offset, missing, image_column, fresh, images)
    return rows


async def _load_rows(ref: _DatasetRef, count: int | None, roots: list[Path],
                     image_column: str | None = None,
                     server: _DatasetsClient | None = None) -> tuple[list[dict], _DatasetCache]:
    """The first `count` rows (all when None) of a split, from the cache or the server.
    Pages are fetched _DOWNLOADS at a time; with an image column, the images the run needs
    are downloaded right after their page (signed URLs expire) and cached."""
    cache = _DatasetCache(roots, ref)
    cache.check()
    server = server or _DatasetsClient()
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=_DOWNLOADS, thread_name_prefix="nano-eval-data")
    images = (ThreadPoolExecutor(max_workers=_DOWNLOADS, thread_name_prefix="nano-eval-images")
              if image_column else None)
    try:
        total = cache.num_rows_total()
        first_page = None
        if total is None:
            first_page = await loop.run_in_executor(pool, server.rows, ref, 0)
            total = first_page[0]["num_rows_total"]
        wanted = total if count is None else min(count, total)
        pages = await asyncio.gather(*(
            loop.run_in_executor(pool, _load_page, cache, server, ref, offset, wanted, image_column,
                                 first_page if offset == 0 else None, images)
            for offset in range(0, wanted, _PAGE_SIZE)))
        cache.save()
    finally:
        pool.shutdown(wait=False)
        if images:
            images.shutdown(wait=False)
    return [row for p in pages for row in p][:wanted], cache


# ============================================================================
# 5. Tasks
# ============================================================================

_GSM8K_TEMPLATE = (
    "Given the following problem, reason and give a final answer to the problem.\n"
    "Problem: {question}\n"
    'Your response should end with "The final answer is [answer]" where [answer] is the response '
    "to the problem.\n"
)
# lm-eval's gsm8k-cot-llama.yaml fewshot_config.samples, in order: (question, target)
_GSM8K_FEWSHOT = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
     "After they are done, there will be 21 trees. How many trees did the grove workers "
     "plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. "
     "So there must have been 21 - 15 = 6. The final answer is 6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, "
     "how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The final answer is 5"),
    ("Leah had 32 chocolates and her sister had 42. "
     "If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
     "After eating 35, they had 74 - 35 = 39. The final answer is 39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
     "How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. "
     "So he gave Denny 20 - 12 = 8. The final answer is 8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. "
     "How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is "
     "4 more toys. 5 + 4 = 9. The final answer is 9"),
    ("There were nine computers in the server room. Five more computers were installed each day, "
     "from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
     "So 5 * 4 = 20 computers were added. 9 + 20 is 29. The final answer is 29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
     "How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
     "After losing 2 more, he had 35 - 2 = 33 golf balls. The final answer is 33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
     "So she has 23 - 15 dollars left. 23 - 15 is 8. The final answer is 8"),
)
_GSM8K_UNTIL = ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "Q:", "</s>",
                "<|im_end|>"]
_CHARTQA_TEMPLATE = (
    "<image>{query}\n"
    "Analyze the image and question carefully, using step-by-step reasoning.\n"
    "First, describe any image provided in detail. Then, present your reasoning. "
    "And finally your final answer in this format:\n"
    "Final Answer: <answer>\n"
    "where <answer> follows the following instructions:\n"
    "- <answer> should should be a single phrase or number.\n"
    "- <answer> should not paraphrase or reformat the text in the image.\n"
    "- If <answer> is a ratio, it should be a decimal value like 0.25 instead of 1:4.\n"
    "- If the question is a Yes/No question, <answer> should be Yes/No.\n"
    "- If <answer> is a number, it should not contain any units.\n"
    "- If <answer> is a percentage, it should include a % sign.\n"
    "- If <answer> is an entity, it should include the full label from the graph.\n"
    "IMPORTANT: Remember, to end your answer with Final Answer: <answer>.\n"
)
_GSM8K_FILTERS = {
    "strict-match": re.compile(r"The final answer is ((-?[$0-9.,]{2,})|(-?[0-9]+))"),
    "flexible-extract": re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"),
}
_GSM8K_IGNORE = [re.compile(p) for p in (",", r"\$", "(?s).*#### ", r"\.$")]


def _data_url(data: bytes) -> str:
    mime = (_sniff_image(data) or ("", "application/octet-stream"))[1]
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _load_image(cache: _DatasetCache | None, row_idx: int,
                cell: Any) -> tuple[dict | None, str | None, tuple | None]:
    """(sha256, size and format of the image, its data URL, error) for a row's image cell."""
    if not cell:
        return None, None, (Status.MISSING_IMAGE, "the dataset row has no image (null cell)")
    found = cache.read_image(row_idx) if cache else None
    if found is None:
        return None, None, (Status.MISSING_IMAGE,
                            "the image is not in the cache or failed its sha256 check")
    data, entry = found
    meta = {"sha256": entry["sha256"], "bytes": len(data),
            "format": (_sniff_image(data) or (entry.get("format"),))[0]}
    if not _image_is_whole(data, meta["format"]):
        return None, None, (Status.MISSING_IMAGE,
                            f"the cached image is truncated ({len(data):,} bytes)")
    return meta, _data_url(data), None


def _map_image_urls(body: dict, change: Callable[[str], str]) -> dict:
    """A copy of the body with `change` applied to the URL of each image part."""
    def part(p: Any) -> Any:
        if (isinstance(p, dict) and p.get("type") == "image_url"
                and isinstance(p.get("image_url"), dict)):
            return {**p, "image_url": {**p["image_url"],
                                       "url": change(p["image_url"].get("url", ""))}}
        return p

    messages = [{**m, "content": [part(p) for p in m["content"]]}
                if isinstance(m.get("content"), list) else m
                for m in body["messages"]]
    return {**body, "messages": messages}


def _redact_images(body: dict, image: dict | None) -> dict:
    """A copy of the body with each data URL replaced by the image's sha256 and size."""
    if not image:
        return body
    stub = f"<image sha256={image['sha256']} bytes={image['bytes']} format={image['format']}>"
    return _map_image_urls(body, lambda url: stub if url.startswith("data:") else url)


@dataclasses.dataclass
class _Sample:
    """One document ready to send: its request body and what identifies it."""

    row_idx: int
    target: str
    body: dict
    payload: bytes  # the exact bytes sent
    doc_hash: str
    body_hash: str
    group: str | None = None  # a subset the results are also split by (chartqa: human/augmented)
    image: dict | None = None  # sha256, bytes, format of the image sent
    error: tuple[str, str] | None = None  # (status, reason) when the sample cannot be sent
    repeat: int = 0  # which of the --repeats sends of this document


@dataclasses.dataclass
class Task:
    """An lm-eval task as nano-eval runs it."""

    name: str
    data: _DatasetRef
    version: str
    generation_kwargs: dict  # the task yaml's, which --gen_kwargs update
    headline: str
    metric_names: list  # per-sample score keys, in report order
    messages: Callable[[dict, str | None, APIConfig], list]  # (doc, image data URL, config)
    target: Callable[[dict], str]
    score: Callable[[str, str], tuple[dict, dict]]  # (response, target) -> (extracted, scores)
    doc_identity: Callable[[dict, dict], dict]  # the fields that identify a doc (for its hash)
    answer_key: str  # the extracted answer the headline metric scores
    # the question's user turn, {field} where the doc's text goes (the report shows the text)
    template: str
    image_column: str | None = None
    group: Callable[[dict], str | None] = lambda row: None

    def finds_answer(self, text: str | None) -> bool:
        """Whether the task's extractor finds an answer in `text`."""
        return bool(text) and self.score(text, "")[0][self.answer_key] not in ("", _INVALID)

    def request_params(self, config: APIConfig) -> dict:
        """Every body key but messages and model, as local-chat-completions builds them:
        max_tokens, temperature, stop (the first 4 of `until`), seed, then whatever is
        left of the generation kwargs (a `stop` or `seed` there replaces ours in place); with
        --logprobs, then "logprobs": true and "top_logprobs": K."""
        gen = {**self.generation_kwargs, **config.gen_kwargs}
        gen.pop("do_sample", None)
        max_tokens = (gen.pop("max_tokens") if "max_tokens" in gen
                      else gen.pop("max_gen_toks", config.max_gen_toks or 256))
        temperature = gen.pop("temperature", 0)
        until = gen.pop("until", None)
        stop = [] if until is None else [until] if isinstance(until, str) else list(until)
        params = {"max_tokens": max_tokens, "temperature": temperature, "stop": stop[:4],
                  "seed": config.seed} | gen
        if config.logprobs:
            params |= {"logprobs": True, "top_logprobs": config.logprobs}
        return params

    def prepare(self, config: APIConfig) -> tuple[dict, str | None]:
        """What build() needs that is the same for every request of a run: request_params
        and the JSON text of the body without its messages."""
        params = self.request_params(config)
        return params, (None if "messages" in params
                        else json.dumps({"model": config.model} | params))

    def build(self, row: dict, config: APIConfig, cache: _DatasetCache | None = None,
              repeat: int = 0, prepared: tuple[dict, str | None] | None = None) -> _Sample:
        """The request for one document. Repeat i of a sampled (temperature > 0) request
        is sent with seed + i; at temperature 0 every repeat sends the same body.
        `prepared`: prepare(config), when the caller made it once for the run."""
        doc = row["row"]
        image, url, error = _load_image(cache, row["row_idx"], doc.get(self.image_column)) \
            if self.image_column else (None, None, None)
        params, rest = prepared or (self.request_params(config), None)
        if repeat and params.get("temperature") and isinstance(params.get("seed"), int):
            params, rest = {**params, "seed": params["seed"] + repeat}, None
        body = {"messages": self.messages(doc, url, config), "model": config.model} | params
        payload = _encode_body(body, rest)
        identity = self.doc_identity(doc, image or {})
        return _Sample(row_idx=row["row_idx"], target=self.target(doc), body=body, payload=payload,
                       doc_hash=_sha256(json.dumps(identity, sort_keys=True).encode()),
                       body_hash=_sha256(payload), group=self.group(doc), image=image, error=error,
                       repeat=repeat)


@functools.lru_cache(maxsize=None)
def _gsm8k_fewshot(system_instruction: str | None, multiturn: bool) -> tuple:
    """The messages before the question, built once: (messages, single-turn prefix)."""
    turns = [(_GSM8K_TEMPLATE.format(question=q), a) for q, a in _GSM8K_FEWSHOT]
    messages = [{"role": "system", "content": system_instruction}] if system_instruction else []
    # lm-eval's single-turn rendering: target_delimiter "" and fewshot_delimiter "\n\n"
    if not multiturn:
        return messages, "".join(u + a + "\n\n" for u, a in turns)
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages, ""


def _gsm8k_messages(doc: dict, image_url: str | None, config: APIConfig) -> list:
    fewshot, prefix = _gsm8k_fewshot(config.system_instruction, config.fewshot_as_multiturn)
    return fewshot + [{"role": "user",
                       "content": prefix + _GSM8K_TEMPLATE.format(question=doc["question"])}]


def _gsm8k_target(doc: dict) -> str:
    return doc["answer"].split("####")[-1].strip()


def _regex_filter(pattern: re.Pattern, response: str) -> str:
    """lm-eval's RegexFilter with group_select -1: the last match's first non-empty
    group, stripped; "[invalid]" when nothing matches."""
    matches = pattern.findall(response if isinstance(response, str) else "")
    match = matches[-1] if matches else _INVALID
    if isinstance(match, tuple):
        match = next((g for g in match if g), _INVALID)
    return match.strip()


def _gsm8k_exact_match(prediction: str, reference: str) -> float:
    """lm-eval's exact_match with ignore_case and gsm8k_cot_llama's regexes_to_ignore."""
    for pattern in _GSM8K_IGNORE:
        prediction = pattern.sub("", prediction)
        reference = pattern.sub("", reference)
    return float(prediction.lower() == reference.lower())


def score_gsm8k(response: str, target: str) -> tuple[dict, dict]:
    extracted = {name: _regex_filter(pattern, response) for name, pattern in _GSM8K_FILTERS.items()}
    scores = {f"exact_match,{name}": _gsm8k_exact_match(answer, target)
              for name, answer in extracted.items()}
    return extracted, scores


def _chartqa_messages(doc: dict, image_url: str | None, config: APIConfig) -> list:
    text = {"type": "text", "text": _CHARTQA_TEMPLATE.format(query=doc["query"])}
    content = ([{"type": "image_url", "image_url": {"url": image_url, "detail": "auto"}}, text]
               if image_url else [text])
    messages = ([{"role": "system", "content": config.system_instruction}]
                if config.system_instruction else [])
    return messages + [{"role": "user", "content": content}]


def _chartqa_target(doc: dict) -> str:
    """`{{ label[0] }}`; a label that is a Python list literal is evaluated by lm-eval's
    doc_to_target and turned back into a string by str() in process_results."""
    label = str(doc["label"][0] if isinstance(doc.get("label"), list) and doc["label"]
                else doc.get("label", ""))
    if len(label) >= 2 and label[0] == "[" and label[-1] == "]":
        try:
            return str(ast.literal_eval(label))
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return label
    return label


def _chartqa_exact_match(prediction: str, reference: str) -> float:
    match = re.search(r"(?:Final Answer|FINAL ANSWER): (.+)$", prediction, re.IGNORECASE)
    if not match:
        return 0.0
    return float(match.group(1).strip().lower().removesuffix(".") == reference.strip().lower())


def _chartqa_final_answer(prediction: str) -> str:
    """ExplicitPromptRelaxedCorrectness's parse: the first non-empty line after the
    last "answer:" (any case), markdown characters removed."""
    text = re.sub(r"([aA]nswer)\**:\**", r"\1:", prediction)
    start = text.lower().rfind("answer:")
    if start == -1:
        return ""
    line = next((ln.strip() for ln in text[start + len("answer:"):].split("\n") if ln.strip()), "")
    return re.sub(r"[*_\[\]()]", "", line)


def _strip_end_punctuation(text: str) -> str:
    while text and (text[-1] in string.punctuation or text[-1].isspace()) and text[-1] != "%":
        text = text[:-1]
    return text


def _relaxed_preprocess(text: str) -> str:
    if not any(ch.isdigit() for ch in text):
        # a lone quote becomes "", as in lm-eval
        if text[:1] in ("'", '"') and text.endswith(text[0]):
            return text[1:-1]
        return text
    return _strip_end_punctuation(text).replace(",", "").replace("$", "")


def _to_float(text: str) -> tuple[float | None, bool]:
    text = text.strip()
    try:
        return float(text.rstrip("%")), text.endswith("%")
    except ValueError:
        return None, False


def _within(prediction: float, target: float, tolerance: float = 0.05) -> float:
    return 1.0 if abs(prediction - target) / max(abs(target), 1e-10) <= tolerance else 0.0


def _relaxed_correctness(answer: str, reference: str) -> float:
    """RelaxedCorrectness: numbers within 5% (with percent/decimal equivalence),
    single-letter options by first letter, else case-insensitive text equality."""
    prediction = _relaxed_preprocess(answer)
    target = _relaxed_preprocess(reference)
    p, p_pct = _to_float(prediction)
    t, t_pct = _to_float(target)
    if p is not None and t is not None:
        value = _within(p, t)
        if value != 1.0 and (p_pct or t_pct):
            value = max(value, _within(p / 100 if p_pct else p, t),
                        _within(p, t / 100 if t_pct else t))
        return value
    if target.isalpha() and len(target) == 1 and prediction:
        return float(prediction[0].lower() == target.lower())
    return float(prediction.rstrip(string.punctuation).lower() == target.lower())


def _chartqa_found_anywhere(prediction: str, reference: str) -> float:
    """anywhere_accuracy when no answer parses: the reference found anywhere in the text."""
    try:
        number = float(reference)
        if int(number) == number:
            number = int(number)
    except (ValueError, OverflowError):
        candidates = [f"is {reference}", f"was {reference}", f" {reference}.", f"are {reference}",
                      f"\n\n{reference}"]
        return float(any(c.lower() in prediction for c in candidates))
    return float(format(number, ",") in prediction or str(number) in prediction
                 or f"{number}%" in prediction)


def score_chartqa(response: str, target: str) -> tuple[dict, dict]:
    answer = _chartqa_final_answer(response)
    relaxed = _relaxed_correctness(answer, target) if answer else 0.0
    scores = {
        "exact_match": _chartqa_exact_match(response, target),
        "relaxed_accuracy": relaxed,
        "anywhere_accuracy": relaxed if answer else _chartqa_found_anywhere(response, target),
    }
    return {"none": response, "final_answer": answer}, scores


def _answer_text(content: str | None, keep_think: bool, think_end: str = _THINK_END) -> str:
    """What gets scored: the content after the last `think_end` token, lstripped
    (lm-eval's think_end_token behaviour), unless --keep_think."""
    text = content or ""
    if not keep_think and think_end and think_end in text:
        text = text[text.rindex(think_end) + len(think_end):].lstrip()
    return text


TASKS: dict[str, Task] = {
    "gsm8k_cot_llama": Task(
        name="gsm8k_cot_llama",
        data=_DatasetRef("openai/gsm8k", "main", "test", ("question", "answer")),
        version="4.0",
        generation_kwargs={"until": _GSM8K_UNTIL, "do_sample": False},
        headline="exact_match,strict-match",
        metric_names=["exact_match,strict-match", "exact_match,flexible-extract"],
        messages=_gsm8k_messages,
        target=_gsm8k_target,
        score=score_gsm8k,
        answer_key="strict-match",
        template=_GSM8K_TEMPLATE,
        doc_identity=lambda doc, image: {"question": doc["question"], "answer": doc["answer"]},
    ),
    "chartqa": Task(
        name="chartqa",
        data=_DatasetRef("HuggingFaceM4/ChartQA", "default", "test", ("query",), "image",
                         ("label",)),
        version="0.0",
        generation_kwargs={"until": [], "temperature": 0.0, "do_sample": False,
                           "max_gen_toks": 512},
        headline="relaxed_accuracy",
        metric_names=["exact_match", "relaxed_accuracy", "anywhere_accuracy"],
        messages=_chartqa_messages,
        target=_chartqa_target,
        score=score_chartqa,
        answer_key="final_answer",
        template=_CHARTQA_TEMPLATE,
        doc_identity=lambda doc, image: {"query": doc["query"], "label": doc["label"],
                                         "human_or_machine": doc.get("human_or_machine"),
                                         "image_sha256": image.get("sha256")},
        image_column="image",
        group=lambda doc: {0: "human", 1: "augmented"}.get(doc.get("human_or_machine"))
        if type(doc.get("human_or_machine")) is int else None,
    ),
}


# ============================================================================
# 6. The sample log
# ============================================================================


# The fields of a sample record that the tools read, and the types they must have
_RECORD_FIELDS = {"task": str, "doc_hash": str, "body_hash": str, "url": str, "status": str,
                  "row_idx": int, "repeat": int, "scores": dict, "response": dict,
                  "extracted": dict, "request": dict, "image": dict, "target": str, "group": str,
                  "error": str, "reasoning_flags": list}


def _record_problem(record: Any) -> str | None:
    """Why a parsed log line is not a sample record nano-eval wrote, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name in ("task", "doc_hash", "status"):
        if record.get(name) is None:
            return f"no {name!r}"
    for name, kind in _RECORD_FIELDS.items():
        value = record.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"{name!r} is not of type {kind.__name__}"
    if not all(_is_finite(v) for v in (record.get("scores") or {}).values()):
        return "a score is not a number"
    if not all(type(flag) is str for flag in record.get("reasoning_flags") or ()):
        return "a reasoning flag is not text"
    for name in ("latency", "attempts"):
        if record.get(name) is not None and not _is_finite(record[name]):
            return f"{name!r} is not a number"
    messages = (record.get("request") or {}).get("messages", [])
    if type(messages) is not list or not set(map(type, messages)) <= {dict}:
        return "request 'messages' is not a list of messages"
    image = record.get("image")
    if image is not None and not (isinstance(image.get("sha256"), str)
                                  and type(image.get("bytes")) is int
                                  and isinstance(image.get("format"), str)):
        return "'image' is not {sha256, bytes, format}"
    return _response_problem(record.get("response") or {})


_RESPONSE_FIELDS = {"content": str, "reasoning_content": str, "finish_reason": str,
                    "http_status": int, "usage": dict, "logprobs": list}


def _response_problem(response: dict) -> str | None:
    for name, kind in _RESPONSE_FIELDS.items():
        value = response.get(name)
        # what json.loads makes is of the exact type
        if value is not None and type(value) is not kind:
            return f"response {name!r} is not of type {kind.__name__}"
    usage = response.get("usage")
    for name in ("prompt_tokens", "completion_tokens", "total_tokens") if usage else ():
        count = usage.get(name)
        if count is not None and (type(count) is not int or not 0 <= count < 2 ** 53):
            return "a usage count is not a count"
    logprobs = response.get("logprobs")
    if logprobs and not all(_is_logged_token(entry) and all(map(_is_logged_alternative, entry[2]))
                            for entry in logprobs):
        return "logprobs are not [token, logprob, [[token, logprob], ...]] per token"
    return None


def _is_logged_alternative(entry: Any) -> bool:
    """[token, logprob]: as _logged_logprobs writes it (a logprob may be null, or NaN in another
    tool's log)."""
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], (str, dict))
            and (entry[1] is None or _is_number(entry[1])))


def _is_logged_token(entry: Any) -> bool:
    return (isinstance(entry, list) and len(entry) == 3 and _is_logged_alternative(entry[:2])
            and isinstance(entry[2], list))


class _Logged(NamedTuple):
    """A sample record as everything that reads one takes it: the results (aggregate), resume,
    compare and the report. In a log every field but task, doc_hash and status is optional (an
    older nano-eval or a hand wrote it): each is read here once, with its empty value, and
    _record_problem has checked its type."""
    task: str
    doc_hash: str
    row_idx: int | None
    repeat: int
    status: str
    scores: dict
    extracted: dict
    target: str | None
    content: str
    reasoning: str | None
    finish_reason: str | None
    usage: dict
    http_status: int | None
    logprobs: list | None
    request: dict
    image: dict | None
    group: str | None
    error: str | None
    latency: float
    attempts: int
    reused: bool
    reasoning_flags: list
    at: tuple | None  # (log path, byte offset) where the tools read it (see _full_record)

    @classmethod
    def of(cls, record: dict, at: tuple | None = None) -> _Logged:
        response = record.get("response") or {}
        return cls(
            task=record["task"], doc_hash=record["doc_hash"], row_idx=record.get("row_idx"),
            repeat=record.get("repeat") or 0, status=record["status"],
            scores=record.get("scores") or {}, extracted=record.get("extracted") or {},
            target=record.get("target"),
            content=response.get("content") or "", reasoning=response.get("reasoning_content"),
            finish_reason=response.get("finish_reason"), usage=response.get("usage") or {},
            http_status=response.get("http_status"), logprobs=response.get("logprobs") or None,
            request=record.get("request") or {}, image=record.get("image"),
            group=record.get("group"), error=record.get("error"),
            latency=record.get("latency") or 0.0, attempts=record.get("attempts") or 0,
            reused=bool(record.get("reused")), reasoning_flags=record.get("reasoning_flags") or [],
            at=at)

    def score(self, metric: str) -> float:
        return float(self.scores.get(metric, 0.0))

    @property
    def prompt_tokens(self) -> int | None:
        count = self.usage.get("prompt_tokens")
        return count if isinstance(count, int) else None

    @property
    def completion_tokens(self) -> int | None:
        count = self.usage.get("completion_tokens")
        return count if isinstance(count, int) else None


# bytes of log lines parsed as one JSON array: their records share key strings (40% less memory)
_READ_BATCH = 1 << 18


def _parsed_lines(file: BinaryIO) -> Iterator[tuple[int, int, Any]]:
    """(line number, byte offset, parsed value) of each line of the file that is JSON. Lines
    are parsed _READ_BATCH bytes at a time; a batch that is not one JSON object per line is
    parsed line by line (bytes that are not UTF-8 read as U+FFFD)."""
    number, offset = 0, 0
    while True:
        lines = file.readlines(_READ_BATCH)
        if not lines:
            return
        starts = list(itertools.accumulate(map(len, lines), initial=offset))
        try:
            values = json.loads(b"[" + b",".join(lines) + b"]")
        except (ValueError, RecursionError):
            values = None
        if (values is not None and len(values) == len(lines)
                and all(type(v) is dict for v in values)):
            yield from zip(range(number + 1, number + len(lines) + 1), starts, values)
        else:
            for line_number, start, line in zip(itertools.count(number + 1), starts, lines):
                try:
                    value = json.loads(line.decode("utf-8", "replace"))
                except ValueError:  # a line cut short by a crash
                    continue
                except RecursionError:  # JSON, but nested too deeply to be a record
                    value = None
                yield line_number, start, value
        number, offset = number + len(lines), starts[-1]


def _read_located(path: Path, strict: bool = False) -> Iterator[tuple[int, dict]]:
    """(byte offset, record) of each record of a sample log. A line that is not JSON (cut
    short by a crash) is skipped; so is one that is JSON but not a sample record, or with
    `strict` it is a UsageError naming it."""
    try:
        with open(path, "rb") as f:
            for number, offset, record in _parsed_lines(f):
                problem = _record_problem(record)
                if problem and strict:
                    raise UsageError(f"{path}:{number}: not a nano-eval sample record ({problem})")
                if not problem:
                    yield offset, record
    except FileNotFoundError:
        return


def _read_records(path: Path, strict: bool = False) -> Iterator[dict]:
    return (record for _, record in _read_located(path, strict))


def _lock_file(file: Any) -> bool:
    """An exclusive lock on an open file, held until it is closed; False if another process
    holds it. Where the system has no flock (Windows), always True."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


class _SampleLog:
    """The per-sample JSONL log: one line per sample, appended in batches (every
    _FLUSH_EVERY seconds and at the end, also when the run is interrupted), so a crash
    loses at most the last batch and the requests in flight. It is also the resume state."""

    def __init__(self, path: Path, log_images: bool = False):
        self.path = path
        self.log_images = log_images
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torn = self.ends_torn(path)
            # never through a symbolic link planted at the log's path; one run at a time per log
            fd = os.open(path,
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                         0o644)
            self._file = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
        except OSError as exc:
            why = "it is a symbolic link" if path.is_symlink() else exc.strerror or exc
            raise UsageError(f"cannot write the sample log {path}: {why}") from None
        if not _lock_file(self._file):
            self._file.close()
            raise UsageError(f"another nano-eval run is writing the sample log {path}: "
                             "wait for it, or give this run its own --log_samples")
        # a line cut short by a crash or a full disk: end it, so the next record starts a line
        if torn:
            self._file.write("\n")

    @staticmethod
    def ends_torn(path: Path) -> bool:
        """Whether the file's last line has no newline (_read_records skips that line)."""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return False
                f.seek(-1, os.SEEK_END)
                return f.read(1) != b"\n"
        except FileNotFoundError:
            return False

    def completed(self, task: str, url: str) -> dict:
        """(doc_hash, body_hash, repeat) -> the last valid record of `task` in the log. A log
        holds one server's samples: compare and replay read it as one run."""
        done: dict = {}
        for record in _read_records(self.path):
            if record.get("task") != task:
                continue
            if record.get("url") != url:
                raise UsageError(f"{self.path} holds samples from {record.get('url')}, not {url}: "
                                 "give this server its own --log_samples or --output")
            if record.get("status") in Status.SCORED:
                done[(record.get("doc_hash"), record.get("body_hash"),
                      record.get("repeat", 0))] = record
        return done

    @staticmethod
    def line(record: dict) -> str:
        return _SECRETS.scrub_json(json.dumps(record, ensure_ascii=False)) + "\n"

    def write_lines(self, lines: list) -> None:
        """Whole lines, then flushed."""
        self._file.write("".join(lines))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ============================================================================
# 7. Runner
# ============================================================================


class _Progress:
    """One self-rewriting line on stderr (done/total, rate, ETA) when it is a terminal."""

    def __init__(self, label: str, total: int, enabled: bool | None = None):
        self.label, self.total, self.done = label, total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self._last = time.monotonic()

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total}  {rate:.1f}/s  "
                             f"ETA {eta:.0f}s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")


def _stop_on_first_failures(outcome: _Outcome, config: APIConfig) -> None:
    """Statuses that, before any success, mean every request would fail the same way."""
    if (error := _refusal(outcome.http_status, config.chat_url)):
        raise error
    if outcome.status == "http_404":
        raise ServerError(f"{config.chat_url} answered 404 ({outcome.error}): "
                          "check --base_url and --model")


def _outcome_from_record(record: dict) -> _Outcome:
    """A logged answer, taken again on resume (only ok and truncated ones are)."""
    logged = _Logged.of(record)
    return _Outcome(logged.status, content=logged.content, reasoning=logged.reasoning,
                    finish_reason=logged.finish_reason, usage=logged.usage or None,
                    http_status=logged.http_status, error=logged.error, latency=logged.latency,
                    attempts=logged.attempts, logprobs=logged.logprobs)


def _reasoning_flags(task: Task, outcome: _Outcome, answer: str) -> list:
    """Why a reasoning model may have scored badly: the task's extractor finds an answer
    in the reasoning channel but none in the content, or the token budget ran out while
    it was still thinking."""
    flags = []
    content = outcome.content or ""
    if outcome.reasoning and not task.finds_answer(answer) and task.finds_answer(outcome.reasoning):
        flags.append("answer_only_in_reasoning")
    if (outcome.finish_reason == "length"
            and (not content.strip() or ("<think>" in content and _THINK_END not in content)
                 or (outcome.reasoning and not answer.strip()))):
        flags.append("budget_ran_out_in_reasoning")
    return flags


def _sample_record(task: Task, config: APIConfig, sample: _Sample, outcome: _Outcome) -> dict:
    """One sample's record: its request, the answer, its status and scores."""
    response_text = (_answer_text(outcome.content, config.keep_think, config.think_end_token)
                     if outcome.valid else "")
    if outcome.valid:
        extracted, scores = task.score(response_text, sample.target)
    else:
        extracted, scores = None, {name: 0.0 for name in task.metric_names}
    return {
        "task": task.name, "row_idx": sample.row_idx, "repeat": sample.repeat,
        "doc_hash": sample.doc_hash,
        "body_hash": sample.body_hash, "url": config.chat_url,
        "request": _redact_images(sample.body, sample.image),
        # a server may echo the key or a header back: _SampleLog.line and every writer scrub it
        "response": {"content": outcome.content, "reasoning_content": outcome.reasoning,
                     "finish_reason": outcome.finish_reason, "usage": outcome.usage,
                     "http_status": outcome.http_status,
                     **({"logprobs": outcome.logprobs} if outcome.logprobs is not None else {})},
        "status": outcome.status, "error": outcome.error,
        "target": sample.target,
        "extracted": extracted, "scores": scores, "group": sample.group, "image": sample.image,
        "latency": round(outcome.latency, 4), "attempts": outcome.attempts,
        "reasoning_flags": _reasoning_flags(task, outcome, response_text),
    }


class _ServerWatch:
    """What a run's answers tell about its server, each said once: it stopped answering, it
    sends no logprobs although asked for them, or a logprob no probability has."""

    def __init__(self, config: APIConfig):
        self.config = config
        self.lock = threading.Lock()
        self.successes = 0
        self.failures_in_a_row = 0
        self.down = False
        self.logprobs_said = False

    def count(self, outcome: _Outcome) -> None:
        """Successes, and network failures in a row: after max(4, --num_concurrent) of them the
        server is taken for down, and nothing more is sent to it."""
        down = False
        with self.lock:
            if outcome.status in Status.NETWORK:  # after all retries
                self.failures_in_a_row += 1
                if self.failures_in_a_row >= max(4, self.config.num_concurrent) and not self.down:
                    self.down = down = True
            else:
                self.failures_in_a_row = 0
                self.successes += outcome.http_status is not None and outcome.http_status < 400
        if down:
            _warn(f"{self.config.chat_url} stopped answering ({self.failures_in_a_row} requests "
                  f"in a row ended in {outcome.status} after every retry): "
                  "no more requests are sent to it")

    def check_logprobs(self, outcome: _Outcome, asked: bool) -> None:
        if outcome.valid and outcome.logprobs is None and asked:
            self.say_once("answered without logprobs although asked for them: "
                          "this run's numerics verdict will be 'unknown'")
        elif outcome.logprobs and any(_is_finite(e[1]) and e[1] > _POSITIVE_LOGPROB
                                      for e in outcome.logprobs):
            self.say_once("sent a logprob above 0, which no probability has: "
                          "its logprobs are wrong, and a comparison will say so")

    def say_once(self, what: str) -> None:
        """About logprobs: the first thing said is the only one."""
        with self.lock:
            said, self.logprobs_said = self.logprobs_said, True
        if not said:
            _warn(f"{self.config.chat_url} {what}")


class _TaskRun:
    """The state of one task's run: sends each sample, scores it, logs it."""

    def __init__(self, task: Task, config: APIConfig, rows: list, cache: _DatasetCache,
                 log: _SampleLog | None, progress: _Progress, resume: bool = True,
                 repeats: int = 1):
        self.task, self.config, self.rows, self.cache, self.log = task, config, rows, cache, log
        self.progress = progress
        self.repeats = repeats
        self.client = _ChatClient(config)
        self.watch = _ServerWatch(config)
        self.prepared = task.prepare(config)  # the same for every request of the run
        previous = log.completed(task.name, config.chat_url) if log else {}
        # (doc_hash, body_hash, repeat) -> a record to reuse
        self.logged = previous if resume else {}
        self.results: dict[tuple, dict] = {}  # (repeat, row_idx) -> record
        # the workers' shared state: the documents, finished records
        self.lock = threading.Lock()
        self.lines: list = []  # log lines not yet written
        self.finished = 0  # records since the last flush
        self.closed = False  # after the final flush: nothing more is recorded
        self.building = threading.Lock() if task.image_column else None

    def records(self) -> list:
        """The finished records in dataset order, repeat by repeat, as _Logged."""
        return [_Logged.of(self.results[key]) for key in sorted(self.results)]

    def send(self, sample: _Sample) -> _Outcome:
        """The sample's request, with retries; not sent without its image, nor to a server that
        stopped answering."""
        if sample.error:
            return _Outcome(sample.error[0], error=sample.error[1], attempts=0)
        if self.watch.down:
            return _Outcome(Status.CONNECTION, error=_NOT_SENT, attempts=0)
        outcome = self.client.send_blocking(sample.payload)
        if self.client.stopped.is_set():
            raise _Stopped()  # the run ended while it was in flight (close() cut it)
        self.watch.count(outcome)
        self.watch.check_logprobs(outcome, asked=bool(self.prepared[0].get("logprobs")))
        return outcome

    def refused_logprobs(self, outcome: _Outcome) -> bool:
        """An HTTP 400 about logprobs: from now on they are not asked for (the run goes on)."""
        if outcome.http_status != 400 or "logprob" not in (outcome.error or "").lower():
            return False
        with self.lock:
            if self.prepared[0].get("logprobs"):
                self.prepared = self.task.prepare(dataclasses.replace(self.config, logprobs=None))
        self.watch.say_once(f"refused logprobs ({outcome.error}): they are no longer "
                            "asked for, and this run's numerics verdict will be 'unknown'")
        return True

    def flush(self, final: bool = False) -> None:
        """Appends the finished records' lines to the log and advances the progress line.
        After the final flush, records that still finish are dropped."""
        with self.lock:
            lines, self.lines = self.lines, []
            finished, self.finished = self.finished, 0
            self.closed = self.closed or final
        if lines:
            self.log.write_lines(lines)
        if finished:
            self.progress.advance(finished)

    def build(self, repeat: int, row: dict) -> _Sample:
        """One document's request. Images are built one at a time (CPU work under the GIL either
        way), so that the workers do not all hold an image in its three encodings at once."""
        if self.building is None:
            return self.task.build(row, self.config, self.cache, repeat, self.prepared)
        with self.building:
            return self.task.build(row, self.config, self.cache, repeat, self.prepared)

    def run_one(self, repeat: int, row: dict) -> bool:
        """Builds, sends (or reuses from the log), scores and records one document; False when
        the run ended while it was in flight (it is then not recorded)."""
        log = self.log
        sample = self.build(repeat, row)
        # the image's data URL is in the payload: not kept twice while in flight
        if sample.image and not (log and log.log_images):
            sample.body = _redact_images(sample.body, sample.image)
        previous = self.logged.get((sample.doc_hash, sample.body_hash, repeat))
        outcome = _outcome_from_record(previous) if previous else self.send(sample)
        if previous is None and self.refused_logprobs(outcome):
            sample = self.build(repeat, row)
            outcome = self.send(sample)
        record = _sample_record(self.task, self.config, sample, outcome)
        line = None
        if previous is None and log:
            line = log.line({**record, "request": sample.body} if log.log_images else record)
        # not needed for the results; keeps memory flat in the number of samples
        del record["request"]
        record["reused"] = previous is not None
        with self.lock:
            if self.closed:
                return False
            self.results[(repeat, sample.row_idx)] = record
            self.finished += 1
            if line is not None:
                self.lines.append(line)
        if self.watch.successes == 0:
            _stop_on_first_failures(outcome, self.config)
        return True

    def work(self) -> None:
        """One worker of the pool, until the documents run out or the run stops."""
        try:
            while not self.client.stopped.is_set():
                with self.lock:  # a generator is not thread-safe
                    item = next(self.todo, None)
                if item is None or not self.run_one(*item):
                    return
        except _Stopped:
            return

    async def drive(self) -> None:
        """asyncio drives a pool of N blocking workers (N = --num_concurrent): each takes the
        next document and builds, sends, scores and records it; every _FLUSH_EVERY seconds the
        event loop appends the finished records to the log and advances the progress line."""
        # whole passes, one by one
        self.todo = ((repeat, row) for repeat in range(self.repeats) for row in self.rows)
        count = min(self.config.num_concurrent, len(self.rows)) or 1
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(count, thread_name_prefix="nano-eval-worker")
        workers: set = set()
        try:
            workers = {loop.run_in_executor(pool, self.work) for _ in range(count)}
            while workers:
                done, workers = await asyncio.wait(workers, timeout=_FLUSH_EVERY,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                self.flush()
                errors = [worker.exception() for worker in done if worker.exception()]
                if errors:
                    # a worker's error (e.g. AuthError before any success) ends the run
                    raise errors[0]
        finally:
            self.flush(final=True)  # what finishes from now on is not recorded
            self.client.close()  # requests still in flight end, nothing more is sent
            for worker in workers:
                worker.cancel()  # not waited for (so what they end with is not reported either)
            pool.shutdown(wait=False)


async def run_task(task: Task, config: APIConfig, max_samples: int | None = None, *,
                   data_dir: str | None = None, log_dir: str | Path | None = None,
                   log_images: bool = False, progress: bool | None = None,
                   datasets_server: _DatasetsClient | None = None, sink: dict | None = None,
                   resume: bool = True, repeats: int = 1) -> dict:
    """Runs one task against one server and returns its results (the per-task dict of the README).

    With `log_dir`, every sample is appended to `<log_dir>/samples_<task>.jsonl` as it
    ends, and samples that server already answered in that log are not sent again
    (unless `resume=False`). `repeats` sends every document that many times (whole
    passes, one after the other) to measure the server's own noise.
    Cancelling the coroutine (Ctrl-C) leaves the log complete up to that point, and
    the partial results in `sink[task.name]`."""
    if max_samples is not None:
        max_samples = _checked("max_samples", _positive_int, max_samples)
    repeats = _checked("repeats", _positive_int, repeats)
    start = time.perf_counter()
    if config.model is None:
        config.model = await asyncio.get_running_loop().run_in_executor(
            None, _resolve_model, config, None)
    rows, cache = await _load_rows(task.data, max_samples, _resolve_data_dir(data_dir),
                                   task.image_column, datasets_server)
    log = _SampleLog(Path(log_dir) / f"samples_{task.name}.jsonl", log_images) if log_dir else None
    run = _TaskRun(task, config, rows, cache, log,
                   _Progress(task.name, len(rows) * repeats, progress), resume, repeats)
    if run.logged:
        _info(f"{task.name}: resuming from {log.path}: samples this server already answered "
              "there are not sent again (--no_resume to send them all)")
    complete = False
    try:
        await run.drive()  # asyncio drives the worker threads that send the samples
        complete = True
    finally:
        run.progress.close()
        if log:
            log.close()
        result = _aggregate(task, run.records(), planned=len(rows) * repeats,
                            elapsed=time.perf_counter() - start,
                            revisions=cache.revisions(range(0, len(rows), _PAGE_SIZE)),
                            complete=complete, repeats=repeats,
                            temperature=task.request_params(config).get("temperature"))
        if sink is not None:
            sink[task.name] = result
    return result


# ============================================================================
# 8. Results
# ============================================================================

# Published scores for these exact tasks, matched on the served model name (see
# _reference_key). They come from other harnesses, hence the tolerance in expectation().
_REFERENCE_SCORES = {
    # Meta's Llama 3.1 model card: GSM-8K (CoT), 8-shot, em_maj1@1 (instruction-tuned models)
    ("gsm8k_cot_llama", "llama-3.1-8b-instruct"):
        (0.845, "Meta Llama 3.1 model card, GSM-8K 8-shot CoT"),
    ("gsm8k_cot_llama", "llama-3.1-70b-instruct"):
        (0.951, "Meta Llama 3.1 model card, GSM-8K 8-shot CoT"),
    # Meta's Llama 3.2 model card: GSM8K (CoT), 8-shot, em_maj1@1
    ("gsm8k_cot_llama", "llama-3.2-1b-instruct"):
        (0.444, "Meta Llama 3.2 model card, GSM8K 8-shot CoT"),
    ("gsm8k_cot_llama", "llama-3.2-3b-instruct"):
        (0.777, "Meta Llama 3.2 model card, GSM8K 8-shot CoT"),
    # vLLM's CI baseline for lm-eval's chartqa prompt, full test split, relaxed accuracy
    ("chartqa", "qwen2.5-vl-7b-instruct"):
        (0.855, "vLLM CI baseline, lm-eval chartqa"),
    # Meta's Llama 3.2 Vision model card: ChartQA (test), CoT, relaxed accuracy
    ("chartqa", "llama-3.2-11b-vision-instruct"):
        (0.834, "Meta Llama 3.2 Vision model card, ChartQA CoT"),
    ("chartqa", "llama-3.2-90b-vision-instruct"):
        (0.855, "Meta Llama 3.2 Vision model card, ChartQA CoT"),
}


def _mean_stderr(values: list) -> tuple[float | None, float | str]:
    """lm-eval's mean and its stderr: sample stdev (n-1) / sqrt(n); "N/A" below 2 values."""
    n = len(values)
    mean = sum(values) / n if n else None
    if n < 2:
        return mean, "N/A"
    variance = sum((x - mean) ** 2 for x in values) / (n - 1)
    return mean, math.sqrt(variance) / math.sqrt(n)


def _stderr_key(metric: str) -> str:
    """lm-eval's spelling: exact_match,strict-match -> exact_match_stderr,strict-match."""
    name, sep, filt = metric.partition(",")
    return f"{name}_stderr{sep}{filt}"


def _quantile(values: list, q: float) -> float | None:
    """The q-quantile of sorted `values` (nearest rank); None when empty."""
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] if values else None


def _counts(values: Iterable) -> dict:
    """{value: how many}, sorted, with None (a failed request has no finish_reason) as "none"."""
    return dict(sorted(collections.Counter("none" if v is None else str(v)
                                           for v in values).items()))


def _by_document(records: list) -> dict:
    """{row_idx: its records, repeat by repeat}, in dataset order."""
    groups: dict = {}
    for record in sorted(records, key=lambda r: (r.row_idx or 0, r.repeat)):
        groups.setdefault(record.row_idx or 0, []).append(record)
    return groups


def _self_agreement(documents: list) -> dict:
    """Of documents sent several times and answered every time (a failed request is a
    failure, not a different answer): the share whose responses are all identical, and
    whose scores are all identical."""
    documents = [group for group in documents if all(r.status in Status.SCORED for r in group)]
    n = len(documents)
    same_text = sum(1 for group in documents if len({r.content for r in group}) == 1)
    same_scores = sum(1 for group in documents
                      if len({json.dumps(r.scores, sort_keys=True) for r in group}) == 1)
    return {"documents": n, "responses": same_text / n if n else None,
            "scores": same_scores / n if n else None}


def _repeat_summary(task: Task, records: list, documents: list, repeats: int,
                    temperature: Any) -> dict:
    """Each pass's metrics, their mean and SEM over the passes, and the self-agreement of the
    documents that have all their repeats."""
    passes = [[r for r in records if r.repeat == i] for i in range(repeats)]
    summary: dict = {"k": repeats, "temperature": temperature, "metrics": {}}
    for name in task.metric_names:
        values = [_mean_stderr([r.score(name) for r in p])[0] for p in passes if p]
        mean, sem = _mean_stderr(values)
        summary["metrics"][name] = {"per_repeat": values, "mean": mean, "sem": sem}
    whole = [group for group in documents if len(group) == repeats]
    summary["self_agreement"] = _self_agreement(whole)
    return summary


def _aggregate(task: Task, records: list, planned: int, elapsed: float,
               revisions: list | None = None, complete: bool = True, repeats: int = 1,
               temperature: Any = None) -> dict:
    """Per-task results: lm-eval's metric names (`,none` dropped), the headline metric
    also under its bare name, `<metric>,valid` over scorable responses only, failure
    counts per status, tokens, latency and throughput. With repeats, each document's
    scores are first averaged over its repeats (so stderr is over documents), and
    `repeats` holds each pass's metrics, their mean and SEM, and the self-agreement."""
    valid = [r for r in records if r.status in Status.SCORED]
    documents = list(_by_document(records).values()) if repeats > 1 else []
    scored = [group[0]._replace(scores={name: sum(r.score(name) for r in group) / len(group)
                                        for name in group[0].scores})
              for group in documents] or records
    base = task.headline.split(",")[0]
    metrics: dict = {}

    def add(label: str, name: str, subset: list, with_stderr: bool = True) -> None:
        mean, se = _mean_stderr([r.score(name) for r in subset])
        metrics[label] = mean
        if with_stderr:
            metrics[_stderr_key(label)] = se

    reported = [(base, task.headline)] if base != task.headline else []
    reported += [(name, name) for name in task.metric_names]
    for label, name in reported:
        add(label, name, scored)
    for label, name in reported:
        add(f"{label},valid", name, valid, with_stderr=False)
    for group in sorted({r.group for r in scored if r.group}):
        add(f"{task.headline},{group}", task.headline, [r for r in scored if r.group == group],
            with_stderr=False)

    statuses = collections.Counter(r.status for r in records)
    finish_reasons = collections.Counter(str(r.finish_reason) for r in records if r.finish_reason)
    sent = [r for r in records if not r.reused and r.attempts]  # this run's requests
    latencies = sorted(r.latency for r in sent if r.latency)
    reasoning_rows: dict = {}  # flag: the rows it was raised on
    for r in records:
        for flag in r.reasoning_flags:
            reasoning_rows.setdefault(flag, []).append(r.row_idx)
    not_sent = sum(r.error == _NOT_SENT for r in records)
    failures = {s: c for s, c in sorted(statuses.items()) if s not in Status.SCORED}
    result = {
        "metrics": metrics,
        "num_samples": len(records),
        "num_ok": statuses[Status.OK],
        "num_truncated": finish_reasons["length"],  # what the server said, not the content
        "num_failed": sum(failures.values()),
        "failures": failures,
        "elapsed": round(elapsed, 3),
        "complete": complete and len(records) == planned,
        "headline": base,
        "finish_reasons": dict(sorted(finish_reasons.items())),
        "num_reused": sum(r.reused for r in records),
        "usage": {"prompt_tokens": sum(r.prompt_tokens or 0 for r in records),
                  "completion_tokens": sum(r.completion_tokens or 0 for r in records)},
        "latency_p50": _quantile(latencies, 0.5),
        "latency_p95": _quantile(latencies, 0.95),
        "requests_per_second": round(len(sent) / elapsed, 3) if elapsed > 0 else None,
        "output_tokens_per_second": (round(sum(r.completion_tokens or 0 for r in sent) / elapsed, 2)
                                    if elapsed > 0 else None),
        "version": task.version,
        "dataset": {"path": task.data.dataset, "config": task.data.config, "split": task.data.split,
                    "revision": (revisions[0] if len(revisions or []) == 1 else revisions) or None},
    }
    if planned != len(records):
        result["num_planned"] = planned
    if not_sent:
        result["num_not_sent"] = not_sent
    if reasoning_rows:
        result["reasoning"] = {flag: len(rows) for flag, rows in reasoning_rows.items()}
        result["reasoning_rows"] = {flag: rows[:50] for flag, rows in reasoning_rows.items()}
    if repeats > 1:
        result["num_documents"] = len(documents)
        result["repeats"] = _repeat_summary(task, records, documents, repeats, temperature)
    if task.image_column:
        formats = dict(collections.Counter(r.image.get("format") for r in records
                                           if isinstance(r.image, dict)))
        result["images"] = {"formats": formats, "jpeg_reencoded": formats.get("jpeg", 0)}
    return result


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _summary_table(results: dict) -> str:
    """The human summary written to stderr."""
    lines = [f"{'task':<18} {'metric':<36} {'value':>7} {'stderr':>7} {'n':>6} "
             f"{'failed':>6} {'seconds':>8}"]
    for name, result in results.items():
        if "error" in result and not result.get("metrics"):
            lines.append(f"{name:<18} error: {result['error']}")
            continue
        metrics = result["metrics"]
        for key in (k for k in metrics if "_stderr" not in k):
            lines.append(f"{name:<18} {key:<36} {_fmt_value(metrics[key]):>7} "
                         f"{_fmt_value(metrics.get(_stderr_key(key), '')):>7} "
                         f"{result['num_samples']:>6} {result['num_failed']:>6} "
                         f"{result['elapsed']:>8.1f}")
            name = ""
    return "\n".join(lines)


def _report_warnings(task_name: str, result: dict) -> None:
    if result.get("failures"):
        detail = ", ".join(f"{status}: {count}" for status, count in result["failures"].items())
        _warn(f"{task_name}: {result['num_failed']} of {result['num_samples']} samples failed "
              f"({detail}); they count as wrong in the headline metrics")
    if result.get("num_not_sent"):
        _warn(f"{task_name}: {result['num_not_sent']} samples were not sent because the server "
              "had stopped answering; they are counted as connection failures "
              "(rerun the same command to resume them)")
    advice = {
        "answer_only_in_reasoning": (
            "had an answer only in the reasoning channel, none in the content",
            "check the server's reasoning parser and the chat template"),
        "budget_ran_out_in_reasoning": (
            "ran out of tokens while still reasoning",
            "raise max_tokens, e.g. --gen_kwargs max_gen_toks=4096"),
    }
    for flag, rows in (result.get("reasoning_rows") or {}).items():
        shown = ", ".join(map(str, rows[:10])) + (" ..." if result["reasoning"][flag] > 10 else "")
        what, fix = advice[flag]
        _warn(f"{task_name}: {result['reasoning'][flag]} samples {what} (rows {shown}); {fix}")
    if cut := result.get("num_truncated"):
        _warn(f"{task_name}: {cut} {'response' if cut == 1 else 'responses'} hit max_tokens "
              "(finish_reason length); scored as they are")
    repeats = result.get("repeats") or {}
    agreement = (repeats.get("self_agreement") or {}).get("responses")
    if repeats.get("temperature") == 0 and agreement is not None and agreement < 1:
        _warn(f"{task_name}: at temperature 0, only {agreement:.1%} of documents got the same "
              f"response in all {repeats['k']} repeats: this backend is not deterministic at "
              "this concurrency; read any comparison against this floor")


def _reference_key(model: str) -> str:
    """The served model name as _REFERENCE_SCORES spells it: lower case, no `org/` prefix,
    no `meta-` prefix, and no suffix naming a lossless dtype (bf16, fp16, fp32) — but a
    quantisation (q4, awq, gptq, int8, fp8, ...) is kept, so it matches nothing."""
    name = model.lower().rstrip("/").rsplit("/", 1)[-1].removeprefix("meta-")
    return re.sub(r"([-_.](bf16|fp16|fp32|f16|f32))+$", "", name)


def reference_score(task_name: str, model: str | None) -> tuple[float, str] | None:
    """(published score, its source) for this task and served model, if known."""
    return _REFERENCE_SCORES.get((task_name, _reference_key(model or "")))


def expectation(result: dict, reference: float, metric: str | None = None,
                tolerance: float = _DEFAULT_TOLERANCE, source: str | None = None) -> dict | None:
    """Is the observed score consistent with `reference`? Below or above when the gap is
    larger than 1.96 x the run's own stderr plus `tolerance`. None without a score."""
    metric = metric or result.get("headline")
    observed = (result.get("metrics") or {}).get(metric)
    if not isinstance(observed, (int, float)):
        return None
    stderr = result["metrics"].get(_stderr_key(metric))
    stderr = stderr if isinstance(stderr, float) else 0.0
    margin = 1.96 * stderr + tolerance
    difference = observed - reference
    verdict = "below" if difference < -margin else "above" if difference > margin else "consistent"
    return {"metric": metric, "reference": reference, "observed": observed,
            "difference": round(difference, 6), "stderr": stderr, "tolerance": tolerance,
            "margin": round(margin, 6), "verdict": verdict, "source": source}


def _format_expectation(task_name: str, e: dict) -> str:
    where = f" ({e['source']})" if e.get("source") else ""
    return (f"{task_name}: {e['metric']} {e['observed']:.4f} "
            f"vs expected {e['reference']:.4f}{where}, "
            f"difference {e['difference']:+.4f}, allowed +-{e['margin']:.4f}: {e['verdict']}")


def _check_expectations(results: dict, model: str | None, expected: dict, tolerance: float) -> None:
    """Each task's `expectation`: against --expect (a gate), else against a published
    reference for this model (information only)."""
    for name, result in results.items():
        if "metrics" not in result:
            continue
        if name in expected:
            metric, value = expected[name]
            verdict = expectation(result, value, metric, tolerance, source="--expect")
        elif (known := reference_score(name, model)) is not None:
            verdict = expectation(result, known[0], None, tolerance, source=known[1])
            if verdict:
                verdict["informational"] = True
        else:
            continue
        if verdict:
            result["expectation"] = verdict
            _info(_format_expectation(name, verdict))


# The recorded config, in the results file's order: each option's value is read from the carrier
# it sets (_Option.into); the other keys are what the run derived
_RECORDED = ("model", "server", "base_url", "chat_url", "max_samples", "num_concurrent", "seed",
             "logprobs", "gen_kwargs", "request_params", "system_instruction",
             "fewshot_as_multiturn", "keep_think", "think_end_token", "data_dir", "timeout",
             "max_retries", "max_fail_rate", "repeats", "nano_eval_version", "python", "date")


def _config_record(config: APIConfig, options: RunOptions) -> dict:
    """What the results file records about the run (never the API key)."""
    derived = {
        "model": config.model, "server": config.server, "gen_kwargs": config.gen_kwargs,
        "base_url": config.api_root, "chat_url": config.chat_url,
        "request_params": {t.name: t.request_params(config) for t in options.tasks},
        "data_dir": str(_resolve_data_dir(options.data_dir)[0]),
        "nano_eval_version": __version__, "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    carriers = {"api": config, "run": options}
    return {name: derived[name] if name in derived
            else getattr(carriers[_OPTION[name].into], name) for name in _RECORDED}


def _task_results(results: dict) -> dict:
    """Each task's entry of a results document, without the preflight's (_results_document puts
    it first, as lm-eval would a task)."""
    return {name: r for name, r in results.items() if name != _CONFORMANCE and isinstance(r, dict)}


def _results_document(config: APIConfig, options: RunOptions, results: dict, preflight: dict | None,
                      finished: bool, start: float) -> dict:
    """The results JSON of one server's run."""
    document = {"results": {**({_CONFORMANCE: preflight} if preflight else {}),
                            **results},
                "config": _config_record(config, options),
                "total_seconds": round(time.perf_counter() - start, 3),
                "complete": finished and all(r["complete"] for r in results.values()),
                "interrupted": not finished}
    if options.log_dir:
        document["config"]["log_samples"] = str(options.log_dir)
    return document


def _most_severe(codes: list) -> int:
    """An interruption first, then the highest code; a failed quality gate only when
    nothing else went wrong."""
    return max(codes or [_EXIT_OK],
               key=lambda c: (c == _EXIT_INTERRUPTED, c not in (_EXIT_OK, _EXIT_GATE), c))


def _fail_rate_exit(results: dict, max_fail_rate: float) -> int:
    for name, result in results.items():
        rate = result["num_failed"] / result["num_samples"] if result["num_samples"] else 0.0
        if rate > max_fail_rate:
            _info(f"error: {name}: {result['num_failed']} of {result['num_samples']} "
                  f"samples failed ({rate:.1%} > --max_fail_rate {max_fail_rate:g})")
            return _EXIT_FAILURES
    return _EXIT_OK


def _exit_code_of(document: dict, options: RunOptions) -> int:
    if document["interrupted"]:
        resume = "; rerun the same command to resume" if options.log_dir else ""
        _info("interrupted: partial results written" + resume)
        return _EXIT_INTERRUPTED
    results = document["results"]
    codes = [r["exit_code"] for r in results.values() if "exit_code" in r]
    preflight = results.get(_CONFORMANCE)
    if preflight and preflight["metrics"]["fail"]:
        _info(f"error: the conformance preflight failed {preflight['metrics']['fail']} check(s)")
        codes.append(_EXIT_FAILURES)
    codes.append(_fail_rate_exit({n: r for n, r in _task_results(results).items()
                                  if "error" not in r}, options.max_fail_rate))

    below = [n for n, r in results.items() if (r.get("expectation") or {}).get("verdict") == "below"
             and not r["expectation"].get("informational")]
    if below:
        _info(f"error: {', '.join(below)} scored significantly below --expect")
        codes.append(_EXIT_GATE)
    return _most_severe(codes)


# ============================================================================
# 9. CLI
# ============================================================================


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        raise UsageError(f"{message} (see --help)")


def _build_parser() -> _ArgumentParser:
    parser = _ArgumentParser(
        prog="nano-eval",
        description="Evaluate an OpenAI-compatible /v1/chat/completions server exactly as "
                    "lm-eval's local-chat-completions does (gsm8k_cot_llama, chartqa).",
        epilog="Other commands: "
               "'nano-eval compare RUN_A RUN_B' (paired comparison of two sample logs), "
               "'nano-eval replay FILE:LINE' (resend one logged request), "
               "'nano-eval report RUN [RUN_B]' (an HTML report).")

    for option in _OPTIONS:
        if not option.help:
            continue  # a --model_args key only
        kwargs = dict(option.argparse)
        if option.check:
            kwargs["type"] = _from_text(option.check, option.parse)
        if option.into == "run" and not option.model_arg and option.default is not None:
            # nothing else can set it: argparse gives the default
            kwargs["default"] = option.default
        spellings = [f"--{option.name}"] + ([f"--{option.name.replace('_', '-')}"]
                                            if "_" in option.name else [])
        helptext = option.help.format(tasks=", ".join([*TASKS, _CONFORMANCE]))
        parser.add_argument(*spellings, dest=option.name, help=helptext, **kwargs)
        if option.name == "max_samples":  # lm-eval's name for it
            parser.add_argument("--limit", dest="max_samples", type=kwargs["type"],
                                help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"nano-eval {__version__}")
    return parser


def _resolve_tasks(text: str | None, check: bool) -> tuple[list, bool]:
    """(tasks to evaluate, whether to run the conformance preflight)."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    valid = [*TASKS, _CONFORMANCE]
    if not names and not check:
        raise UsageError(f"--tasks is required: {', '.join(valid)}")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UsageError(f"unknown task {', '.join(unknown)}; valid tasks: {', '.join(valid)}")
    return ([TASKS[n] for n in dict.fromkeys(names) if n != _CONFORMANCE],
            check or _CONFORMANCE in names)


def _parse_model_args(text: str | None) -> dict:
    """`k=v,k=v`, or a JSON object (as lm-eval also takes, for a `header` dict)."""
    if text and text.strip().startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--model_args is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise UsageError("--model_args: a JSON value must be an object")
        return parsed
    return _parse_kv(text, "--model_args")


def _header_items(value: Any) -> dict | list:
    """lm-eval's `header` model_arg: a dict (JSON model_args), or one `Name: value` text."""
    if value is None:
        return []
    if isinstance(value, dict):
        return value
    return [str(value)]


def _resolve_settings(args: argparse.Namespace) -> tuple[list, str | None, dict]:
    """(base URLs, model, the APIConfig fields): flags win over --model_args, which win over
    the environment and the defaults."""
    model_args = _parse_model_args(args.model_args)
    unknown = set(model_args) - _MODEL_ARGS - _IGNORED_MODEL_ARGS
    if unknown:
        raise UsageError(f"--model_args: unsupported key {', '.join(sorted(unknown))}; "
                         f"supported: {', '.join(sorted(_MODEL_ARGS))}")
    for key in sorted(set(model_args) & _IGNORED_MODEL_ARGS):
        _info(f"--model_args {key} has no effect here and is ignored")

    def pick(name: str) -> Any:
        option, value = _OPTION[name], getattr(args, name, None)
        if value is not None:
            return value  # a flag's, checked by argparse
        if not (option.model_arg and name in model_args):
            return option.default
        value = model_args[name]  # null is a value of its own for a nullable option (a null seed)
        if option.check and (value is not None or not option.nullable):
            value = _checked(name, option.check, value)
        return value

    fields = {option.name: pick(option.name) for option in _OPTIONS if option.into == "api"}
    fields.update(
        api_key=_check_secret(pick("api_key") or os.environ.get("OPENAI_API_KEY"), "the API key"),
        gen_kwargs=_parse_kv(args.gen_kwargs, "--gen_kwargs"),
        headers={**_parse_headers(_header_items(model_args.get("header"))),
                 **_parse_headers(args.header or [])},
        verify_certificate=pick("verify_certificate") and not args.insecure,
        ca_cert=args.ca_cert or model_args.get("ca_cert_path"))
    until = fields["gen_kwargs"].get("until")
    if until is not None and not isinstance(until, str):
        raise UsageError(f"--gen_kwargs: until must be text, got {until!r}")
    base_urls = args.base_url or ([model_args["base_url"]] if model_args.get("base_url") else [])
    model = pick("model")
    return base_urls, None if model is None else str(model), fields


def _parse_expectations(items: list | None, tasks: list) -> dict:
    """--expect TASK=VALUE or TASK:METRIC=VALUE (VALUE a fraction, or a percentage with %)
    -> {task: (metric or None for the headline, value)}."""
    expected = {}
    names = {t.name: t for t in tasks}
    for item in items or []:
        target, _, value = item.rpartition("=")
        task_name, _, metric = target.partition(":")
        task = names.get(task_name.strip())
        if task is None:
            raise UsageError(f"--expect {item!r}: expected TASK[:METRIC]=VALUE with a task of "
                             f"--tasks ({', '.join(names) or 'none'})")
        metric = metric.strip() or None
        if metric and metric not in [task.headline.split(",")[0], *task.metric_names]:
            raise UsageError(f"--expect {item!r}: {task.name} has no metric {metric!r} (one of "
                             f"{', '.join([task.headline.split(',')[0], *task.metric_names])})")
        text = value.strip()
        try:
            number = _fraction(float(text.rstrip("%")) / (100 if text.endswith("%") else 1))
        except (ValueError, argparse.ArgumentTypeError):
            raise UsageError(f"--expect {item!r}: the value must be from 0 to 1, "
                             "or a percentage like 84.5%") from None
        expected[task.name] = (metric, number)
    return expected


def _check_output_path(path: str | None, flag: str = "--output") -> Path | None:
    if not path:
        return None
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"{flag}: folder {target.parent} does not exist")
    if (not os.access(target.parent, os.W_OK)
            or (target.exists() and not os.access(target, os.W_OK))):
        raise UsageError(f"{flag} {target} is not writable")
    return target


def _sample_log_dir(args: argparse.Namespace, output: Path | None) -> Path | None:
    if args.log_samples:
        return Path(args.log_samples).expanduser()
    if output:
        return output.with_name(output.stem + "_samples")
    return None


def _check_distinct_outputs(output: Path | None, report: Path | None, log_dir: Path | None) -> None:
    """--output, --report and the sample logs are different files: one written over another
    would lose it (the results replaced by HTML, the resume state by a page)."""
    def same(a: Path, b: Path) -> bool:
        return a.resolve() == b.resolve()

    if output and report and same(output, report):
        raise UsageError(f"--output and --report are the same file ({output}): give each its own")
    for path, flag in ((output, "--output"), (report, "--report")):
        if path and log_dir and same(path.parent, log_dir) and path.name.startswith("samples_") \
                and path.suffix == ".jsonl":
            raise UsageError(f"{flag} {path} is a sample log of this run: give it another name")


def _failure_of(exc: Exception) -> str:
    """One line for an error that ended a part of the run, kept in its results: nano-eval's own
    message, or what else it was (a full disk, a bug)."""
    if isinstance(exc, NanoEvalError):
        message = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.strerror}{f' ({exc.filename})' if exc.filename else ''}"
    else:
        message = (f"internal error: {type(exc).__name__}: {exc} "
                   "(set NANO_EVAL_DEBUG=1 for a traceback)")
    return _SECRETS.scrub(message)


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` while the tasks run (a KeyboardInterrupt raised inside the
    event loop could leave it anywhere); the previous handlers are put back after."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, TypeError):
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous[sig])  # asyncio leaves SIG_DFL behind


async def _run_each_task(config: APIConfig, options: RunOptions, results: dict) -> str | None:
    """The tasks one after the other into `results`: the error that made the server unusable,
    if one did. A task that cannot run or finish gets an entry with its `error`; the next task
    still runs, unless the server itself is unusable."""
    tasks = options.tasks
    for task in tasks:
        try:
            await run_task(task, config, options.max_samples, data_dir=options.data_dir,
                           log_dir=options.log_dir, log_images=options.log_images,
                           progress=options.progress, sink=results, resume=options.resume,
                           repeats=options.repeats)
        except Exception as exc:  # noqa: BLE001 -- whatever ended it, finished tasks are kept
            if os.environ.get("NANO_EVAL_DEBUG") and not isinstance(exc, NanoEvalError):
                raise
            message = _failure_of(exc)
            _info(f"error: {task.name}: {message}")
            results[task.name] = {**results.get(task.name, {}), "error": message,
                                  "exit_code": getattr(exc, "exit_code", _EXIT_FAILURES),
                                  "complete": False}
            # every other task would fail the same way
            if isinstance(exc, (AuthError, ServerError)):
                for skipped in tasks[tasks.index(task) + 1:]:
                    results[skipped.name] = {"error": f"not run: {message}",
                                             "exit_code": exc.exit_code, "complete": False}
                return message
    return None


async def _run_tasks(config: APIConfig, options: RunOptions,
                     results: dict) -> tuple[bool, str | None]:
    """The tasks into `results` until they end or a signal stops them: (False when
    interrupted, the error that made the server unusable)."""
    stop = asyncio.Event()
    with _stop_on_signals(stop):
        work = asyncio.ensure_future(_run_each_task(config, options, results))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        stopper.cancel()
        return True, work.result()  # raises what the run raised
    work.cancel()
    try:
        await work
    except asyncio.CancelledError:
        pass
    # a task interrupted before its first sample (its dataset loading) is still named
    for task in options.tasks:
        results.setdefault(task.name, {"error": "not run: interrupted",
                                       "exit_code": _EXIT_INTERRUPTED, "complete": False})
    return False, None


def _run_server(config: APIConfig, options: RunOptions) -> dict:
    """The preflight (if asked) and the tasks against one server: its results document."""
    start = time.perf_counter()
    preflight = _preflight_result(config) if options.check else None
    results: dict = {}
    try:
        finished, server_error = asyncio.run(_run_tasks(config, options, results))
    finally:
        for name, result in results.items():
            _report_warnings(name, result)
    if results:
        print(_summary_table(results), file=sys.stderr)
    _check_expectations(results, config.model, options.expected, options.expect_tolerance)
    document = _results_document(config, options, results, preflight, finished, start)
    if server_error:
        document["error"] = server_error
    return document


def _floor_concurrency(num_concurrent: int) -> int:
    """The other batch composition the reference runs at for its noise floor."""
    return 1 if num_concurrent > 1 else _DEFAULT_CONCURRENCY


def _measure_noise_floor(config: APIConfig, options: RunOptions) -> dict:
    """The reference server again, on the same samples, at another concurrency (--noise_floor):
    its results document; its sample log is the floor of every numerics verdict against it."""
    again = dataclasses.replace(config, num_concurrent=_floor_concurrency(config.num_concurrent))
    _info(f"noise floor: {config.model} at {config.chat_url} again at "
          f"--num_concurrent {again.num_concurrent} (it ran at {config.num_concurrent})")
    return _run_server(again, dataclasses.replace(options, check=False))


def _compare_servers(runs: list, tolerance: float = _DEFAULT_LOGPROB_TOLERANCE,
                     noise_floor: str | None = None) -> list:
    """The first run compared with each of the others, printed and returned; `noise_floor`:
    the first server's second run, which calibrates the numerics verdicts."""
    comparisons = []
    for run in runs[1:]:
        a, b = runs[0]["config"], run["config"]
        entry = {"a": a["chat_url"], "b": b["chat_url"]}
        try:
            entry["comparison"] = compare_paths(a["log_samples"], b["log_samples"],
                                                tolerance=tolerance, noise_floor=noise_floor)
            print(_format_comparison(entry["comparison"], a["chat_url"], b["chat_url"]),
                  file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 -- e.g. a run with no samples; the runs are kept
            entry["error"] = _failure_of(exc)
            _info(f"cannot compare {a['chat_url']} with {b['chat_url']}: {entry['error']}")
        comparisons.append(entry)
    return comparisons


def _run_and_compare(configs: list, model: str | None, options: RunOptions) -> tuple[dict, int]:
    """The same samples against each server, then the paired comparison of the first
    usable server with each of the others: the document and its exit code. A server that
    cannot be used is reported in its entry of `runs`; the others still run."""
    root = options.log_dir or Path(tempfile.mkdtemp(prefix="nano-eval-runs-"))
    start = time.perf_counter()
    unusable = {}
    for config in configs:
        try:
            _find_server(config, model or config.model)
        except (AuthError, ServerError) as exc:
            unusable[id(config)] = exc
            _info(f"error: {exc}")
    runs, codes, comparisons, floor = [], [], [], None
    try:  # Ctrl-C or SIGTERM between or after the runs: what finished is still written
        for i, config in enumerate(configs):
            parts = urllib.parse.urlsplit(config.api_root)
            run_options = dataclasses.replace(
                options, log_dir=root / f"{i}_{parts.hostname}_{parts.port or ''}".rstrip("_"))
            error = unusable.get(id(config))
            if error is None:
                _info(f"server {i + 1}/{len(configs)}: {config.model} at {config.chat_url} "
                      f"({config.server['name']})")
                runs.append(_run_server(config, run_options))
                codes.append(_exit_code_of(runs[-1], run_options))
                if (options.noise_floor and floor is None and options.tasks
                        and not runs[-1]["interrupted"]):
                    floor_dir = run_options.log_dir.with_name(run_options.log_dir.name + "_floor")
                    floor_options = dataclasses.replace(run_options, log_dir=floor_dir)
                    floor = _measure_noise_floor(config, floor_options)
                    codes.append(_exit_code_of(floor, floor_options))
                    if floor["interrupted"]:
                        break
            else:  # this server is unusable; the others' results still count
                runs.append({"results": {}, "config": _config_record(config, options),
                             "error": _SECRETS.scrub(str(error)), "complete": False,
                             "interrupted": False})
                codes.append(error.exit_code)
            if runs[-1]["interrupted"]:
                break
        comparisons = _compare_servers(
            [run for run in runs if "error" not in run] if options.tasks else [],
            options.logprob_tolerance, floor and floor["config"]["log_samples"])
    except KeyboardInterrupt:
        _info("interrupted: the runs that finished are written, without their comparison")
        codes.append(_EXIT_INTERRUPTED)
    document = {"runs": runs, **({"noise_floor": floor} if floor else {}),
                "comparisons": comparisons, "total_seconds": round(time.perf_counter() - start, 3)}
    codes += [_gate_exit(c["comparison"], options.fail_if) for c in comparisons
              if "comparison" in c]
    return document, _most_severe(codes)


def _check_places(options: RunOptions) -> None:
    """The sample log's folder and the dataset cache can be written: said now, not after
    connecting."""
    if options.log_dir and not _is_writable_dir(options.log_dir):
        raise UsageError(f"cannot write the sample log in {options.log_dir}")
    if options.data_dir or os.environ.get("NANO_EVAL_DATA_DIR"):
        _resolve_data_dir(options.data_dir)


def evaluate(configs: list, options: RunOptions, model: str | None = None) -> tuple[dict, int]:
    """One server, or several compared with the first: the results document and the exit
    code, as the command line writes and returns them. `model` is asked of every server;
    None: each config's own, or the only one its /v1/models lists."""
    _check_places(options)
    if (not all(c.verify_certificate for c in configs)
            and any(c.chat_url.startswith("https:") for c in configs)):
        _warn("TLS certificate verification is off (--insecure / verify_certificate=false): "
              "any server can pose as this one")
    if len(configs) > 1:
        return _run_and_compare(configs, model, options)
    config = configs[0]
    _find_server(config, model or config.model)
    server = config.server
    _info(
        f"evaluating {config.model} at {config.chat_url} ({server['name']}"
        f"{' ' + str(server['version']) if server.get('version') else ''}): "
        f"{', '.join([t.name for t in options.tasks] + ([_CONFORMANCE] if options.check else []))}")

    document = _run_server(config, options)
    return document, _exit_code_of(document, options)


def _stdout_json(document: dict) -> str:
    """The document as JSON text that any stdout encoding can carry: non-ASCII characters
    are escaped unless stdout takes UTF-8."""
    try:
        utf8 = codecs.lookup(sys.stdout.encoding or "ascii").name == "utf-8"
    except LookupError:
        utf8 = False
    return _SECRETS.scrub_json(json.dumps(document, indent=2, ensure_ascii=not utf8))


def _print_to_stdout(text: str) -> bool:
    """`text` on stdout; False when stdout is closed (`... | head`): it is then pointed at
    os.devnull, so that Python's own flush at exit does not fail too."""
    try:
        print(text, flush=True)
        return True
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def _write_results(document: dict, output: Path | None, report: Path | None) -> None:
    """The document in --output, as the --report page, and on stdout: each is written even
    when another fails (the first failure is raised after)."""
    failures: list = []
    if output:
        text = _SECRETS.scrub_json(json.dumps(document, indent=2, ensure_ascii=False))
        try:
            _atomic_write(output, (text + "\n").encode("utf-8", "replace"))
        except OSError as exc:
            failures.append(UsageError(f"cannot write --output {output}: {exc.strerror or exc}"))
            output = None
    if report:
        try:
            _write_report(report, _report_from_document(document))
        except Exception as exc:  # noqa: BLE001 -- the results still reach stdout
            failures.append(exc)
    if not _print_to_stdout(_stdout_json(document)):
        _info("stdout is closed: the results JSON was not printed"
              + (f"; it is in {output}" if output else ""))
    if failures:
        raise failures[0]


def _cmd_eval(argv: list) -> int:
    args = _build_parser().parse_args(argv)
    tasks, check = _resolve_tasks(args.tasks, args.check)
    base_urls, model, fields = _resolve_settings(args)
    expected = _parse_expectations(args.expect, tasks)
    if args.fail_if and len(base_urls) < 2:
        raise UsageError("--fail_if compares servers: give several --base_url "
                         "(or use 'nano-eval compare A B --fail_if')")
    if args.noise_floor and (len(base_urls) < 2 or not fields["logprobs"] or not tasks):
        raise UsageError("--noise_floor calibrates a comparison of logprobs: give several "
                         "--base_url, --logprobs K and a task "
                         "(or use 'nano-eval compare A B --noise_floor A2')")
    _SECRETS.add(fields["api_key"], os.environ.get("HF_TOKEN"))
    output = _check_output_path(args.output)
    report = _check_output_path(args.report, "--report")
    log_dir = _sample_log_dir(args, output)
    _check_distinct_outputs(output, report, log_dir)
    scratch = (Path(tempfile.mkdtemp(prefix="nano-eval-samples-")) if report and not log_dir
               else None)
    options = RunOptions(tasks=tasks, check=check, log_dir=log_dir or scratch, expected=expected,
                         progress=False if args.no_progress else None, resume=not args.no_resume,
                         **{option.name: getattr(args, option.name) for option in _OPTIONS
                            if option.into == "run"})
    try:
        _check_places(options)
        configs = [APIConfig(url=url, **fields) for url in base_urls or [_probe_local_server()]]
        document, code = evaluate(configs, options, model)
        _write_results(document, output, report)
        return code
    finally:
        if scratch:  # the report needed the samples; nobody asked to keep them
            shutil.rmtree(scratch, ignore_errors=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM stops nano-eval as Ctrl-C does, everywhere; and Ctrl-C does so in every phase
        # even when nano-eval was started with SIGINT ignored (a script's background job), as it
        # does during the tasks
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGINT, _raise_interrupt)
    commands = {"compare": _cmd_compare, "replay": _cmd_replay, "report": _cmd_report}
    # text we print must never fail on the terminal's encoding
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    code = _EXIT_OK
    try:
        for arg in argv:
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"argument {arg!r} is not valid UTF-8") from None
        command = commands.get(argv[0]) if argv else None
        if command:
            with _collector_paused():
                code = command(argv[1:])
        else:
            code = _cmd_eval(argv)
    except NanoEvalError as exc:
        print(_SECRETS.scrub(f"nano-eval: error: {exc}"), file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("nano-eval: interrupted", file=sys.stderr)
        code = _EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line, unless asked for the traceback
        if os.environ.get("NANO_EVAL_DEBUG"):
            raise
        print(_SECRETS.scrub(f"nano-eval: internal error: {type(exc).__name__}: {exc} "
                             "(set NANO_EVAL_DEBUG=1 for a traceback)"), file=sys.stderr)
        code = 1
    if _BLOCKED_CALLS.value:  # abandoned requests still wait on sockets: do not wait for them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# ============================================================================
# 10. Preflight
# ============================================================================

_IMAGE_LITERAL = "<image>"  # lm-eval's chartqa text starts with it
_IMAGE_LITERAL_EFFECT = ("each chartqa request (lm-eval's text starts with it) then carries a "
                         "second image token, which the server may reject or leave unexpanded; "
                         "scores can differ from a model that reads it as text "
                         "(the bodies stay lm-eval's)")
# A 1x1 RGB PNG, for the image check.
_ONE_PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC")


class _Preflight:
    """What the checks of _PREFLIGHT_CHECKS share: short requests with the run's TLS
    settings and headers (no retries: each answer is evidence), classified as the runner
    classifies its responses, and the first plain answer."""

    PROMPT = [{"role": "user", "content": "Write the numbers from 1 to 30, separated by spaces."}]
    TIMEOUT = 120.0  # seconds a check waits, at most (and never more than --timeout)

    def __init__(self, config: APIConfig):
        self.config = config
        self.client = _server_client(config, timeout=min(self.TIMEOUT, config.timeout),
                                     connect_timeout=5.0)
        self.headers = {"Content-Type": "application/json", **_server_headers(config)}
        self.first: _Outcome | None = None  # the plain greedy answer the other checks compare with

    def post(self, body: dict) -> _HTTPResponse | str:
        """The raw response, or why there is none."""
        try:
            return self.client.request("POST", self.config.chat_url,
                                       json.dumps({"model": self.config.model, **body}).encode(),
                                       self.headers)
        except Exception as exc:
            return _describe_network_error(exc)[1]

    def chat(self, **body: Any) -> _Outcome:
        """One request, classified as the runner classifies every response."""
        resp = self.post({"temperature": 0, **body})
        return (_Outcome(Status.CONNECTION, error=resp) if isinstance(resp, str)
                else _classify_response(resp))


def _failure(outcome: _Outcome) -> str:
    """Why a request did not give an answer, in one line."""
    return ((f"HTTP {outcome.http_status}: " if outcome.http_status else "")
            + (outcome.error or outcome.status))


def _answered(outcome: _Outcome) -> bool:
    """HTTP 200 with a well-formed message (its content may be empty)."""
    return outcome.http_status == 200 and outcome.status != Status.BAD_RESPONSE


def _models_listed(pf: _Preflight) -> tuple[str, str]:
    try:
        status, data, _ = _http_json(pf.client, pf.config.api_root + "/models",
                                     _server_headers(pf.config))
    except Exception as exc:
        return "FAIL", _describe_network_error(exc)[1]
    models = _listed_models(data)
    if status != 200 or models is None:
        return "FAIL", f"HTTP {status}, no data list"
    if data.get("object") != "list" or not all(isinstance(m, dict) and "id" in m for m in models):
        return "WARN", f"data present but not OpenAI-shaped: {json.dumps(data)[:120]}"
    return "PASS", f"object list, {len(models)} model(s)"


def _chat_answers(pf: _Preflight) -> tuple[str, str]:
    pf.first = first = pf.chat(messages=pf.PROMPT, max_tokens=96)
    if not _answered(first) or first.content is None:
        return "FAIL", f"a plain request failed: {_failure(first)}"
    return "PASS", f"HTTP 200, content {first.content[:60]!r}"


def _usage_reported(pf: _Preflight) -> tuple[str, str]:
    usage = pf.first.usage
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int) \
            or not isinstance(usage.get("prompt_tokens"), int):
        return "FAIL", f"usage missing or incomplete: {usage!r}"
    if usage.get("total_tokens") not in (None, usage["prompt_tokens"] + usage["completion_tokens"]):
        return "WARN", f"total_tokens {usage['total_tokens']} != prompt + completion {usage}"
    return "PASS", json.dumps(usage)[:120]


def _max_tokens_honoured(pf: _Preflight) -> tuple[str, str]:
    o = pf.chat(messages=pf.PROMPT, max_tokens=5)
    if o.http_status != 200:
        return "FAIL", f"request failed: {_failure(o)}"
    used = (o.usage or {}).get("completion_tokens")
    if isinstance(used, int) and used > 5:
        return "FAIL", f"max_tokens 5 but completion_tokens {used}"
    if o.finish_reason != "length":
        return "FAIL", f"max_tokens 5 hit but finish_reason {o.finish_reason!r}, not 'length'"
    return "PASS", f"completion_tokens {used}, finish_reason 'length'"


def _stop_honoured(pf: _Preflight) -> tuple[str, str]:
    baseline = pf.first.content
    words = baseline.split()
    middle = baseline[len(baseline) // 2:len(baseline) // 2 + 2].strip()
    stop = words[2] if len(words) >= 4 else middle  # a string the greedy answer is known to contain
    if not stop or baseline.index(stop) == 0:
        return "WARN", f"inconclusive: the greedy answer is too short: {baseline[:60]!r}"
    o = pf.chat(messages=pf.PROMPT, max_tokens=96, stop=[stop])
    text = o.content if _answered(o) else None
    if text is None:
        return "FAIL", f"a request with stop failed: {_failure(o)}"
    if stop in text:
        return "FAIL", f"stop {stop!r} is in the output: {text[:80]!r}"
    if not baseline.startswith(text.rstrip()):
        return "WARN", (f"output with stop {stop!r} is not a prefix of the greedy output: "
                        f"{text[:80]!r}")
    return "PASS", f"stopped before {stop!r}: {text[:60]!r}, finish_reason {o.finish_reason!r}"


def _greedy_repeatable(pf: _Preflight) -> tuple[str, str]:
    o = pf.chat(messages=pf.PROMPT, max_tokens=96)
    again = o.content if _answered(o) else None
    if again == pf.first.content:
        return "PASS", "the same request at temperature 0 gave the same text twice"
    return "WARN", ("temperature 0 differs between two identical requests: "
                    f"{pf.first.content[:40]!r} vs {str(again)[:40]!r}")


def _seed_accepted(pf: _Preflight) -> tuple[str, str]:
    o = pf.chat(messages=pf.PROMPT, max_tokens=8, seed=pf.config.seed)
    if o.http_status == 200:
        return "PASS", f"seed {pf.config.seed} accepted"
    return "FAIL", f"seed rejected: {o.error or o.status}"


def _logprobs_consistent(pf: _Preflight, k: int = 3) -> tuple[str, str]:
    """What the numerics verdict reads: per token a logprob <= 0 and the top K, sorted, with the
    chosen token first (temperature 0 is greedy)."""
    o = pf.chat(messages=pf.PROMPT, max_tokens=8, logprobs=True, top_logprobs=k)
    if o.http_status != 200:
        return "WARN", f"logprobs refused (compare cannot judge numerics): {_failure(o)}"
    if not o.logprobs:
        return "WARN", "no logprobs in the answer (compare cannot judge numerics)"
    for i, (token, logprob, top) in enumerate(o.logprobs):
        values = [t[1] for t in top]
        problem = ("a logprob that is not a number" if logprob is None or None in values
                   else f"logprob {logprob} > 0" if logprob > _POSITIVE_LOGPROB
                   else f"{len(top)} top_logprobs, asked for {k}" if len(top) != k
                   else "top_logprobs not sorted" if values != sorted(values, reverse=True)
                   else f"chosen {token!r} ({logprob:.4f}) is not the top-1 {top[0][0]!r} "
                        f"({values[0]:.4f})"
                   if _token_key(token) != _token_key(top[0][0]) and values[0] - logprob > 1e-4
                   else None)
        if problem:
            return "FAIL", f"token {i}: {problem}"
    return "PASS", f"{len(o.logprobs)} tokens, each with top {k} sorted, the greedy choice first"


def _image_accepted(pf: _Preflight) -> tuple[str, str]:
    content = [{"type": "image_url",
                "image_url": {"url": _data_url(_ONE_PIXEL_PNG), "detail": "auto"}},
               {"type": "text", "text": "What color is this image? Answer in one word."}]
    o = pf.chat(messages=[{"role": "user", "content": content}], max_tokens=8)
    if _answered(o):
        return "PASS", "a 1-pixel PNG data URL was accepted"
    return "WARN", f"images are not accepted (chartqa will fail): {_failure(o)}"


def _image_placeholder(pf: _Preflight) -> tuple[str, str]:
    """chartqa's text part starts with lm-eval's literal `<image>`. A model whose
    tokenizer has `<image>` as its image placeholder sees one image too many."""
    counts, refused = [], None
    for text in ("Say hi.", _IMAGE_LITERAL + "Say hi."):
        o = pf.chat(messages=[{"role": "user", "content": text}], max_tokens=1)
        if o.http_status != 200:
            refused = _failure(o)
            break
        counts.append((o.usage or {}).get("prompt_tokens"))
    if refused and len(counts) == 1:
        return "WARN", (f"a text-only prompt with the literal {_IMAGE_LITERAL} is refused "
                        f"({refused}): the model takes it for its image placeholder; "
                        f"{_IMAGE_LITERAL_EFFECT}")
    if refused or not all(isinstance(c, int) for c in counts):
        return "WARN", f"inconclusive: {refused or 'no usage.prompt_tokens'}"
    if counts[1] - counts[0] == 1:
        return "WARN", (f"the literal {_IMAGE_LITERAL} is one token here "
                        f"({counts[0]} -> {counts[1]} prompt tokens): "
                        f"the model's own image placeholder; {_IMAGE_LITERAL_EFFECT}")
    return "PASS", (f"the literal {_IMAGE_LITERAL} is plain text here "
                    f"({counts[1] - counts[0]} prompt tokens)")


def _reasoning_channel(pf: _Preflight) -> tuple[str, str]:
    if pf.first.reasoning_field:
        return "PASS", f"reasoning arrives in message.{pf.first.reasoning_field}"
    if "<think>" in (pf.first.content or ""):
        return "WARN", ("reasoning arrives inside content as <think>...</think> "
                        "(nano-eval drops it before scoring)")
    return "PASS", "no reasoning seen (not a reasoning model, or reasoning off)"


def _max_completion_tokens_honoured(pf: _Preflight) -> tuple[str, str]:
    o = pf.chat(messages=pf.PROMPT, max_completion_tokens=5)
    used = (o.usage or {}).get("completion_tokens")
    if o.http_status != 200:
        return "WARN", f"not accepted: {_failure(o)}"
    if isinstance(used, int) and used > 5:
        return "WARN", f"accepted but ignored: completion_tokens {used} > 5"
    if used is None and o.finish_reason != "length":
        return "WARN", ("accepted, but cannot tell whether it is honoured: no usage and "
                        f"finish_reason {o.finish_reason!r}")
    return "PASS", f"honoured: completion_tokens {used}, finish_reason {o.finish_reason!r}"


def _malformed_refused(pf: _Preflight) -> tuple[str, str]:
    resp = pf.post({"messages": "this is not a list of messages"})
    if isinstance(resp, str):
        return "FAIL", f"no answer: {resp}"
    if not 400 <= resp.status < 500:
        return "FAIL", f"HTTP {resp.status} instead of a 4xx: {_error_message(resp.body)}"
    try:
        error = json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        error = None
    if not isinstance(error, dict):
        return "WARN", f"HTTP {resp.status} but the body is not JSON"
    return "PASS", f"HTTP {resp.status} with a JSON error"


_PREFLIGHT_CHECKS = (
    ("/v1/models", _models_listed),
    ("chat completion", _chat_answers),
    ("usage", _usage_reported),
    ("max_tokens", _max_tokens_honoured),
    ("stop", _stop_honoured),
    ("greedy repeatable", _greedy_repeatable),
    ("seed", _seed_accepted),
    ("logprobs", _logprobs_consistent),
    ("image input", _image_accepted),
    ("image placeholder", _image_placeholder),
    ("reasoning channel", _reasoning_channel),
    ("max_completion_tokens", _max_completion_tokens_honoured),
    ("malformed request", _malformed_refused),
)


def _preflight_checks(config: APIConfig) -> dict:
    """Every check of _PREFLIGHT_CHECKS, in order:
    {"checks": [...], "metrics": pass/warn/fail counts}."""
    context, checks = _Preflight(config), []
    for name, check in _PREFLIGHT_CHECKS:
        result, evidence = check(context)
        # a server may echo the key in an error
        evidence = _SECRETS.scrub(" ".join(str(evidence).split()))
        checks.append({"check": name, "result": result, "evidence": evidence[:300]})
        if check is _chat_answers and result == "FAIL":
            break  # every other check needs a plain answer
    tally = collections.Counter(c["result"] for c in checks)
    return {"checks": checks,
            "metrics": {result.lower(): tally[result] for result in ("PASS", "WARN", "FAIL")}}


def _format_preflight(report: dict) -> str:
    width = max(len(c["check"]) for c in report["checks"])
    return "\n".join(f"{c['result']:<4}  {c['check']:<{width}}  {c['evidence']}"
                     for c in report["checks"])


def _preflight_result(config: APIConfig) -> dict:
    """The preflight's entry in the results (printed on stderr as it ends)."""
    start = time.perf_counter()
    _info(f"--check: {len(_PREFLIGHT_CHECKS)} conformance checks against {config.chat_url}, one "
          f"request at a time (each waits up to {min(_Preflight.TIMEOUT, config.timeout):.0f} s)")
    report = _preflight_checks(config)
    print(_format_preflight(report), file=sys.stderr)
    return {**report, "elapsed": round(time.perf_counter() - start, 3)}


# ============================================================================
# 11. Compare
# ============================================================================


# The compare key of a token servers spell differently: special tokens, parts of a character
_UNSPELLED = "\ufffd"
# A special token as vLLM spells it (llama.cpp: "" with its id; MAX: ""):
# the end of a turn or of the text
_SPECIAL_TOKEN = re.compile(r"<\|[^|\s]{1,40}\|>|</?s>|<eos>|<end_of_turn>")


def _token_key(token: Any) -> str:
    if not isinstance(token, str) or not token or _SPECIAL_TOKEN.fullmatch(token):
        return _UNSPELLED
    return token


def _logged_request(body: dict, image: dict | None) -> dict:
    """A logged body with its image as its sha256 stub, whether or not --log_images was on."""
    return _redact_images(body, image) if isinstance(body.get("messages"), list) else body


class _MessagesDigest:
    """The sha256 of a request's messages: of their role NUL content, joined by \\2, when all
    are {"role": str, "content": str}; else of their sorted JSON. A few-shot task sends the
    same turns before the question in every sample (gsm8k: 5 of its 5.6 KB): the hash state
    after them is kept, and copied while they repeat."""

    def __init__(self) -> None:
        self.head: list | None = None
        self.after_head = hashlib.sha256()

    def __call__(self, messages: list) -> str:
        try:
            # each has only "role" and "content", or KeyError
            if messages and sum(map(len, messages)) == 2 * len(messages):
                head, last = messages[:-1], messages[-1]
                if head != self.head:
                    text = "".join([m["role"] + "\0" + m["content"] + "\2" for m in head])
                    self.head, self.after_head = head, hashlib.sha256(
                        text.encode("utf-8", "surrogatepass"))
                digest = self.after_head.copy()
                digest.update(
                    (last["role"] + "\0" + last["content"]).encode("utf-8", "surrogatepass"))
                return digest.hexdigest()
        except (TypeError, KeyError):
            pass
        return hashlib.sha256(("\1" + json.dumps(messages, sort_keys=True)).encode()).hexdigest()


def _messages_digest(messages: list) -> str:
    return _MessagesDigest()(messages)


# asking for logprobs changes no generated text (measured)
_NOT_COMPARED = ("model", "logprobs", "top_logprobs")


def _slim_request(body: dict, image: dict | None, digest: Callable = _messages_digest) -> dict:
    """What the tools keep of a logged body (the 8-shot gsm8k messages are ~5 KB a sample):
    the fields a comparison compares, and the messages as [{"sha256": of them all, any image
    as its stub}]."""
    body = {key: value for key, value in _logged_request(body, image).items()
            if key not in _NOT_COMPARED}
    if isinstance(body.get("messages"), list):
        body["messages"] = [{"sha256": digest(body["messages"])}]
    return body


def _log_files(source: Path) -> list:
    """The sample logs a path names: the file itself, or a folder's samples_<task>.jsonl."""
    if source.is_dir():
        return sorted(source.glob("samples_*.jsonl"))
    return [source] if source.is_file() else []


def _load_repeats(path: str) -> dict:
    """{(task, doc_hash): {repeat: the last record, _Logged}} from a sample log file or a folder
    of them, each request reduced to _slim_request() as it is read (a comparison of two
    100,000-sample logs then fits in 800 MB), and where it was read kept (see _full_record)."""
    source = Path(path).expanduser()
    files = _log_files(source)
    if not files:
        raise UsageError(f"{source}: no samples_<task>.jsonl in this folder" if source.is_dir()
                         else f"{source}: no such sample log or folder")
    records: dict = {}
    digest = _MessagesDigest()
    for file in files:
        name = str(file)
        for offset, record in _read_located(file, strict=True):
            if isinstance(record.get("request"), dict):
                record["request"] = _slim_request(record["request"], record.get("image"), digest)
            logged = _Logged.of(record, (name, offset))
            records.setdefault((logged.task, logged.doc_hash), {})[logged.repeat] = logged
    if not records:
        raise UsageError(f"{source}: no sample records")
    return records


def _load_run(path: str) -> dict:
    """{(task, doc_hash): the last record of its first repeat} from a sample log file or a
    folder of them."""
    return {key: repeats[min(repeats)] for key, repeats in _load_repeats(path).items()}


def _full_record(record: _Logged) -> _Logged:
    """The record as its log holds it, whole request and all (_load_repeats keeps a slim
    one): its line read again. The slim one if the line is gone or no longer this sample."""
    if not record.at:
        return record
    file, offset = record.at
    try:
        with open(file, "rb") as f:
            f.seek(offset)
            full = json.loads(f.readline().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return record
    if not isinstance(full, dict) or _record_problem(full):
        return record
    full = _Logged.of(full, record.at)
    return full if ((full.task, full.doc_hash, full.repeat)
                    == (record.task, record.doc_hash, record.repeat)) else record


def _request_difference(a: dict, b: dict) -> str | None:
    """The first request field (other than the model name and the logprobs asked for) that
    differs, or None."""
    return next((key for key in dict.fromkeys([*a, *b])
                 if key not in _NOT_COMPARED and a.get(key) != b.get(key)), None)


def _mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs at 1/2. The tail
    P(X <= min) is summed in integers from its largest term down, each term from the one before
    (C(n, k-1) = C(n, k)·k/(n-k+1)), and stops once what is left cannot move the float result:
    100,000 discordant pairs take milliseconds, not a sum of n-digit binomials."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    m = min(a_only, b_only)
    total, term = 0, math.comb(n, m)
    for k in range(m, -1, -1):
        total += term
        if term * (k + 1) < total >> 64:  # the k terms left, each smaller than this one
            break
        term = term * k // (n - k + 1)
    return min(1.0, 2 * total / 2 ** n)


def _paired_bootstrap(differences: list, resamples: int = 10_000,
                      seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean paired difference (seeded, deterministic). A resample
    of n pairs is drawn as how many times each distinct difference comes up (a multinomial, by
    sequential binomials): the same bootstrap distribution as n draws with replacement, in time
    independent of n for 0/1 scores (three distinct differences)."""
    if not differences:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(differences)
    counted = sorted(collections.Counter(differences).items())
    means = []
    for _ in range(resamples):
        left, rest, total = n, n, 0.0
        for value, count in counted[:-1]:
            k = _binomial(left, count / rest, rng)
            total += value * k
            left, rest = left - k, rest - count
        means.append((total + counted[-1][0] * left) / n)
    means.sort()
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def _rank_and_gap(entry: list, other: str) -> tuple[int | None, float | None, float | None]:
    """Where `other` stands in this side's top K at a parting: (rank from 1, how far the
    chosen token's logprob leads it, None); when it is not in the top K, (None, None, the
    least it can lead it by: the chosen logprob minus the last of the top K, as `other` is
    below them all)."""
    top = sorted((t for t in entry[2] if _is_finite(t[1])), key=lambda t: -t[1])
    chosen = entry[1] if _is_finite(entry[1]) else None
    for rank, (token, logprob) in enumerate(top, 1):
        if _token_key(token) == other:
            return rank, (chosen - logprob) if chosen is not None else None, None
    at_least = chosen - top[-1][1] if top and chosen is not None else None
    return None, None, at_least


def _token_pair(a: list, b: list, same_text: bool) -> tuple[list, dict | None]:
    """|delta logprob| of the chosen tokens both sides generated (all of them when the texts are
    the same; else up to where they part), and the parting: where, each side's token, the
    other's rank and gap there (or the least gap the top K shows, when the other's token is not
    in it). Whether a parting is a near-tie is judged by _parting_margin."""
    diffs: list = []
    for i, (x, y) in enumerate(zip(a, b)):
        if not same_text and _token_key(x[0]) != _token_key(y[0]):
            break
        if _is_finite(x[1]) and _is_finite(y[1]):
            diffs.append(abs(x[1] - y[1]))
    else:
        if same_text or len(a) == len(b):
            return diffs, None
        i = min(len(a), len(b))  # one side stopped where the other went on
    if i >= len(a) or i >= len(b):
        return diffs, {"token": i, "a": None, "b": None}
    key_a, key_b = _token_key(a[i][0]), _token_key(b[i][0])
    rank_b_in_a, gap_a, gap_a_at_least = _rank_and_gap(a[i], key_b)
    rank_a_in_b, gap_b, gap_b_at_least = _rank_and_gap(b[i], key_a)
    return diffs, {"token": i, "a": key_a, "b": key_b, "a_logprob": a[i][1], "b_logprob": b[i][1],
                   "rank_of_b_in_a": rank_b_in_a, "gap_a": gap_a, "gap_a_at_least": gap_a_at_least,
                   "rank_of_a_in_b": rank_a_in_b, "gap_b": gap_b, "gap_b_at_least": gap_b_at_least}


def _parting_margin(p: dict, confident_gap: float) -> str:
    """`near-tie` (each side's choice within the other's top K and within confident_gap of its
    top-1: a coin flip that float noise can tip), `confident` (one side leads the other's choice
    by confident_gap or more, or stopped where the other went on), or `unknown` (the top K is
    too short to show the lead: not evidence either way)."""
    if p["a"] is None:
        return "confident"
    leads = [lead for lead in (p["gap_a"], p["gap_b"], p["gap_a_at_least"], p["gap_b_at_least"])
             if lead is not None]
    if any(lead >= confident_gap for lead in leads):
        return "confident"
    if p["gap_a"] is not None and p["gap_b"] is not None:
        return "near-tie"
    return "unknown"


# Precision, read from a log: the gaps between the top-K logprobs at a position are the gaps
# between their logits (log-softmax subtracts one number from all of them)
_GRID_STEPS = [2.0 ** -k for k in range(13)]  # 1 nat down to 1/4096: coarser grids are no precision
_GRID_POSITIONS = 5000  # positions read per side: enough for a steady median, fast on any log
_GRID_SHARE = 0.5  # of the positions read, the share on a grid for a side to be on one


def _position_step(values: list) -> float | None:
    """The largest step of _GRID_STEPS that every gap between one position's top-K logprobs is a
    multiple of (0.0: none is, a float32 position); None with fewer than two distinct gaps (a
    single gap fits a coarse grid by chance too often). The slack covers float32 rounding of
    each logprob and the sample log's 7 decimals."""
    top = max(values)
    if len({round(top - v, 4) for v in values} - {0.0}) < 2:
        return None
    slack = 1e-5 + 2.5e-7 * max(abs(v) for v in values)
    exact = [top - v for v in values if top - v > slack]
    for step in _GRID_STEPS:
        if all(abs(gap - step * round(gap / step)) <= slack for gap in exact):
            return step
    return 0.0


def _logit_precision(records: Iterable) -> dict:
    """What a side's logged top-K say of its logits: `bf16-like` or `fp16-like` (on a grid, its
    median step in nats), `float32-like` (no grid) or `unknown` (no top K of three or more)."""
    steps: list = []
    for record in records:
        for entry in record.logprobs or ():
            values = [t[1] for t in entry[2] if _is_finite(t[1])]
            step = _position_step(values) if len(values) >= 3 else None
            if step is not None:
                steps.append(step)
        if len(steps) >= _GRID_POSITIONS:
            break
    if not steps:
        return {"label": "unknown", "step": None, "positions": 0}
    on_grid = sorted(step for step in steps if step > 0)
    if len(on_grid) < _GRID_SHARE * len(steps):
        return {"label": "float32-like", "step": None, "positions": len(steps)}
    step = _quantile(on_grid, 0.5)
    return {"label": "bf16-like" if step >= _BF16_STEP else "fp16-like", "step": step,
            "positions": len(steps)}


def _precision_name(label: str) -> str:
    return label.replace("-like", "")


def _judged_tolerance(tolerance: float, precision: dict, floor: dict | None) -> dict:
    """The p99 |delta logprob| and the parting lead the verdict allows: the user's tolerance and
    _CONFIDENT_GAP, widened to the coarser side's logit grid and to the reference's own noise
    floor, and what widened them (None: nothing did)."""
    steps = [(side["step"], side["label"]) for side in precision.values() if side["step"]]
    step, coarse = max(steps) if steps else (0.0, None)
    floor_p99 = (floor or {}).get("p99_abs_logprob_diff") or 0.0
    allowed = max(tolerance, _GRID_TOLERANCE * step, _GRID_TOLERANCE * floor_p99)
    gap = max(_CONFIDENT_GAP, _GRID_GAP * step, _GRID_GAP * floor_p99)
    limit = None
    if allowed > tolerance:  # by whichever widened it more
        limit = {"precision": coarse if step >= floor_p99 else "noise floor", "nats": allowed}
    return {"tolerance": allowed, "confident_gap": gap, "resolution": limit}


def _resolution_note(resolution: dict) -> str:
    """What an `equivalent` at a coarse resolution cannot see, in one line."""
    if resolution["precision"] == "noise floor":
        return (f"equivalent within the reference's own noise floor ({resolution['nats']:.2g} "
                "nats, measured at two batch compositions): faults smaller than this are "
                "invisible on this server")
    return (f"equivalent within {_precision_name(resolution['precision'])} resolution "
            f"({resolution['nats']:.2g} nats): faults smaller than this are invisible at this "
            "precision; compare in float32 for a sharp check")


def _logprob_health(with_logprobs: list) -> tuple[int, int]:
    """(chosen tokens whose logprob is not a finite number, chosen tokens with a logprob above 0)
    on either side: a NaN, an infinity or a null is broken numerics, never float noise; a
    positive logprob is impossible."""
    broken = positive = 0
    for pair in with_logprobs:
        for record in pair:
            for entry in record.logprobs:
                if not _is_finite(entry[1]):
                    broken += 1
                elif entry[1] > _POSITIVE_LOGPROB:
                    positive += 1
    return broken, positive


def _logprob_distances(with_logprobs: list) -> tuple[list, list, list]:
    """Over pairs of records that both carry logprobs: every |delta logprob| of a shared token
    (sorted), each sample's largest, and the partings."""
    diffs, per_sample_max, partings = [], [], []
    for a, b in with_logprobs:
        sample_diffs, parting = _token_pair(a.logprobs, b.logprobs, a.content == b.content)
        diffs += sample_diffs
        if sample_diffs:
            per_sample_max.append(max(sample_diffs))
        if parting:
            partings.append({"row_idx": a.row_idx, "char": _first_difference(a.content, b.content),
                             **parting})
    diffs.sort()
    per_sample_max.sort()
    return diffs, per_sample_max, partings


def _mean_of(values: Iterable) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _numerics_verdict(with_logprobs: list, lacking: list, n: int, prompt_mismatch: int,
                      tolerance: float = _DEFAULT_LOGPROB_TOLERANCE, top: int = 10,
                      floor: dict | None = None) -> dict:
    """Whether two servers compute the same thing, from the logprobs of the samples both
    answered with them (`with_logprobs`, of `n` paired; `lacking`: the sides that logged none):
    `equivalent` (what differs is float noise at the coarser side's precision, or within the
    reference's measured noise `floor`), `different` (with the evidence: prompt tokens, broken
    logprobs, logprob distance over the shared tokens, confident partings) or `unknown` (too
    few logprobs to judge)."""
    if not with_logprobs:
        return {"samples": 0, "tolerance": tolerance, "verdict": "unknown",
                "evidence": [
                    f"no logprobs from {' and '.join(lacking) or 'both on the same samples'} "
                    "(run both with --logprobs K)"]}
    precision = {side: _logit_precision(pair[i] for pair in with_logprobs)
                 for i, side in enumerate("ab")}
    judged = _judged_tolerance(tolerance, precision, floor)
    diffs, per_sample_max, partings = _logprob_distances(with_logprobs)
    for p in partings:
        p["margin"] = _parting_margin(p, judged["confident_gap"])
        p["near_tie"] = p["margin"] == "near-tie"
    confident = [p for p in partings if p["margin"] == "confident"]
    unknown_margin = sum(1 for p in partings if p["margin"] == "unknown")
    allowed = max(1, math.floor(_CONFIDENT_PARTINGS * len(with_logprobs)))
    broken, positive = _logprob_health(with_logprobs)
    p99 = _quantile(diffs, 0.99)
    where = ("" if judged["resolution"] is None
             else f" ({_precision_name(judged['resolution']['precision'])} resolution)"
             if judged["resolution"]["precision"] != "noise floor" else " (the noise floor)")
    evidence = []
    if prompt_mismatch:
        evidence.append(f"prompt tokens differ on {prompt_mismatch} of {n} samples: the servers "
                        "do not see the same input (chat template, BOS)")
    if broken:
        evidence.append(f"{broken} generated tokens carry a logprob that is not a finite number "
                        "(NaN, infinity or null): broken numerics, not float noise")
    if p99 is not None and p99 > judged["tolerance"]:
        evidence.append(f"logprob distance: p99 |delta| {p99:.3g} > "
                        f"{judged['tolerance']:.3g}{where} over {len(diffs)} shared tokens")
    if len(confident) > allowed:
        evidence.append(f"{len(confident)} of {len(with_logprobs)} samples part at a confident "
                        f"token (not a near-tie; at most {allowed} allowed)")
    coverage = f"logprobs on {len(with_logprobs)} of {n} paired samples"
    if evidence:
        verdict = "different"
        if len(with_logprobs) < n:
            evidence.append(coverage)
    elif not diffs and not partings:
        verdict, evidence = "unknown", ["no generated tokens to compare"]
    elif len(with_logprobs) < _LOGPROB_COVERAGE * n:
        verdict, evidence = "unknown", [f"{coverage}: at least {_LOGPROB_COVERAGE:.0%} are needed "
                                        "to call them equivalent (did one run lose logprobs on "
                                        "some samples?)"]
    else:
        verdict = "equivalent"
        evidence = [f"p99 |delta logprob| {p99 if p99 is not None else 0:.3g} <= "
                    f"{judged['tolerance']:.3g}{where} over {len(diffs)} shared tokens; "
                    f"{sum(p['near_tie'] for p in partings)} of {len(partings)} "
                    "partings are near-ties"
                    + (f", {unknown_margin} of unknown margin (a longer --logprobs K shows it)"
                       if unknown_margin else "")]
        if judged["resolution"]:
            evidence.append(_resolution_note(judged["resolution"]))
    label_a, label_b = precision["a"]["label"], precision["b"]["label"]
    if label_a != label_b and "unknown" not in (label_a, label_b):
        evidence.append(f"the precisions differ: A {label_a}, B {label_b} (judged at the coarser)")
    warnings = [f"{positive} generated tokens have a logprob above 0, which no probability has: "
                "the server's logprobs are wrong"] if positive else []
    return {"samples": len(with_logprobs), "tolerance": judged["tolerance"],
            "requested_tolerance": tolerance, "confident_gap": judged["confident_gap"],
            "precision": precision, "resolution": judged["resolution"], "floor": floor,
            "coverage": {"with_logprobs": len(with_logprobs), "paired": n},
            "verdict": verdict, "evidence": evidence, "warnings": warnings,
            "shared_tokens": len(diffs),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs) if diffs else None,
            "median_abs_logprob_diff": _quantile(diffs, 0.5), "p99_abs_logprob_diff": p99,
            "max_abs_logprob_diff": diffs[-1] if diffs else None,
            "median_sample_max_abs_logprob_diff": _quantile(per_sample_max, 0.5),
            "divergences": len(partings), "unexplained": len(confident),
            "unexplained_allowed": allowed,
            "unknown_margin": unknown_margin, "non_finite_logprobs": broken,
            "mean_parting_char": _mean_of(p["char"] for p in partings),
            "partings": partings[:top]}


def _first_difference(a: str, b: str) -> int:
    """The length of the common prefix: a binary search on slices, which compare in C."""
    # a[:same] == b[:same]; a[:differ] != b[:differ] (or too long)
    same, differ = 0, min(len(a), len(b)) + 1
    while differ - same > 1:
        middle = (same + differ) // 2
        same, differ = (middle, differ) if a[:middle] == b[:middle] else (same, middle)
    return same


def _labelled_answer(record: _Logged) -> tuple[str, str | None]:
    """(the answer a sample gave, the filter that found it): the one its task scores
    (gsm8k: strict-match), else another that found one (flexible-extract), else what failed."""
    extracted = record.extracted
    task = TASKS.get(record.task)
    filters = list(dict.fromkeys([*([task.answer_key] if task else []), *extracted]))
    filters = [name for name in filters if name != "none"]  # chartqa's "none": the whole response
    for name in filters:
        if extracted.get(name) not in (None, "", _INVALID):
            return extracted[name], name
    if record.status not in Status.SCORED:
        return f"<{record.status}>", None
    return (extracted.get(filters[0]) or "", filters[0]) if filters else ("", None)


def _compare_pairs(task_name: str, pairs: list, unmatched: int, top: int, resamples: int,
                   tolerance: float = _DEFAULT_LOGPROB_TOLERANCE,
                   floor: dict | None = None) -> dict:
    task = TASKS.get(task_name)
    metric = task.headline if task else next(iter(pairs[0][0].scores or {"score": 0}))
    for a, b in pairs:
        field = a.request != b.request and _request_difference(
            _logged_request(a.request, a.image), _logged_request(b.request, b.image))
        if field:
            raise UsageError(f"{task_name} row {a.row_idx}: the runs sent different '{field}' "
                             "(only the model name may differ); "
                             "compare runs made with the same settings")
    side_a, side_b = [a for a, _ in pairs], [b for _, b in pairs]
    scores = [(a.score(metric), b.score(metric)) for a, b in pairs]
    n = len(pairs)
    acc_a, acc_b = sum(x for x, _ in scores) / n, sum(y for _, y in scores) / n
    a_only = sum(1 for x, y in scores if x > y)
    b_only = sum(1 for x, y in scores if y > x)
    low, high = _paired_bootstrap([y - x for x, y in scores], resamples)
    p_value = _mcnemar_exact(a_only, b_only)
    diff = acc_b - acc_a
    if p_value < 0.05:
        verdict = f"B is {'lower' if diff < 0 else 'higher'} by {abs(diff):.4f}, p={p_value:.3g}"
    else:
        verdict = f"no significant difference at n={n} (p={p_value:.3g})"
    same_text = sum(1 for a, b in pairs if a.content == b.content)
    differing = [_first_difference(a.content, b.content) for a, b in pairs
                 if a.content != b.content]
    counted = [(a, b) for a, b in pairs
               if a.prompt_tokens is not None and b.prompt_tokens is not None]
    prompt_mismatch = [(a, b) for a, b in counted if a.prompt_tokens != b.prompt_tokens]
    flips = [(a, b, x, y) for (a, b), (x, y) in zip(pairs, scores) if x != y][:top]
    with_logprobs = [(a, b) for a, b in pairs if a.logprobs and b.logprobs]
    lacking = [side for side, answered in (("A", side_a), ("B", side_b))
               if not any(x.logprobs for x in answered)]
    numerics = _numerics_verdict(with_logprobs, lacking, n, len(prompt_mismatch), tolerance,
                                 top, floor)
    if numerics["verdict"] == "different":
        verdict += f"; but the implementations differ: {'; '.join(numerics['evidence'])}"
    elif numerics["verdict"] == "equivalent":
        verdict += "; numerics equivalent (logprobs agree within float noise" + (
            f", at {_precision_name(numerics['resolution']['precision'])} resolution: "
            "a smaller fault may hide)"
            if numerics["resolution"] else ")")
    result = {
        "metric": metric, "n": n, "unmatched": unmatched,
        "accuracy_a": acc_a, "accuracy_b": acc_b, "difference": diff,
        "ci95": [low, high], "mcnemar_p": p_value, "a_only_correct": a_only,
        "b_only_correct": b_only,
        "verdict": verdict, "numerics": numerics,
        "response_agreement": same_text / n,
        "mean_first_difference": _mean_of(differing),
        "prompt_tokens_equal": len(counted) - len(prompt_mismatch),
        "prompt_tokens_mismatch": len(prompt_mismatch),
        "prompt_tokens_unknown": n - len(counted),
        "finish_reasons_a": _counts(x.finish_reason for x in side_a),
        "finish_reasons_b": _counts(y.finish_reason for y in side_b),
        "status_a": _counts(x.status for x in side_a),
        "status_b": _counts(y.status for y in side_b),
        "mean_output_tokens_a": _mean_of(x.completion_tokens for x in side_a),
        "mean_output_tokens_b": _mean_of(y.completion_tokens for y in side_b),
        "flips": [{"row_idx": a.row_idx, "target": a.target, "a": _labelled_answer(a)[0],
                   "b": _labelled_answer(b)[0], "a_correct": bool(x), "b_correct": bool(y)}
                  for a, b, x, y in flips],
    }
    if prompt_mismatch:
        a, b = prompt_mismatch[0]
        result["first_prompt_mismatch"] = {"row_idx": a.row_idx, "a": a.prompt_tokens,
                                           "b": b.prompt_tokens}
    return result


def _pairs_by_task(run_a: dict, run_b: dict) -> dict:
    """{task: [(a, b), ...]}: the samples both runs hold, joined on (task, doc hash)."""
    pairs: dict = {}
    for key, a in run_a.items():
        if key in run_b:
            pairs.setdefault(key[0], []).append((a, run_b[key]))
    return pairs


def _compare_runs(run_a: dict, run_b: dict, top: int = 10, resamples: int = 10_000,
                  tolerance: float = _DEFAULT_LOGPROB_TOLERANCE,
                  floors: dict | None = None) -> dict:
    """Per-task paired comparison of two runs joined on (task, doc hash); `floors`: each task's
    noise floor (_noise_floors), which widens its numerics verdict."""
    paired = _pairs_by_task(run_a, run_b)
    unmatched = collections.Counter(task for task, _ in run_a.keys() ^ run_b.keys())
    comparison: dict = {}
    for task_name in sorted(paired.keys() | unmatched.keys()):
        pairs = paired.get(task_name)
        if not pairs:
            comparison[task_name] = {"n": 0, "unmatched": unmatched[task_name],
                                     "verdict": "no samples in common"}
            continue
        pairs.sort(key=lambda pair: pair[0].row_idx or 0)
        comparison[task_name] = _compare_pairs(task_name, pairs, unmatched[task_name], top,
                                               resamples, tolerance, (floors or {}).get(task_name))
    return comparison


def _noise_floors(reference: dict, again: dict, source: str) -> dict:
    """{task: the p99 |delta logprob| of the reference against a second run of itself at another
    batch composition}: the noise of the reference server as it runs, which a comparison with it
    cannot tell from a fault."""
    floors = {}
    for task_name, task_pairs in _pairs_by_task(reference, again).items():
        task_pairs = [(a, b) for a, b in task_pairs if a.logprobs and b.logprobs]
        diffs = _logprob_distances(task_pairs)[0]
        if diffs:
            floors[task_name] = {"p99_abs_logprob_diff": _quantile(diffs, 0.99),
                                 "shared_tokens": len(diffs),
                                 "samples": len(task_pairs), "source": source}
    if not floors:
        raise UsageError(f"{source}: no sample with logprobs in common with A's, so no noise floor "
                         "(run the reference again with the same --logprobs K and samples)")
    return floors


def compare_paths(path_a: str, path_b: str, top: int = 10,
                  tolerance: float = _DEFAULT_LOGPROB_TOLERANCE,
                  noise_floor: str | None = None) -> dict:
    """compare_runs of two sample logs, with each side's self-agreement where it has repeats;
    `noise_floor`: a second log of A's server, at another concurrency, to calibrate the numerics."""
    repeats_a, repeats_b = _side_by_side(_load_repeats, path_a, path_b)
    run_a = {k: v[min(v)] for k, v in repeats_a.items()}
    floors = _noise_floors(run_a, _load_run(noise_floor), noise_floor) if noise_floor else None
    comparison = _compare_runs(run_a, {k: v[min(v)] for k, v in repeats_b.items()}, top=top,
                               tolerance=tolerance, floors=floors)
    for side, repeats in (("a", repeats_a), ("b", repeats_b)):
        for task_name, c in comparison.items():
            documents = [list(v.values()) for (task, _), v in repeats.items()
                         if task == task_name and len(v) > 1]
            if documents and c.get("n"):
                c[f"self_agreement_{side}"] = _self_agreement(documents)
    return comparison


_GATE_MATCHED = 0.9  # of a task's samples, the share both runs must have for --fail_if to judge it


def _too_few_matched(c: dict) -> bool:
    """A gate judges two runs over the same samples: a candidate that crashed early has few."""
    return c.get("n", 0) < _GATE_MATCHED * (c.get("n", 0) + c.get("unmatched", 0)) or not c.get("n")


def _fails_gate(c: dict, fail_if: str) -> bool:
    """One task's comparison against --fail_if (worse or different)."""
    if _too_few_matched(c):
        return True
    significant = c["mcnemar_p"] < 0.05
    if fail_if == "worse":
        return significant and c["difference"] < 0
    return significant or (c.get("numerics") or {}).get("verdict") == "different"


def gate_failures(comparison: dict, fail_if: str | None) -> list:
    """The tasks where B is significantly worse than A (`worse`) or differs (`different`: in
    accuracy, or in numerics), or that too few samples of both runs cover to judge."""
    if not fail_if:
        return []
    return [name for name, c in comparison.items() if _fails_gate(c, fail_if)]


def _gate_exit(comparison: dict, fail_if: str | None) -> int:
    failed = gate_failures(comparison, fail_if)
    for name in failed:
        c = comparison[name]
        if _too_few_matched(c):
            _info(f"error: --fail_if {fail_if}: {name}: only {c.get('n', 0)} of "
                  f"{c.get('n', 0) + c.get('unmatched', 0)} samples are in both runs (at least "
                  f"{_GATE_MATCHED:.0%} needed): rerun the one that stopped early")
    failed_by_score = [name for name in failed if not _too_few_matched(comparison[name])]
    in_accuracy = [name for name in failed_by_score if comparison[name]["mcnemar_p"] < 0.05]
    if in_accuracy:
        _info(f"error: --fail_if {fail_if}: B is significantly "
              f"{'worse' if fail_if == 'worse' else 'different'} on {', '.join(in_accuracy)}")
    for name in failed_by_score:
        if name not in in_accuracy:
            _info(f"error: --fail_if {fail_if}: B's numerics differ from A's on {name}: "
                  f"{'; '.join(comparison[name]['numerics']['evidence'])}")
    return _EXIT_GATE if failed else _EXIT_OK


def _format_counts(counted: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in counted.items()) or "-"


def _format_parting(p: dict) -> str:
    """One parting: where, and each side's token with its rank and gap in the other's top K."""
    def side(token: str | None, rank: int | None, gap: float | None, at_least: float | None,
             other: str) -> str:
        if token is None:
            return "(stopped)"
        where = (f"{other}'s rank {rank}, {gap:.3f} behind" if rank is not None and gap is not None
                 else f"not in {other}'s top K, >= {at_least:.3f} behind" if at_least is not None
                 else f"not in {other}'s top K")
        return f"{json.dumps(token, ensure_ascii=False)} ({where})"

    margin = p.get("margin") or ("near-tie" if p.get("near_tie") else "confident")
    if margin == "unknown":
        margin = "margin unknown (the top K is too short to show it)"
    a = side(p["a"], p.get("rank_of_a_in_b"), p.get("gap_b"), p.get("gap_b_at_least"), "B")
    b = side(p["b"], p.get("rank_of_b_in_a"), p.get("gap_a"), p.get("gap_a_at_least"), "A")
    return f"row {p['row_idx']} at token {p['token']} (char {p['char']}): A {a} | B {b} -> {margin}"


def _format_precision(nm: dict) -> str:
    """Each side's logit precision as read from its log, and the thresholds the verdict used."""
    def side(s: dict) -> str:
        return s["label"] + (f" (grid {s['step']:g} nats)" if s.get("step") else "")

    floor = nm.get("floor")
    return (f"A {side(nm['precision']['a'])}, B {side(nm['precision']['b'])}; tolerance "
            f"{nm['tolerance']:.3g} nats (asked {nm['requested_tolerance']:g}), a confident "
            f"parting leads by >= {nm['confident_gap']:.3g}"
            + (f"; noise floor p99 {floor['p99_abs_logprob_diff']:.3g} over "
               f"{floor['shared_tokens']} tokens ({floor['source']})" if floor else ""))


def _numerics_rows(nm: dict) -> list:
    """(label, text) of the numerics verdict, and of the logprob figures with each parting."""
    rows = [("numerics", f"{nm['verdict']}: {'; '.join(nm['evidence'])}")]
    rows += [("warning", text) for text in nm.get("warnings") or ()]
    if nm.get("precision"):
        rows.append(("precision", _format_precision(nm)))
    if nm.get("shared_tokens") is not None:
        g = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        rows.append(("logprobs", "\n".join([
            f"{nm['samples']} samples, {nm['shared_tokens']} shared tokens, |delta| mean "
            f"{g(nm['mean_abs_logprob_diff'])} median {g(nm['median_abs_logprob_diff'])} p99 "
            f"{g(nm['p99_abs_logprob_diff'])} max {g(nm['max_abs_logprob_diff'])}; "
            f"{nm['divergences']} partings, {nm['unexplained']} confident"
            + (f", {nm['unknown_margin']} of unknown margin" if nm.get("unknown_margin") else ""),
            *map(_format_parting, nm["partings"])])))
    return rows


def _comparison_rows(c: dict, b: str = "B") -> list:
    """(label, text, is a warning) of one task's comparison, in the order both the text and
    the HTML views show them; accuracy in fractions, as every metric."""
    f4 = lambda x: f"{x:.4f}"  # noqa: E731
    one_decimal = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    mismatch, first = c["prompt_tokens_mismatch"], c.get("first_prompt_mismatch")
    numerics = c.get("numerics") or {"verdict": "unknown", "evidence": []}
    self_agreement = "   ".join(
        f"{side.upper()} {c[f'self_agreement_{side}']['responses'] * 100:.1f}% identical "
        "over its repeats"
        for side in "ab" if f"self_agreement_{side}" in c)
    rows = [
        ("verdict", c["verdict"], c["mcnemar_p"] < 0.05),
        *((label, text, label == "warning" or numerics["verdict"] == "different")
          for label, text in _numerics_rows(numerics)),
        ("warning", f"the prompts differ on {mismatch} of {c['n']} samples (usage.prompt_tokens): "
                    "the servers do not see the same input", True) if mismatch else None,
        ("accuracy", f"A {f4(c['accuracy_a'])}   {b} {f4(c['accuracy_b'])}   "
                     f"{b}-A {c['difference']:+.4f} "
                     f"[95% CI {c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]", False),
        ("McNemar", f"p={c['mcnemar_p']:.3g}   A-only correct {c['a_only_correct']}   "
                    f"{b}-only correct {c['b_only_correct']}", False),
        ("identical text", f"{c['response_agreement'] * 100:.1f}%" + (
            f"   first difference at char {c['mean_first_difference']:.0f} on average"
            if c["mean_first_difference"] is not None else ""), False),
        ("self-agreement", f"{self_agreement}   (the noise floor for identical text)", False)
        if self_agreement else None,
        ("prompt tokens", f"{c['prompt_tokens_equal']} equal, {mismatch} differ"
                          + (f", {c['prompt_tokens_unknown']} without usage"
                             if c["prompt_tokens_unknown"] else "")
                          + (f"   (row {first['row_idx']}: A {first['a']} vs {b} {first['b']}: "
                             "the chat templates differ)" if first else ""), bool(mismatch)),
        ("finish_reason", f"A {_format_counts(c['finish_reasons_a'])}   "
                          f"{b} {_format_counts(c['finish_reasons_b'])}", False),
        ("status", f"A {_format_counts(c['status_a'])}   "
                   f"{b} {_format_counts(c['status_b'])}", False),
        ("output tokens", f"A {one_decimal(c['mean_output_tokens_a'])}   "
                          f"{b} {one_decimal(c['mean_output_tokens_b'])}", False),
    ]
    return [row for row in rows if row]


def _format_comparison(comparison: dict, label_a: str = "A", label_b: str = "B") -> str:
    lines = [f"A = {label_a}", f"B = {label_b}"]
    for task_name, c in comparison.items():
        lines.append("")
        if not c.get("n"):
            lines.append(f"{task_name}: {c['verdict']}")
            continue
        lines.append(f"{task_name} ({c['metric']}, n={c['n']}"
                     + (f", {c['unmatched']} unmatched" if c["unmatched"] else "") + ")")
        for label, text, _ in _comparison_rows(c):
            first, *more = text.split("\n")
            lines += [f"  {label:<15} {first}", *(f"    {line}" for line in more)]
        if c["flips"]:
            lines.append("  flipped samples (row: target | A | B):")
            lines += [f"    {f['row_idx']}: {f['target']} | "
                      f"{f['a']}{' ok' if f['a_correct'] else ''} | "
                      f"{f['b']}{' ok' if f['b_correct'] else ''}" for f in c["flips"]]
    return "\n".join(map(_printable, lines))


def _cmd_compare(argv: list) -> int:
    parser = _ArgumentParser(prog="nano-eval compare",
                             description="Paired comparison of two runs' sample logs.")
    parser.add_argument("run_a", help="sample log (samples_<task>.jsonl) or the --log_samples "
                                      "folder of run A")
    parser.add_argument("run_b", help="the same for run B")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.add_argument("--top", type=_from_text(_positive_int), default=10,
                        help="flipped samples to list (default 10)")
    parser.add_argument("--fail_if", "--fail-if", dest="fail_if", choices=_FAIL_IF,
                        help=f"exit {_EXIT_GATE} when B is significantly worse than A, "
                             "or different either way "
                             "(in accuracy, or in numerics when both logged logprobs)")
    parser.add_argument("--logprob_tolerance", "--logprob-tolerance", dest="logprob_tolerance",
                        type=_from_text(_positive_float, float), default=_DEFAULT_LOGPROB_TOLERANCE,
                        help="the p99 |delta logprob| over shared tokens above which the numerics "
                             f"differ (default {_DEFAULT_LOGPROB_TOLERANCE}; "
                             "widened at bf16 or fp16, see the README)")
    parser.add_argument("--noise_floor", "--noise-floor", dest="noise_floor", metavar="RUN_A2",
                        help="a second sample log of A's server "
                             "(the same samples and --logprobs K at another --num_concurrent): "
                             "its distance from A is the noise floor the numerics verdict allows")
    args = parser.parse_args(argv)
    comparison = compare_paths(args.run_a, args.run_b, top=args.top,
                               tolerance=args.logprob_tolerance, noise_floor=args.noise_floor)
    if args.json:
        floor = {"noise_floor": args.noise_floor} if args.noise_floor else {}
        print(_stdout_json({"a": args.run_a, "b": args.run_b, **floor, "comparison": comparison}))
    else:
        print(_format_comparison(comparison, args.run_a, args.run_b))
    return _gate_exit(comparison, args.fail_if)


# ============================================================================
# 12. Replay
# ============================================================================


def _restore_images(body: dict, record: dict, data_dir: str | None) -> dict:
    """Puts the image bytes back into a body logged without them (from the cache)."""
    stub = re.compile(r"<image sha256=([0-9a-f]{64}) bytes=(\d+) format=(\w+)>")

    def restore(url: str) -> str:
        found = stub.fullmatch(url)
        if not found:
            return url
        task = TASKS.get(record.get("task"))
        cached = (_DatasetCache(_resolve_data_dir(data_dir), task.data)
                  .read_image(record["row_idx"]) if task else None)
        if not cached or cached[1]["sha256"] != found.group(1):
            raise UsageError(f"the image of row {record.get('row_idx')} is not in the cache "
                             "any more; log with --log_images to replay without it")
        return _data_url(cached[0])

    return _map_image_urls(body, restore)


def _cmd_replay(argv: list) -> int:
    parser = _ArgumentParser(prog="nano-eval replay",
                             description="Resend one logged request exactly.")
    parser.add_argument("where", metavar="FILE:LINE", help="a sample log and a 1-based line number")
    parser.add_argument("--base_url", "--base-url", dest="base_url",
                        help="send it here instead of the logged URL")
    parser.add_argument("--api_key", "--api-key", dest="api_key",
                        help="default: env OPENAI_API_KEY")
    parser.add_argument("--data_dir", "--data-dir", dest="data_dir",
                        help="dataset cache, for logged images")
    parser.add_argument("--header", action="append", metavar="'NAME: VALUE'",
                        help="an extra header (repeatable)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the server's TLS certificate")
    parser.add_argument("--ca_cert", "--ca-cert", dest="ca_cert", metavar="FILE",
                        help="CA bundle (PEM)")
    parser.add_argument("--curl", action="store_true",
                        help="print a curl command instead of sending")
    parser.add_argument("--timeout", type=_from_text(_positive_float, float),
                        default=_DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)
    path, _, line_text = args.where.rpartition(":")
    if not path or not _is_digits(line_text) or int(line_text) < 1:
        raise UsageError(f"expected FILE:LINE (a 1-based line number), got {args.where!r}")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            line = next(itertools.islice(f, int(line_text) - 1, None), None)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        record = json.loads(line) if line else None
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("request"), dict):
        raise UsageError(f"{args.where} is not a sample record")
    body = _restore_images(record["request"], record, args.data_dir)
    url = _normalize_base_url(args.base_url)[1] if args.base_url else record.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise UsageError("the record has no http(s) URL; pass --base_url")
    # nano-eval sends the environment's key only to a host the user named, never to one a log names
    # (--curl sends nothing: its command names $OPENAI_API_KEY, for the user to run or not)
    key = args.api_key or (os.environ.get("OPENAI_API_KEY") if args.base_url or args.curl else None)
    config = APIConfig(url=url, api_key=_check_secret(key, "the API key"), timeout=args.timeout,
                       headers=_parse_headers(args.header or []),
                       verify_certificate=not args.insecure, ca_cert=args.ca_cert)
    payload = json.dumps(body).encode()
    if args.curl:  # every argument quoted: a log's URL may hold "&" (Azure) or "$(...)"
        body_file = Path(tempfile.mkdtemp(prefix="nano-eval-replay-")) / "body.json"
        body_file.write_bytes(payload)
        options = ' -H "Authorization: Bearer $OPENAI_API_KEY"' if config.api_key else ""
        options += "".join(f" -H {shlex.quote(f'{name}: <value of {name}>')}"
                           for name in config.headers)
        options += (" -k" if args.insecure
                    else f" --cacert {shlex.quote(args.ca_cert)}" if args.ca_cert else "")
        print(_printable(f"curl -sS {shlex.quote(url)} -H 'Content-Type: application/json'"
                         f"{options} --data-binary {shlex.quote('@' + str(body_file))}"))
        return _EXIT_OK
    _info(f"sending line {line_text} of {path} to {url}" + ("" if args.base_url else
         " (the URL the log names; without --base_url no key from OPENAI_API_KEY is sent)"))
    headers = {"Content-Type": "application/json", **_server_headers(config)}
    try:
        resp = _server_client(config).request("POST", url, payload, headers)
    except Exception as exc:
        raise ServerError(f"cannot reach {url}: {_describe_network_error(exc)[1]}") from None
    outcome = _classify_response(resp)
    _info(f"HTTP {resp.status}, status {outcome.status} (logged: {record.get('status')})")
    sys.stdout.write(_printable(_SECRETS.scrub(resp.body.decode("utf-8", "replace"))) + "\n")
    return _EXIT_OK if resp.status == 200 else _EXIT_SERVER


# ============================================================================
# 13. HTML report
# ============================================================================

_REPORT_CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1400px;margin:0 auto;padding:1em 2em}
h2{border-bottom:2px solid #ddd;margin-top:2em}table{border-collapse:collapse;margin:.5em 0}
th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #eee;vertical-align:top;\
white-space:pre-line}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.verdict{font-size:1.3em;font-weight:600;padding:.4em .8em;border-radius:4px;background:#e8f5e9}
.verdict.differ{background:#ffebee}.warn{color:#b71c1c;font-weight:600}.muted{color:#777}
.ok{color:#1b5e20}.bad{color:#b71c1c}
.browse>input{position:absolute;opacity:0}.browse>input:focus-visible+label{outline:2px solid #06c}
.browse>label{display:inline-block;padding:2px 12px;margin:0 4px 8px 0;\
border:1px solid #999;border-radius:14px;
cursor:pointer}
.browse>input:checked+label{background:#333;color:#fff}
.f-wrong:checked~.samples>:not(.wrong),.f-failed:checked~.samples>:not(.failed),
.f-flipped:checked~.samples>:not(.flipped),.f-differs:checked~.samples>:not(.differs){display:none}
details.s{border:1px solid #ddd;border-radius:4px;margin:3px 0;content-visibility:auto;\
contain-intrinsic-size:auto 30px}
details.s>summary{padding:3px 8px;cursor:pointer;white-space:nowrap;overflow:hidden;\
text-overflow:ellipsis}
details.s[open]>summary{background:#f3f3f3}.s.flipped>summary{border-left:4px solid #e65100}
.body{padding:4px 10px}.body p,h4{margin:.3em 0}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:12px}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#fafafa;border:1px solid #eee;\
padding:6px;margin:4px 0;
font:12.5px/1.4 ui-monospace,monospace}
mark{background:#ffd54f;outline:1px solid #e65100}mark:empty::after{content:"\\2205"}
.top{display:flex;flex-wrap:wrap;gap:0 3em;align-items:flex-start}
svg.dlp{background:#fafafa;border:1px solid #eee}svg.dlp rect{fill:#5c6bc0}\
svg.dlp line{stroke:#b71c1c}
.tok{font:12.5px ui-monospace,monospace;white-space:pre;background:#f1f1f1;margin:0 1px;\
padding:0 2px}
.tok.part{background:#ffd54f;outline:1px solid #e65100}
img{max-width:100%;max-height:480px;border:1px solid #ddd}
"""
# Bidirectional controls that would reverse the rest of a line (U+202E, ...): shown, not obeyed
_BIDI_CONTROLS = {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_DATA_IMAGE_URL = re.compile(r"data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=]+")
_FILTERS = {"all": "all", "wrong": "wrong", "failed": "failed", "flipped": "flipped",
            "differs": "text differs"}
# Samples per task on the page (a browser slows past a few thousand); the most telling first
_REPORT_SAMPLES = 2000
_SAMPLE_PRIORITY = ("flipped", "failed", "differs", "wrong")


def _clean(value: Any) -> str:
    """Free text as the report shows it: any secret replaced by ***."""
    return _SECRETS.scrub(str(value))


def _esc(value: Any) -> str:
    return html.escape(_clean(value))


def _run_letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"R{i}"


def _marked(text: str, other: str | None) -> str:
    """`text` escaped, with its first character that differs from `other` in a <mark>
    (empty when `text` stops where `other` goes on). Both are already redacted."""
    if other is None or text == other:
        return html.escape(text)
    i = _first_difference(text, other)
    return (f"{html.escape(text[:i])}<mark>{html.escape(text[i:i + 1])}</mark>"
            f"{html.escape(text[i + 1:])}")


def _sample_flags(records: list, metric: str) -> list:
    """The filters a sample belongs to: wrong or failed in any run; flipped (score) or text
    differs from run A's in any other run."""
    first = records[0]
    present = [r for r in records if r is not None]
    others = [r for r in records[1:] if r is not None] if first is not None else []
    on = {"wrong": any(not r.score(metric) for r in present),
          "failed": any(r.status not in Status.SCORED for r in present),
          "flipped": any(r.score(metric) != first.score(metric) for r in others),
          "differs": any(r.content != first.content for r in others)}
    return [name for name, flagged in on.items() if flagged]


def _logged_question(record: _Logged) -> str:
    """The question of a logged request: the text of its last user message without its
    task's template around it (gsm8k: the problem; chartqa: the query)."""
    messages = record.request.get("messages") or []
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content
                          if isinstance(p, dict) and p.get("type") == "text")
    content = content if isinstance(content, str) else ""
    task = TASKS.get(record.task)
    if task:
        before, after = re.split(r"\{\w+\}", task.template, maxsplit=1)
        if content.endswith(after) and before in content:
            return content[content.rindex(before) + len(before):len(content) - len(after)]
    return content


def _image_html(records: list) -> str:
    """The chart that was sent, from the first log that kept it (--log_images), else its sha256."""
    for record in filter(None, records):
        for message in record.request.get("messages") or []:
            for part in message.get("content") if isinstance(message.get("content"), list) else []:
                url = (part.get("image_url") or {}).get("url") if isinstance(part, dict) else None
                # base64 only: nothing to escape
                if isinstance(url, str) and _DATA_IMAGE_URL.fullmatch(url):
                    return (f'<div><img loading="lazy" decoding="async" alt="the chart sent" '
                            f'src="{url}"></div>')
    image = next((r.image for r in records if r and isinstance(r.image, dict)), None)
    if not image:
        return ""
    return (f'<p class="muted">image sha256 {_esc(image.get("sha256"))}, '
            f'{_esc(image.get("bytes"))} bytes, {_esc(image.get("format"))} '
            "(not in the log: run with --log_images to see it here)</p>")


def _response_html(label: str, record: _Logged | None, text: str, other: str | None) -> str:
    """One run's answer: status line, extracted answer and scores, reasoning collapsed, and the
    response with its first difference from `other` marked."""
    if record is None:
        return f'<div><h4>{label}</h4><p class="muted">not in this run</p></div>'
    facts = [record.status, record.finish_reason and f"finish {record.finish_reason}",
             record.prompt_tokens and f"{record.prompt_tokens} prompt tokens",
             record.completion_tokens and f"{record.completion_tokens} tokens",
             record.latency and f"{record.latency:.2f} s"]
    status = " · ".join(_esc(fact) for fact in facts if fact)
    scores = " · ".join(f"{_esc(k)} {_esc(v)}" for k, v in record.scores.items())
    thinking, sep, visible = text.rpartition(_THINK_END)
    thinking = "\n\n".join(filter(None, (_clean(record.reasoning or ""), thinking + sep)))
    other_visible = other.rpartition(_THINK_END)[2] if other is not None else None
    answer, found_by = _labelled_answer(record)
    return (f'<div><h4>{label} <span class="muted">{status}</span></h4>'
            f'<p>{_esc(found_by or "")} answer <b>{_esc(answer)}</b>'
            f" · {scores}</p>"
            + (f'<p class="warn">{_esc(record.error)}</p>' if record.error else "")
            + (f"<details><summary>reasoning ({len(thinking)} characters)</summary>"
               f"<pre>{html.escape(thinking)}</pre></details>" if thinking else "")
            + f"<pre>{_marked(visible, other_visible)}</pre></div>")


# nats: the top of the |delta logprob| chart (a wrong RoPE reaches it; float noise stays near 0)
_DLP_CAP = 0.5


def _dlp_svg(diffs: list, parting: dict | None) -> str:
    """|delta logprob| of each shared token as bars, the tolerance as a dashed line, and a red
    line where the texts part: a coin flip parts after low bars, a bug after high ones."""
    width, height = 600, 48
    n = max(len(diffs) + (parting is not None), 1)
    step = width / n
    bars = "".join(f'<rect x="{i * step:.1f}" y="{height - h:.1f}" '
                   f'width="{max(step - 0.5, 0.5):.1f}" height="{h:.1f}"/>'
                   for i, d in enumerate(diffs)
                   if (h := min(d, _DLP_CAP) / _DLP_CAP * height) > 0)
    level = height - _DEFAULT_LOGPROB_TOLERANCE / _DLP_CAP * height
    parted = (f'<line x1="{len(diffs) * step:.1f}" x2="{len(diffs) * step:.1f}" y1="0" '
              f'y2="{height}" stroke-width="2"/>' if parting else "")
    label = f"|delta logprob| over {len(diffs)} shared tokens, max {max(diffs, default=0):.3g}"
    return (f'<svg class="dlp" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">'
            f"<title>{_esc(label)}</title>{bars}"
            f'<line x1="0" x2="{width}" y1="{level:.1f}" y2="{level:.1f}" '
            'stroke-dasharray="4 3" stroke-width="1"/>'
            f'{parted}</svg><div class="muted">{_esc(label)} (bars up to {_DLP_CAP} nats; dashed: '
            f"{_DEFAULT_LOGPROB_TOLERANCE}; red: where the texts part)</div>")


def _token_html(token: Any, parting: bool = False) -> str:
    return f'<span class="tok{" part" if parting else ""}">{_esc(_token_key(token))}</span>'


def _parting_html(logprobs: list, other: list, at: int, label: str, other_label: str) -> str:
    """One side's tokens around the parting, and its top K there with the other side's
    choice marked."""
    if at >= len(logprobs):
        return f"<div><h4>{label}</h4><p class=muted>stopped here</p></div>"
    context = "".join(_token_html(t[0], i == at)
                      for i, t in enumerate(logprobs[max(0, at - 8):at + 4], max(0, at - 8)))
    theirs = _token_key(other[at][0]) if at < len(other) else None
    top = sorted((t for t in logprobs[at][2] if t[1] is not None), key=lambda t: -t[1])
    rows = "".join(f"<tr><td>{_token_html(token)}</td><td class=n>{logprob:.4f}</td><td>"
                   f"{'chosen' if _token_key(token) == _token_key(logprobs[at][0]) else ''}"
                   f"{f' ({other_label} chose it)' if _token_key(token) == theirs else ''}"
                   "</td></tr>"
                   for token, logprob in top)
    return (f"<div><h4>{label}</h4><p>{context}</p>"
            f"<table><tr><th>top K</th><th>logprob</th><th></th></tr>{rows}</table></div>")


def _numerics_html(a: _Logged | None, b: _Logged | None, label_b: str) -> str:
    """Run A against `label_b` on one sample, from their logprobs: the |delta| chart, and where
    the texts part, both token streams there with each side's top K."""
    if not (a and b and a.logprobs and b.logprobs):
        return ""
    diffs, parting = _token_pair(a.logprobs, b.logprobs, a.content == b.content)
    where = ""
    if parting:
        at = parting["token"]
        margin = {"near-tie": "a near-tie", "confident": "a confident token (not a near-tie)",
                  "unknown": "a token whose margin the top K is too short to show"}
        where = (f"<p>the texts part at token {at}: "
                 f"{margin[_parting_margin(parting, _CONFIDENT_GAP)]}</p>"
                 f'<div class="cols">{_parting_html(a.logprobs, b.logprobs, at, "A", label_b)}'
                 f"{_parting_html(b.logprobs, a.logprobs, at, label_b, 'A')}</div>")
    return f"<div><h4>numerics, A vs {label_b}</h4>{_dlp_svg(diffs, parting)}{where}</div>"


def _answer_html(record: _Logged, metric: str) -> str:
    """The answer with the mark of the headline metric, and the filter that found it when
    that is not the one the headline scores (strict-match found none: flexible-extract's)."""
    answer, found_by = _labelled_answer(record)
    task = TASKS.get(record.task)
    by = (f' <span class="muted">({_esc(found_by)})</span>'
          if found_by and task and found_by != task.answer_key else "")
    right = record.score(metric)
    return (f'<span class="{"ok" if right else "bad"}">{_esc(answer)}{by} '
            f'{"✓" if right else "✗"}</span>')


def _sample_html(task: str, records: list, flags: list, metric: str, opened: bool) -> str:
    first = next(r for r in records if r)
    row = first.doc_hash[:12] if first.row_idx is None else first.row_idx
    question = _logged_question(first)
    answers = " · ".join(f"{_run_letter(i)} " + ("-" if r is None else _answer_html(r, metric))
                         for i, r in enumerate(records))
    summary = (f"<b>#{_esc(row)}</b> target <b>{_esc(first.target)}</b> · {answers} · "
               f'<span class="muted">{_esc(" ".join(question.split())[:160])}</span>')
    texts = [_clean(r.content) if r else None for r in records]
    # A vs B, others vs A
    against = [texts[1 if i == 0 else 0] if len(texts) > 1 else None for i in range(len(texts))]
    columns = "".join(_response_html(_run_letter(i), r, texts[i], against[i])
                      for i, r in enumerate(records))
    return (f'<details class="s {" ".join(flags)}" id="{_esc(task)}-{_esc(row)}"'
            f'{" open" if opened else ""}><summary>{summary}</summary>'
            f'<div class="body"><pre>{_esc(question)}</pre>'
            f'<div class="cols">{_image_html(records)}{columns}</div>'
            + "".join(_numerics_html(records[0], r, _run_letter(i))
                      for i, r in enumerate(records) if i)
            + "</div></details>")


def _samples_html(index: int, task: str, runs: list) -> str:
    keys = list(dict.fromkeys(k for run in runs for k in run["records"] if k[0] == task))
    if not keys:
        return ""
    rows = [[run["records"].get(k) for run in runs] for k in keys]
    rows.sort(key=lambda records: next((r.row_idx or 0 for r in records if r), 0))
    metric = TASKS[task].headline if task in TASKS else ""
    flags = [_sample_flags(records, metric) for records in rows]
    total, note = len(rows), ""
    if total > _REPORT_SAMPLES:
        telling = sorted(range(total), key=lambda i: min(
            map(_SAMPLE_PRIORITY.index, flags[i]), default=len(_SAMPLE_PRIORITY)))
        kept = sorted(telling[:_REPORT_SAMPLES])
        rows, flags = [rows[i] for i in kept], [flags[i] for i in kept]
        note = (f'<p class="muted">{_REPORT_SAMPLES:,} of {total:,} samples shown: '
                "flipped, failed, differing and wrong ones first; "
                "the sample logs hold every one</p>")
    rows = [[_full_record(r) if r else None for r in records] for records in rows]
    shown = [n for n in _FILTERS if len(runs) > 1 or n not in ("flipped", "differs")]
    opened = next((i for i, f in enumerate(flags)
                   if (len(runs) > 1 and "flipped" in f) or "wrong" in f), None)
    controls = "".join(f'<input type="radio" name="f{index}" id="f{index}-{n}" class="f-{n}"'
                       f'{" checked" if n == "all" else ""}>'
                       f'<label for="f{index}-{n}">{_FILTERS[n]} '
                       f"({len(rows) if n == 'all' else sum(n in f for f in flags)})</label>"
                       for n in shown)
    samples = "\n".join(_sample_html(task, records, f, metric, i == opened)
                        for i, (records, f) in enumerate(zip(rows, flags)))
    return f'{note}<div class="browse">{controls}<div class="samples">\n{samples}\n</div></div>'


def _metrics_table(task: str, runs: list) -> str:
    results = [run["results"].get(task) or {} for run in runs]
    headline = TASKS[task].headline if task in TASKS else None
    metrics = [r.get("metrics") or {} for r in results]
    names = list(dict.fromkeys(k for m in metrics for k in m if "_stderr" not in k))

    def value(m: dict, name: str) -> str:
        se = m.get(_stderr_key(name))
        return (_esc(_fmt_value(m[name])
                     + (f" ± {_fmt_value(se)}" if isinstance(se, float) else ""))
                if name in m else "-")

    bold = {headline, *(r.get("headline") for r in results)}
    rows = [(f"<b>{_esc(n)}</b> (headline)" if n in bold else _esc(n),
             [value(m, n) for m in metrics]) for n in names]
    counts = (("samples", lambda r: r.get("num_samples")),
              ("failed", lambda r: r.get("num_failed")),
              ("failures by status", lambda r: _format_counts(r.get("failures") or {})),
              ("finish_reason", lambda r: _format_counts(r.get("finish_reasons") or {})))
    rows += [(label, [_esc(count(r)) if r.get("metrics") else "-" for r in results])
             for label, count in counts]
    head = "".join(f'<th class="n">{_run_letter(i)}</th>' for i in range(len(runs)))
    body = "".join(f"<tr><th>{name}</th>"
                   + "".join(f'<td class="n">{v}</td>' for v in values) + "</tr>"
                   for name, values in rows)
    note = ('<p class="muted">± is the standard error '
            '(lm-eval\'s stderr: sample standard deviation over √n); '
            "<i>,valid</i> is the score over the valid responses only (ok and truncated), "
            "failed samples left out; every other score counts a failed sample as wrong.</p>")
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>{note}" if names else ""


def _comparison_html(task: str, c: dict, label_b: str) -> tuple[str, str]:
    """(the verdict, a table of the rest) of one task's _compare_runs() result: _comparison_rows(),
    the verdict and the prompt warning above the table, flipped samples linked."""
    if not c.get("n"):
        return f'<p class="verdict">{label_b} vs A: {_esc(c.get("verdict"))}</p>', ""
    rows = _comparison_rows(c, label_b)
    alarm = any(warn for label, _, warn in rows if label in ("verdict", "warning", "numerics"))
    heading = "".join(f'<br><span class="warn">{_esc(text)}</span>'
                      for label, text, _ in rows if label == "warning")
    table = "".join(f'<tr><th>{label}</th><td{" class=warn" if warn else ""}>{_esc(text)}</td></tr>'
                    for label, text, warn in rows if label not in ("verdict", "warning"))
    flips = ", ".join(f'<a href="#{_esc(task)}-{_esc(f["row_idx"])}">{_esc(f["row_idx"])}</a>'
                      for f in c["flips"])
    unmatched = f", {c['unmatched']} unmatched" if c["unmatched"] else ""
    return (f'<p class="verdict{" differ" if alarm else ""}">{label_b} vs A '
            f'({_esc(c["metric"])}, n={_esc(c["n"])}{_esc(unmatched)}): '
            f'{_esc(c["verdict"])}{heading}</p>',
            f"<table>{table}" + (f"<tr><th>flipped</th><td>{flips}</td></tr>" if flips else "")
            + "</table>")


def _task_section(index: int, task: str, runs: list, comparisons: list) -> str:
    compared = [_comparison_html(task, c[task], _run_letter(i + 1))
                for i, c in enumerate(comparisons) if c and task in c]
    errors = "".join(f'<p class="warn">{_run_letter(i)}: {_esc(run["results"][task]["error"])}</p>'
                     for i, run in enumerate(runs) if (run["results"].get(task) or {}).get("error"))
    return (f'<section id="{_esc(task)}"><h2>{_esc(task)}</h2>'
            + "".join(verdict for verdict, _ in compared) + errors
            + '<div class="top">' + "".join(table for _, table in compared)
            + _metrics_table(task, runs) + "</div>"
            + _samples_html(index, task, runs) + "</section>")


def _runs_table(runs: list) -> str:
    rows = []
    for i, run in enumerate(runs):
        config = run["config"] or {}
        server = config.get("server") or {}
        what = (f"{config.get('model')} on {server.get('name', '?')} {server.get('version') or ''} "
                f"(recognised by {server.get('evidence', '?')}), {config.get('date', '')}"
                if config else "")
        settings = "".join(f"<tr><th>{_esc(k)}</th>"
                           f"<td>{_esc(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
                           for k, v in config.items())
        notes = "".join(f'<div class="{cls}">{_esc(run[key])}</div>'
                        for key, cls in (("error", "warn"), ("note", "muted")) if run.get(key))
        rows.append(f"<tr><th>{_run_letter(i)}</th><td>{_esc(run['label'])}<br>{_esc(what)}{notes}"
                    + (f"<details><summary>settings</summary><table>{settings}</table></details>"
                       if settings else "")
                    + "</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


# The page runs no script and loads nothing, even should a value ever escape _esc()
_REPORT_CSP = ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
               "style-src 'unsafe-inline'; img-src data:\">")


def _render_report(runs: list, comparisons: list | None = None) -> str:
    """One self-contained HTML page. `runs`: _report_side() dicts; `comparisons[i]`: _compare_runs()
    of runs[0] and runs[i + 1], or None."""
    tasks = list(dict.fromkeys(name for run in runs
                               for name in [*run["results"], *(t for t, _ in run["records"])]))
    title = "nano-eval report: " + ", ".join(tasks) + (
        f" ({' vs '.join(map(_run_letter, range(len(runs))))})" if len(runs) > 1 else "")
    parts = [f"<h1>{_esc(title)}</h1>", _runs_table(runs)]
    parts += [_task_section(i, task, runs, comparisons or []) for i, task in enumerate(tasks)]
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">' + _REPORT_CSP
            + "<title>" + _esc(title) + "</title>"
            '<meta name="viewport" content="width=device-width"><style>' + _REPORT_CSS
            + "</style></head><body>\n"
            + "\n".join(parts) + f'\n<p class="muted">nano-eval {__version__}, '
            f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}</p>\n'
            "</body></html>\n").translate(_BIDI_CONTROLS)


def _write_report(path: str | Path, page: str) -> None:
    target = Path(path).expanduser()
    try:
        # "replace": a lone surrogate from a log
        _atomic_write(target, _SECRETS.scrub(page).encode("utf-8", "replace"))
    except OSError as exc:
        raise UsageError(f"cannot write the report {target}: {exc.strerror or exc}") from None
    _info(f"report written to {target}")


def _document_problem(document: dict) -> str | None:
    """Why a parsed results JSON is not one nano-eval wrote, or None."""
    if "runs" in document:
        if (not isinstance(document["runs"], list)
                or not isinstance(document.get("comparisons", []), list)):
            return "'runs' and 'comparisons' are not lists"
        return next((f"run {i}: {p}" for i, run in enumerate(document["runs"])
                     if (p := "not an object" if not isinstance(run, dict)
                             else _document_problem(run))), None)
    results, config = document.get("results"), document.get("config")
    if not isinstance(results, dict) or not all(isinstance(r, dict) for r in results.values()):
        return "'results' is not an object of task results"
    if not all(isinstance(r.get("metrics", {}), dict) for r in results.values()):
        return "a task's 'metrics' is not an object"
    if config is not None and not isinstance(config, dict):
        return "'config' is not an object"
    return None


def _read_results_file(path: str) -> dict | None:
    """The results JSON at `path` (--output), or None when `path` is a sample log or folder."""
    source = Path(path).expanduser()
    if not source.is_file() or source.suffix != ".json":
        return None
    try:
        document = json.loads(source.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{source} is not a results JSON: {exc}") from None
    if not isinstance(document, dict) or not ("results" in document or "runs" in document):
        raise UsageError(f"{source} is not a results JSON (no 'results')")
    problem = _document_problem(document)
    if problem:
        raise UsageError(f"{source} is not a results JSON nano-eval wrote ({problem})")
    return document


def _report_side_from_document(document: dict, label: str | None = None,
                               base: Path = Path(".")) -> dict:
    """A run for the report from one server's results document: its config and metrics, and
    the records of the sample log it names (config.log_samples, also tried relative to `base`)."""
    config = document.get("config") or {}
    log, records, note = config.get("log_samples"), {}, None
    if not log:
        note = (None if document.get("error")
                else "no sample log: run with --log_samples or --output to see the samples")
    else:
        folder = next((p for p in (Path(log).expanduser(), base / log) if p.exists()), None)
        try:
            records = _load_run(str(folder or log))
        except UsageError as exc:
            note = str(exc)
    results = _task_results(document.get("results") or {})
    return {"label": label or config.get("chat_url") or "run", "config": config, "results": results,
            "records": records, "note": note, "error": document.get("error")}


def _report_side(path: str) -> dict:
    """A run for the report from a results JSON, or a sample log (file or folder) alone: then the
    metrics are recomputed from its records and the config is unknown."""
    document = _read_results_file(path)
    if document is not None:
        if "runs" in document:
            raise UsageError(f"{path} holds several servers' runs: "
                             "give it alone to report them all")
        label = f"{(document.get('config') or {}).get('chat_url', '')} ({path})".strip()
        return _report_side_from_document(document, label, Path(path).expanduser().parent)
    records = _load_run(path)
    by_task: dict = {}
    for (task, _), record in records.items():
        by_task.setdefault(task, []).append(record)
    results = {name: _aggregate(TASKS[name], sorted(rs, key=lambda r: r.row_idx or 0),
                                planned=len(rs), elapsed=0)
               for name, rs in by_task.items() if name in TASKS}
    return {"label": path, "config": None, "results": results, "records": records,
            "note": "config unknown: only the sample log was given "
                    "(give the results JSON to see it)"}


def _report_from_document(document: dict) -> str:
    """The report of what an eval run just wrote: one server's document, or the several
    --base_url document {"runs": [...], "comparisons": [...]} (run A against each other run)."""
    if "runs" not in document:
        return _render_report([_report_side_from_document(document)])
    runs = sorted((_report_side_from_document(run) for run in document["runs"]),
                  key=lambda run: bool(run["error"]))
    # A is the first usable server
    by_b = {c.get("b"): c for c in document.get("comparisons") or []}
    entries = [by_b.get(run["config"].get("chat_url"), {}) for run in runs[1:]]
    for run, entry in zip(runs[1:], entries):
        if entry.get("error"):
            run["note"] = f"not compared with A: {entry['error']}"
        elif entry.get("comparison") is not None and not _renders(entry["comparison"]):
            run["note"], entry["comparison"] = (
                "its comparison with A in the results JSON is malformed: not shown", None)
    return _render_report(runs, [entry.get("comparison") for entry in entries])


def _renders(comparison: Any) -> bool:
    """Whether a comparison read from a results JSON has the types _compare_runs gives it."""
    try:
        for c in comparison.values():
            if type(c.get("n", 0)) is not int or type(c.get("unmatched", 0)) is not int:
                return False
            if c.get("n"):
                _comparison_rows(c)
        return True
    except (AttributeError, TypeError, ValueError, KeyError, IndexError):
        return False


def _cmd_report(argv: list) -> int:
    parser = _ArgumentParser(prog="nano-eval report",
                             description="One self-contained HTML file of a run, "
                                         "or of two runs compared.")
    parser.add_argument("run_a", metavar="RUN",
                        help="a results JSON (--output), a --log_samples folder or a "
                             "samples_<task>.jsonl; a several --base_url results JSON "
                             "reports all its runs")
    parser.add_argument("run_b", metavar="RUN_B", nargs="?",
                        help="a second run, compared with the first")
    parser.add_argument("-o", "--output", default="report.html",
                        help="the HTML file (default report.html)")
    args = parser.parse_args(argv)
    _SECRETS.add(os.environ.get("OPENAI_API_KEY"), os.environ.get("HF_TOKEN"))
    if args.run_b:
        runs = list(_side_by_side(_report_side, args.run_a, args.run_b))
        page = _render_report(runs, [_compare_runs(runs[0]["records"], runs[1]["records"])])
    else:
        document = _read_results_file(args.run_a)
        page = (_report_from_document(document) if document and "runs" in document
                else _render_report([_report_side(args.run_a)]))
    _write_report(args.output, page)
    return _EXIT_OK


# ============================================================================
# 14. Speed
# ============================================================================

# What keeps nano-eval from being what limits a run, gathered here: each trick with the test of
# its invariant and its gain, measured in bench/ against the plain way in the same run (2 cores,
# 2026-12-07). Two more live where they work: _READ_BATCH (a log parsed in batches: -18% peak
# memory for ~3-5% more CPU) and _MessagesDigest (the few-shot hash state reused: ~9% less CPU
# reading big logs). Tricks whose gain was no longer measurable were dropped (bench/README.md).


# One send() a request: +10-15% requests a second, -9% CPU a request against plain http.client
# (nginx bench, c=8-256). Invariant: the bytes sent are http.client's
# (test_one_send_sends_what_http_client_sends).
class _OneSend:
    """An http.client connection that sends a request's head and a bytes body in one
    send(), as Python 2's http.client did: one system call and one TCP segment instead
    of two (the server then wakes once per request)."""

    def _send_output(self, message_body=None, encode_chunked=False):
        if isinstance(message_body, bytes) and not encode_chunked:
            self._buffer.extend((b"", message_body))
            data = b"\r\n".join(self._buffer)
            del self._buffer[:]
            self.send(data)
            return
        super()._send_output(message_body, encode_chunked)


class _Connection(_OneSend, http.client.HTTPConnection):
    pass


class _TLSConnection(_OneSend, http.client.HTTPSConnection):
    pass


# Request bodies from cached parts: ~10 us less a body (16 vs 26 us), +4% requests a second, -3%
# CPU a request against json.dumps(body). Invariant: the payload is json.dumps(body), byte for
# byte (the lm-eval parity tests of tests/test_tasks.py).
_json_string = json.encoder.encode_basestring_ascii  # how json.dumps writes a str (ensure_ascii)


def _plain_message(m: Any) -> bool:
    """{"role": str, "content": str}, in that order."""
    return type(m) is dict and len(m) == 2 and next(iter(m)) == "role" and type(m["role"]) is str \
        and type(m.get("content")) is str


@functools.lru_cache(maxsize=256)
def _encode_message(role: str, content: str) -> str:
    return json.dumps({"role": role, "content": content})


def _encode_body(body: dict, rest: str | None = None) -> bytes:
    """Exactly json.dumps(body) (lm-eval's wire format), with text messages encoded
    through a cache: the 16 few-shot turns are the same in every gsm8k request.
    `rest`: json.dumps of the body without "messages", when the caller has it."""
    messages = body["messages"]
    encoded = []
    for i, m in enumerate(messages):
        if not _plain_message(m):
            encoded.append(json.dumps(m))
        elif i < len(messages) - 1:  # a few-shot turn: the same in every request
            encoded.append(_encode_message(m["role"], m["content"]))
        else:  # the question
            encoded.append('{"role": ' + _json_string(m["role"]) + ', "content": '
                           + _json_string(m["content"]) + "}")
    if rest is None:
        rest = json.dumps({k: v for k, v in body.items() if k != "messages"})
    return ('{"messages": [' + ", ".join(encoded) + "], " + rest[1:]).encode()


# The cycle collector off while a tool reads whole logs: ~1.6x less CPU for compare and report
# of two 50,000-sample logs. Invariant: it is on again after
# (test_the_collector_is_paused_only_inside).
@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a tool works on whole sample logs: their records
    hold no cycles, and it would rescan the growing heap again and again (half the time of a
    comparison of two 100,000-sample logs)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# The second of two big logs read in a child process: ~20-25% less wall time for compare and report
# of two 50,000-sample logs on an idle 2-core machine, for 5-10% more CPU (none when the other
# core is busy). Invariant: the child's result is the parent's own reading
# (test_the_report_of_two_big_logs_reads_them_side_by_side).
# Bytes of sample logs above which the second is read in a child process
_SIDE_BY_SIDE_BYTES = 50_000_000


def _log_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in _log_files(Path(path).expanduser()))


def _read_marshalled(read: Callable, path: str) -> bytes:
    """read(path) in the child process, sent back marshalled: marshal moves the records ~3
    times faster than pickle, but takes only built-in types (see marshallable)."""
    with _collector_paused():
        return marshal.dumps(_marshallable(read(path)))


def _marshallable(value: Any) -> Any:
    """`value` (read from logs: JSON values and _Logged records in dicts) with each _Logged as a
    plain tuple: the only tuples held as dict values, so _from_marshallable knows them."""
    if isinstance(value, _Logged):
        return tuple(value)
    if isinstance(value, dict):
        return {key: _marshallable(item) for key, item in value.items()}
    return value


def _from_marshallable(value: Any) -> Any:
    if type(value) is tuple:
        return _Logged._make(value)
    if isinstance(value, dict):
        return {key: _from_marshallable(item) for key, item in value.items()}
    return value


def _side_by_side(read: Callable, first: str, second: str) -> tuple:
    """read(first) here while read(second) runs in a child process: the tools on two big
    logs use both cores (reading 100,000 samples is ~4 s). One after the other for small logs,
    on one core, or where no child process can start."""
    if _log_bytes(first) + _log_bytes(second) < _SIDE_BY_SIDE_BYTES or (os.cpu_count() or 1) < 2:
        return read(first), read(second)
    try:
        pool = ProcessPoolExecutor(max_workers=1)
        pending = pool.submit(_read_marshalled, read, second)
    except (OSError, RuntimeError, ImportError):
        return read(first), read(second)
    try:
        result = read(first)
        try:
            return result, _from_marshallable(marshal.loads(pending.result()))
        except BrokenProcessPool:
            return result, read(second)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# An exact binomial sampler for the paired bootstrap: on Python 3.9-3.11 (no
# random.binomialvariate) the obvious loop makes compare of two 50,000-sample logs 11x slower
# (49 s vs 4.4 s); on 3.12 binomialvariate is as fast, but would change the interval's last
# digit between versions. Invariant: test_binomial_draws_follow_the_binomial_distribution.
def _binomial(n: int, p: float, rng: random.Random) -> int:
    """One exact Binomial(n, p) draw in O(1) expected time: inversion when n·p < 10, else
    Hörmann's BTRS (transformed rejection with squeeze, 1993)."""
    if n == 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - _binomial(n, 1.0 - p, rng)
    if n * p < 10:
        pmf, u, k = (1.0 - p) ** n, rng.random(), 0
        while u > pmf and k < n:
            u -= pmf
            k += 1
            pmf *= p / (1.0 - p) * (n - k + 1) / k
        return k
    spq = math.sqrt(n * p * (1.0 - p))
    b = 1.15 + 2.53 * spq
    a = -0.0873 + 0.0248 * b + 0.01 * p
    c, alpha, v_r = n * p + 0.5, (2.83 + 5.1 / b) * spq, 0.92 - 4.2 / b
    m, log_odds = math.floor((n + 1) * p), math.log(p / (1.0 - p))
    h = math.lgamma(m + 1) + math.lgamma(n - m + 1)
    while True:
        u, v = rng.random() - 0.5, rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + c) if us > 0 else -1
        if not 0 <= k <= n:
            continue
        if us >= 0.07 and v <= v_r:
            return k
        if (math.log(v * alpha / (a / (us * us) + b))
                <= h - math.lgamma(k + 1) - math.lgamma(n - k + 1) + (k - m) * log_odds):
            return k


if __name__ == "__main__":
    sys.exit(main())
