"""`pipeline demo`: the whole path, end to end, over HTTP, on whatever the settings name."""

from __future__ import annotations

import json
import logging
import sys
import time
from decimal import Decimal

import requests

from pipeline.config import Settings

DEPOSIT = Decimal(50)
JOBS = {
    "text": {"prompt": "Write a short note about lighthouses.", "settings": {"maxTokens": 120}},
    "image": {"prompt": "A lighthouse at dawn", "settings": {"width": 640, "height": 360}},
    "audio": {"prompt": "Hello from the content pipeline demo.", "settings": {}},
    "video": {"prompt": "Waves rolling past a lighthouse", "settings": {"duration": 3}},
}
TIMEOUT_SECONDS = 180


def check_file(content_type: str, data: bytes) -> str | None:
    """None when the bytes are what the content type promises, else what is wrong."""
    if content_type == "image" and not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "not a PNG"
    if content_type == "audio" and not (data[:4] == b"RIFF" and data[8:12] == b"WAVE"):
        return "not a WAV"
    if content_type == "video" and data[4:8] != b"ftyp":
        return "not an MP4"
    if content_type == "text" and not data.decode("utf-8").strip():
        return "empty text"
    return None


def say(as_json: bool, line: str = "") -> None:
    if not as_json:
        print(line, flush=True)


def run_demo(settings: Settings, *, port: int = 0, as_json: bool = False) -> int:
    from pipeline.accounts import create_company
    from service.cli import _ensure_db, _runtime
    from service.stack import Stack, free_port, stop_on_signals

    port = port or free_port()
    settings = Settings.from_env(public_url=f"http://127.0.0.1:{port}")
    runtime = _runtime(settings, with_publisher=True)
    _ensure_db(runtime)
    company = create_company(runtime.engine, "demo", credits=DEPOSIT)
    log_path = settings.data_dir / "demo-worker.log"
    stack = Stack(settings, "127.0.0.1", port, log_path=log_path)
    say(as_json, f"database  {runtime.engine.url.render_as_string(hide_password=True)}")
    say(as_json, f"broker    {settings.broker_url.split('@')[-1]}")
    say(as_json, f"storage   {settings.storage_url}")
    say(as_json, f"API       {stack.url}   (worker log: {log_path})")
    say(as_json, f"company   {company.company_id} with {DEPOSIT} credits")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log in the demo
    with stop_on_signals():
        try:
            stack.start(runtime)
            report = _drive(stack.url, company.api_key, as_json)
        finally:
            stack.stop()
    report["companyId"] = str(company.company_id)
    if as_json:
        print(json.dumps(report, indent=2))
    ok = report["ok"]
    say(as_json, "demo passed: all four jobs completed and their files check out" if ok
        else "demo FAILED")
    return 0 if ok else 1


def _drive(url: str, api_key: str, as_json: bool) -> dict:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {api_key}"
    views = _wait(http, url, _submit(http, url, as_json), as_json)
    results, ok = _check_results(http, views, as_json)
    return _report_wallet(http, url, results, ok, as_json)


def _submit(http, url: str, as_json: bool) -> dict[str, str]:
    jobs = {}
    say(as_json, "\nsubmitting one job of each content type")
    for ctype, spec in JOBS.items():
        # The built-in renderers, by name: a platform key in the environment must not
        # turn the demo into paid calls.
        resp = http.post(f"{url}/v1/jobs", json={"contentType": ctype, "provider": "local",
                                                 **spec}, timeout=30)
        resp.raise_for_status()
        body = resp.json()
        jobs[ctype] = body["jobId"]
        say(as_json, f"  {ctype:6} {body['jobId']}  {body['status']:9} "
                     f"estimate {body['estimatedCost']}")
    return jobs


def _wait(http, url: str, jobs: dict[str, str], as_json: bool) -> dict[str, dict]:
    say(as_json, "\nwaiting")
    views: dict[str, dict] = {}
    seen: dict[str, str] = {}
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        for ctype, job_id in jobs.items():
            views[ctype] = http.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
            status = views[ctype]["status"]
            if seen.get(ctype) != status:
                seen[ctype] = status
                say(as_json, f"  {time.strftime('%H:%M:%S')}  {ctype:6} -> {status}")
        if all(v["status"] in ("completed", "failed", "cancelled") for v in views.values()):
            break
        time.sleep(0.3)
    return views


def _check_results(http, views: dict[str, dict], as_json: bool) -> tuple[list[dict], bool]:
    say(as_json, "\nresults")
    results, ok = [], True
    for ctype, view in views.items():
        problem = None
        size = 0
        if view["status"] != "completed":
            problem = f"status {view['status']}: {(view.get('error') or {}).get('message')}"
        else:
            data = http.get(view["result"]["url"], timeout=60).content
            size = len(data)
            problem = check_file(ctype, data)
        ok = ok and problem is None
        results.append({"contentType": ctype, "jobId": view["jobId"], "status": view["status"],
                        "actualCost": view["actualCost"], "bytes": size,
                        "url": (view.get("result") or {}).get("url"), "problem": problem})
        say(as_json, f"  {ctype:6} {view['status']:9} cost {view['actualCost'] or '-':>10}  "
                     f"{size:>8} bytes  {'ok' if problem is None else 'FAIL: ' + problem}")
        if view["result"]:
            say(as_json, f"         {view['result']['url']}")
        if view.get("preview"):
            say(as_json, f"         preview: {view['preview'][:70]!r}")
    return results, ok


def _report_wallet(http, url: str, results: list[dict], ok: bool, as_json: bool) -> dict:
    wallet = http.get(f"{url}/v1/wallet", timeout=30).json()
    entries = http.get(f"{url}/v1/wallet/transactions", timeout=30).json()["transactions"]
    spent = sum((Decimal(r["actualCost"] or 0) for r in results), Decimal(0))
    expected = DEPOSIT - spent
    balanced = Decimal(wallet["available"]) == expected and Decimal(wallet["held"]) == 0
    ok = ok and balanced
    say(as_json, f"\nwallet    available {wallet['available']}  held {wallet['held']}  "
                 f"used {wallet['used']}")
    say(as_json, f"          deposit {DEPOSIT} - actual costs {spent} = {expected}  "
                 f"{'ok' if balanced else 'MISMATCH'}")
    say(as_json, "transactions (newest first)")
    for entry in entries:
        say(as_json, f"  {entry['type']:12} {entry['amount']:>12}  {entry['key']}")
    if not ok:
        print("see the worker log for details", file=sys.stderr)
    return {"ok": ok, "jobs": results, "wallet": wallet, "expectedAvailable": str(expected),
            "transactions": entries}
