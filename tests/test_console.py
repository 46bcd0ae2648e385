"""The web console (/console) in a real browser: Debian's Chromium driven by Playwright,
over a real API server, PostgreSQL, Redis and a Celery worker running the local provider.

Sign in (a wrong key first), submit a job of each content type, watch each complete live
without reloading, see and hear the results, cancel a job that waits, read the wallet
and its chart; every request the page makes stays on the server's origin. Screenshots
of the console are written to docs/screenshots/ on every run.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from api.console import POLICY
from service.stack import free_port
from tests.builders import auth, make_company, serving, wait_terminal, wallet_of
from tests.conftest import ROOT, distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

SCREENSHOTS = ROOT / "docs" / "screenshots"
PROMPTS = {
    "text": "a haiku about lighthouses",
    "image": "a lighthouse at dawn",
    "audio": "the tide is coming in",
    "video": "waves on a pier",
}
# Small outputs, so four renders fit a shared two-core machine.
SETTINGS = {
    "image": {"width": "320", "height": "200"},
    "video": {"duration": "1", "width": "160", "height": "120", "fps": "6"},
    "text": {"maxTokens": "40"},
}
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing answers there


def chromium_path() -> str | None:
    return shutil.which("chromium") or next(
        (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()),
        None)


@pytest.fixture
def browser():
    """Debian's Chromium through Playwright (never a downloaded browser). Missing: a
    failure under CI=true, a skip elsewhere."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        why = "Chromium (apt-get install chromium) and playwright (the dev extra) are needed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; CI must install them (.ci/run does)")
        pytest.skip(why)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


@pytest.fixture
def console_stack(pg_database, own_redis_prefix, tmp_path, start_worker):
    """A real HTTP server for the API (threaded, as `pipeline run` serves it) and a worker
    for the pipeline and local queues only: a job for OpenAI waits in its queue forever."""

    from api import create_app

    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    env = distributed_env(tmp_path, pg_database, own_redis_prefix,
                          storage_url=f"file://{tmp_path}/store", PUBLIC_URL=origin,
                          OPENAI_API_KEY="sk-console-test", OPENAI_BASE_URL=UNREACHABLE)
    rt = runtime_for(env)
    with serving(create_app(rt), port):
        start_worker(env, queues=["pipeline", "local"], concurrency=2)
        yield origin, rt
    rt.engine.dispose()


def _shot(page, name: str, locator=None) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (locator or page).screenshot(path=str(SCREENSHOTS / name))


def _submit(page, content_type: str, provider: str, prompt: str, settings: dict) -> str:
    page.select_option("#submit-form select[name=contentType]", content_type)
    page.select_option("#submit-form select[name=provider]", provider)
    page.fill("#submit-form textarea[name=prompt]", prompt)
    for name, value in settings.items():
        page.fill(f"#submit-form [name='setting.{name}']", value)
    before = page.locator("#session-jobs article").count()
    page.click("#submit-form button[type=submit]")
    page.wait_for_function(  # a function, not an expression: the page's CSP forbids eval
        "n => document.querySelectorAll('#session-jobs article').length > n", arg=before)
    return page.locator("#session-jobs article").first.get_attribute("data-job-id")


def _card(page, job_id: str):
    return page.locator(f"#session-jobs article[data-job-id='{job_id}']")


