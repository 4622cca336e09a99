"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright): load it, create a 2-second countdown through the form, watch its bar
reach 100 % and the job complete, with no errors in the browser console; the details
panel follows a job over SSE and shows its result; cancel and clear from the page."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
expect.set_options(timeout=15_000)  # behaviour, not speed: be generous
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# Records every change of a .progress-fill width in #job-list as "job-<id>:<width>".
WATCH_BARS = """() => {
  window.__widths = [];
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      const t = m.target;
      if (t.classList && t.classList.contains("progress-fill")) {
        window.__widths.push(t.closest("li").id + ":" + t.style.width);
      }
    }
  }).observe(document.getElementById("job-list"),
             {subtree: true, attributes: true, attributeFilter: ["style"]});
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


class Dashboard:
    """A page on the dashboard, collecting console errors, page errors and requests."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.goto(url + "/")
        expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
        expect(page.locator("#job-type option")).to_have_count(4)

    def create(self, job_type: str, **params: str) -> None:
        page = self.page
        page.select_option("#job-type", job_type)
        for name, value in params.items():
            page.fill(f'#create-job-form [name="{name}"]', value)
        page.click("#create-job-button")


@pytest.fixture
def dashboard(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield Dashboard(page, server.url)
    context.close()


def test_create_a_countdown_through_the_form_and_watch_it_complete(dashboard):
    page = dashboard.page
    assert page.locator("#job-type option").all_inner_texts() == [
        "countdown", "prime", "fibonacci", "echo"]
    for status in ("pending", "running", "completed", "failed", "cancelled"):
        expect(page.locator(f"#stat-{status}")).to_have_text("0")
    expect(page.locator("#worker-capacity")).to_have_text("3")

    page.select_option("#job-type", "countdown")
    seconds = page.locator('#create-job-form input[name="seconds"]')
    # the input is generated from /api/job-types: min, max and default
    expect(seconds).to_have_attribute("min", "1")
    expect(seconds).to_have_attribute("max", "60")
    expect(seconds).to_have_value("10")

    page.evaluate(WATCH_BARS)
    dashboard.create("countdown", seconds="2")

    row = page.locator("#job-1")
    expect(row).to_have_count(1)
    expect(row).to_have_class(re.compile(r"\bjob-row\b"))
    row_element = row.element_handle()
    expect(row).to_have_attribute("data-status", "running")
    expect(page.locator("#stat-running")).to_have_text("1")
    expect(page.locator("#worker-active")).to_have_text("1")
    expect(row.locator(".cancel-btn")).to_be_visible()

    expect(row).to_have_attribute("data-status", "completed")
    expect(row.locator(".progress-fill")).to_have_attribute("style", re.compile(r"width:\s*100%"))
    expect(row.locator(".progress-text")).to_have_text("100%")
    widths = page.evaluate("window.__widths")
    assert "job-1:50%" in widths and widths[-1] == "job-1:100%", widths
    # the row was updated in place, not rebuilt
    assert row_element.evaluate("e => e.isConnected && e.id === 'job-1'")

    expect(page.locator("#stat-completed")).to_have_text("1")
    expect(page.locator("#stat-running")).to_have_text("0")
    expect(page.locator("#stat-pending")).to_have_text("0")
    expect(page.locator("#worker-processed")).to_have_text("1")
    expect(page.locator("#worker-active")).to_have_text("0")
    expect(row.locator(".cancel-btn")).to_have_count(0)
    expect(page.locator("#form-error")).to_be_hidden()
    assert dashboard.errors == []


def test_details_panel_follows_the_job_over_sse_and_shows_the_result(dashboard):
    page = dashboard.page
    responses = []
    page.on("response", lambda r: responses.append(r) if "/progress" in r.url else None)
    dashboard.create("echo", message="hello browser", delay="3")
    row = page.locator("#job-1")
    expect(row).to_have_attribute("data-status", "running")
    row.locator(".job-head").click()

    expect(page.locator("#details-body")).to_be_visible()
    expect(page.locator("#details-live")).to_be_visible()  # the stream is open
    progress = page.locator('#job-fields dd[data-field="progress"]')
    expect(progress).to_contain_text("Echoing in 1 second...")  # live, from the streams
    expect(page.locator("#job-result")).to_contain_text('"echoed": "hello browser"')
    expect(row).to_have_attribute("data-status", "completed")
    expect(page.locator('#job-fields dd[data-field="status"]')).to_have_text("completed")
    expect(page.locator("#details-live")).to_be_hidden()  # ended with the job
    expect(page.locator("#job-error-box")).to_be_hidden()

    assert any(url.endswith("/api/jobs/1/progress") for url in dashboard.requests)
    stream = [r for r in responses if r.url.endswith("/api/jobs/1/progress")]
    assert stream and stream[0].status == 200
    assert stream[0].headers["content-type"].startswith("text/event-stream")
    assert dashboard.errors == []


def test_form_error_cancel_and_clear_completed(dashboard):
    page = dashboard.page
    dashboard.create("countdown", seconds="0")
    expect(page.locator("#form-error")).to_be_visible()
    expect(page.locator("#form-error")).to_contain_text("seconds")
    expect(page.locator("#job-list li.job-row")).to_have_count(0)

    dashboard.create("countdown", seconds="30")
    row = page.locator("#job-1")
    expect(row).to_have_attribute("data-status", "running")
    expect(page.locator("#form-error")).to_be_hidden()
    row.locator(".cancel-btn").click()
    expect(row).to_have_attribute("data-status", "cancelled")
    expect(row.locator(".retry-btn")).to_be_visible()
    expect(page.locator("#stat-cancelled")).to_have_text("1")
    expect(page.locator("#worker-active")).to_have_text("0")

    dashboard.create("fibonacci", count="5")
    expect(page.locator("#job-2")).to_have_attribute("data-status", "completed")
    expect(page.locator("#job-list li.job-row")).to_have_count(2)
    page.click("#clear-completed")
    expect(page.locator("#job-list li.job-row")).to_have_count(0)
    expect(page.locator("#stat-completed")).to_have_text("0")
    expect(page.locator("#stat-cancelled")).to_have_text("0")
    # the form's 400 is the only error the console may show (Chromium logs it itself)
    expected = "console: Failed to load resource: the server responded with a status of 400"
    unexpected = [e for e in dashboard.errors if not e.startswith(expected)]
    assert unexpected == []
