"""report.html: one self-contained page per run and per sweep. Checked as a reader meets it, in
headless Chromium (Debian's ``chromium``): it renders with no request beyond the file itself,
every figure decodes, each section is there, and a sweep's table sorts and links to its jobs'
reports. Reports of folders written by earlier versions show what their files allow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from galaxy_lightning.report import (
    LEGACY_VIEWER,
    accuracy_interval,
    main,
    per_class_scores,
    write_report,
)

SECTIONS = ("results", "curves", "confusion", "reliability", "examples", "mistakes", "run")


def open_page(browser: object, path: Path, width: int = 1200) -> tuple[object, list[str]]:
    """The page at ``path`` in a fresh context; every request it makes other than for data:
    URIs and its own file is recorded and refused."""
    context = browser.new_context(viewport={"width": width, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    own = path.resolve().as_uri()
    outside: list[str] = []

    def guard(route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        if url.startswith("data:") or url == own or url.startswith(own.rsplit("/", 1)[0]) \
                and url.endswith("/report.html"):
            route.continue_()  # type: ignore[attr-defined]
        else:
            outside.append(url)
            route.abort()  # type: ignore[attr-defined]

    page.route("**/*", guard)
    page.on("request", lambda r: None if r.url.startswith(("data:", "file:")) else outside.append(r.url))
    page.goto(own)
    page.wait_for_load_state("load")
    return page, outside


def test_scores_from_the_confusion_matrix() -> None:
    scores = per_class_scores([[8, 2], [1, 9]], ["a", "b"])
    assert scores[0] == pytest.approx({"name": "a", "precision": 8 / 9, "recall": 0.8,
                                       "f1": 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8), "support": 10})
    low, high = accuracy_interval(17, 20)
    assert low < 0.85 < high and high - low > 0.25  # 20 images say little
    low, high = accuracy_interval(1700, 2000)
    assert high - low < 0.04
    # a class never predicted has no precision (not 0, not an error)
    assert per_class_scores([[0, 3], [0, 5]], ["x", "y"])[0]["precision"] != 0


@pytest.mark.slow  # headless Chromium
def test_a_run_leaves_a_report_that_renders_offline_with_every_section(
        tiny_run: tuple[Path, dict, Path], browser: object, tmp_path: Path) -> None:
    run = Path(tiny_run[0]).parents[1]
    report = run / "report.html"
    assert report.is_file()  # written by the run itself
    html = report.read_text()
    assert "http://" not in html.replace(LEGACY_VIEWER.split("?")[0], "")
    page, outside = open_page(browser, report)
    assert outside == []
    for section in SECTIONS:
        assert page.locator(f"section#{section}").count() == 1, section
    images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) >= 5 and all(done and width > 0 for done, width in images), images
    text = page.inner_text("body")
    metrics = tiny_run[1]
    assert f"{100 * metrics['test/acc']:.1f}%" in text and "Wilson" in text
    assert "cpu_native_bf16" in text and "torch" in text  # the machine and the versions
    rows = page.locator("#per-class tbody tr").count()
    assert rows == len(metrics["class_names"])
    shot = page.screenshot(full_page=True)
    assert len(shot) > 50_000  # figures, not a blank page
    # narrow screens: no horizontal scrolling of the page itself
    phone, _ = open_page(browser, report, width=390)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 400


def test_a_report_of_an_earlier_version_shows_what_its_files_allow(
        tiny_run: tuple[Path, dict, Path], tmp_path: Path) -> None:
    old = tmp_path / "old_run"
    shutil.copytree(Path(tiny_run[0]).parents[1], old,
                    ignore=shutil.ignore_patterns("checkpoints", "report.html", "mistakes.json"))
    metrics = json.loads((old / "metrics.json").read_text())
    for key in ("environment", "input_spec", "finished"):
        metrics.pop(key)
    metrics["history"] = {k: v for k, v in metrics["history"].items() if "loss" not in k}
    (old / "metrics.json").write_text(json.dumps(metrics))
    main([str(old)])
    html = (old / "report.html").read_text()
    assert "Not recorded by the version that wrote this run" in html
    assert "The input spec was not recorded" in html
    assert html.count("data:image/png;base64,") >= 5  # the figures it had, the mistakes as a PNG


@pytest.mark.slow  # headless Chromium
def test_galaxy_report_on_a_sweep_links_every_job_and_sorts(
        tiny_run: tuple[Path, dict, Path], browser: object, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """A sweep of two seeds of two learning rates (copies of one run with their own numbers)."""
    sweep = tmp_path / "multiruns" / "2026-12-04_10-00-00_000000"
    run = Path(tiny_run[0]).parents[1]
    accuracies = {(0.01, 0): 0.5, (0.01, 1): 0.6, (0.1, 0): 0.9, (0.1, 1): 0.8}
    for number, ((lr, seed), acc) in enumerate(accuracies.items()):
        job = sweep / f"{number}_10-00-00_000000"
        shutil.copytree(run, job, ignore=shutil.ignore_patterns("checkpoints", "report.html"))
        (job / ".hydra").mkdir()
        (job / ".hydra" / "config.yaml").write_text("{}\n")
        (job / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"optimizer.lr={lr}", f"seed={seed}"]))
        metrics = json.loads((job / "metrics.json").read_text())
        metrics["test/acc"] = acc
        (job / "metrics.json").write_text(json.dumps(metrics))
    main([str(sweep)])
    assert "report.html" in capsys.readouterr().out
    assert all((job / "report.html").is_file() for job in sweep.iterdir() if job.is_dir())
    page, outside = open_page(browser, sweep / "report.html")
    assert outside == []
    groups = page.locator("#by-config tbody tr")
    assert groups.count() == 2 and "optimizer.lr=0.1" in groups.nth(1).inner_text()
    assert "85.0%" in groups.nth(1).inner_text()  # the mean over the two seeds
    links = groups.nth(1).locator("a")
    assert [links.nth(i).inner_text() for i in range(links.count())] == ["seed=0", "seed=1"]
    assert links.nth(0).get_attribute("href").startswith("2_")  # the job of lr=0.1, seed=0
    jobs = page.locator("#jobs tbody tr")
    assert jobs.count() == 4
    column = 3  # test accuracy
    page.locator("#jobs th").nth(column).click()
    ascending = [jobs.nth(i).locator("td").nth(column).inner_text() for i in range(4)]
    assert ascending == ["50.0%", "60.0%", "80.0%", "90.0%"]
    page.locator("#jobs th").nth(column).click()
    assert jobs.nth(0).locator("td").nth(column).inner_text() == "90.0%"
    link = jobs.nth(0).locator("a")
    link.click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/report.html") and "/2_" in page.url  # the 0.9 job's own report
    assert page.locator("section#results").count() == 1 and outside == []


def test_galaxy_report_refuses_what_is_not_a_run_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for target, expected in ((tmp_path / "missing", "no such directory"),
                             (tmp_path, "no metrics.json")):
        with pytest.raises(SystemExit) as stop:
            main([str(target)])
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and expected in err and "\n" not in err, err
    assert not (tmp_path / "report.html").exists()


def test_mistakes_link_to_the_sky_viewer_at_their_position(
        tiny_run: tuple[Path, dict, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(Path(tiny_run[0]).parents[1], run, ignore=shutil.ignore_patterns("checkpoints"))
    mistakes = json.loads((run / "mistakes.json").read_text())
    assert mistakes and all(m["image"].startswith("data:image/png;base64,") for m in mistakes)
    mistakes[0].update(id="J133536.70-015758.9", ra=203.903, dec=-1.96636)
    (run / "mistakes.json").write_text(json.dumps(mistakes))
    html = write_report(run).read_text()
    link = LEGACY_VIEWER.format(ra=203.903, dec=-1.96636).replace("&", "&amp;")
    assert link.startswith("https://www.legacysurvey.org/viewer?ra=203.903000&amp;dec=-1.966360")
    assert html.count(f'href="{link}"') == 2  # the image and the id
    assert "J133536.70-015758.9" in html and html.count("legacysurvey.org") == 2