@pytest.mark.e2e
def test_console_submits_watches_plays_cancels_and_charges(browser, console_stack):
    origin, rt = console_stack
    company = make_company(rt.engine, credits=50)
    requested: list[str] = []
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.on("request", lambda request: requested.append(request.url))

    response = page.goto(f"{origin}/console/")
    assert response.status == 200
    assert response.headers["content-security-policy"] == POLICY

    # A wrong key is refused in words, with its code; nothing is kept.
    page.fill("#api-key", "sk-not-a-real-key")
    page.click("#sign-in-form button[type=submit]")
    error = page.locator("#sign-in-error")
    error.filter(has_text="UNAUTHORIZED").wait_for()
    assert "not accepted" in error.inner_text()
    assert page.evaluate("sessionStorage.length") == 0

    page.fill("#api-key", company.admin_key)
    page.click("#sign-in-form button[type=submit]")
    page.locator("#submit-form").wait_for()
    assert page.locator("#nav-admin").is_visible()
    page.evaluate("window.__notReloaded = true")

    jobs = {}
    for kind in ("image", "text", "audio", "video"):
        jobs[kind] = _submit(page, kind, "local", PROMPTS[kind], SETTINGS.get(kind, {}))
        if kind == "image":  # the form with the new job's card below it
            page.evaluate("() => document.getElementById('session-title')"
                          ".scrollIntoView({block: 'center'})")
            _shot(page, "job-submitted.png")

    for job_id in jobs.values():
        card = _card(page, job_id)
        page.wait_for_function(
            "id => { const c = document.querySelector(`article[data-job-id='${id}']`);"
            " return c && ['completed', 'failed', 'cancelled'].includes(c.dataset.status); }",
            arg=job_id, timeout=180_000)
        assert card.get_attribute("data-status") == "completed", card.inner_text()
    assert page.evaluate("window.__notReloaded") is True

    image = _card(page, jobs["image"]).locator(".result img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                           arg=image.element_handle())
    assert image.evaluate("img => img.naturalWidth") == 320
    for kind in ("audio", "video"):
        media = _card(page, jobs[kind]).locator(f".result {kind}")
        duration = page.wait_for_function(
            "el => el.readyState >= 1 && el.duration > 0 && el.duration",
            arg=media.element_handle(), timeout=30_000).json_value()
        assert duration > 0, kind
    text = _card(page, jobs["text"]).locator(".result pre")
    page.wait_for_function("pre => pre.textContent && pre.textContent !== 'Loading…'",
                           arg=text.element_handle())
    assert not text.inner_text().startswith("Could not load")
    # Followed over the event stream, not by polling.
    assert "live stream" in _card(page, jobs["image"]).inner_text()
    assert any(urlsplit(u).path.endswith("/events") for u in requested)
    _shot(page, "image-result.png", _card(page, jobs["image"]))

    # A job for a provider no worker serves waits; the page cancels it.
    waiting = _submit(page, "text", "openai", "never generated", {})
    card = _card(page, waiting)
    card.locator("button", has_text="Cancel").click()
    page.wait_for_function(
        "id => document.querySelector(`article[data-job-id='${id}']`).dataset.status"
        " === 'cancelled'", arg=waiting, timeout=30_000)
    assert "CANCELLED" in card.locator(".error").inner_text()

    # The wallet shows the charged balance and the day's spend.
    available = wallet_of(rt.engine, company.company_id).credits_available
    assert available < Decimal(50)
    page.click("#nav a[data-view=wallet]")
    balance = page.locator("[data-wallet=balance]")
    balance.wait_for()
    assert Decimal(balance.inner_text()) == available
    page.locator("#spend-chart svg rect[data-day]").first.wait_for()
    _shot(page, "wallet-chart.png", page.locator("#spend-chart").locator(".."))
    spend = requests.get(f"{origin}/v1/wallet/spend?days=7", headers=auth(company.api_key),
                         timeout=10).json()
    assert Decimal(spend["total"]) == Decimal(50) - available

    # The jobs page lists them with badges and an image thumbnail.
    page.click("#nav a[data-view=jobs]")
    page.locator(f"tr[data-job-id='{jobs['image']}'] img.thumb").wait_for()
    assert page.locator("tr[data-status=cancelled]").count() == 1
    page.select_option("select[name=status]", "completed")
    page.wait_for_function("() => document.querySelectorAll('tbody tr').length === 4")

    # The page never asked any other origin for anything, and the key is in no URL.
    assert requested
    assert all(u.startswith(f"{origin}/") for u in requested), requested
    assert not any(company.admin_key in u for u in requested)
    assert page.evaluate("sessionStorage.getItem('pipeline.console.key')") == company.admin_key
    context.close()


@pytest.mark.e2e
def test_console_fits_a_phone_and_signs_out(browser, console_stack, tmp_path):
    origin, rt = console_stack
    company = make_company(rt.engine, credits=5)
    context = browser.new_context(viewport={"width": 375, "height": 740})
    page = context.new_page()
    failures: list[str] = []
    page.on("pageerror", lambda error: failures.append(str(error)))
    page.goto(f"{origin}/console/")
    page.fill("#api-key", company.api_key)
    page.keyboard.press("Enter")  # the form works from the keyboard
    page.locator("#submit-form").wait_for()
    assert page.evaluate("document.activeElement.id") == "create-title"  # focus moved
    assert not page.locator("#nav-admin").is_visible()  # a client key: no admin page
    job_id = _submit(page, "image", "local", "a small boat", {"width": "64", "height": "64"})
    page.wait_for_function(
        "id => document.querySelector(`article[data-job-id='${id}']`).dataset.status"
        " === 'completed'", arg=job_id, timeout=120_000)
    widths = {}
    shown = {"submit": f"article[data-job-id='{job_id}']", "jobs": f"tr[data-job-id='{job_id}']",
             "wallet": "#spend-chart svg rect[data-day]"}
    for view, marker in shown.items():
        page.click(f"#nav a[data-view={view}]")
        page.locator(marker).wait_for()
        widths[view] = page.evaluate("document.documentElement.scrollWidth")
        page.screenshot(path=str(tmp_path / f"phone-{view}.png"), full_page=True)
    assert widths == dict.fromkeys(widths, 375), widths  # nothing wider than the screen
    assert failures == []
    page.click("#sign-out")
    page.locator("#sign-in-form").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    context.close()


def _completes(page, job_id, timeout=120_000):
    page.wait_for_function(
        "id => document.querySelector(`article[data-job-id='${id}']`).dataset.status"
        " === 'completed'", arg=job_id, timeout=timeout)


@pytest.mark.e2e
def test_console_resumes_a_dropped_stream_and_falls_back_to_polling(browser, console_stack):
    """The stream's first answer ends early: the page reconnects with Last-Event-ID. Then
    a server without the stream (404): the page polls GET /v1/jobs/<id> instead."""
    origin, rt = console_stack
    company = make_company(rt.engine, credits=5)
    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.goto(f"{origin}/console/")
    page.fill("#api-key", company.api_key)
    page.keyboard.press("Enter")
    page.locator("#submit-form").wait_for()

    resumed_with: list[str | None] = []

    def drop_first(route):
        resumed_with.append(route.request.headers.get("last-event-id"))
        if len(resumed_with) > 1:
            route.continue_()
            return
        job_id = route.request.url.rsplit("/", 2)[-2]
        early = {"jobId": job_id, "status": "queued", "contentType": "text"}
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                      body=f"retry: 100\n\nid: 1\nevent: queued\ndata: {json.dumps(early)}\n\n")

    page.route("**/v1/jobs/*/events", drop_first)
    streamed = _submit(page, "text", "local", "resume me", {"maxTokens": "10"})
    _completes(page, streamed)
    assert resumed_with[:2] == [None, "1"]
    assert "live stream" in _card(page, streamed).inner_text()

    page.unroute("**/v1/jobs/*/events")
    page.route("**/v1/jobs/*/events", lambda route: route.fulfill(
        status=404, content_type="application/json",
        body=json.dumps({"error": "Not found.", "code": "NOT_FOUND", "details": {}})))
    polled = _submit(page, "text", "local", "poll me", {"maxTokens": "10"})
    _completes(page, polled)
    assert "polling" in _card(page, polled).inner_text()
    page.context.close()


