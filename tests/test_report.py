"""The HTML report (issue 17), from real fake-server runs: `nano-eval report RUN [RUN_B]` and the
report of an eval run's document (one server, or several --base_url). The HTML must parse, hold
the counts and verdict of the runs, show untrusted text as text, hold no secret, and (when Debian's
chromium is installed) render in a real browser with working filters."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fakes import FIXTURES, ROOT  # noqa: E402

import nano_eval  # noqa: E402
from fakes import (ByRow, CHARTQA, FakeDatasetsServer, FakeOpenAI, GSM, GSM8K_GOLD, Reply,  # noqa: E402
                   answers_responder, free_port, main_json, synthetic_chartqa_dataset)


class Page(HTMLParser):
    """The elements of a page as (tag, attrs, text inside); fails on a tag closed out of order."""

    VOID = {"input", "img", "meta", "br", "hr", "link"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self.open: list[dict] = []
        self.feed(text)
        self.close()
        assert [e["tag"] for e in self.open] == [], "elements left open"

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in self.VOID:
            self.open.append(element)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1]["tag"] == tag, f"</{tag}> closes <{self.open[-1]['tag']}>"
        self.open.pop()

    def handle_data(self, data):
        for element in self.open:
            element["text"] += data

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag
                and (cls is None or cls in e["attrs"].get("class", "").split())]

    def filter_counts(self) -> dict:
        return {m.group(1): int(m.group(2)) for e in self.find("label")
                for m in [re.fullmatch(r"(.+) \((\d+)\)", e["text"].strip())] if m}


HOSTILE = "<script>alert(1)</script>"

KEY = "sk-test-0123456789abcdef"

TOKEN = "team-token-fedcba9876543210"  # the value of an extra --header: a secret too

# A is wrong on rows 1 and 3; B is wrong on 2 and 3, answers row 4 with a script, echoes the key on
# row 5 (right, but the text differs) and fails row 6 with HTTP 400.
# -> wrong 1,2,3,4,6 (5); flipped 1,2,4,6 (4); text differs 1,2,4,5,6 (5); failed 6 (1)
# -> A-only correct 3 (2, 4, 6), B-only correct 1 (1): McNemar p = 2 * (1 + 4) / 16 = 0.625
B_PLAN = {4: HOSTILE, 5: f"Let me think. My key is {KEY}, {TOKEN}. The final answer is {GSM8K_GOLD[5]}",
          6: Reply(status=400)}

report = nano_eval


@pytest.fixture
def compared(isolated_env, tmp_path, capsys) -> dict:
    """Two servers that disagree, run in one command (several --base_url) with --api_key."""
    with FakeOpenAI(models=["model-a"], responder=ByRow(wrong={1, 3}), api_key=KEY) as a, \
            FakeOpenAI(models=["model-b"], responder=ByRow(wrong={2, 3}, plan=B_PLAN), api_key=KEY) as b:
        code, document, _ = main_json(["--tasks", GSM, "--base_url", a.base_url, "--base_url", b.base_url,
                                   "--api_key", KEY, "--header", f"X-Team: {TOKEN}", "--max_samples", 10,
                                   "--max_fail_rate", 0.5,
                                   "--output", tmp_path / "both.json", "--log_samples", tmp_path / "logs",
                                   "--no_progress"], capsys)
    assert code == 0
    runs = [run["config"]["log_samples"] for run in document["runs"]]
    return {"document": document, "html": report._report_from_document(document), "logs": runs,
            "json": tmp_path / "both.json", "tmp": tmp_path}


def test_comparison_report_counts_and_verdict(compared):
    page = Page(compared["html"])
    c = compared["document"]["comparisons"][0]["comparison"][GSM]
    assert (c["a_only_correct"], c["b_only_correct"], c["mcnemar_p"]) == (3, 1, 0.625)
    verdicts = [e["text"] for e in page.find("p", "verdict")]
    assert verdicts == ["B vs A (exact_match,strict-match, n=10): no significant difference at n=10 (p=0.625)"]
    assert page.filter_counts() == {"all": 10, "wrong": 5, "failed": 1, "flipped": 4, "text differs": 5}
    samples = page.find("details", "s")
    assert [s["attrs"]["id"] for s in samples] == [f"{GSM}-{row}" for row in range(10)]
    assert [row for row, s in enumerate(samples) if "flipped" in s["attrs"]["class"]] == [1, 2, 4, 6]
    assert "open" in samples[1]["attrs"]  # the first flipped sample is shown open
    assert "model-a" in compared["html"] and "model-b" in compared["html"]
    # self-contained: nothing to fetch, no script
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    assert all(e["attrs"]["href"].startswith("#") for e in page.find("a"))
    assert "http_400 1" in "".join(e["text"] for e in page.find("td"))  # failures by status
    # each run's metrics with their stderr
    assert "0.8000 ± 0.1333" in compared["html"] and "0.6000 ± 0.1633" in compared["html"]


def texts_in(page: Page, sample_id: str, tag: str) -> list:
    """The text of each <tag> in one sample."""
    start = next(i for i, e in enumerate(page.elements) if e["attrs"].get("id") == sample_id)
    end = next((i for i, e in enumerate(page.elements) if i > start and e in page.find("details", "s")),
               len(page.elements))
    return [e["text"] for e in page.elements[start:end] if e["tag"] == tag]


def test_first_difference_is_marked(compared):
    page = Page(compared["html"])
    # row 1: A "Let me think. The final answer is 0", B "... is 3": marked at the answer
    assert texts_in(page, f"{GSM}-1", "mark") == ["0", GSM8K_GOLD[1][0]]
    # row 4: B's script differs from the first character on
    assert texts_in(page, f"{GSM}-4", "mark") == ["L", "<"]
    assert texts_in(page, f"{GSM}-0", "mark") == []  # the same text: nothing marked


def test_hostile_response_is_text_and_no_secret(compared):
    html = compared["html"]
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html.replace("<mark>", "").replace("</mark>", "")
    assert not Page(html).find("script")  # the report has no script at all
    assert HOSTILE in texts_in(Page(html), f"{GSM}-4", "pre")  # shown as text
    assert KEY not in html and TOKEN not in html
    redacted = f"Let me think. My key is ***, ***. The final answer is {GSM8K_GOLD[5]}"
    assert redacted in texts_in(Page(html), f"{GSM}-5", "pre")


def test_cmd_report_of_two_folders_and_of_the_results_json(compared, monkeypatch):
    tmp = compared["tmp"]
    a, b = compared["logs"]
    assert report._cmd_report([a, b, "-o", str(tmp / "ab.html")]) == 0
    page = Page((tmp / "ab.html").read_text("utf-8"))
    assert page.filter_counts() == {"all": 10, "wrong": 5, "failed": 1, "flipped": 4, "text differs": 5}
    assert "no significant difference at n=10 (p=0.625)" in page.find("p", "verdict")[0]["text"]
    assert "config unknown" in (tmp / "ab.html").read_text("utf-8")  # sample logs alone
    # the several --base_url results JSON given alone reports its runs and their comparison
    assert report._cmd_report([str(compared["json"]), "-o", str(tmp / "doc.html")]) == 0
    text = (tmp / "doc.html").read_text("utf-8")
    assert "model-b" in text and "config unknown" not in text
    assert Page(text).filter_counts() == page.filter_counts()
    with pytest.raises(nano_eval.UsageError, match="several servers"):
        report._cmd_report([a, str(compared["json"])])


def test_cmd_report_redacts_the_key_from_the_environment(compared):
    # a fresh process: the key is known only from OPENAI_API_KEY
    out = compared["tmp"] / "env.html"
    proc = subprocess.run([sys.executable, str(ROOT / "nano_eval.py"), "report", *compared["logs"],
                           "-o", str(out)], env={**os.environ, "OPENAI_API_KEY": KEY},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert KEY not in out.read_text("utf-8") and "***" in out.read_text("utf-8")


def test_several_servers_one_unusable_and_a_prompt_mismatch(isolated_env, tmp_path, capsys):
    # C is not listening: its entry carries the error; B's chat template "differs" on row 0
    odd_prompt = Reply(content=f"Let me think. The final answer is {GSM8K_GOLD[0]}",
                       usage={"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12})
    with FakeOpenAI(responder=ByRow()) as a, FakeOpenAI(responder=ByRow(plan={0: odd_prompt})) as b:
        dead = f"http://127.0.0.1:{free_port()}/v1"
        code, document, _ = main_json(["--tasks", GSM, "--base_url", dead, "--base_url", a.base_url, "--base_url",
                                   b.base_url, "--max_samples", 5, "--log_samples", tmp_path / "logs", "--no_progress"],
                                  capsys)
    assert code != 0 and "error" in document["runs"][0]
    page = Page(report._report_from_document(document))
    runs = [e["text"] for e in page.find("table")[0:1]][0]
    assert runs.index(a.base_url) < runs.index(b.base_url) < runs.index(dead)  # A: the first usable server
    assert "cannot reach" in "".join(e["text"] for e in page.find("div", "warn"))
    verdict = page.find("p", "verdict")
    assert len(verdict) == 1 and "the prompts differ on 1 of 5 samples" in verdict[0]["text"]
    assert "differ" in verdict[0]["attrs"]["class"].split()


def test_single_run_from_results_json_and_from_its_log(isolated_env, tmp_path, capsys):
    thinking = Reply(content=f"<think>First I add the numbers.</think>The final answer is {GSM8K_GOLD[4]}",
                     reasoning_content="The channel's own thoughts.")
    plan = {2: Reply(status=400), 3: Reply(content=None), 4: thinking}
    with FakeOpenAI(models=["solo"], responder=ByRow(wrong={1}, plan=plan)) as srv:
        code, document, _ = main_json(["--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 6,
                                   "--max_fail_rate", 0.5, "--output", tmp_path / "out.json", "--no_progress"], capsys)
    assert code == 0 and document["results"][GSM]["failures"] == {"empty": 1, "http_400": 1}
    from_json = report._report_side(str(tmp_path / "out.json"))
    assert from_json["config"]["model"] == "solo" and from_json["results"] == document["results"]
    page = Page(report._render_report([from_json]))
    assert page.filter_counts() == {"all": 6, "wrong": 3, "failed": 2}  # no flipped / differs for one run
    assert not page.find("p", "verdict")
    assert "empty 1, http_400 1" in "".join(e["text"] for e in page.find("td"))
    # reasoning (the reasoning channel and the <think> block) collapsed; the answer shown after it
    _, reasoning, answer = texts_in(page, f"{GSM}-4", "pre")  # the question, then run A's two
    assert reasoning == "The channel's own thoughts.\n\n<think>First I add the numbers.</think>"
    assert answer == f"The final answer is {GSM8K_GOLD[4]}"
    assert texts_in(page, f"{GSM}-4", "summary")[1].startswith("reasoning (")
    # the sample log alone: the same metrics, recomputed, and the config unknown
    from_log = report._report_side(document["config"]["log_samples"])
    assert from_log["config"] is None and "config unknown" in from_log["note"]
    assert from_log["results"][GSM]["metrics"] == document["results"][GSM]["metrics"]
    assert report._report_from_document(document).count('<details class="s') == 6


CHART_FIXTURES = FIXTURES / "chartqa"

CHART_ROWS = [json.loads(line) for line in (CHART_FIXTURES / "rows.jsonl").read_text("utf-8").splitlines()]


def test_chartqa_report_shows_the_image_sent(isolated_env, tmp_path, capsys):
    answers = {r["query"]: r["label"][0] for r in CHART_ROWS}
    pages = {}
    with FakeOpenAI(models=["vision"], responder=answers_responder(answers)) as srv:
        for images in (True, False):
            log = tmp_path / f"log_{images}"
            code, document, _ = main_json(["--tasks", "chartqa", "--base_url", srv.base_url, "--max_samples", 3,
                                       "--log_samples", log, "--no_progress"] + ["--log_images"] * images, capsys)
            assert code == 0
            pages[images] = report._report_from_document(document)
    chart = (CHART_FIXTURES / CHART_ROWS[0]["image"]).read_bytes()
    sources = [e["attrs"]["src"] for e in Page(pages[True]).find("img")]
    assert len(sources) == 3 and sources[0] == nano_eval._data_url(chart)
    assert all(e["attrs"].get("loading") == "lazy" for e in Page(pages[True]).find("img"))
    assert all(src.startswith("data:image/png;base64,") for src in sources)  # nothing fetched
    assert not Page(pages[False]).find("img") and hashlib.sha256(chart).hexdigest() in pages[False]
    assert CHART_ROWS[0]["query"] in Page(pages[False]).find("details", "s")[0]["text"]  # the query, not the template
    assert "Analyze the image" not in pages[False]


def test_unknown_keys_repeats_and_odd_text_do_not_break_it(compared):
    folder = Path(compared["logs"][1])
    log = folder / f"samples_{GSM}.jsonl"
    records = [json.loads(line) for line in log.read_text("utf-8").splitlines()]
    records[0]["response"]["content"] = "lone \ud800 surrogate, NUL \x00, and ]]> --> </details>"
    records += [{**records[1], "repeat": 1, "new_field": {"x": [1]}}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    out = compared["tmp"] / "odd.html"
    assert report._cmd_report([str(folder), "-o", str(out)]) == 0
    page = Page(out.read_text("utf-8"))
    assert page.filter_counts()["all"] == 10
    assert "&lt;/details&gt;" in out.read_text("utf-8")


def test_a_record_with_only_its_required_fields_is_read_with_empty_values(tmp_path, capsys):
    """In a log only task, doc_hash and status are required (Logged.of): a hand-written line
    with nothing else is a failed-to-score sample in the report and in compare, not a KeyError."""
    log = tmp_path / "min.jsonl"
    log.write_text(json.dumps({"task": GSM, "doc_hash": "ab" * 32, "status": "ok"}) + "\n"
                   + json.dumps({"task": GSM, "doc_hash": "cd" * 32, "status": "timeout", "row_idx": 3}) + "\n")
    out = tmp_path / "min.html"
    assert report._cmd_report([str(log), "-o", str(out)]) == 0
    page = Page(out.read_text("utf-8"))
    assert page.filter_counts()["all"] == 2 and page.filter_counts()["failed"] == 1
    assert "#abababababab" in out.read_text("utf-8")  # no row: the doc hash names it
    side = nano_eval._report_side(str(log))
    assert side["results"][GSM]["metrics"]["exact_match"] == 0.0
    assert side["results"][GSM]["failures"] == {"timeout": 1}
    c = nano_eval._compare_runs(nano_eval._load_run(str(log)), nano_eval._load_run(str(log)))[GSM]
    assert (c["n"], c["accuracy_a"], c["prompt_tokens_unknown"], c["status_b"]) == (2, 0.0, 2, {"ok": 1, "timeout": 1})


def test_unwritable_output_is_a_usage_error(compared):
    with pytest.raises(nano_eval.UsageError, match="cannot write the report"):
        report._cmd_report([compared["logs"][0], "-o", str(compared["json"] / "r.html")])  # under a file


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="nano-eval-chromium-")
    try:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium) "
                                             "so the report is not checked in a real browser")
def test_report_in_a_real_browser(compared):
    path = compared["tmp"] / "report.html"
    path.write_text(compared["html"], "utf-8")
    shot = compared["tmp"] / "report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1400,1600", path.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-2000:]
    dom = chromium("--dump-dom", path.as_uri()).stdout
    for name in ("all", "wrong", "failed", "flipped", "differs"):
        assert re.search(rf'<input type="radio" name="f0" id="f0-{name}" class="f-{name}"', dom), name
    first_flipped = re.search(r'<details class="s [a-z ]*flipped[a-z ]*" id="([^"]+)" open="">', dom)
    assert first_flipped and first_flipped.group(1) == f"{GSM}-1"
    assert "<script" not in dom and "<mark>&lt;</mark>script&gt;alert(1)&lt;/script&gt;" in dom
    # the filters work without JavaScript: with "flipped" checked, only the 4 flipped samples are shown
    counting = compared["html"].replace('class="f-flipped"', 'class="f-flipped" checked').replace(
        "</body>", "<script>document.body.dataset.shown = [...document.querySelectorAll('details.s')]"
                   ".filter(d => d.getClientRects().length).map(d => d.id).join(' ')</script></body>")
    # the page's Content-Security-Policy runs no script, not even this one: the counting needs it removed
    path.write_text(counting, "utf-8")
    assert "data-shown" not in chromium("--dump-dom", path.as_uri()).stdout
    assert nano_eval._REPORT_CSP in counting
    path.write_text(counting.replace(nano_eval._REPORT_CSP, ""), "utf-8")
    shown = re.search(r'data-shown="([^"]*)"', chromium("--dump-dom", path.as_uri()).stdout).group(1)
    assert shown.split() == [f"{GSM}-{row}" for row in (1, 2, 4, 6)]


@pytest.mark.skipif(CHROMIUM is None or not os.environ.get("NANO_EVAL_REPORT_BENCH"),
                    reason="set NANO_EVAL_REPORT_BENCH=1 (and install chromium) to time a 2,500-chart report")
def test_large_chartqa_comparison_opens_fast(tmp_path, monkeypatch, capsys):
    # 2,500 incompressible 150x140 charts (~63 KB each, the mean of the fixture's real charts)
    spec = synthetic_chartqa_dataset(2500, 150, 140, noise=True)
    with FakeDatasetsServer({CHARTQA: spec}) as hf, FakeOpenAI() as a, \
            FakeOpenAI(responder=lambda body, n: "Final Answer: 1" if n % 3 else "Final Answer: 2") as b:
        monkeypatch.setenv("NANO_EVAL_DATASETS_SERVER", hf.url)
        monkeypatch.setenv("NANO_EVAL_DATA_DIR", str(tmp_path / "data"))
        code, document, _ = main_json(["--tasks", "chartqa", "--base_url", a.base_url, "--base_url", b.base_url,
                                   "--log_samples", tmp_path / "logs", "--log_images", "--max_fail_rate", 1,
                                   "--num_concurrent", 16, "--no_progress"], capsys)
    path = tmp_path / "report.html"
    report._write_report(path, report._report_from_document(document).replace("</body>", (
        "<script>const paint = performance.getEntriesByName('first-contentful-paint')[0];"
        "document.documentElement.innerHTML = `<body data-parsed=${performance.now() | 0} "
        "data-painted=${paint ? paint.startTime | 0 : -1}></body>`</script></body>")))
    timing = re.search(r'data-parsed="(\d+)" data-painted="(-?\d+)"', chromium("--dump-dom", path.as_uri()).stdout)
    size, parsed, painted = path.stat().st_size, int(timing.group(1)), int(timing.group(2))
    print(f"\n2,500 charts: {size / 1e6:.0f} MB, first paint {painted} ms, parsed {parsed} ms")
    assert 0 <= painted < 2000 and parsed < 15_000


def test_report_flag_on_a_run_without_a_sample_log(isolated_env, tmp_path, capsys):
    """--report alone: the samples still reach the report (a temporary sample log is kept for it)."""
    with FakeOpenAI(responder=ByRow(wrong={2})) as srv:
        code, document, _ = main_json(["--tasks", GSM, "--base_url", srv.base_url, "--max_samples", 4,
                                   "--report", tmp_path / "r.html", "--no_progress"], capsys)
    assert code == 0 and document["results"][GSM]["num_samples"] == 4
    page = Page((tmp_path / "r.html").read_text("utf-8"))
    assert len(page.find("details", "s")) == 4
    assert page.filter_counts() == {"all": 4, "wrong": 1, "failed": 0}


def test_report_flag_on_several_servers(isolated_env, tmp_path, capsys):
    with FakeOpenAI(models=["m"], responder=ByRow()) as a, FakeOpenAI(models=["m"], responder=ByRow(wrong={0, 1})) as b:
        code, document, _ = main_json(["--tasks", GSM, "--base_url", a.base_url, "--base_url", b.base_url,
                                   "--max_samples", 5, "--report", tmp_path / "both.html", "--no_progress"], capsys)
    assert code == 0 and len(document["comparisons"]) == 1
    page = Page((tmp_path / "both.html").read_text("utf-8"))
    assert page.filter_counts() == {"all": 5, "wrong": 2, "failed": 0, "flipped": 2, "text differs": 2}
    assert document["comparisons"][0]["comparison"][GSM]["verdict"] in " ".join(e["text"] for e in page.find("p", "verdict"))


def test_report_flag_refuses_an_unwritable_path_before_sending(isolated_env, fake_openai, tmp_path, capsys):
    code = nano_eval.main(["--tasks", GSM, "--base_url", fake_openai.base_url, "--report", str(tmp_path / "no" / "r.html")])
    assert code == 2 and "--report: folder" in capsys.readouterr().err
    assert fake_openai.chat_requests == []


# --------------------------------------------------------------------------------------------
# Numerics on the page (issue 22): the verdict first, the |delta logprob| chart, the parting
# --------------------------------------------------------------------------------------------

from fakes import LogprobModel  # noqa: E402


def test_report_shows_numerics_verdict_chart_and_parting(isolated_env, tmp_path, capsys):
    ties = {row: 4 for row in range(6)}
    with FakeOpenAI(responder=LogprobModel(seed=1, noise=0.003, ties=ties)) as a, \
            FakeOpenAI(responder=LogprobModel(seed=2, noise=0.003, ties=ties, parts={2})) as b:
        code, document, _ = main_json(["--tasks", GSM, "--base_url", a.base_url, "--base_url", b.base_url,
                                       "--max_samples", 6, "--logprobs", 3, "--log_samples", tmp_path / "logs",
                                       "--no_progress"], capsys)
    assert code == 0
    page = Page(report._report_from_document(document))
    verdict = page.find("p", "verdict")[0]["text"]
    assert "numerics equivalent" in verdict and "differ" not in page.find("p", "verdict")[0]["attrs"]["class"]
    rows = [e["text"] for e in page.find("tr") if e["text"].startswith(("numerics", "accuracy"))]
    assert rows[0].startswith("numericsequivalent: p99 |delta logprob|")  # first in the comparison table
    assert rows[1].startswith("accuracy")
    charts = page.find("svg", "dlp")
    assert len(charts) == 6  # one per sample, A vs B
    parted = page.find("details", "s")[2]
    assert "the texts part at token 4: a near-tie" in parted["text"]
    marked = [e["text"] for e in page.find("span", "part")]
    assert marked == [" The", " Thex"]  # A's token, B's token, each highlighted in its own stream
    assert "(B chose it)" in parted["text"] and "(A chose it)" in parted["text"]
    # a chart's bars: one rect per shared token with a nonzero |delta|, none higher than the chart
    rects = re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="([\d.]+)"/>',
                       report._report_from_document(document))
    assert rects and all(0 <= float(y) and float(y) + float(h) == pytest.approx(48, abs=0.11) for y, h in rects)


def test_report_marks_a_numerics_difference(isolated_env, tmp_path, capsys):
    with FakeOpenAI(responder=LogprobModel(seed=1)) as a, FakeOpenAI(responder=LogprobModel(seed=2, noise=0.3)) as b:
        code, document, _ = main_json(["--tasks", GSM, "--base_url", a.base_url, "--base_url", b.base_url,
                                       "--max_samples", 6, "--logprobs", 3, "--log_samples", tmp_path / "logs",
                                       "--no_progress"], capsys)
    page = Page(report._report_from_document(document))
    verdict = page.find("p", "verdict")[0]
    assert "differ" in verdict["attrs"]["class"].split()
    assert "but the implementations differ: logprob distance" in verdict["text"]


def test_a_big_run_lists_the_most_telling_samples_first(compared, monkeypatch):
    """Past REPORT_SAMPLES a task's page lists that many samples, flipped, failed, differing and
    wrong ones first (issue 23, item 15: a page of 100,000 samples would not open)."""
    monkeypatch.setattr(nano_eval, "_REPORT_SAMPLES", 5)
    page = Page(report._report_from_document(compared["document"]))
    samples = page.find("details", "s")
    # flipped 1, 2, 4, 6 first; then row 5 (text differs); row 3 (wrong in both) and the rest left out
    assert [s["attrs"]["id"] for s in samples] == [f"{GSM}-{row}" for row in (1, 2, 4, 5, 6)]
    assert page.filter_counts() == {"all": 5, "wrong": 4, "failed": 1, "flipped": 4, "text differs": 5}
    notes = [e["text"] for e in page.find("p", "muted") if "samples shown" in e["text"]]
    assert notes == ["5 of 10 samples shown: flipped, failed, differing and wrong ones first; "
                     "the sample logs hold every one"]


def test_the_report_of_two_big_logs_reads_them_side_by_side(compared, monkeypatch):
    """Two logs above SIDE_BY_SIDE_BYTES are read at once, the second in a child process; the
    page and the comparison are the same as when they are read one after the other, and the
    child's error is the error."""
    a, b = compared["logs"]
    out = compared["tmp"]
    assert nano_eval.main(["report", a, b, "-o", str(out / "one.html")]) == 0
    one_after_the_other = nano_eval.compare_paths(a, b)
    monkeypatch.setattr(nano_eval, "_SIDE_BY_SIDE_BYTES", 0)
    assert nano_eval.main(["report", a, b, "-o", str(out / "two.html")]) == 0
    assert (out / "one.html").read_text() == (out / "two.html").read_text()
    assert nano_eval.compare_paths(a, b) == one_after_the_other
    assert nano_eval._side_by_side(os.path.basename, a, b) == (os.path.basename(a), os.path.basename(b))
    pids = nano_eval._side_by_side(process_id, a, b)
    assert pids[0] == os.getpid() and pids[1] != os.getpid()
    broken = out / "broken.jsonl"
    broken.write_text('{"task": "x"}\n')
    with pytest.raises(nano_eval.UsageError, match="broken.jsonl:1: not a nano-eval sample record"):
        nano_eval._side_by_side(nano_eval._report_side, a, str(broken))


