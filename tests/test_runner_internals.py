"""The runner's and HTTP client's fast paths give exactly what the plain ones give: bodies built
with Task.prepare() are the bytes of json.dumps(body), a request sent in one send() is the bytes
http.client sends in two, and the lock-free AdaptiveLimiter never lets more requests through than
its cap."""

from __future__ import annotations

import http.client
import json
import random
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nano_eval import TASKS, AdaptiveLimiter, APIConfig, Connection  # noqa: E402

URL = "http://127.0.0.1:9/v1"  # never contacted


def gsm8k_rows(n: int) -> list[dict]:
    path = ROOT / "tests" / "fixtures" / "gsm8k" / "test.jsonl"
    with open(path, encoding="utf-8") as f:
        return [{"row_idx": i, "row": json.loads(line)} for i, line in zip(range(n), f)]


@pytest.mark.parametrize("settings", [
    {},
    {"gen_kwargs": {"temperature": 0.7, "top_p": 0.9}, "system_instruction": "Sé breve \u2603"},
    {"fewshot_as_multiturn": False, "gen_kwargs": {"stop": ["a"], "seed": 3}, "model": None},
    {"gen_kwargs": {"max_gen_toks": 512, "until": "Q:"}, "seed": None},
], ids=["defaults", "sampled-system", "single-turn", "odd-kwargs"])
def test_prepared_bodies_are_json_dumps(settings):
    task = TASKS["gsm8k_cot_llama"]
    config = APIConfig(url=URL, **{"model": "m", **settings})
    prepared = task.prepare(config)
    for row in gsm8k_rows(40):
        for repeat in (0, 1, 2):
            fast = task.build(row, config, None, repeat, prepared)
            plain = task.build(row, config, None, repeat)
            assert fast.payload == plain.payload == json.dumps(fast.body).encode()
            assert fast.body == plain.body and fast.body_hash == plain.body_hash


HEADER_BLOCKS = [
    b"Server: nginx\r\nContent-Type: application/json\r\nContent-Length: 285\r\nConnection: keep-alive\r\n\r\n",
    b"A: b \r\nB:\tc\t\r\n:x\r\nC: d\r\n\r\n",  # trailing blanks kept, an empty name
    b"A: b\r\n folded\r\nC: d\r\n\r\n",  # a folded line
    b"From x: y\r\nA:\r\n\r\n",
    b"A: \x85x\r\nB: \xe9\r\n\n",  # a character str.splitlines() splits at
    b"X: 1\nY:2\n\n",  # bare LF
    b"Bad line\r\nA: b\r\n\r\n",
    b"",
    b"A: b\r\nA: c\r\n\r\n",  # repeated
    b"A: b\r\r\n\r\n",
    b"A b: c\r\n\r\n",
]


class Recorder:
    """What a connection's send() is given, instead of a socket."""

    def __init__(self, connection_class):
        self.conn = connection_class("127.0.0.1", 9)
        self.sent: list = []
        self.conn.send = self.sent.append

    def request(self, body) -> bytes:
        self.conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        self.conn.putheader("Content-Type", "application/json")
        self.conn.putheader("Content-Length", str(len(body)))
        self.conn.endheaders(body)
        return b"".join(self.sent)


@pytest.mark.parametrize("body", [b'{"messages": []}', b""])
def test_one_send_sends_what_http_client_sends(body):
    ours, theirs = Recorder(Connection), Recorder(http.client.HTTPConnection)
    assert ours.request(body) == theirs.request(body)
    assert len(ours.sent) == 1


def test_limiter_never_exceeds_its_cap_under_threads():
    limiter = AdaptiveLimiter(8)
    peak, lock, stop = [0], threading.Lock(), time.monotonic() + 1.0
    rnd = random.Random(1)

    def worker():
        while time.monotonic() < stop:
            assert limiter.acquire()
            with lock:
                peak[0] = max(peak[0], limiter.in_flight)
            time.sleep(0.0005)
            limiter.release(throttled=rnd.random() < 0.05, success=True)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)  # no lost wake-up while the cap moved
    assert limiter.in_flight == 0 and peak[0] <= 8 and 1 <= limiter.limit <= 8


def test_limiter_admits_no_more_than_a_lowered_cap():
    limiter = AdaptiveLimiter(4)
    for _ in range(4):
        assert limiter.acquire()
    limiter.release(throttled=True)  # cap 2, 3 in flight
    admitted = []
    waiter = threading.Thread(target=lambda: admitted.append(limiter.acquire()))
    waiter.start()
    time.sleep(0.05)
    assert admitted == []  # 3 in flight >= cap 2: it waits
    limiter.release(success=True)  # 2 in flight: still waits
    time.sleep(0.05)
    assert admitted == []
    limiter.release(success=True)  # 1 in flight, and 2 successes at cap 2 grew it to 3: it goes
    waiter.join(5)
    assert admitted == [True] and limiter.in_flight == 2 and limiter.limit == 3
    limiter.close()
    assert limiter.acquire() is False
