"""Fake servers and synthetic images for nano-eval's tests (standard library only).

- ``FakeOpenAI``: an OpenAI-compatible server (``GET /v1/models``, ``POST /v1/chat/completions``)
  whose answers come from a ``responder(body, n)`` callable.
- ``FakeDatasetsServer``: the HuggingFace datasets-server ``/rows`` API (validation order and
  messages, ``X-Error-Code``, ``X-Revision``, ``Cache-Control``, feature shapes, error bodies, as
  in the dataset-viewer source) plus signed, expiring ``/cached-assets/...`` image URLs.
- ``make_png``, ``TINY_JPEG``, ``image_size``, ``image_format``, ``free_port``.

Both servers listen on 127.0.0.1 on a free port, serve from a daemon thread, speak HTTP/1.1 with
keep-alive (every response carries Content-Length) and are context managers::

    with FakeOpenAI(answers={"question": "18"}) as srv:
        ...  # talk to srv.base_url
    srv.requests        # every request, as a dict: method, path, query ({name: last value}),
                        # url (as sent), headers (case-insensitive), body (parsed JSON, raw
                        # bytes, or None), time (time.monotonic() at arrival), status (None if dropped)
    srv.connections     # TCP connections accepted (keep-alive reuse shows as a small number)

``close()`` (or leaving the ``with`` block) wakes handlers that are sleeping or hanging, closes
open keep-alive connections and returns promptly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import math
import os
import random
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import typing
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def make_png(width: int, height: int, seed: int = 0, rgba: bool = False) -> bytes:
    """A valid 8-bit RGB (or RGBA) PNG: a background and a few vertical bars, colours and bar
    heights derived from ``seed``, so different seeds give different images."""
    rng = random.Random(seed)
    channels = 4 if rgba else 3

    def colour() -> bytes:
        rgb = bytes(rng.randrange(256) for _ in range(3))
        return rgb + b"\xff" if rgba else rgb

    background = colour()
    bars = []  # (first column, end column, top row, pixel)
    n_bars = rng.randint(2, 6)
    slot = max(1, width // n_bars)
    for i in range(n_bars):
        x0 = i * slot + slot // 4
        x1 = min(width, x0 + max(1, slot // 2))
        bars.append((x0, x1, rng.randrange(height), colour()))

    scanlines = []
    for y in range(height):
        line = bytearray(background * width)
        for x0, x1, top, pixel in bars:
            if y >= top and x1 > x0:
                line[x0 * channels : x1 * channels] = pixel * (x1 - x0)
        scanlines.append(b"\x00" + bytes(line))  # filter type 0 (None)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6 if rgba else 2, 0, 0, 0)
    return b"".join([
        PNG_MAGIC,
        _png_chunk(b"IHDR", ihdr),
        _png_chunk(b"IDAT", zlib.compress(b"".join(scanlines), 6)),
        _png_chunk(b"IEND", b""),
    ])


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _tiny_jpeg() -> bytes:
    """An 8x8 mid-grey baseline JPEG (JFIF, 3 components, no subsampling), built by hand.

    Every DCT coefficient is 0, so each Huffman table needs one symbol with the 1-bit code ``0``:
    DC difference category 0, and AC end-of-block. The entropy-coded scan is then 3 components x
    (DC ``0`` + EOB ``0``) = six 0-bits, padded with 1-bits to the byte ``0b00000011``.
    """
    one_code_table = bytes([1] + [0] * 15) + b"\x00"  # 1 code of length 1, for symbol 0x00
    components = b"\x01\x11\x00" + b"\x02\x11\x00" + b"\x03\x11\x00"  # id, 1x1 sampling, table 0
    return b"".join([
        b"\xff\xd8",  # SOI
        _jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),  # APP0 JFIF 1.01
        _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64),  # DQT: table 0, 8-bit, all ones
        _jpeg_segment(0xC0, struct.pack(">BHHB", 8, 8, 8, 3) + components),  # SOF0: 8x8, 3 comps
        _jpeg_segment(0xC4, b"\x00" + one_code_table),  # DHT: DC table 0
        _jpeg_segment(0xC4, b"\x10" + one_code_table),  # DHT: AC table 0
        _jpeg_segment(0xDA, b"\x03" + b"\x01\x00\x02\x00\x03\x00" + b"\x00\x3f\x00"),  # SOS
        b"\x03",  # entropy-coded data
        b"\xff\xd9",  # EOI
    ])


TINY_JPEG: bytes = _tiny_jpeg()


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG (from IHDR) or a JPEG (from its SOFn segment)."""
    if data.startswith(PNG_MAGIC):
        return struct.unpack(">II", data[16:24])
    if data.startswith(JPEG_MAGIC):
        i = 2
        while i + 4 <= len(data):
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return width, height
            i += 2 + length
    raise ValueError("not a PNG or JPEG with a readable size")


def image_format(data: bytes) -> tuple[str, str]:
    """(file extension, MIME type) sniffed from the magic bytes: ("png", "image/png") or ("jpg", "image/jpeg")."""
    if data.startswith(PNG_MAGIC):
        return "png", "image/png"
    if data.startswith(JPEG_MAGIC):
        return "jpg", "image/jpeg"
    raise ValueError("not a PNG or JPEG")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# HTTP plumbing shared by both fakes
# --------------------------------------------------------------------------------------------


class Headers(dict):
    """Request headers: keys stored lower-cased, look-ups case-insensitive."""

    def __init__(self, items=()):
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)


@dataclasses.dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict = dataclasses.field(default_factory=dict)
    drop: bool = False  # close the connection without answering


def _json_response(status: int, obj, headers: dict | None = None) -> _Response:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return _Response(status, body, {"Content-Type": "application/json", **(headers or {})})


def _text_response(status: int, text: str, headers: dict | None = None) -> _Response:
    return _Response(status, text.encode(), {"Content-Type": "text/plain; charset=utf-8", **(headers or {})})


