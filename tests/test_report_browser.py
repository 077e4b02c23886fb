"""The results page in a real browser: headless Chromium renders the shared tiny store's
``results.html`` (the page the ``report`` job wrote), takes a screenshot, and finds through the DOM
what a user looks for first: the configuration, the summary table with its rows and intervals,
every figure decoded and laid out with its caption, the masks table, the detailed tables.

Needs Chromium and its driver from the OS packages (``apt-get install chromium chromium-driver``;
``.ci/run`` installs them) and selenium (the ``test`` extra). Without Chromium the test is skipped,
saying so.
"""

from __future__ import annotations

import io
import shutil

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
WIDTH, HEIGHT = 1280, 1600

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium and chromedriver are not installed: apt-get install chromium chromium-driver "
           "(.ci/run installs them)",
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1", f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # both given: no driver download
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, tiny_store, tiny_plan):
    """The tiny store's results page, loaded (every embedded image decoded)."""
    path = tiny_store / tiny_plan.job("report").outputs["html"]
    browser.get(path.as_uri())
    browser.execute_async_script(  # wait until every image has decoded (or failed to)
        "const done = arguments[arguments.length - 1];"
        "Promise.all([...document.images].map(i => i.decode().catch(() => null))).then(() => done(true));")
    return browser


def test_the_results_page_renders_to_a_real_screenshot(page, tmp_path):
    from PIL import Image

    png = page.get_screenshot_as_png()
    (tmp_path / "results.png").write_bytes(png)  # kept by pytest for a look when the test fails
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = page.execute_script("return [window.innerWidth, window.innerHeight]")
    assert image.size == (width, height) and width >= WIDTH - 20 and height >= HEIGHT // 2
    small = image.resize((width // 8, height // 8))
    colours = small.getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 50, "the screenshot is (nearly) one colour: nothing rendered"
    white = sum(n for n, rgb in colours if min(rgb) >= 245)
    assert white < 0.95 * small.width * small.height, "the screenshot is almost all white"


def test_the_page_opens_on_the_configuration_and_the_summary_table(page, tiny_plan):
    assert page.title.startswith("memctl results")
    config = page.find_element("id", "configuration").text
    assert tiny_plan.model.tag in config and "N=" in config and "32-token prefixes" in config
    summary = page.find_element("css selector", "table#summary-table")
    # what the page opens on: the summary table starts inside the first screen
    top = page.execute_script("return arguments[0].getBoundingClientRect().top", summary)
    assert 0 < top < page.execute_script("return window.innerHeight")
    headers = [th.text for th in summary.find_elements("css selector", "thead th")]
    assert headers[:3] == ["#", "Method", "Settings"]
    groups = [h.split(" (N=")[0] for h in headers if h.startswith(("Extraction-rate", "Memorized", "Held-out",
                                                                     "Out-of-domain"))]
    # both test tracks, the utility beside them (the frontier's axes), the out-of-domain family last
    assert groups == ["Extraction-rate track", "Memorized track", "Held-out perplexity / Origin",
                      "Out-of-domain family"]
    assert headers.count("95% CI") == 4 and headers.count("vs Origin") == 4
    rows = summary.find_elements("css selector", "tbody tr")
    labels = [r.find_elements("css selector", "td")[1].text for r in rows]
    assert labels[0] == "Origin" and len(rows) == len(tiny_plan.edits)
    assert {"K-FAC", "SVD", "Ours (down)", "Ours (up)", "CSP (down)", "BalancedSubnet"} <= set(labels)
    for row in rows:
        assert row.size["height"] > 0 and row.is_displayed()
    cells = [td.text for td in rows[1].find_elements("css selector", "td")]
    assert cells[0] == "2" and cells[4].startswith("[") and cells[4].endswith("]")  # an exact 95% interval
    verdicts = summary.find_elements("css selector", "td.verdict")
    assert verdicts, "no verdict cell"
    for cell in verdicts:
        assert cell.text.startswith(("lower", "higher", "no evidence of a difference")), cell.text
        background = page.execute_script("return getComputedStyle(arguments[0]).backgroundColor", cell)
        assert background not in ("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)"), background  # styled, words kept
    caption = page.find_element("id", "summary-caption").text
    assert caption.startswith("Table 1.") and tiny_plan.model.tag in caption


def test_every_figure_is_rendered_with_a_caption_naming_the_configuration(page, tiny_plan):
    figures = page.find_elements("css selector", "figure")
    ids = [f.get_attribute("id") for f in figures]
    assert ids == ["fig-frontier", "fig-edits-by-copies", "fig-extraction-by-copies", "fig-masks-sparsity",
                   "fig-masks-threshold"]
    for figure in figures:
        img = figure.find_element("css selector", "img")
        assert img.get_attribute("src").startswith("data:image/svg+xml;base64,")  # embedded: one file
        natural, complete = page.execute_script("return [arguments[0].naturalWidth, arguments[0].complete]", img)
        assert complete and natural > 0, f"{figure.get_attribute('id')}: the image did not decode"
        assert img.size["width"] > 300 and img.size["height"] > 150, (figure.get_attribute("id"), img.size)
        caption = figure.find_element("css selector", "figcaption").text
        assert caption.startswith("Figure ") and tiny_plan.model.tag in caption and "N=" in caption, caption
    masks_caption = figures[-1].find_element("css selector", "figcaption").text
    assert f"target sparsity {tiny_plan.config['masks']['sparsity']:g}" in masks_caption
    # nothing is fetched: the page is self-contained
    assert page.execute_script("return performance.getEntriesByType('resource').length") == 0


def test_the_masks_table_and_the_detailed_tables_follow(page):
    order = page.execute_script(
        "return ['summary', 'figures', 'masks', 'details'].map(i => document.getElementById(i)"
        ".getBoundingClientRect().top)")
    assert order == sorted(order)
    masks = page.find_element("id", "masks")
    methods = [r.find_elements("css selector", "td")[0].text
               for r in masks.find_elements("css selector", "table tbody tr")]
    assert "Origin" in methods and any(m.startswith("Ours (down)") for m in methods)
    details = page.find_element("id", "details")
    headings = [h.text for h in details.find_elements("css selector", "h4")]
    assert "Extraction-rate track" in headings and "Memorized track" in headings
    assert len(details.find_elements("css selector", "table")) >= 2