def test_console_is_served_without_a_key_under_its_policy(api_stack):
    _env, _rt, client, _company = api_stack(5)
    for path in ("/console/", "/console/console.js", "/console/console.css"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["Content-Security-Policy"] == POLICY
        assert "default-src 'self'" in POLICY
    assert client.get("/console").status_code == 308
    assert client.get("/console/secrets.txt").status_code == 404
    page = client.get("/console/").get_data(as_text=True)
    assert "http" not in page.replace("http-equiv", "")  # nothing from another origin
    assert client.get("/v1/providers").status_code == 401


def test_providers_lists_each_provider_with_its_settings(api_stack):
    _env, _rt, client, company = api_stack(5)
    resp = client.get("/v1/providers", headers=auth(company.api_key))
    assert resp.status_code == 200
    by_name = {p["name"]: p for p in resp.get_json()["providers"]}
    local = by_name["local"]
    assert local["contentTypes"] == ["audio", "image", "text", "video"]
    assert local["configured"] is True
    duration = {s["name"]: s for s in local["settings"]["video"]}["duration"]
    assert (duration["minimum"], duration["maximum"], duration["default"]) == (1, 30, 4)
    assert by_name["openai"]["configured"] is False  # no platform key, none of its own


def test_spend_is_validated_and_empty_for_a_new_company(api_stack):
    _env, _rt, client, company = api_stack(5)
    resp = client.get("/v1/wallet/spend?days=3", headers=auth(company.api_key))
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert (body["days"], body["total"], body["entries"]) == (3, "0.000000", [])
    bad = client.get("/v1/wallet/spend?days=0", headers=auth(company.api_key))
    assert bad.status_code == 400
    assert bad.get_json()["code"] == "VALIDATION_ERROR"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_engine(request, tmp_path):
    """The embedded default's SQLite, or the run's PostgreSQL."""
    if request.param == "postgres":
        yield request.getfixturevalue("pg_runtime").engine
        return
    from pipeline.config import Settings
    from pipeline.db import init_db
    from service.runtime import build_runtime

    rt = build_runtime(Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path), "SECRET_KEY": "k",
        "PIPELINE_ENV_FILE": str(tmp_path / "no.env")}))
    init_db(rt.engine)
    yield rt.engine
    rt.engine.dispose()