def _parse_body(raw: bytes):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class _HTTPServer(http.server.ThreadingHTTPServer):  # one daemon thread per connection
    request_queue_size = 64

    def __init__(self, fake: _FakeServer, port: int = 0):
        self.fake = fake
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self):
        # Skip HTTPServer.server_bind's socket.getfqdn(), a reverse DNS look-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length
    timeout = 60  # an idle keep-alive connection is closed after this many seconds

    def setup(self):
        super().setup()
        # Headers and body go out in two writes: without NODELAY, Nagle + the client's delayed
        # ACK add ~40 ms to every request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fake: _FakeServer = self.server.fake
        self.fake._connection_opened(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.fake._connection_closed(self.connection)

    def log_message(self, format, *args):
        pass

    def version_string(self):
        return self.fake.server_header or super().version_string()

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_GET

    def _handle(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        request = {
            "method": self.command,
            "path": url.path,
            "query": dict(parse_qsl(url.query, keep_blank_values=True)),
            "url": self.path,
            "headers": Headers(self.headers.items()),
            "body": _parse_body(raw),
            "time": time.monotonic(),
            "status": None,  # filled in once the response is decided
        }
        try:
            response = self.fake._route(request)
        except Exception:
            self.fake._record(self.fake.errors, traceback.format_exc())
            response = _json_response(500, {"error": {"message": "fake server error", "type": "server_error"}})
        request["status"] = None if response.drop else response.status
        if response.drop or self.fake.closed:
            self.close_connection = True
            return
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self._send_body(response.body)

    def _send_body(self, body: bytes) -> None:
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1:<free port>, run in a daemon thread. Subclasses
    implement ``_route(request) -> _Response`` and record the request where they want it."""

    server_header: str | None = None

    def __init__(self, port: int = 0):
        self.requests: list[dict] = []
        self.connections = 0  # TCP connections accepted so far
        self.errors: list[str] = []  # tracebacks of exceptions raised while routing
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._open_sockets: set[socket.socket] = set()
        self._httpd = _HTTPServer(self, port)  # binds now, so .url is known before start()
        self._thread: threading.Thread | None = None
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    # lifecycle -------------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name=f"{type(self).__name__}:{self.port}")
        self._thread.start()
        return self

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()  # wakes handlers in a delay or a hang
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            sockets = list(self._open_sockets)
        for sock in sockets:  # unblock handlers waiting for the next keep-alive request
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    # helpers for subclasses ------------------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up as soon as the server is closed."""
        if seconds and seconds > 0:
            self._closing.wait(seconds)

    def _record(self, log: list, request: dict) -> None:
        with self._lock:
            log.append(request)

    def _connection_opened(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._open_sockets.add(sock)

    def _connection_closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._open_sockets.discard(sock)

    def _route(self, request: dict) -> _Response:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# FakeOpenAI
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    """Full control over one chat-completion response (a responder may return this instead of a str).

    status/content/reasoning_content/reasoning/finish_reason/usage shape the standard body
    (content None -> ``"content": null``; reasoning fields are included only when not None;
    usage True -> computed counts, False -> no "usage" key, dict -> sent as given). A non-200
    status without json_body/raw sends an OpenAI-style ``{"error": {...}}`` body.
    json_body: a dict sent instead of the standard body. raw: bytes sent as-is (Content-Type
    text/html unless headers say otherwise). headers: extra response headers (e.g. Retry-After).
    delay: seconds to wait before answering (None -> the server's ``delay``).
    hang: never answer; the handler returns when the server is closed. drop: close the
    connection without answering.
    """

    status: int = 200
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    finish_reason: str | None = "stop"
    json_body: dict | None = None
    raw: bytes | None = None
    headers: dict = dataclasses.field(default_factory=dict)
    delay: float | None = None
    hang: bool = False
    drop: bool = False
    usage: bool | dict = True
    logprobs: dict | None = None  # sent as choices[0].logprobs (see LogprobModel)


Responder = Callable[[dict, int], "str | Reply"]

_GSM8K_PROBLEM = re.compile(r"Problem: (.*?)\nYour response should end with", re.S)
_CHARTQA_QUERY = re.compile(r"^(?:<image>)?(.*?)\nAnalyze the image and question carefully", re.S)


def question_of(body: dict) -> tuple[str, str] | None:
    """("gsm8k" | "chartqa", question) from the last user message of an lm-eval-style request.

    gsm8k_cot_llama: the text between the last "Problem: " and "\\nYour response should end with"
    (the single-turn form repeats the few-shot problems first). chartqa: the text part's query
    between the leading "<image>" and "\\nAnalyze the image ...".
    """
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return None
    content = users[-1].get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        return None
    if problems := _GSM8K_PROBLEM.findall(content):
        return "gsm8k", problems[-1]
    if m := _CHARTQA_QUERY.search(content):
        return "chartqa", m.group(1)
    return None


def answers_responder(answers: dict[str, str]) -> Responder:
    """Responder answering known questions correctly, in the format lm-eval's filters expect.

    gsm8k question in ``answers`` -> "Let me think. The final answer is <answer>";
    chartqa query in ``answers`` -> "Let me look at the chart.\\nFinal Answer: <answer>";
    anything else -> "The final answer is 0".
    """

    def respond(body: dict, n: int) -> str:
        found = question_of(body)
        if found and found[1] in answers:
            task, question = found
            if task == "chartqa":
                return f"Let me look at the chart.\nFinal Answer: {answers[question]}"
            return f"Let me think. The final answer is {answers[question]}"
        return "The final answer is 0"

    return respond


class ByRow:
    """A gsm8k responder keyed on the test row of the request (found from its question), so a plan
    does not depend on request order. plan[row] is a str/Reply, or a list of them for the successive
    attempts of that row (the last one repeats). Other rows answer right ("Let me think. The final
    answer is <gold>"), except the ``wrong`` rows, which answer 0. ``delay`` applies to every answer.
    ``rows`` lists the row of every request, in arrival order; ``attempts`` counts them per row."""

    def __init__(self, plan: dict | None = None, wrong=(), delay: float | None = None):
        self.plan = plan or {}
        self.wrong = set(wrong)
        self.delay = delay
        self.attempts: dict[int, int] = {}
        self.rows: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, body, n):
        row = gsm8k_row_of(body)
        with self._lock:
            k = self.attempts.get(row, 0)
            self.attempts[row] = k + 1
            self.rows.append(row)
        reply = self.plan.get(row)
        if isinstance(reply, list):
            reply = reply[min(k, len(reply) - 1)]
        if reply is None:
            reply = Reply(content=f"Let me think. The final answer is {0 if row in self.wrong else GSM8K_GOLD[row]}")
        if isinstance(reply, str):
            reply = Reply(content=reply)
        if self.delay is not None and reply.delay is None:
            reply = Reply(**{**reply.__dict__, "delay": self.delay})
        return reply


# The gsm8k test split of tests/fixtures (all 1319 rows, parsed once for every test file) and its gold answers
GSM8K_ROWS = [json.loads(line) for line in
              (Path(__file__).parent / "fixtures" / "gsm8k" / "test.jsonl").read_text("utf-8").splitlines()]
GSM8K_GOLD = [row["answer"].split("####")[-1].strip() for row in GSM8K_ROWS]
# what the tests' planted answers rely on: row 0 is Janet's ducks (18), no gold answer among the first 40 is 0
assert GSM8K_GOLD[:3] == ["18", "3", "70000"] and "0" not in GSM8K_GOLD[:40]
_GSM8K_ROW_OF = {row["question"]: i for i, row in enumerate(GSM8K_ROWS)}


def gsm8k_row_of(body: dict) -> int:
    """The gsm8k test row a request body asks about."""
    return _GSM8K_ROW_OF[question_of(body)[1]]


def openai_token(text: str | None, logprob: float, raw: bytes | None = None, **extra) -> dict:
    """One entry of choices[0].logprobs.content as vLLM and llama.cpp send it (bytes = UTF-8 of the text)."""
    raw = text.encode() if raw is None and text is not None else raw
    return {"token": text or "", "bytes": list(raw) if raw else [], "logprob": logprob, **extra}


class LogprobModel:
    """A gsm8k responder that is a tiny stand-in for a real model: row r answers
    "Let me think. The final answer is <gold>" as word tokens, each with a logprob fixed by
    the row and token (in -0.05..-0.6) and a runner-up 1 nat behind, plus Gaussian `noise`
    (nats, seeded by `seed`: two instances with different seeds are two backends' float
    noise). `ties` {row: token index}: there the runner-up is only `gap` nats behind; on
    the rows in `parts` this side takes the runner-up there, and the rest of its answer
    follows that branch (a small gap: a near-tie flipped by noise; a large one: a confident
    parting). The final token is an EOS spelled as `eos`. Asked with "logprobs": true it
    sends them (top_logprobs of them), unless send_logprobs is False."""

    def __init__(self, noise: float = 0.0, seed: int = 0, ties: dict | None = None, parts=(), gap: float = 0.01,
                 eos: dict | None = None, send_logprobs: bool = True):
        self.noise, self.seed, self.ties, self.parts, self.gap = noise, seed, ties or {}, set(parts), gap
        self.eos = eos if eos is not None else {"token": "<|im_end|>"}
        self.send_logprobs = send_logprobs

    def tokens(self, row: int) -> list[tuple[str, float, str, float]]:
        """(chosen, its logprob, runner-up, its logprob) for each generated token."""
        words = ["Let", " me", " think", ".", " The", " final", " answer", " is", f" {GSM8K_GOLD[row]}"]
        base = random.Random(f"{row}")  # the same "true" model on every side
        rng = random.Random(f"{row}-{self.seed}")
        out, branch = [], ""
        for i, word in enumerate(words):
            lp = -0.05 - 0.55 * base.random() + rng.gauss(0, self.noise)
            word, alt = word + branch, word + branch + "x"
            if self.ties.get(row) == i:
                if row in self.parts:
                    word, alt, branch = alt, word, "y"
                out.append((word, lp, alt, lp - self.gap))
            else:
                out.append((word, lp, alt, lp - 1.0))
        return out

    def __call__(self, body, n):
        tokens = self.tokens(gsm8k_row_of(body))
        logprobs = None
        if body.get("logprobs") and self.send_logprobs:
            k = body.get("top_logprobs") or 0
            entries = [openai_token(t, lp, top_logprobs=[openai_token(t, lp), openai_token(alt, alp)][:k])
                       for t, lp, alt, alp in tokens]
            eos = {**openai_token(None, -0.001), **self.eos}
            logprobs = {"content": entries + [{**eos, "top_logprobs": [eos][:k]}]}
        return Reply(content="".join(t[0] for t in tokens), logprobs=logprobs)


def float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


class GridModel:
    """A gsm8k responder whose logprobs come from logits as a bf16 or fp16 server computes them:
    on a grid of `step` nats (0: float32, no grid), five alternatives at each token, the
    logprobs log-softmax of them in float32. Row r answers like LogprobModel (the same words).
    Batch noise: on a `moved` share of the tokens the chosen logit moves by `steps` grid steps
    (at least 0.01 nats when there is no grid), drawn afresh for every request (a server's batch
    composition differs from run to run); `fault`: Gaussian nats added to every chosen logit
    before it is put on the grid (a wrong implementation). `k` caps the top_logprobs sent."""

    def __init__(self, step: float = 0.125, moved: float = 0.02, steps: int = 1, fault: float = 0.0, seed: int = 0,
                 k: int | None = None):
        self.step, self.moved, self.steps, self.fault, self.seed, self.k = step, moved, steps, fault, seed, k
        self.asked: dict = {}
        self.lock = threading.Lock()

    def on_grid(self, logit: float) -> float:
        return round(logit / self.step) * self.step if self.step else logit

    def __call__(self, body, n):
        row = gsm8k_row_of(body)
        with self.lock:
            asked = self.asked[row] = self.asked.get(row, -1) + 1
        base = random.Random(f"grid-{row}")  # the same "true" model on every side
        noise = random.Random(f"grid-{row}-{self.seed}-{asked}")
        fault = random.Random(f"grid-fault-{row}-{self.seed}")
        words = ["Let", " me", " think", ".", " The", " final", " answer", " is", f" {GSM8K_GOLD[row]}"]
        entries = []
        for word in words:
            true = 16 + 15 * base.random()
            gaps = [self.on_grid(0.3 + 4 * base.random()) for _ in range(4)]
            alternatives = [self.on_grid(true - sum(gaps[:i + 1])) for i in range(4)]
            tail = true - 3  # 200 other tokens there: the chosen one has ~9% of the probability, as in a long answer
            logit = self.on_grid(true + fault.gauss(0, self.fault))
            if noise.random() < self.moved:
                logit += noise.choice((-1, 1)) * self.steps * (self.step or 0.01)
            logits = [logit, *alternatives]
            top_logit = max(logits)
            total = top_logit + math.log(sum(math.exp(x - top_logit) for x in logits) + 200 * math.exp(tail - top_logit))
            logprobs = [float32(x - total) for x in logits]
            top = sorted(zip([word] + [word + c for c in "wxyz"], logprobs), key=lambda t: -t[1])
            k = min(body.get("top_logprobs") or 0, self.k if self.k is not None else 5)
            entries.append(openai_token(word, logprobs[0], top_logprobs=[openai_token(t, lp) for t, lp in top[:k]]))
        eos = openai_token(None, -0.001, token="<|im_end|>")
        return Reply(content="".join(words), logprobs={"content": entries + [{**eos, "top_logprobs": [eos][:1]}]}
                     if body.get("logprobs") else None)


def fault_plan(plan: dict[int, str | Reply], fallback: Responder | None = None) -> Responder:
    """Responder that answers request ``n`` with ``plan[n]`` when present, else with ``fallback``
    (default: ``answers_responder({})``). E.g. ``fault_plan({0: Reply(status=500)}, ok)``."""
    fallback = fallback or answers_responder({})
    return lambda body, n: plan[n] if n in plan else fallback(body, n)


class FakeOpenAI(_FakeServer):
    """OpenAI-compatible fake: ``GET /v1/models`` and ``POST /v1/chat/completions``.

    responder(body, n) -> str | Reply answers chat requests; ``n`` is the 0-based index of the
    chat request among those that passed the API-key check and had a JSON body. Default:
    ``answers_responder(answers or {})``. ``responder`` and ``delay`` are plain attributes that
    tests may change while the server runs.
    api_key: if set, every /v1/ request needs ``Authorization: Bearer <api_key>`` (else 401).
    port: 0 for a free one; a given port lets a test restart "the same server" (same URL).
    extra_routes: {path: (status, json_or_text)} answered for GET before the built-in routes
    (so "/v1/models" can be overridden too). server_header: value of the ``Server`` header.
    """

    def __init__(self, models: Sequence[str] = ("fake-model",), responder: Responder | None = None,
                 delay: float = 0.0, api_key: str | None = None, server_header: str | None = None,
                 extra_routes: dict[str, tuple[int, object]] | None = None,
                 answers: dict[str, str] | None = None, port: int = 0):
        super().__init__(port)
        self.models = list(models)
        self.responder = responder or answers_responder(answers or {})
        self.delay = delay
        self.api_key = api_key
        self.server_header = server_header
        self.extra_routes = dict(extra_routes or {})
        self.in_flight = 0  # chat requests being answered right now
        self.max_in_flight = 0  # peak of in_flight
        self._chat_count = 0

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def chat_requests(self) -> list[dict]:
        """The recorded POST /v1/chat/completions requests, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r["path"] == "/v1/chat/completions"]

    def _route(self, request: dict) -> _Response:
        self._record(self.requests, request)
        path, method = request["path"], request["method"]
        if method == "GET" and path in self.extra_routes:
            status, payload = self.extra_routes[path]
            if isinstance(payload, str):
                return _text_response(status, payload)
            return _json_response(status, payload)
        if path.startswith("/v1/") and self.api_key is not None:
            if request["headers"].get("Authorization") != f"Bearer {self.api_key}":
                return _json_response(401, {"error": {"message": "Invalid API key",
                                                      "type": "invalid_request_error"}})
        if method == "GET" and path == "/v1/models":
            return _json_response(200, {"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": "fake"} for m in self.models]})
        if method == "POST" and path == "/v1/chat/completions":
            return self._chat(request["body"])
        return _json_response(404, {"error": {"message": f"Unknown route {method} {path}",
                                              "type": "invalid_request_error"}})

    def _chat(self, body) -> _Response:
        if not isinstance(body, dict):
            return _json_response(400, {"error": {"message": "Request body is not a JSON object",
                                                  "type": "invalid_request_error"}})
        with self._lock:
            n = self._chat_count
            self._chat_count += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = self.responder(body, n)
            if isinstance(reply, str):
                reply = Reply(content=reply)
            if not isinstance(reply, Reply):
                raise TypeError(f"responder returned {type(reply).__name__}, expected str or Reply")
            self._sleep(self.delay if reply.delay is None else reply.delay)
            if reply.hang:
                self._closing.wait()
            if reply.hang or reply.drop:
                return _Response(drop=True)
            return self._reply_response(reply, body, n)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _reply_response(self, reply: Reply, body: dict, n: int) -> _Response:
        if reply.raw is not None:
            return _Response(reply.status, reply.raw, {"Content-Type": "text/html; charset=utf-8", **reply.headers})
        if reply.json_body is not None:
            return _json_response(reply.status, reply.json_body, reply.headers)
        if reply.status != 200:
            kind = "server_error" if reply.status >= 500 else "invalid_request_error"
            return _json_response(reply.status, {"error": {
                "message": f"fake error {reply.status}", "type": kind, "code": reply.status}}, reply.headers)
        message = {"role": "assistant", "content": reply.content}
        if reply.reasoning_content is not None:
            message["reasoning_content"] = reply.reasoning_content
        if reply.reasoning is not None:
            message["reasoning"] = reply.reasoning
        completion = {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or (self.models[0] if self.models else "fake-model"),
            "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
        }
        if reply.logprobs is not None:
            completion["choices"][0]["logprobs"] = reply.logprobs
        if reply.usage is True:
            prompt_tokens = len(json.dumps(body.get("messages", []))) // 4
            completion_tokens = len((reply.content or "").split())
            completion["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens}
        elif isinstance(reply.usage, dict):
            completion["usage"] = reply.usage
        return _json_response(200, completion, reply.headers)


# --------------------------------------------------------------------------------------------
# FakeDatasetsServer
# --------------------------------------------------------------------------------------------

STRING = {"dtype": "string", "_type": "Value"}
IMAGE = {"_type": "Image"}


def list_of(feature: dict) -> dict:
    return {"feature": feature, "_type": "List"}


def class_label(*names: str) -> dict:
    return {"names": list(names), "_type": "ClassLabel"}


@dataclasses.dataclass
class Dataset:
    """One split served by FakeDatasetsServer.

    features: [(column name, FeatureType dict)] in column order (use ``list_of`` for lists;
    the server restyles them per its ``list_style``). rows: any sequence of row dicts; row i is
    served as row_idx i. A cell of an Image column is None or the image file's bytes (PNG or
    JPEG; the format is sniffed from the magic bytes).
    """

    features: list[tuple[str, dict]]
    rows: Sequence[dict]


GSM8K = ("openai/gsm8k", "main", "test")  # (dataset, config, split) keys of FakeDatasetsServer
CHARTQA = ("HuggingFaceM4/ChartQA", "default", "test")
CHARTQA_FEATURES = [("image", IMAGE), ("query", STRING), ("label", list_of(STRING)),
                    ("human_or_machine", class_label("human", "machine"))]


def gsm8k_dataset(path: str | Path) -> Dataset:
    """openai/gsm8k main/test from a jsonl of {"question", "answer"} (e.g. tests/fixtures/gsm8k/test.jsonl)."""
    with open(path, encoding="utf-8") as f:
        rows = [{"question": r["question"], "answer": r["answer"]} for r in map(json.loads, f)]
    return Dataset([("question", STRING), ("answer", STRING)], rows)


def chartqa_dataset(rows_jsonl: str | Path, images_dir: str | Path | None = None,
                    jpeg_rows: Sequence[int] = ()) -> Dataset:
    """HuggingFaceM4/ChartQA default/test from tests/fixtures/chartqa/rows.jsonl.

    Rows are served densely in file order (line i -> row_idx i). Each line's ``image`` names a
    file in ``images_dir`` (default: ``images/`` next to the jsonl); a null image gives a null
    cell. Rows listed in ``jpeg_rows`` serve ``TINY_JPEG`` instead, as the real server does for
    RGB charts, which it re-encodes as JPEG.
    """
    rows_jsonl = Path(rows_jsonl)
    images_dir = Path(images_dir) if images_dir is not None else rows_jsonl.parent / "images"
    jpeg_rows = set(jpeg_rows)
    files: dict[str, bytes] = {}
    rows = []
    with open(rows_jsonl, encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            image = None
            if i in jpeg_rows:
                image = TINY_JPEG
            elif r["image"]:
                name = Path(r["image"]).name
                if name not in files:
                    files[name] = (images_dir / name).read_bytes()
                image = files[name]
            rows.append({"image": image, "query": r["query"], "label": r["label"],
                         "human_or_machine": r["human_or_machine"]})
    return Dataset(list(CHARTQA_FEATURES), rows)


def noise_png(width: int, height: int, seed: int) -> bytes:
    """An RGB PNG of random pixels: it does not compress, so each image really is ~3*w*h bytes
    (memory tests and the bench use it to make images as heavy as real charts)."""
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join([PNG_MAGIC, _png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", zlib.compress(raw, 1)),
                     _png_chunk(b"IEND", b"")])


class _SyntheticChartRows(Sequence):
    """ChartQA-shaped rows whose PNG is generated on access, so nothing large is held."""

    def __init__(self, n_rows: int, width: int, height: int, noise: bool = False):
        self.n_rows, self.width, self.height = n_rows, width, height
        self.image = noise_png if noise else (lambda w, h, seed: make_png(w, h, seed=seed))

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n_rows))]
        if i < 0:
            i += self.n_rows
        if not 0 <= i < self.n_rows:
            raise IndexError(i)
        return {"image": self.image(self.width, self.height, i),
                "query": f"What is the value of the tallest bar in synthetic chart {i}?",
                "label": [str(i)], "human_or_machine": i % 2}


def synthetic_chartqa_dataset(n_rows: int, width: int = 400, height: int = 300, noise: bool = False) -> Dataset:
    """A ChartQA-shaped split of ``n_rows`` distinct synthetic PNGs (row i: seed i, query
    mentioning "synthetic chart i", label [str(i)]), generated on demand; ``noise``: random
    pixels that do not compress (``noise_png``)."""
    return Dataset(list(CHARTQA_FEATURES), _SyntheticChartRows(n_rows, width, height, noise))


_ERROR_MESSAGES = {
    "ExternalUnauthenticatedError": "The dataset does not exist, or is not accessible without authentication "
    "(private or gated). Please check the spelling of the dataset name or retry with authentication.",
    "ExternalAuthenticatedError": "The dataset does not exist, or is not accessible with the current credentials "
    "(private or gated). Please check the spelling of the dataset name or retry with other authentication "
    "credentials.",
    "ResponseNotFound": "Not found.",
    "ResponseNotReady": "The server is busier than usual and the response is not ready yet. Please retry later.",
    "UnexpectedApiError": "Unexpected error.",
}
_ACCESS_DENIED = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                  "<Error><Code>AccessDenied</Code><Message>Access denied</Message></Error>")
MAX_ROWS_PER_PAGE = 100


def _restyle(ftype, list_style: str):
    """A FeatureType with every List rendered as "List", "Sequence" or the legacy ``[feature]``."""
    if isinstance(ftype, list):
        ftype = list_of(ftype[0])
    if not isinstance(ftype, dict):
        return ftype
    if ftype.get("_type") in ("List", "Sequence"):
        inner = _restyle(ftype["feature"], list_style)
        if list_style == "legacy":
            return [inner]
        if list_style == "Sequence":
            return {"feature": inner, "length": -1, "_type": "Sequence"}
        return {"feature": inner, "_type": "List"}
    if "_type" not in ftype:  # a struct: {field: FeatureType}
        return {k: _restyle(v, list_style) for k, v in ftype.items()}
    return ftype


class FakeDatasetsServer(_FakeServer):
    """The datasets-server ``/rows`` (and ``/splits``) API and its signed ``/cached-assets`` URLs.

    datasets: {(dataset, config, split): Dataset}. expire_seconds: lifetime of issued image URLs
    (negative -> already expired). revision: the 40-hex ``X-Revision`` (a plain attribute; change
    it to simulate a new dataset revision, which also invalidates issued URLs). list_style:
    "List" | "Sequence" | "legacy" for list features.

    faults: a list (the same object is kept as ``.faults``; append to it at any time) of dicts
    applied to the next matching requests, before any validation:
      path: URL-path prefix to match (default "" = every request; "/cached-assets" for images),
      match: {query param: value} that must also match (e.g. {"offset": "100"}),
      times: how many requests it applies to (default 1; decremented, removed at 0),
      status (default 500), error_code (-> X-Error-Code; also picks the canonical message),
      body: dict -> JSON, str -> text/plain, bytes -> as is. Default body: {"error": <canonical
      message>} with an error_code, {"error": "too many requests"} for 429, otherwise plain-text
      "Internal Server Error".
      headers: extra headers (e.g. {"Retry-After": "1"}), delay: seconds before answering,
      drop: close the connection without answering.

    ``.requests`` records API calls (/rows, /splits, ...); ``.asset_requests`` image downloads.
    """

    def __init__(self, datasets: dict[tuple[str, str, str], Dataset], expire_seconds: float = 3600,
                 revision: str = "a" * 40, faults: list[dict] | None = None, list_style: str = "List"):
        super().__init__()
        if list_style not in ("List", "Sequence", "legacy"):
            raise ValueError(f"list_style must be List, Sequence or legacy, not {list_style!r}")
        self.datasets = dict(datasets)
        self.expire_seconds = expire_seconds
        self.revision = revision
        self.faults = faults if faults is not None else []
        self.list_style = list_style
        self.asset_requests: list[dict] = []
        self._epoch = 0  # part of every signature; expire_now() bumps it

    def expire_now(self) -> None:
        """Invalidate every image URL issued so far (their downloads get 403 from now on)."""
        with self._lock:
            self._epoch += 1

    @property
    def rows_requests(self) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["path"] == "/rows"]

    # routing ---------------------------------------------------------------------------------
    def _route(self, request: dict) -> _Response:
        is_asset = request["path"].startswith("/cached-assets/")
        self._record(self.asset_requests if is_asset else self.requests, request)
        fault = self._take_fault(request)
        if fault is not None:
            return self._fault_response(fault)
        if is_asset:
            return self._asset(request)
        if request["path"] == "/rows":
            return self._rows(request)
        if request["path"] == "/splits":
            return self._splits(request)
        return _text_response(404, "Not Found")

    def _take_fault(self, request: dict) -> dict | None:
        with self._lock:
            for fault in self.faults:
                if not request["path"].startswith(fault.get("path", "")):
                    continue
                if any(request["query"].get(k) != str(v) for k, v in fault.get("match", {}).items()):
                    continue
                fault["times"] = fault.get("times", 1) - 1
                if fault["times"] <= 0:
                    self.faults.remove(fault)
                return dict(fault)
        return None

    def _fault_response(self, fault: dict) -> _Response:
        self._sleep(fault.get("delay", 0))
        if fault.get("drop"):
            return _Response(drop=True)
        status, code = fault.get("status", 500), fault.get("error_code")
        headers = {"Cache-Control": "max-age=10", **({"X-Error-Code": code} if code else {})}
        headers.update(fault.get("headers", {}))
        if "body" in fault:
            body = fault["body"]
        elif code:
            body = {"error": _ERROR_MESSAGES.get(code, code)}
        elif status == 429:
            body = {"error": "too many requests"}
        else:
            body = "Internal Server Error"
        if isinstance(body, bytes):
            return _Response(status, body, {"Content-Type": "application/octet-stream", **headers})
        if isinstance(body, str):
            return _text_response(status, body, headers)
        return _json_response(status, body, headers)

    @staticmethod
    def _error(status: int, code: str, message: str | None = None, **extra) -> _Response:
        return _json_response(status, {"error": message or _ERROR_MESSAGES[code], **extra},
                              {"X-Error-Code": code, "Cache-Control": "max-age=10"})

    def _lookup(self, request: dict, dataset: str, config: str, split: str) -> Dataset | _Response:
        """The split's Dataset, or the error the real server gives for an unknown name."""
        keys = self.datasets.keys()
        if not any(d == dataset for d, _, _ in keys):
            if "Authorization" in request["headers"]:
                return self._error(404, "ExternalAuthenticatedError")
            return self._error(401, "ExternalUnauthenticatedError")
        if not any(d == dataset and c == config for d, c, _ in keys):
            return self._error(404, "ResponseNotFound")
        if (dataset, config, split) not in self.datasets:
            return self._error(500, "UnexpectedApiError", cause_exception="EmptyParquetMetadataError",
                               cause_message="No parquet files found.", cause_traceback=[])
        return self.datasets[dataset, config, split]

    def _rows(self, request: dict) -> _Response:
        q = request["query"]
        for name in ("dataset", "config", "split"):
            if not q.get(name, "").strip():
                return self._error(422, "MissingRequiredParameter", f"Parameter '{name}' is required")
        bounds = {}
        for name, default in (("offset", 0), ("length", MAX_ROWS_PER_PAGE)):
            try:
                bounds[name] = int(q.get(name, default))
            except ValueError:
                return self._error(422, "InvalidParameter", f"Parameter '{name}' must be integer")
            if bounds[name] < 0:
                return self._error(422, "InvalidParameter", f"Parameter '{name}' must be positive")
        if bounds["length"] > MAX_ROWS_PER_PAGE:
            return self._error(422, "InvalidParameter",
                               f"Parameter 'length' must not be greater than {MAX_ROWS_PER_PAGE}")
        dataset, config, split = q["dataset"], q["config"], q["split"]
        spec = self._lookup(request, dataset, config, split)
        if isinstance(spec, _Response):
            return spec

        offset, total = bounds["offset"], len(spec.rows)
        rows = []
        for row_idx in range(offset, min(offset + bounds["length"], total)):
            source = spec.rows[row_idx]
            cells = {}
            for name, ftype in spec.features:
                value = source.get(name)
                if isinstance(ftype, dict) and ftype.get("_type") == "Image" and value is not None:
                    value = self._image_cell(dataset, config, split, row_idx, name, value)
                cells[name] = value
            rows.append({"row_idx": row_idx, "row": cells, "truncated_cells": []})
        features = [{"feature_idx": i, "name": name, "type": _restyle(ftype, self.list_style)}
                    for i, (name, ftype) in enumerate(spec.features)]
        body = {"features": features, "rows": rows, "num_rows_total": total,
                "num_rows_per_page": MAX_ROWS_PER_PAGE, "partial": False}
        return _json_response(200, body, {"Cache-Control": "max-age=120", "X-Revision": self.revision})

    def _splits(self, request: dict) -> _Response:
        dataset = request["query"].get("dataset", "")
        if not dataset.strip():
            return self._error(422, "MissingRequiredParameter", "Parameter 'dataset' is required")
        if not any(d == dataset for d, _, _ in self.datasets):
            return self._lookup(request, dataset, "", "")
        config = request["query"].get("config")
        splits = [{"dataset": d, "config": c, "split": s} for d, c, s in self.datasets
                  if d == dataset and config in (None, c)]
        body = {"splits": splits} if config is not None else {"splits": splits, "pending": [], "failed": []}
        return _json_response(200, body, {"Cache-Control": "max-age=120"})

    # images ----------------------------------------------------------------------------------
    def _signature(self, path: str, expires: str) -> str:
        with self._lock:
            epoch = self._epoch
        return hashlib.sha256(f"{epoch}|{self.revision}|{path}|{expires}".encode()).hexdigest()[:24]

    def _image_cell(self, dataset: str, config: str, split: str, row_idx: int, column: str,
                    data: bytes) -> dict:
        ext, _ = image_format(data)
        width, height = image_size(data)
        path = (f"/cached-assets/{quote(dataset)}/--/{self.revision}/--/{quote(config)}/{quote(split)}"
                f"/{row_idx}/{quote(column)}/image.{ext}")
        expires = str(int(time.time() + self.expire_seconds))
        query = f"Expires={expires}&Signature={self._signature(path, expires)}&Key-Pair-Id=K"
        return {"src": f"{self.url}{path}?{query}", "height": height, "width": width}

    def _asset(self, request: dict) -> _Response:
        """Serve an image if its URL is one we issued, unexpired; otherwise a CloudFront-like 403."""
        q = request["query"]
        if q.get("Signature") != self._signature(request["path"], q.get("Expires", "")):
            return self._denied("bad signature")
        if int(q["Expires"]) < time.time():
            return self._denied("expired")
        dataset, _, rest = request["path"][len("/cached-assets/"):].partition(f"/--/{self.revision}/--/")
        config, split, row_idx, column, filename = map(unquote, rest.split("/"))
        spec = self.datasets.get((unquote(dataset), config, split))
        if spec is None or not 0 <= int(row_idx) < len(spec.rows):
            return self._denied("no such asset")
        data = spec.rows[int(row_idx)].get(column)
        if not isinstance(data, bytes) or filename != f"image.{image_format(data)[0]}":
            return self._denied("no such asset")
        return _Response(200, data, {"Content-Type": image_format(data)[1], "Cache-Control": "public, max-age=3600"})

    @staticmethod
    def _denied(reason: str) -> _Response:
        return _Response(403, _ACCESS_DENIED.encode(),
                         {"Content-Type": "text/xml", "X-Fake-Reason": reason})


# --------------------------------------------------------------------------------------------
# Deployment helpers: HTTPS, chunked responses, a forward proxy
# --------------------------------------------------------------------------------------------

TLS_DIR = Path(__file__).parent / "fixtures" / "tls"
TLS_CERT = TLS_DIR / "cert.pem"  # self-signed, its own CA, for IP:127.0.0.1 and DNS:localhost (test only)
TLS_KEY = TLS_DIR / "key.pem"


def serve_https(server: _FakeServer) -> _FakeServer:
    """Make a not yet started fake speak HTTPS with the test certificate in fixtures/tls/:
    its listening socket is wrapped (the handshake happens in the connection's handler
    thread), and ``url``/``base_url`` become https://127.0.0.1:PORT. Returns the server::

        with serve_https(FakeOpenAI()) as srv:  # srv.base_url == "https://127.0.0.1:PORT/v1"
    """
    import ssl

    if server._thread is not None:
        raise RuntimeError("serve_https() must be called before start()")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS_CERT, TLS_KEY)
    server._httpd.socket = context.wrap_socket(server._httpd.socket, server_side=True,
                                               do_handshake_on_connect=False)
    server._httpd.handle_error = lambda request, client_address: None  # failed handshakes are expected
    server.url = f"https://127.0.0.1:{server.port}"
    return server


