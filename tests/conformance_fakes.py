"""A configurable chat server for nano-eval's conformance preflight tests (``--check``).

``ConformanceFake()`` with no arguments is a well-behaved OpenAI-compatible server:

- ``GET /v1/models``: ``{"object": "list", "data": [{"id", "object": "model", "owned_by"}]}``.
- ``max_tokens`` (or ``max_completion_tokens``, which wins when both are given) is honoured: tokens
  are whitespace-separated words; a longer answer is cut to that many words and gets
  ``finish_reason: "length"``.
- ``stop`` (a string or a list): the answer is cut before the earliest occurrence of any stop
  string, which is not included; ``finish_reason`` stays ``"stop"``.
- ``usage``: ``prompt_tokens`` (words in every message text), ``completion_tokens`` (words sent),
  ``total_tokens`` (their sum).
- Deterministic: the counting prompt the preflight sends ("Write the numbers from 1 to 30 ...")
  is answered ``"1 2 3 ... 30"``; the image prompt with ``"Red"``; a gsm8k_cot_llama prompt by
  ``fallback`` (default ``answers_responder(answers or {})`` from tests/fakes.py); anything else
  with ``"OK"``.
- ``seed`` and ``image_url`` content parts are accepted.
- A body whose ``messages`` is not a list gets HTTP 400 with an OpenAI-style JSON error.

Each keyword below breaks exactly one of those behaviours (the default is the good one):

=====================  =========================================================================
models                 "ok" | "no_data" (``{"models": [...]}``: no ``data`` list) |
                       "not_openai" (``{"data": [{"name": ...}]}``: no ``object``, no ``id``)
usage                  "ok" | "missing" (no ``usage`` key) | "bad_total" (total != sum)
max_tokens             "ok" | "ignored" (full answer, ``finish_reason: "stop"``) |
                       "wrong_finish" (cut, but ``finish_reason: "stop"``)
stop                   "ok" | "included" (cut after the stop string) | "ignored"
deterministic          True | False (a random word list is appended to each answer, so two
                       identical temperature-0 requests differ; the first words stay the same)
seed                   "ok" | "reject" (HTTP 400 when ``seed`` is present)
image                  "ok" | "reject" (HTTP 500 when a message has an ``image_url`` part)
reasoning              None | "think" (``<think>...</think>`` inside content) |
                       "reasoning_content" | "reasoning" (the reasoning in that message field)
max_completion_tokens  "ok" | "reject" (HTTP 400) | "ignored" (treated as absent)
malformed              "ok" (400 JSON) | "500" | "hang" (never answers) | "400_text" (400 with a
                       non-JSON body) | "200" (answers as if the body were fine)
chat                   "ok" | "fail" (every chat request gets HTTP 500)
image_literal          "text" (a literal ``<image>`` in the text counts 3 prompt tokens: < image >) |
                       "token" (it counts 1: the model's image placeholder) | "reject" (HTTP 400
                       for a text-only request containing it, as a server expecting an image does)
logprobs               "ok" (asked for: a logprob per word, the top K sorted, the word first) |
                       "missing" (none sent) | "reject" (HTTP 400) | "positive" (a logprob > 0) |
                       "unsorted" | "not_greedy" (a runner-up above the chosen word) | "wrong_k" (K+1)
=====================  =========================================================================

``srv.chat_requests`` (from FakeOpenAI) records every chat body received.
"""

from __future__ import annotations

import random
import socket

from fakes import FakeOpenAI, Reply, _Handler, answers_responder, question_of

COUNTING_PROMPT = "Write the numbers from 1 to 30"
IMAGE_PROMPT = "What color is this image?"
COUNTING_ANSWER = " ".join(str(i) for i in range(1, 31))
THOUGHT = "The user wants the numbers one to thirty."

# The checks nano-eval's preflight runs, in its order.
CHECKS = ["/v1/models", "chat completion", "usage", "max_tokens", "stop", "greedy repeatable", "seed",
          "logprobs", "image input", "image placeholder", "reasoning channel", "max_completion_tokens", "malformed request"]


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _has_image(messages: list) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
               for m in messages)


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]
    found = [text.index(s) for s in stops if s in text]
    return (text[: min(found)], True) if found else (text, False)