def _usage(engine, company, at: datetime, cost: str, *, kind: str = "image",
           provider: str = "local") -> None:
    from pipeline.db import new_id
    from pipeline.tables import api_usage, jobs

    job_id = new_id()
    with engine.begin() as conn:
        conn.execute(jobs.insert().values(
            id=job_id, company_id=company.company_id, provider=provider, content_type=kind,
            status="completed", prompt="p", estimated_cost=Decimal(cost)))
        conn.execute(api_usage.insert().values(
            id=new_id(), company_id=company.company_id, job_id=job_id, provider=provider,
            content_type=kind, cost=Decimal(cost), created_at=at))


def test_spend_is_summed_per_utc_day_provider_and_content_type(any_engine):
    from pipeline.spend import spend_per_day

    ours, theirs = make_company(any_engine), make_company(any_engine, name="other")
    day = datetime(2026, 11, 25, tzinfo=UTC)
    _usage(any_engine, ours, day - timedelta(days=3), "9")  # before the window
    _usage(any_engine, ours, day - timedelta(minutes=30), "0.5")  # 24th, 23:30 UTC
    _usage(any_engine, ours, day + timedelta(minutes=30), "0.25")
    _usage(any_engine, ours, day + timedelta(hours=20), "0.125")
    _usage(any_engine, ours, day + timedelta(hours=1), "1", kind="video")
    _usage(any_engine, ours, day + timedelta(hours=2), "0")  # failed: charged nothing
    _usage(any_engine, theirs, day + timedelta(hours=1), "7")  # another company's
    with any_engine.connect() as conn:
        spend = spend_per_day(conn, ours.company_id, days=2, today=day.date())
    assert spend == {
        "from": "2026-11-24", "to": "2026-11-25", "days": 2, "total": "1.875000",
        "entries": [
            {"day": "2026-11-24", "provider": "local", "contentType": "image",
             "cost": "0.500000"},
            {"day": "2026-11-25", "provider": "local", "contentType": "image",
             "cost": "0.375000"},
            {"day": "2026-11-25", "provider": "local", "contentType": "video",
             "cost": "1.000000"},
        ]}


@pytest.mark.e2e
def test_console_shows_the_attempt_log_and_retries_any_job_from_the_jobs_page(
        browser, console_stack):
    """A card lists its job's attempts; a job submitted elsewhere (here with curl's
    equivalent) is retried from the Jobs page with its own prompt and settings."""
    origin, rt = console_stack
    company = make_company(rt.engine, credits=10)
    elsewhere = requests.post(f"{origin}/v1/jobs", headers=auth(company.api_key), timeout=10,
                              json={"contentType": "text", "prompt": "retry me, from afar",
                                    "provider": "local", "settings": {"maxTokens": 12}})
    assert elsewhere.status_code == 202, elsewhere.text
    original = elsewhere.json()["jobId"]
    assert wait_terminal(rt.engine, [original]) == {original: "completed"}

    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.goto(f"{origin}/console/")
    page.fill("#api-key", company.api_key)
    page.keyboard.press("Enter")
    page.locator("#submit-form").wait_for()

    job_id = _submit(page, "text", "local", "log my attempts", {"maxTokens": "10"})
    _completes(page, job_id)
    attempt = _card(page, job_id).locator(".attempts li[data-outcome=succeeded]")
    attempt.wait_for()
    assert "#1 local: succeeded" in attempt.inner_text()
    assert "started" in attempt.inner_text()
    assert "ended" in attempt.inner_text()
    assert _card(page, job_id).locator(".attempts li").count() == 1

    page.click("#nav a[data-view=jobs]")
    page.locator(f"tr[data-job-id='{original}'] button", has_text="Retry").click()
    page.wait_for_function(
        "id => { const c = document.querySelector('#session-jobs article');"
        " return c && c.dataset.jobId !== id && location.hash === '#/submit'; }",
        arg=job_id)
    retried = page.locator("#session-jobs article").first.get_attribute("data-job-id")
    assert retried not in (original, job_id)
    assert "retry me, from afar" in _card(page, retried).inner_text()
    _completes(page, retried)
    _card(page, retried).locator(".attempts li[data-outcome=succeeded]").wait_for()

    again = requests.get(f"{origin}/v1/jobs/{retried}", headers=auth(company.api_key),
                         timeout=10).json()
    assert again["input"] == {"contentType": "text", "prompt": "retry me, from afar",
                              "settings": {"maxTokens": 12}, "provider": "local"}
    page.context.close()