class _ChunkedHandler(_Handler):
    """_Handler, but every response body goes out with Transfer-Encoding: chunked (no Content-Length),
    in 64 KiB chunks."""

    def _send_body(self, body: bytes) -> None:
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        body = memoryview(body)
        for i in range(0, len(body), 65536):
            chunk = body[i:i + 65536]
            self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


def send_chunked(server: _FakeServer) -> _FakeServer:
    """Make a not yet started fake send every response with chunked transfer encoding. Returns it."""
    server._httpd.RequestHandlerClass = _ChunkedHandler
    return server


_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
               "te", "trailer", "transfer-encoding", "upgrade", "content-length"}


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forward proxy: absolute-form requests are forwarded (one kept-alive upstream connection
    per client connection and origin), CONNECT opens a tunnel."""

    protocol_version = "HTTP/1.1"
    timeout = 60

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fake: ForwardProxy = self.server.fake
        self.fake._connection_opened(self.connection)
        self.upstreams: dict = {}

    def finish(self):
        try:
            super().finish()
        finally:
            for conn in self.upstreams.values():
                conn.close()
            self.fake._connection_closed(self.connection)

    def log_message(self, format, *args):
        pass

    def _authorized(self) -> bool:
        """With ``credentials``, a request without the right Proxy-Authorization gets 407."""
        if self.fake.credentials is None:
            return True
        import base64
        if self.headers.get("Proxy-Authorization") == "Basic " + base64.b64encode(self.fake.credentials.encode()).decode():
            return True
        self.fake._record(self.fake.refused, {"method": self.command, "target": self.path,
                                              "headers": Headers(self.headers.items())})
        body = b"Proxy Authentication Required"
        self.send_response(407)
        self.send_header("Proxy-Authenticate", 'Basic realm="fake proxy"')
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return False

    def do_CONNECT(self):
        host, _, port = self.path.rpartition(":")
        if not self._authorized():
            self.close_connection = True
            return
        self.fake._record(self.fake.tunnels, {"target": self.path, "headers": Headers(self.headers.items()),
                                              "client": self.client_address, "time": time.monotonic()})
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except (OSError, ValueError):
            self.send_error(502)
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        self._relay(self.connection, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        import selectors

        with upstream, selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, upstream)
            sel.register(upstream, selectors.EVENT_READ, client)
            while not self.fake.closed:
                for key, _ in sel.select(timeout=0.1):
                    try:
                        data = key.fileobj.recv(65536)
                        if not data:
                            return
                        key.data.sendall(data)
                    except OSError:
                        return

    def _forward(self):
        import http.client

        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        if not url.scheme or not url.hostname:
            self.fake._record(self.fake.errors, f"not absolute-form: {self.command} {self.path}")
            self.send_error(400, "absolute-form request target required")
            return
        if not self._authorized():
            return
        self.fake._record(self.fake.requests, {"method": self.command, "url": self.path, "path": url.path,
                                               "headers": Headers(self.headers.items()), "client": self.client_address,
                                               "time": time.monotonic()})
        conn = self.upstreams.get(url.netloc)
        if conn is None:
            conn = self.upstreams[url.netloc] = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        try:
            conn.request(self.command, target, body=raw if raw or self.command == "POST" else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            del self.upstreams[url.netloc]
            self.send_error(502)
            self.close_connection = True
            return
        if resp.will_close:
            conn.close()
            del self.upstreams[url.netloc]
        self.send_response_only(resp.status, resp.reason)  # the origin's own Server and Date headers
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward


class ForwardProxy(_FakeServer):
    """An HTTP forward proxy on 127.0.0.1 (threaded, keep-alive on both sides) that counts what
    passed through it: ``requests`` (absolute-form GET/POST: method, url, path, headers, client,
    time), ``tunnels`` (CONNECT: target "host:port", headers, client, time), ``connections`` (TCP
    connections accepted from clients; ``client`` is the (host, port) of the one a request came on).
    ``url`` is http://127.0.0.1:PORT, for HTTP(S)_PROXY. credentials: "user:password" the proxy
    requires (Proxy-Authorization: Basic); other requests get 407 and are listed in ``refused``."""

    def __init__(self, credentials: str | None = None):
        super().__init__()
        self.credentials = credentials
        self.refused: list[dict] = []
        self.tunnels: list[dict] = []
        self._httpd.RequestHandlerClass = _ProxyHandler

    def _route(self, request: dict) -> _Response:  # not used: _ProxyHandler handles everything
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Running the CLI
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
NANO_EVAL = ROOT / "nano_eval.py"
DEAD_URL = "http://127.0.0.1:9"  # the discard port: nothing listens there


class CliRun(typing.NamedTuple):
    """A child run of nano-eval: unpacks as ``code, out, err``; ``.returncode``, ``.stdout`` and
    ``.stderr`` give the same (the names of subprocess.CompletedProcess)."""

    code: int
    out: str
    err: str

    returncode = property(lambda self: self.code)
    stdout = property(lambda self: self.out)
    stderr = property(lambda self: self.err)


def cli_command(*args, script=NANO_EVAL) -> list[str]:
    """The argv of ``python SCRIPT ARGS`` (for Popen)."""
    return [sys.executable, str(script), *map(str, args)]


# The repository's nano_eval.py runs in the child as an import of the module, so that its bytecode
# is compiled once for the whole suite (`python nano_eval.py` compiles the script anew each time).
BYTECODE = Path(tempfile.gettempdir()) / f"nano-eval-tests-bytecode-{os.getuid()}"
RUN_NANO_EVAL = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import nano_eval; sys.exit(nano_eval.main())"


def cli(*args, env=None, cwd=None, timeout=120, script=NANO_EVAL, command=None, terminal=False) -> CliRun:
    """``python nano_eval.py ARGS`` in a child process (``script``: another copy of it, run as a
    script; ``command``: another program, e.g. an installed console script). Runs in ``cwd``, by
    default the repository root (the script's folder for another script). Output is decoded as
    UTF-8 with replacement. terminal=True: stderr is a pseudo-terminal (isatty() is true), read
    back with its "\r\n" line ends made "\n" again."""
    if command is None and Path(script) == NANO_EVAL:
        command = [sys.executable, "-c", RUN_NANO_EVAL]
        env = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(BYTECODE)
    argv = [*(command or [sys.executable, str(script)]), *map(str, args)]
    if cwd is None:
        cwd = ROOT if Path(script) == NANO_EVAL else Path(script).parent
    if not terminal:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=env, cwd=str(cwd))
        return CliRun(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))
    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain():  # read while the child runs, so a full pty buffer never blocks it
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                              timeout=timeout, env=env, cwd=str(cwd))
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    err = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return CliRun(proc.returncode, proc.stdout.decode("utf-8", "replace"), err)


def cli_env(tmp_path=None, datasets_server=DEAD_URL, **extra) -> dict:
    """os.environ without NANO_EVAL_*, OPENAI_API_KEY or HF_TOKEN, with 127.0.0.1 off any proxy;
    NANO_EVAL_DATA_DIR=tmp_path/"data" when tmp_path is given; NANO_EVAL_DATASETS_SERVER=
    datasets_server (a URL or a FakeDatasetsServer; by default a dead port: gsm8k ships in data/);
    plus ``extra`` variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NANO_EVAL_") and k not in ("OPENAI_API_KEY", "HF_TOKEN")}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if tmp_path is not None:
        env["NANO_EVAL_DATA_DIR"] = str(Path(tmp_path) / "data")
    if datasets_server is not None:
        env["NANO_EVAL_DATASETS_SERVER"] = getattr(datasets_server, "url", datasets_server)
    env.update(extra)
    return env


def gsm8k_args(server, n, *extra, log_dir=None) -> list:
    """The CLI arguments of a gsm8k_cot_llama run of ``n`` rows against ``server``, without a
    progress line (``log_dir``: --log_samples), then ``extra``."""
    args = ["--tasks", "gsm8k_cot_llama", "--base_url", server.base_url, "--max_samples", n, "--no_progress"]
    if log_dir is not None:
        args += ["--log_samples", log_dir]
    return args + list(extra)


def run_main(argv, capsys) -> tuple[int, str, str]:
    """nano_eval.main(ARGV) in this process: (exit code, stdout, stderr) of that call alone."""
    import nano_eval

    capsys.readouterr()
    code = nano_eval.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def main_json(argv, capsys):
    """run_main(), with stdout parsed: (exit code, the results document or None, stderr)."""
    code, out, err = run_main(argv, capsys)
    try:
        doc = json.loads(out) if out.strip() else None
    except ValueError:
        doc = None
    return code, doc, err


def error_lines(stderr: str) -> list:
    """The one-line errors nano-eval printed."""
    return [line for line in stderr.splitlines() if line.startswith("nano-eval: error:")]


def warning_lines(stderr: str) -> list:
    """The warnings nano-eval printed."""
    return [line for line in stderr.splitlines() if line.startswith("nano-eval: warning:")]


def error_line(stderr: str, *fragments) -> str:
    """The single 'nano-eval: error:' line, holding every fragment; fails on a traceback, an
    internal error or several error lines."""
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def one_error(code, err, expected_code, *fragments) -> str:
    """Exit code ``expected_code`` and error_line(err, *fragments)."""
    assert code == expected_code, (code, err)
    return error_line(err, *fragments)


def read_log(where, task="gsm8k_cot_llama", sort=True) -> list[dict]:
    """The records of a sample log: ``where`` is the file, or its folder (then samples_TASK.jsonl);
    sorted by row_idx (a stable sort: a row's repeats keep their order) unless sort=False."""
    path = Path(where)
    if path.is_dir():
        path = path / f"samples_{task}.jsonl"
    records = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    return sorted(records, key=lambda r: r["row_idx"]) if sort else records


def run_inproc(server, tmp_path=None, n=1, *, log_dir=None, repeats=1, **config):
    """(results, sample records sorted by row) of an in-process gsm8k run of `n` rows, ``repeats``
    times, against ``server`` (fast retries, model "fake-model"), logged in ``log_dir``, by default
    a fresh folder under tmp_path (neither: no sample log, no records)."""
    import asyncio

    from nano_eval import APIConfig, TASKS, run_task

    config.setdefault("retry_base_delay", 0.01)
    config.setdefault("model", "fake-model")
    if log_dir is None and tmp_path is not None:
        log_dir = tmp_path / f"log{len(list(tmp_path.glob('log*')))}"
    result = asyncio.run(run_task(TASKS["gsm8k_cot_llama"], APIConfig(url=server.base_url, **config),
                                  max_samples=n, log_dir=log_dir, progress=False, repeats=repeats))
    return result, (read_log(log_dir) if log_dir is not None else [])


def wait_for(predicate, timeout=20.0, interval=0.02) -> bool:
    """Whether predicate() became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def interrupted_cli(*args, when, sig=signal.SIGINT, what="the run did not get there", env=None):
    """Starts ``python nano_eval.py ARGS``, waits until when() is true (failing with ``what`` after
    20 s), sends ``sig``: (its CliRun, seconds from the signal to its exit)."""
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
    try:
        assert wait_for(when), what
        start = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return CliRun(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")), elapsed


def interrupt_while_waiting(cmd: list) -> tuple:
    """Starts `cmd`, waits for its "waiting ..." notice on stderr, sends SIGINT: (the process,
    its stderr lines, the notice, stdout, seconds from SIGINT to exit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    announced = threading.Event()

    def read_stderr():
        for raw in proc.stderr:
            lines.append(raw.decode("utf-8", "replace"))
            if "waiting" in lines[-1]:
                announced.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert announced.wait(20), "".join(lines)
        notice = next(line for line in lines if "waiting" in line)
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)  # not communicate(): the reader thread owns stderr
        out = proc.stdout.read()
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    return proc, lines, notice, out, elapsed


# --------------------------------------------------------------------------------------------
# Shared by several test files
# --------------------------------------------------------------------------------------------

# These helpers use nano_eval itself, which the rest of this file never imports.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import asyncio  # noqa: E402
import base64  # noqa: E402
import math  # noqa: E402

import nano_eval as ne  # noqa: E402
from nano_eval import TASKS, APIConfig, _DatasetCache, _DatasetsClient, run_task  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


GSM = "gsm8k_cot_llama"


def bodies(server) -> list[dict]:
    return [r["body"] for r in server.chat_requests]


TASK_ARGS = ["--tasks", "gsm8k_cot_llama", "--max_samples", "2", "--no_progress"]


GSM_ARGS = ["--tasks", "gsm8k_cot_llama", "--no_progress"]


ROWS_JSONL = FIXTURES / "chartqa" / "rows.jsonl"


with open(ROWS_JSONL, encoding="utf-8") as _f:
    FIXTURE_ROWS = [json.loads(line) for line in _f]


ANSWERS = {r["query"]: r["label"][0] for r in FIXTURE_ROWS}


SECRET = "sk-test-SECRET-0123456789abcdef"


PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy")


TASK = ne.TASKS["gsm8k_cot_llama"]


OTHER_RIGHT = "Let me see. The final answer is {}"  # right, but other text than ByRow's default


WRONG = "Let me think. The final answer is 0"  # no gold answer of the first 40 rows is 0


def right(row: int) -> str:
    """ByRow's own right answer for a row (the default when a row has no plan)."""
    return f"Let me think. The final answer is {GSM8K_GOLD[row]}"


def client(server, token=None) -> _DatasetsClient:
    return _DatasetsClient(base_url=server.url, token=token, retry_base_delay=0.01)


def image_of(row_idx: int) -> bytes:
    return (FIXTURES / "chartqa" / FIXTURE_ROWS[row_idx]["image"]).read_bytes()


CQA = TASKS["chartqa"]


def run_chartqa(config, n, data_dir, hf, **kwargs) -> dict:
    return asyncio.run(run_task(CQA, config, max_samples=n, data_dir=str(data_dir), datasets_server=client(hf),
                                progress=False, **kwargs))


def chart_row_of(body: dict) -> int:
    """The fixture row a chat request is for (by its query)."""
    task, query = question_of(body)
    assert task == "chartqa"
    return next(i for i, r in enumerate(FIXTURE_ROWS) if r["query"] == query)


def image_url(body: dict) -> str:
    parts = body["messages"][-1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
    assert len(urls) == 1
    return urls[0]


CAPTURES = FIXTURES / "lm_eval_requests"


URL = "http://127.0.0.1:9/v1"  # never contacted: build() does not talk to the server


def chartqa_cache(tmp_path: Path) -> _DatasetCache:
    return _DatasetCache([tmp_path], TASKS["chartqa"].data)


def image_bytes_of(body: dict) -> bytes:
    url = body["messages"][-1]["content"][0]["image_url"]["url"]
    header, _, data = url.partition(",")
    assert header == "data:image/png;base64"
    return base64.b64decode(data)


def read_log_by_row(log_dir: Path) -> dict[int, dict]:
    return {rec["row_idx"]: rec for rec in read_log(log_dir, "chartqa", sort=False)}


METRICS = ["exact_match,strict-match", "exact_match,flexible-extract"]


def assert_auth_failure(code, out, err, secret):
    assert code == 4, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "authentication failed" in lines[0] and "--api_key" in lines[0]
    assert "Traceback" not in err
    assert secret not in err and secret not in out


WRONG_ROWS = {1, 4, 9, 13, 17, 22}  # rows the standard responder answers wrongly (so metrics are not trivial)


def ByRowWithWrongRows(plan=None, delay=None):
    """ByRow with WRONG_ROWS wrong."""
    return ByRow(plan, wrong=WRONG_ROWS, delay=delay)


LOG_NAME = "samples_gsm8k_cot_llama.jsonl"


def gsm8k_first(n: int) -> list[dict]:
    return GSM8K_ROWS[:n]


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


def run_gsm8k_plain(config: APIConfig, n: int, tmp_path: Path) -> dict:
    return asyncio.run(run_task(TASKS["gsm8k_cot_llama"], config, max_samples=n, data_dir=str(tmp_path / "data"),
                                progress=False))


def sem(values) -> float:
    """lm-eval's stderr of a mean, by hand: sample stdev (n - 1) / sqrt(n)."""
    n = len(values)
    m = sum(values) / n
    return math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1)) / math.sqrt(n)
