"""report.py: the HTML report's content, its escaping, its input errors, and a real browser rendering it."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
from conftest import TINY

import analyze
import evaluate_lds
import formats
import report
import retrain
import train
from demo import make_demo_dataset
from utils import UserError

LDS_TINY = [*TINY, "--num_train_epochs", "1", "--lds_num_masks", "4"]
SCRIPT_TEXT = "<script>alert('x')</script> & co"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The tiny demo from files in which training row 0 and query 0 hold markup, with pairwise and self-influence
    scores and an LDS (4 masks, plots)."""
    tmp = tmp_path_factory.mktemp("report")
    raw = make_demo_dataset()
    train_split = raw["train"].map(lambda row, i: {"ending0": SCRIPT_TEXT} if i == 0 else {}, with_indices=True)
    queries = raw["validation"].map(lambda row, i: {"sent1": SCRIPT_TEXT} if i == 0 else {}, with_indices=True)
    train_split.to_csv(tmp / "train.csv")
    queries.to_csv(tmp / "validation.csv")
    files = ["--train_file", str(tmp / "train.csv"), "--validation_file", str(tmp / "validation.csv")]
    flags = [f for f in TINY if f not in ("--dataset", "demo")]
    train.main([*files, *flags, "--model_name_or_path", "tiny-roberta", "--learning_rate", "1e-3",
                "--num_train_epochs", "1", "--output_dir", str(tmp / "ckpt")])
    retrain.main([*files, *flags, "--model_name_or_path", "tiny-roberta", "--learning_rate", "1e-3",
                  "--num_train_epochs", "1", "--lds_num_masks", "4", "--lds_output_dir", str(tmp / "lds")])
    common = ["--checkpoint_dir", str(tmp / "ckpt"), "--factor_strategy", "identity", "--output_dir", str(tmp / "s")]
    scores = analyze.main(common)
    self_scores = analyze.main([*common, "--self_influence"])
    evaluate_lds.main(["--scores", str(scores), "--lds_dir", str(tmp / "lds")])
    return scores, self_scores, tmp


@pytest.mark.slow
def test_report_holds_queries_examples_and_escapes_markup(hostile):
    scores_dir, self_dir, _ = hostile
    out = report.main(["--scores", str(scores_dir), "--self_scores", str(self_dir), "--top_k", "2"])
    html = out.read_text()
    assert out == scores_dir / formats.REPORT_FILE
    assert html.count('<details class="query"') == 12  # every query
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co" in html  # shown as text, twice at least
    assert "<script>alert" not in html and html.count("<script>") == 1  # the report's own paging script only
    context = report.build_context(report.parse_args(["--scores", str(scores_dir), "--self_scores", str(self_dir),
                                                      "--top_k", "2"]))
    first = context["queries"][0]
    assert first["context"] == SCRIPT_TEXT and len(first["endings"]) == 4 and len(first["proponents"]) == 2
    assert first["choice"] in range(4) and first["lds"] is not None
    assert first["proponents"][0]["score"] >= first["proponents"][1]["score"]
    assert first["opponents"][0]["score"] <= first["opponents"][1]["score"]
    assert context["evaluation"]["histogram"].startswith("data:image/png;base64,")  # inlined, nothing fetched
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    assert len(context["suspicious"]["rows"]) == 20


def test_best_worst_and_query_selection(hostile):
    scores_dir, _, tmp = hostile
    lds = evaluate_lds.main(["--scores", str(scores_dir), "--lds_dir", str(tmp / "lds"), "--no_plots",
                             "--output_dir", str(tmp / "again")])
    context = report.build_context(report.parse_args(["--scores", str(scores_dir), "--best_worst", "2"]))
    shown = [q["index"] for q in context["queries"]]
    known = [(v, q) for q, v in enumerate(lds["per_query"]) if v is not None]
    best = sorted(known, key=lambda vq: (-vq[0], vq[1]))  # highest LDS first, ties by query index
    worst = sorted(known)
    assert shown == [best[0][1], best[1][1], worst[1][1], worst[0][1]]  # the worst last
    assert best[0][0] > worst[0][0]
    picked = report.build_context(report.parse_args(["--scores", str(scores_dir), "--queries", "5", "2", "5"]))
    assert [q["index"] for q in picked["queries"]] == [5, 2]


def test_report_input_errors(hostile, tmp_path):
    scores_dir, self_dir, _ = hostile
    for flags, message in ((["--queries", "12"], "--queries 12 is outside the 12 queries; pass 0 to 11"),
                           (["--lds", str(tmp_path / "none.json")], "does not exist; run evaluate_lds.py first"),
                           (["--output", str(tmp_path)], "is a directory; pass a file name")):
        with pytest.raises(UserError, match=re.escape(message)):
            report.main(["--scores", str(scores_dir), *flags])
    with pytest.raises(UserError, match="holds no self-influence scores"):
        report.main(["--scores", str(scores_dir), "--self_scores", str(scores_dir)])
    with pytest.raises(UserError, match="no scores at"):
        report.main(["--scores", str(tmp_path)])


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
    if found is None:
        pytest.skip("no chromium here (apt-get install chromium); CI installs it and runs this test")
    return found


def test_report_renders_in_chromium_without_console_errors(demo_checkpoint, hostile, tmp_path):
    """Headless Chromium loads the demo's report and the markup-laden one from disk: the paging script runs to
    its end, and the browser logs no console message (a script error or a blocked request would log one)."""
    browser = chromium()
    demo_scores = analyze.main(["--checkpoint_dir", str(demo_checkpoint), "--output_dir", str(tmp_path / "s")])
    pages = [report.main(["--scores", str(demo_scores), "--output", str(tmp_path / "demo.html")]),
             report.main(["--scores", str(hostile[0]), "--self_scores", str(hostile[1]),
                          "--output", str(tmp_path / "hostile.html")])]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}"]
    for page in pages:
        run = subprocess.run([browser, *flags, "--dump-dom", page.resolve().as_uri()], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert 'data-js="ready"' in run.stdout and "data-errors" not in run.stdout
        assert "page 1 of " in run.stdout
        console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, console
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,900", pages[0].resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_summary_names_a_dropout_ensemble():
    meta = {"checkpoint": "c", "data": {"num_queries": 2}, "factor_strategy": "ekfac", "scoring": "fused",
            "dropout_ensemble": 4, "dropout_rate": 0.1}
    summary = report.scores_summary(meta, Path("s"), (2, 3), [])
    assert summary["dropout"] == (4, 0.1) and summary["num_train"] == 3
    assert report.scores_summary({**meta, "dropout_ensemble": None}, Path("s"), (2, 3), [])["dropout"] is None


def test_the_summary_names_source_and_no_damping():
    meta = {"checkpoint": "c", "data": {}, "factor_strategy": "ekfac", "scoring": "fused", "damping_factor": 1e-8,
            "source_horizon": 10.0, "source_segments": 3}
    summary = report.scores_summary(meta, Path("s"), (2, 3), [])
    assert summary["source"] == (10.0, 3) and summary["damping"] is None
    row = next(line for line in report.TEMPLATE.splitlines() if "summary.strategy" in line)
    html = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(row).render(summary=summary)
    assert "ekfac, fused scoring, SOURCE (horizon 10.0, 3 segments)</td>" in html and "damping" not in html
    plain = report.scores_summary({**meta, "source_horizon": None}, Path("s"), (2, 3), [])
    assert plain["source"] is None and plain["damping"] == 1e-8