class _NoDelayHandler(_Handler):
    """fakes._Handler with TCP_NODELAY: it writes the headers and the body in two send() calls, and
    with Nagle on, the second one waits for the client's delayed ACK (~40 ms a request). The
    preflight sends its requests one at a time, so that would dominate these tests' run time."""

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ConformanceFake(FakeOpenAI):
    """A FakeOpenAI whose chat endpoint implements the request parameters the preflight checks."""

    def __init__(self, *, models: str = "ok", usage: str = "ok", max_tokens: str = "ok", stop: str = "ok",
                 deterministic: bool = True, seed: str = "ok", image: str = "ok", reasoning: str | None = None,
                 max_completion_tokens: str = "ok", malformed: str = "ok", chat: str = "ok",
                 image_literal: str = "text", logprobs: str = "ok", model: str = "conformance-model", answers: dict | None = None,
                 fallback=None, **kwargs):
        self.options = dict(models=models, usage=usage, max_tokens=max_tokens, stop=stop,
                            deterministic=deterministic, seed=seed, image=image, reasoning=reasoning,
                            max_completion_tokens=max_completion_tokens, malformed=malformed, chat=chat,
                            image_literal=image_literal, logprobs=logprobs)
        for name, value in self.options.items():
            allowed = _ALLOWED[name]
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}")
        self.fallback = fallback or answers_responder(answers or {})
        self._rng = random.Random()  # unseeded on purpose: deterministic=False must differ run to run
        routes = dict(kwargs.pop("extra_routes", None) or {})
        if models == "no_data":
            routes["/v1/models"] = (200, {"models": [{"name": model}]})
        elif models == "not_openai":
            routes["/v1/models"] = (200, {"data": [{"name": model}]})
        super().__init__(models=[model], responder=self.respond, extra_routes=routes, **kwargs)
        self._httpd.RequestHandlerClass = _NoDelayHandler

    # the answer before any limit ------------------------------------------------------------
    def _full_answer(self, body: dict, n: int) -> str:
        messages = body["messages"]
        last = _text_of(messages[-1].get("content")) if messages and isinstance(messages[-1], dict) else ""
        if COUNTING_PROMPT in last:
            text = COUNTING_ANSWER
        elif IMAGE_PROMPT in last:
            text = "Red"
        elif question_of(body):
            reply = self.fallback(body, n)
            text = reply if isinstance(reply, str) else (reply.content or "")
        else:
            text = "OK"
        if not self.options["deterministic"]:
            text += " " + " ".join(f"w{self._rng.randrange(10**9)}" for _ in range(3))
        if self.options["reasoning"] == "think":
            text = f"<think>{THOUGHT}</think>\n{text}"
        return text

    def respond(self, body: dict, n: int) -> Reply:
        o = self.options
        messages = body.get("messages")
        if not isinstance(messages, list):
            if o["malformed"] == "ok":
                return Reply(status=400, json_body={"error": {
                    "message": "messages: Input should be a valid list", "type": "BadRequestError", "code": 400}})
            if o["malformed"] == "500":
                return Reply(status=500)
            if o["malformed"] == "hang":
                return Reply(hang=True)
            if o["malformed"] == "400_text":
                return Reply(status=400, raw=b"Bad Request", headers={"Content-Type": "text/plain"})
            body = {**body, "messages": [{"role": "user", "content": str(messages)}]}  # "200"
            messages = body["messages"]
        if o["chat"] == "fail":
            return Reply(status=500)
        if "seed" in body and o["seed"] == "reject":
            return Reply(status=400, json_body={"error": {"message": "Unrecognized request argument: seed",
                                                          "type": "invalid_request_error", "code": 400}})
        if _has_image(messages) and o["image"] == "reject":
            return Reply(status=500, json_body={"error": {"message": "this model does not support images",
                                                          "type": "server_error", "code": 500}})
        literals = sum(_text_of(m.get("content")).count("<image>") for m in messages if isinstance(m, dict))
        if literals and not _has_image(messages) and o["image_literal"] == "reject":
            return Reply(status=400, json_body={"error": {"message": "1 image placeholder but 0 images",
                                                          "type": "invalid_request_error", "code": 400}})
        if body.get("logprobs") and o["logprobs"] == "reject":
            return Reply(status=400, json_body={"error": {"message": "logprobs are not supported",
                                                          "type": "invalid_request_error", "code": 400}})
        if "max_completion_tokens" in body and o["max_completion_tokens"] == "reject":
            return Reply(status=400, json_body={"error": {"message": "Unknown field max_completion_tokens",
                                                          "type": "invalid_request_error", "code": 400}})

        text = self._full_answer(body, n)
        finish = "stop"
        # stop strings
        if o["stop"] != "ignored" and body.get("stop"):
            cut, found = cut_at_stop(text, body["stop"])
            if found and o["stop"] == "included":
                stop = next(s for s in ([body["stop"]] if isinstance(body["stop"], str) else body["stop"])
                            if text[len(cut):].startswith(s))
                cut += stop
            text = cut
        # token limit
        limit = body.get("max_tokens")
        if o["max_tokens"] == "ignored":
            limit = None
        if "max_completion_tokens" in body and o["max_completion_tokens"] == "ok":
            limit = body["max_completion_tokens"]
        words = text.split()
        if isinstance(limit, int) and len(words) > limit:
            text = " ".join(words[:limit])
            words = words[:limit]
            finish = "stop" if o["max_tokens"] == "wrong_finish" else "length"

        texts = [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        per_literal = 1 if o["image_literal"] == "token" else 3
        prompt_tokens = sum(len(t.replace("<image>", " ").split()) + per_literal * t.count("<image>") for t in texts)
        completion_tokens = len(words)
        if o["usage"] == "missing":
            usage = False
        elif o["usage"] == "bad_total":
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens + 7}
        else:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
        reply = Reply(content=text, finish_reason=finish, usage=usage)
        if body.get("logprobs") and o["logprobs"] != "missing":
            reply.logprobs = {"content": [self._logprobs(word, i, body.get("top_logprobs") or 0)
                                          for i, word in enumerate(words)]}
        if o["reasoning"] == "reasoning_content":
            reply.reasoning_content = THOUGHT
        elif o["reasoning"] == "reasoning":
            reply.reasoning = THOUGHT
        return reply


    def _logprobs(self, word: str, i: int, k: int) -> dict:
        o = self.options["logprobs"]
        chosen = 0.5 if o == "positive" and i == 1 else -0.1
        top = [(word, chosen)] + [(f"{word}{j}", -1.0 - j) for j in range(k - 1 + (o == "wrong_k"))]
        if o == "unsorted" and len(top) > 2:
            top[1], top[2] = top[2], top[1]
        if o == "not_greedy":
            top = [(f"{word}!", -0.05)] + top[:-1]
        entry = lambda token, lp: {"token": token, "bytes": list(token.encode()), "logprob": lp}  # noqa: E731
        return {**entry(word, chosen), "top_logprobs": [entry(t, lp) for t, lp in top]}


_ALLOWED = {
    "models": ("ok", "no_data", "not_openai"),
    "usage": ("ok", "missing", "bad_total"),
    "max_tokens": ("ok", "ignored", "wrong_finish"),
    "stop": ("ok", "included", "ignored"),
    "deterministic": (True, False),
    "seed": ("ok", "reject"),
    "image": ("ok", "reject"),
    "reasoning": (None, "think", "reasoning_content", "reasoning"),
    "max_completion_tokens": ("ok", "reject", "ignored"),
    "malformed": ("ok", "500", "hang", "400_text", "200"),
    "chat": ("ok", "fail"),
    "image_literal": ("text", "token", "reject"),
    "logprobs": ("ok", "missing", "reject", "positive", "unsorted", "not_greedy", "wrong_k"),
}

__all__ = ["CHECKS", "COUNTING_ANSWER", "ConformanceFake", "cut_at_stop"]
