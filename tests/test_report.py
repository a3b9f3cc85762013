"""`lmzoo report`: one self-contained file from a run's own files; a resumed run reads as one history."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import read_history
from PIL import Image
from typer.testing import CliRunner

from lmzoo.analysis.report import build_report, to_html, to_markdown, write_report
from lmzoo.cli import app
from lmzoo.training.loop import train

CHROMIUM = Path("/usr/bin/chromium")


def images(page: str) -> list[Image.Image]:
    found = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in found]


def test_a_resumed_run_reads_as_one_history_with_the_resume_marked(make_config):
    extra = {"train": {"eval_every": 5, "log_every": 1}}
    first = train(make_config({**extra, "train": {**extra["train"], "max_steps": 10}}), progress=False)
    resumed = train(
        make_config({**extra, "train": {**extra["train"], "max_steps": 20}}), resume=True, progress=False
    )
    assert resumed == first
    history = read_history(resumed)
    steps, losses, elapsed = history.series("train/loss")
    assert steps == list(range(1, 21)) and len(losses) == 20  # every step exactly once
    assert history.series("val/loss")[0] == [5, 10, 15, 20]
    assert history.resume_steps == [10]
    assert [(s.event, s.first_step, s.last_step) for s in history.segments] == [
        ("start", 0, 10),
        ("resume", 10, 20),
    ]
    assert all(t is not None for t in elapsed) and elapsed == sorted(elapsed)  # one clock across segments
    assert history.wall_seconds == pytest.approx(sum(s.seconds for s in history.segments))

    report = build_report(resumed)
    summary = dict(report.summary)
    assert summary["resumed at step"] == "10" and summary["steps"] == "20"
    assert summary["tokens seen"] == f"{20 * 4 * 8:,}"  # 20 steps of batch 4 x seq_len 8
    assert [e["event"] for e in report.environment] == ["start", "resume"]
    assert "resume at step 10, trained to step 20" in to_html(report)


def test_html_report_is_self_contained(trained_run, tmp_path):
    path = write_report(trained_run, out=tmp_path / "report.html")
    page = path.read_text()
    assert "<script" not in page.lower() and not re.search(r"(src|href)=['\"]?(https?:|//)", page)
    [figure] = images(page)
    assert figure.format == "PNG" and figure.size == (1000, 600)  # 2 x 2 panels of 5 x 3 inches at 100 dpi
    report = build_report(trained_run)
    summary = dict(report.summary)
    steps, losses, _ = read_history(trained_run).series("val/loss")
    assert summary["best validation loss"] == f"{min(losses):.4f}" and summary["steps"] == "30"
    assert summary["best validation bits/char"].startswith(f"{min(losses) / 0.6931471805599453:.4f}")
    model_params = dict(report.parameters)
    assert model_params["total"] == sum(n for name, n in report.parameters if name != "total")
    assert report.samples and report.samples[-1][0] == "logged at step 30"
    markdown = to_markdown(report)
    assert len(images(markdown)) == 1 and "## Config" in markdown


def test_report_refuses_a_run_without_metrics(tmp_path, trained_run):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(trained_run / "config.yaml", bare / "config.yaml")
    runner = CliRunner()
    for where, message in [(bare, "has no metrics"), (tmp_path / "missing", "not found")]:
        result = runner.invoke(app, ["report", str(where), "--out", str(tmp_path / "r.html")])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "r.html").exists()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_html_report_renders_its_figure_in_headless_chromium(trained_run, tmp_path):
    path = write_report(trained_run, out=tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1100,1400", path.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
        assert pixels.size == (1100, 1400)
        colours = pixels.getcolors(maxcolors=1 << 20)
    # The curves are drawn in matplotlib's first two colours: only a rendered image has them.
    counts = {colour: n for n, colour in colours}
    blue_ish = sum(n for (r, g, b), n in counts.items() if abs(r - 31) < 25 and abs(g - 119) < 25 and b > 150)
    orange_ish = sum(n for (r, g, b), n in counts.items() if r > 230 and 100 < g < 160 and b < 60)
    assert blue_ish > 500 and orange_ish > 200, (blue_ish, orange_ish)
