"""A person's journey in a real headless Chromium (Debian's package, driven by Playwright).

Screenshots of each tab go to test-artifacts/ (kept by CI as artifacts).
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_ui import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (.ci/run installs it)")
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from dpo_space import models
    from dpo_space.ui import build_app, launch
    from dpo_space.workbench import Workbench

    app = build_app(Workbench(models.EMBEDDED, root=tmp_path_factory.mktemp("space")), shared=False)
    port = free_port()
    launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def page(page_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        context = browser.new_context(locale="ja-JP", viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(page_url)
        yield page
        browser.close()


def shot(page, name):
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_journey(page, tmp_path):
    # Data: the わかりません example is loaded on open
    page.get_by_text("650 pairs").first.wait_for()
    assert page.locator("#data-table").get_by_text("分かりません").count() > 0
    shot(page, "1-data")

    # Train on a small subset and see chart points appear
    page.get_by_role("tab", name="学習").click()
    page.locator("#memory-estimate").get_by_text("Estimated peak GPU memory").wait_for()  # the planner, up front
    page.get_by_text("詳細設定").click()
    pairs = page.get_by_label("使うペア数の上限")
    pairs.wait_for()
    page.wait_for_timeout(500)  # a number typed while the accordion's fields still mount is reset to the default
    pairs.fill("160")
    pairs.press("Tab")
    page.wait_for_timeout(300)
    page.locator("#start").click()
    # 160 pairs at the preset's batch 12, 1 epoch: 14 steps (so the number typed above reached the run)
    page.locator("#run-status").get_by_text(re.compile(r"step \d+/14")).first.wait_for(timeout=60_000)
    # a reload mid-run neither stalls nor kills the run: the page reattaches to its live chart
    page.reload()
    page.get_by_role("tab", name="学習").click()
    try:
        page.locator("#run-status").get_by_text("done").wait_for(timeout=180_000)
    finally:
        shot(page, "2-train")
    assert "4-bit nf4" in page.locator("#run-status").inner_text()  # what ran, said on the page
    assert page.locator("#loss-plot canvas, #loss-plot svg").count() > 0
    shot(page, "2-train")

    # Compare: both columns answer the same prompt
    page.get_by_role("tab", name="比較").click()
    page.locator("#compare-prompt textarea").fill("人はどんなことをしてもらうと嬉しいですか?")
    page.locator("#send").click()
    page.locator("#dpo-measures").get_by_text("implicit reward").wait_for(timeout=60_000)
    assert page.locator("#base-chat").inner_text().strip() and page.locator("#dpo-chat").inner_text().strip()
    shot(page, "3-compare")

    page.get_by_role("tab", name="評価").click()
    page.get_by_label("評価用の質問").fill("人はどんなことをしてもらうと嬉しいですか?\n部屋の掃除のコツは?\n朝ごはんを食べるメリットは?")
    page.get_by_role("button", name="評価を実行").click()
    page.locator("#eval-table").get_by_text("部屋の掃除のコツは?").wait_for(timeout=120_000)
    page.locator("#eval-chart canvas, #eval-chart svg").first.wait_for()
    table = page.locator("#eval-table")
    # the answers are on screen at 1400 px, not only the prompt column
    box = table.get_by_role("columnheader", name="dpo").first.bounding_box()
    assert box and box["x"] + box["width"] <= 1400
    shot(page, "4-evaluate")
    page.get_by_role("tab", name="解説").click()
    page.locator(".katex-display").first.wait_for()  # the formulas are rendered, not left as TeX
    assert "暗黙の報酬" in page.locator("body").inner_text()  # Japanese by default for a Japanese browser
    shot(page, "5-learn")

    # A second run with another recipe: the charts overlay the first run, and Compare puts the two in columns
    page.get_by_role("tab", name="学習").click()
    page.locator("#recipe input").click()
    page.get_by_role("option", name=re.compile("崩壊の対策: β↑")).click()
    page.wait_for_timeout(500)
    page.locator("#start").click()
    page.locator("#run-status").get_by_text(re.compile(r"running|waiting")).first.wait_for(timeout=60_000)
    try:
        page.locator("#run-status").get_by_text("done").wait_for(timeout=240_000)
    finally:
        shot(page, "7-train-two-runs")
    assert "run −1" in page.locator("#run-status").inner_text()  # the first run, overlaid and named
    shot(page, "7-train-two-runs")
    page.get_by_role("tab", name="比較").click()
    runs = page.locator("#compare-runs input")
    for beta in ("β 0.1", "β 0.5"):  # the two runs, listed when the tab opened
        runs.click()
        page.get_by_role("option", name=re.compile(beta)).click()
    page.locator("#second-chat").wait_for()
    page.locator("#compare-prompt textarea").fill("部屋の掃除のコツは?")
    page.locator("#send").click()
    page.locator("#second-measures").get_by_text("implicit reward").wait_for(timeout=60_000)
    assert "β 0.5" in page.locator("#dpo-measures").inner_text() + page.locator("#second-measures").inner_text()
    shot(page, "8-compare-two-runs")

    # Data: the token-length audit with the picked model's tokenizer
    page.get_by_role("tab", name="データ").click()
    page.get_by_text("トークン長を調べる").click()
    page.get_by_role("button", name=re.compile("トークナイザで数える")).click()
    page.locator("#token-audit").get_by_text("p99").wait_for()
    assert "cuts 0%" in page.locator("#token-audit").inner_text()

    # Data: a broken upload shows its error and the dataset stays
    page.get_by_role("tab", name="データ").click()
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "a"}]), encoding="utf-8")
    page.locator("#upload input[type=file]").set_input_files(str(broken))
    page.locator("#data-report").get_by_text("row 1").wait_for()
    assert "identical" in page.locator("#data-report").inner_text()
    assert page.locator("#data-table").get_by_text("分かりません").count() > 0
    shot(page, "6-broken-upload")
    assert Path(ARTIFACTS / "3-compare.png").stat().st_size > 10_000
