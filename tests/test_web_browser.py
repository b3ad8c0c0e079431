"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Playwright,
against the dashboard of a running cluster (the five services and ``python -m jobmesh.web``).

It logs in with the token, submits a job from the page, sees it reach succeeded without a
reload, opens its timeline and takes a screenshot: ``$JOBMESH_SCREENSHOT`` when set (that is
how docs/images/dashboard.png is made), else a file under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page, async_playwright, expect

from jobmesh.dev.devcluster import start_dashboard, wait_dashboard
from tests.cluster_fixtures import NODE_ID
from tests.helpers import eventually

CHROMIUM = "/usr/bin/chromium"
TOKEN = "web-browser-test-token"
LAPTOP = {"width": 1366, "height": 768}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chromium() -> str:
    """Debian's Chromium; a clear failure (never a skip) when it is not installed."""
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if not path:
        pytest.fail(f"{CHROMIUM} is missing: `make system-packages` installs chromium (Playwright cannot download one)")
    return path


@pytest.fixture(scope="module")
async def web_url(cluster) -> str:
    port = free_port()
    start_dashboard(cluster, port, token=TOKEN)
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_dashboard, cluster, url)
    return url


@pytest.fixture
async def page():
    executable = chromium()
    async with async_playwright() as p:
        # --no-sandbox: Chromium's own sandbox needs user namespaces, which a container
        # running the tests as root may not give it.
        browser = await p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport=LAPTOP, color_scheme="light")
            yield await context.new_page()
        finally:
            await browser.close()


async def log_in(page: Page, url: str) -> None:
    await page.goto(url)
    await page.fill("#token", "not the token")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#login-error")).to_contain_text("not valid")
    await page.fill("#token", TOKEN)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("h1")).to_have_text("Overview")


async def test_a_job_submitted_from_the_page_reaches_succeeded_live(page, web_url, tmp_path):
    await log_in(page, web_url)
    await expect(page.locator("#live")).to_have_text("live")
    # A reload would lose this; it must still be there when the job has succeeded.
    await page.evaluate("window.__noReload = true")

    command = ["sh", "-c", "echo hello from the dashboard; printf '{\"answer\": 42}' > $JOBMESH_RESULT_PATH"]
    await page.fill("#submit-form input[name=command]", json.dumps(command))
    await page.fill("#submit-form input[name=name]", "dashboard-hello")
    await page.click("#submit-form button[type=submit]")
    submitted = page.locator("[data-submitted]")
    await expect(submitted).to_have_count(1)
    job_id = await submitted.get_attribute("data-submitted")
    assert job_id

    row = page.locator(f'#recent-jobs tr[data-job-id="{job_id}"]')
    await expect(row.locator('[data-state="succeeded"]')).to_be_visible(timeout=30_000)
    assert await page.evaluate("window.__noReload") is True
    # The node table, fed by the stream, shows the executor with its capacity and isolation.
    node = page.locator(f'#nodes tr[data-node="{NODE_ID}"]')
    await expect(node).to_contain_text("8000 m")
    await expect(node.locator("[data-isolation]")).not_to_be_empty()

    await row.locator("a").first.click()
    await expect(page.locator("#job h1")).to_contain_text(job_id)
    await expect(page.locator('#attempts tr[data-attempt="1"]')).to_contain_text(NODE_ID)
    await expect(page.locator('#attempts [data-state="succeeded"]')).to_be_visible()
    for kind in ("submitted", "started", "succeeded"):
        await expect(page.locator(f'#transitions tr[data-event="{kind}"]')).to_have_count(1)
    await expect(page.locator("#logs pre")).to_contain_text("hello from the dashboard", timeout=10_000)
    await expect(page.locator("#result pre")).to_contain_text('{"answer": 42}')
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "wider than a laptop"

    shot = Path(os.environ.get("JOBMESH_SCREENSHOT") or tmp_path / "dashboard.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


async def test_the_dashboard_follows_dark_mode(page, web_url):
    await log_in(page, web_url)
    light = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    await page.emulate_media(color_scheme="dark")
    dark = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light != dark

    def luminance(rgb: str) -> float:
        r, g, b = (int(x) for x in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3])
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    text = await page.evaluate("getComputedStyle(document.body).color")
    assert luminance(dark) < 60 < 160 < luminance(text), (dark, text)


