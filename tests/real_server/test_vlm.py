"""chartqa against a real multimodal server: vLLM 0.32.0 (CPU) serving a tiny Idefics3
(SmolVLM-architecture) model with seeded random weights (make_tiny_vlm.py).

What this proves: a real server accepts nano-eval's chartqa requests as lm-eval shapes them
(an image_url part with a PNG or JPEG data URL first, then the text, which starts with the
literal `<image>`), decodes both image formats, runs the model's own processor (tiling and
placeholder expansion) and counts the image in usage.prompt_tokens exactly as the formula
below says, and answers deterministically with text that depends on the pixels.
What it does not prove: anything about accuracy (the weights are random, every answer is
wrong), or about other architectures' processors.

Skipped unless run with `-m real_server` or NANO_EVAL_REAL_SERVER=1 (see conftest.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import describe, post, read_samples, results_of, run_cli

pytestmark = pytest.mark.real_server

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tests/fakes.py: the datasets-server stand-in

from fakes import CHARTQA, CHARTQA_FEATURES, GSM8K, Dataset, FakeDatasetsServer, gsm8k_dataset  # noqa: E402

FIXTURES = TESTS / "fixtures" / "chartqa"
TASK = "chartqa"

# make_tiny_vlm.py's geometry
TILE, LONGEST_EDGE, TOKENS_PER_TILE = 512, 2048, 64


def idefics3_image_tokens(width: int, height: int) -> tuple[int, int]:
    """(image tokens, all tokens) that one image adds to the prompt, for make_tiny_vlm.py's
    Idefics3 processor:
      1. resize so that the longest edge is 2048 (up or down), keeping the aspect ratio, the
         other edge int()-truncated and rounded up to even;
      2. split into R = ceil(h/512) rows x C = ceil(w/512) columns of 512x512 tiles, plus one
         global 512x512 view: 64 <image> tokens each, so 64 * (R*C + 1) image tokens;
      3. around them: <fake_token_around_image><row_r_col_c> before each tile (2*R*C), a "\\n"
         after each row but the last (R-1), then "\\n\\n" (one token), <fake_token_around_image>
         <global-img> before the global view and <fake_token_around_image> after it (+4):
      all = 64 * (R*C + 1) + 2*R*C + R + 3   (e.g. 850x600 -> 2048x1446 -> 3x4: 832 + 30 = 862).
    The chat template's one `<image>` placeholder is replaced by all of these."""
    if width >= height:
        w, h = LONGEST_EDGE, int(LONGEST_EDGE / (width / height))
        h += h % 2
    else:
        h, w = LONGEST_EDGE, int(LONGEST_EDGE * (width / height))
        w += w % 2
    rows, cols = math.ceil(h / TILE), math.ceil(w / TILE)
    image = TOKENS_PER_TILE * (rows * cols + 1)
    return image, image + 2 * rows * cols + rows + 3


# (fixture image, as JPEG?, the row whose question is asked): rows 0/1 and 2/3 ask the same
# question about two different charts. The PNGs are RGBA charts (the datasets-server serves
# those as PNG), the JPEGs RGB ones re-encoded by Pillow at its default quality, as the
# datasets-server does for RGB images.
ROWS = [
    ("41699051005347.png", False, 0),
    ("41810321001157.png", False, 0),
    ("8127.png", True, 4),
    ("166.png", True, 4),
]


@pytest.fixture(scope="module")
def chart_rows(vllm_paths, tmp_path_factory):
    """[(image bytes, query, label, width, height)] for ROWS."""
    fixture_rows = [json.loads(line) for line in (FIXTURES / "rows.jsonl").read_text().splitlines()]
    out = tmp_path_factory.mktemp("charts")
    rows = []
    for name, as_jpeg, question_row in ROWS:
        src = FIXTURES / "images" / name
        data = src.read_bytes()
        if as_jpeg:  # Pillow is in the vLLM venv, not in the test venv
            dst = out / (src.stem + ".jpg")
            subprocess.run([vllm_paths["VLLM_PYTHON"], "-c",
                            "import sys; from PIL import Image; "
                            "Image.open(sys.argv[1]).convert('RGB').save(sys.argv[2], 'JPEG')",
                            src, dst], check=True)
            data = dst.read_bytes()
            assert data[:3] == b"\xff\xd8\xff"
        row = fixture_rows[question_row]
        width, height = image_size(src)
        rows.append((data, row["query"], row["label"], width, height))
    return rows