def process_id(path: str) -> int:
    return os.getpid()


def test_the_page_names_each_answers_filter_marks_the_headline_and_explains_its_signs(compared):
    """Issue 24, item 4: strict-match found nothing in B's row 4, so the answer shown is
    flexible-extract's and says so (beside strict-match's ✗); the headline metric is marked; ±
    and ,valid are explained; the comparison speaks in fractions, as the metrics table does."""
    page = Page(compared["html"])
    summary = next(e["text"] for e in page.find("summary") if e["text"].startswith("#4 "))
    assert "B 1 (flexible-extract) ✗" in summary and "(strict-match)" not in summary
    row1 = next(e["text"] for e in page.find("summary") if e["text"].startswith("#1 "))
    assert "(flexible-extract)" not in row1  # A's strict-match answer needs no label
    assert "strict-match answer" in "".join(texts_in(page, f"{GSM}-1", "p"))
    assert [e["text"] for e in page.find("th") if "(headline)" in e["text"]] == [
        "exact_match (headline)", "exact_match,strict-match (headline)"]
    assert "± is the standard error" in compared["html"] and ",valid is the score over the valid" in \
        " ".join(e["text"] for e in page.find("p", "muted"))
    accuracy = next(e for i, e in enumerate(page.elements) if e["tag"] == "td"
                    and page.elements[i - 1]["text"] == "accuracy")
    assert accuracy["text"] == "A 0.8000   B 0.6000   B-A -0.2000 [95% CI " + accuracy["text"].split("CI ")[1]
    assert "points" not in compared["html"]