async def test_a_workflow_is_drawn_as_a_graph_that_follows_the_run(page, web_url):
    spec = {
        "name": "browser-flow",
        "steps": {
            "fetch": {"runtime": {"kind": "process", "argv": ["true"]}},
            "clean": {"runtime": {"kind": "process", "argv": ["true"]}, "needs": ["fetch"]},
            "stats": {"runtime": {"kind": "process", "argv": ["true"]}, "needs": ["fetch"]},
            "report": {"runtime": {"kind": "process", "argv": ["true"]}, "needs": ["clean", "stats"]},
        },
    }
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(base_url=web_url, headers=headers) as http:
        async with http.post("/api/v1/workflows", json={"spec": spec}) as response:
            assert response.status == 200, await response.text()
            run_id = (await response.json())["run"]["run_id"]
    await log_in(page, web_url)
    await page.goto(f"{web_url}/#/workflows/{run_id}")
    graph = page.locator("svg.graph")
    await expect(graph.locator("g[data-step]")).to_have_count(4)
    await expect(graph.locator("path[marker-end]")).to_have_count(4)
    # Reached live: the page was opened while the run went on, or after; either way the
    # last step ends succeeded in the graph without a reload.
    await expect(graph.locator('g[data-step="report"].state-succeeded')).to_have_count(1, timeout=60_000)
    x = {}
    for step in ("fetch", "clean", "stats", "report"):
        box = await graph.locator(f'g[data-step="{step}"]').bounding_box()
        assert box is not None
        x[step] = box["x"]
    assert x["fetch"] < x["clean"] == x["stats"] < x["report"]
    await graph.locator('g[data-step="report"]').click()
    await expect(page.locator("#job h1")).to_contain_text("succeeded")


@pytest.mark.parametrize(
    ("fragment", "title", "table"),
    [
        ("#/jobs?state=succeeded&limit=5", "Jobs", "#jobs"),
        ("#/workflows", "Workflow runs", "main section"),
        ("#/queues", "Queues", "#queues"),
        ("#/nodes", "Nodes", "#nodes"),
        ("#/dead-letters", "Dead letters", "main section"),
        ("#/triggers", "Trigger rules", "main section"),
    ],
)
async def test_every_page_renders_without_an_error(page, web_url, fragment, title, table):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await log_in(page, web_url)
    await page.goto(f"{web_url}/{fragment}")
    await expect(page.locator("h1")).to_have_text(title)
    await expect(page.locator(table).first).to_be_visible()
    await expect(page.locator("main [role=alert]:not(:empty)")).to_have_count(0)
    assert not errors


async def test_a_page_drawn_while_the_stream_was_down_catches_up(page, web_url):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    held = {
        "spec": {"runtime": {"kind": "process", "argv": ["true"]}, "name": "browser-held", "not_before": 4102444800.0}
    }
    await log_in(page, web_url)
    # The stream cannot connect: whatever happens meanwhile reaches the page only when it does.
    await page.route("**/api/v1/events*", lambda route: route.abort())
    async with aiohttp.ClientSession(base_url=web_url, headers=headers) as http:
        async with http.post("/api/v1/jobs", json={"jobs": [held]}) as response:
            assert response.status == 200, await response.text()
            (job_id,) = (await response.json())["job_ids"]
        await page.goto(f"{web_url}/#/jobs/{job_id}")
        await page.reload()  # a fresh page whose stream is refused from the start
        await expect(page.locator("#job h1")).to_contain_text(job_id)
        await expect(page.locator("#live")).not_to_have_text("live")

        async def cancelled() -> bool:
            async with http.post(f"/api/v1/jobs/{job_id}/cancel", json={"reason": "browser"}) as response:
                return response.status == 200  # 503 until the scheduler has seen the job

        await eventually(cancelled, timeout=30, what="the cancel to reach the scheduler")
    await expect(page.locator("#job h1 [data-state]")).not_to_have_attribute("data-state", "cancelled")
    await page.unroute("**/api/v1/events*")
    # Reconnected: the cancel it missed is drawn without a reload.
    await expect(page.locator("#live")).to_have_text("live", timeout=20_000)
    await expect(page.locator('#job h1 [data-state="cancelled"]')).to_have_count(1, timeout=10_000)


async def test_an_unreachable_panel_is_drawn_as_an_error_and_no_style_is_blocked(page, web_url):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    down = json.dumps({"code": "unavailable", "message": "the binder is not running", "field": "", "retryable": True})
    await log_in(page, web_url)
    await page.route("**/api/v1/events*", lambda route: route.abort())  # no snapshot hides the failure
    await page.route(
        "**/api/v1/nodes", lambda route: route.fulfill(status=503, body=down, content_type="application/json")
    )
    await page.goto(f"{web_url}/#/nodes")
    await page.reload()
    await expect(page.locator("h1")).to_have_text("Nodes")
    await expect(page.locator("#nodes .error")).to_contain_text("the binder is not running")
    await page.goto(f"{web_url}/#/")
    await expect(page.locator("h1")).to_have_text("Overview")
    await expect(page.locator("#nodes .error")).to_contain_text("the binder is not running")
    await expect(page.locator("#queues table, #queues p.muted").first).to_be_visible()
    assert not errors


async def test_a_stream_refused_for_good_goes_back_to_the_login(page, web_url):
    await log_in(page, web_url)
    await page.goto(f"{web_url}/#/triggers")  # a page that reads nothing again on updates
    await expect(page.locator("h1")).to_have_text("Trigger rules")
    await expect(page.locator("#live")).to_have_text("live")
    # The cookie expires; the stream's next connection is refused (401), which closes the
    # EventSource for good: the page must say so and ask for the token again.
    await page.context.clear_cookies()
    await page.evaluate("events.close(); events = null; connectEvents()")
    await expect(page.locator("#live")).to_have_text("disconnected")
    await expect(page.locator("#login-form")).to_be_visible(timeout=15_000)