def image_size(png: Path) -> tuple[int, int]:
    data = png.read_bytes()
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def chart_datasets_server(chart_rows):
    rows = [{"image": data, "query": query, "label": label, "human_or_machine": 0}
            for data, query, label, _, _ in chart_rows]
    gsm8k = gsm8k_dataset(TESTS / "fixtures" / "gsm8k" / "test.jsonl")
    with FakeDatasetsServer({CHARTQA: Dataset(list(CHARTQA_FEATURES), rows), GSM8K: gsm8k}) as server:
        yield server


def run_chartqa(vlm_server, server, tmp_path, name):
    log_dir = tmp_path / f"samples_{name}"
    proc = run_cli(["--tasks", TASK, "--num_concurrent", 1, "--base_url", vlm_server.base_url,
                    "--log_samples", log_dir], server, data_dir=tmp_path / "data")
    doc = results_of(proc)
    assert proc.returncode == 0, describe(proc)
    return doc, read_samples(log_dir, TASK)


@pytest.fixture(scope="module")
def two_runs(vlm_server, chart_datasets_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chartqa_runs")
    return [run_chartqa(vlm_server, chart_datasets_server, tmp, name) for name in ("first", "second")]


# --------------------------------------------------------------------------- tests


def test_check_image_passes(vlm_server, chart_datasets_server, capsys):
    """`--check` against the tiny VLM: the image check passes (a real server decoded the PNG data
    URL and answered 200), and nothing fails."""
    proc = run_cli(["--check", "--base_url", vlm_server.base_url], chart_datasets_server, timeout=900)
    doc = results_of(proc)
    with capsys.disabled():
        print(f"\n[real_server] --check against vLLM + tiny Idefics3 (exit {proc.returncode}):")
        print("\n".join(line for line in proc.stderr.splitlines() if line.startswith(("PASS", "WARN", "FAIL"))))
    checks = {c["check"]: c["result"] for c in doc["results"]["api_conformance"]["checks"]}
    assert checks.get("image input") == "PASS", checks
    # Idefics3's tokenizer has `<image>` as one special token: the preflight must say so
    assert checks.get("image placeholder", "WARN") == "WARN", checks
    assert not [c for c, r in checks.items() if r == "FAIL"], checks
    assert proc.returncode == 0, describe(proc)
    assert doc["config"]["server"]["name"] == "vLLM", doc["config"]["server"]


def test_chartqa_every_sample_scored(two_runs, chart_rows):
    """PNG and JPEG charts: every sample HTTP 200 and scored, and the results count both formats."""
    doc, samples = two_runs[0]
    res = doc["results"][TASK]
    n = len(chart_rows)
    assert res["num_samples"] == n and not res["failures"], res
    assert res["num_ok"] + res.get("num_truncated", 0) == n, res
    assert [s["row_idx"] for s in samples] == list(range(n))
    formats = []
    for s, (data, *_rest) in zip(samples, chart_rows):
        where = f"row_idx={s['row_idx']} status={s['status']!r}"
        assert s["status"] in ("ok", "truncated"), where
        assert s["response"]["finish_reason"] in ("stop", "length"), where
        assert isinstance(s["response"]["content"], str), where
        assert all(isinstance(v, float) for v in s["scores"].values()) and s["scores"], (where, s["scores"])
        content = s["request"]["messages"][-1]["content"]
        assert content[0]["type"] == "image_url" and content[1]["type"] == "text", where
        assert content[1]["text"].startswith("<image>"), where  # lm-eval's literal
        formats.append("jpeg" if data[:3] == b"\xff\xd8\xff" else "png")
    assert formats == ["png", "png", "jpeg", "jpeg"], formats
    images = json.dumps(res.get("images"))
    assert "png" in images and "jpeg" in images, res.get("images")


def test_image_tokens_counted(two_runs, chart_rows, vlm_server):
    """usage.prompt_tokens of each chartqa request minus that of the same request without its
    image part equals idefics3_image_tokens(width, height)[1] (see its docstring for the
    formula): the server ran the model's processor on the decoded image, PNG and JPEG alike."""
    _, samples = two_runs[0]
    for s, (_data, _q, _l, width, height) in zip(samples, chart_rows):
        body = dict(s["request"])
        body["messages"] = [dict(m) for m in body["messages"]]
        body["messages"][-1]["content"] = [p for p in body["messages"][-1]["content"] if p["type"] != "image_url"]
        body["max_tokens"] = 1
        status, out = post(vlm_server.base_url + "/chat/completions", body)
        assert status == 200, out
        with_image = s["response"]["usage"]["prompt_tokens"]
        without = out["usage"]["prompt_tokens"]
        image_tokens, all_tokens = idefics3_image_tokens(width, height)
        assert with_image - without == all_tokens, (s["row_idx"], width, height, with_image, without, all_tokens)
        print(f"\n[real_server] row {s['row_idx']} {width}x{height}: prompt_tokens {with_image} with the image, "
              f"{without} without: {with_image - without} = {image_tokens} image tokens + {all_tokens - image_tokens}")


def test_deterministic_and_pixels_matter(two_runs):
    """Two runs at --num_concurrent 1 give identical responses; two different charts asked the
    same question (rows 0/1: PNGs, rows 2/3: JPEGs) give different responses, so the pixels
    reach the model (with --load-format dummy weights every response would be the same)."""
    (_, first), (_, second) = two_runs
    for a, b in zip(first, second):
        assert a["response"]["content"] == b["response"]["content"], (a["row_idx"], a["response"], b["response"])
        assert a["response"]["usage"] == b["response"]["usage"], a["row_idx"]
    for i, j in ((0, 1), (2, 3)):
        qa = first[i]["request"]["messages"][-1]["content"][1]["text"]
        qb = first[j]["request"]["messages"][-1]["content"][1]["text"]
        assert qa == qb, (qa, qb)
        assert first[i]["response"]["content"] != first[j]["response"]["content"], (i, j, first[i]["response"])


def test_literal_image_is_the_placeholder(vlm_server, chart_rows, two_runs):
    """What the real server does with lm-eval's literal `<image>` (the collision of issue 14):
    Idefics3's tokenizer has it as one special token (vLLM's /tokenize: [image_token_id]), a
    text-only request containing it gets HTTP 200 and one more prompt token than without it,
    and a chartqa request (image part + text starting with the literal) gets 200 and exactly
    one token more than the same request whose text has no literal: vLLM expands the image
    part's placeholder and leaves the literal as one stray image token, with no warning."""
    model = vlm_server.alias
    status, tok = post(vlm_server.root_url + "/tokenize", {"model": model, "prompt": "<image>"})
    assert status == 200 and tok["count"] == 1, tok
    image_token_id = tok["tokens"][0]
    counts = {}
    for text in ("Say hi.", "<image>Say hi.", "<imagex>Say hi."):
        status, out = post(vlm_server.base_url + "/chat/completions", {
            "model": model, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": text}]})
        assert status == 200, out
        counts[text] = out["usage"]["prompt_tokens"]
    assert counts["<image>Say hi."] - counts["Say hi."] == 1, counts
    assert counts["<imagex>Say hi."] - counts["Say hi."] > 1, counts

    _, samples = two_runs[0]
    s = samples[0]
    body = dict(s["request"])
    body["messages"] = [dict(m) for m in body["messages"]]
    parts = [dict(p) for p in body["messages"][-1]["content"]]
    data = chart_rows[0][0]
    import base64
    parts[0] = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}
    assert parts[1]["text"].startswith("<image>")
    parts[1] = {"type": "text", "text": parts[1]["text"][len("<image>"):]}
    body["messages"][-1]["content"] = parts
    body["max_tokens"] = 1
    status, out = post(vlm_server.base_url + "/chat/completions", body)
    assert status == 200, out
    with_literal = s["response"]["usage"]["prompt_tokens"]
    assert with_literal - out["usage"]["prompt_tokens"] == 1, (with_literal, out["usage"])
    print(f"\n[real_server] <image> is token {image_token_id}; text-only prompt tokens {counts}; chartqa row 0: "
          f"{with_literal} with lm-eval's literal, {out['usage']['prompt_tokens']} without it")
