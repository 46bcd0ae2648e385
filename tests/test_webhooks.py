"""Signed webhooks: a local receiver verifies what real workers send with the
`standardwebhooks` package; retries keep the webhook-id; refused addresses at submit and
at connect (DNS rebinding); secret rotation; the delivery log; tenant isolation."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook, WebhookVerificationError

from pipeline import jobevents, netguard, provider_keys, webhook_secrets, webhooks
from pipeline.db import utcnow
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.tables import webhook_deliveries
from service.stack import free_port
from tests.builders import (
    assert_wallet_matches_ledger,
    auth,
    count_jobs,
    ledger_entries,
    make_company,
    wait_for,
    wait_terminal,
)
from tests.conftest import distributed_env, runtime_for

CREDITS = 1000
TEXT_JOB = {"contentType": "text", "prompt": "a haiku about webhooks"}
# Short retries so a test sees them all; the receiver is on 127.0.0.1, allowed here only.
E2E_ENV = {"WEBHOOK_ALLOW_PRIVATE": "1", "WEBHOOK_RETRY_SCHEDULE": "1,1,1",
           "WEBHOOK_RELAY_SECONDS": "0.5", "WEBHOOK_TIMEOUT_SECONDS": "3"}


class Receiver:
    """An HTTP server on 127.0.0.1 that keeps every POST; it answers 500 to the first
    `fail_first` attempts of each webhook-id, then 204."""

    def __init__(self, fail_first: int = 0):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                seen = sum(r["headers"].get("webhook-id") == headers.get("webhook-id")
                           for r in receiver.requests)
                receiver.requests.append({"headers": headers, "body": body})
                self.send_response(500 if seen < receiver.fail_first else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/hooks/pipeline?token=abc"

    def of_type(self, type_: str) -> list[dict]:
        return [r for r in self.requests if json.loads(r["body"])["type"] == type_]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def own_stack(empty_pg_database, own_redis_prefix, tmp_path):
    """api_stack on a database of the test's own: the relay and `claim_due` take every
    due delivery in the database, so no other test's may be there."""
    from api import create_app

    runtimes = []

    def make(credits, **extra):
        env = distributed_env(tmp_path, empty_pg_database, own_redis_prefix,
                              storage_url=f"file://{tmp_path}/store", **extra)
        runtimes.append(runtime_for(env))
        rt = runtimes[-1]
        return env, rt, create_app(rt).test_client(), make_company(rt.engine, credits)

    yield make
    for rt in runtimes:
        rt.engine.dispose()


@pytest.fixture
def receiver():
    made = []

    def make(fail_first: int = 0) -> Receiver:
        made.append(Receiver(fail_first))
        return made[-1]

    yield make
    for r in made:
        r.close()


def resolving_to(*addresses: str):
    """A getaddrinfo that answers these addresses for any name (DNS we control)."""

    def resolve(host, port, **_kwargs):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in addresses]

    return resolve


def _secret(client, company) -> str:
    resp = client.get("/v1/webhooks/secret", headers=auth(company.admin_key))
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["secret"]


def _deliveries(client, key, job_id) -> dict[str, dict]:
    resp = client.get(f"/v1/jobs/{job_id}/deliveries", headers=auth(key))
    assert resp.status_code == 200, resp.get_json()
    return {d["event"]: d for d in resp.get_json()["deliveries"]}


# The guard, alone: which addresses are refused, and names resolved by a resolver we pass.

@pytest.mark.parametrize(("address", "refused"), [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True),  # noqa: S104
    ("::1", True), ("fe80::1", True), ("fd00::1", True), ("::", True), ("ff02::1", True),
    ("::ffff:10.0.0.1", True), ("::ffff:127.0.0.1", True), ("64:ff9b::a9fe:a9fe", True),
    ("2002:a00:1::", True),
    ("93.184.216.34", False), ("8.8.8.8", False), ("2606:4700:4700::1111", False),
    ("::ffff:8.8.8.8", False),
])
def test_the_guard_refuses_every_non_public_address(address, refused):
    assert (netguard.refusal(ipaddress.ip_address(address)) is not None) is refused


def test_a_name_resolving_to_a_private_address_is_refused_unless_allowed():
    url = "https://hooks.example.com/in"
    netguard.Guard(resolver=resolving_to("93.184.216.34")).check(url)
    for answer in (("10.20.30.40",), ("93.184.216.34", "10.20.30.40"), ("::ffff:10.0.0.1",)):
        with pytest.raises(netguard.Refused, match="resolves to"):
            netguard.Guard(resolver=resolving_to(*answer)).check(url)
    netguard.Guard(allow_private=True, resolver=resolving_to("10.20.30.40")).check(url)


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://example.com/x", "https://"), ("https://user:pw@93.184.216.34/", "password"),
    ("https:///path", "no host"), ("https://93.184.216.34/a b", "spaces"),
    ("https://93.184.216.34/" + "a" * 2100, "longer"), ("http://[::1/", "cannot be read"),
    ("http://93.184.216.34:99999/", "cannot be read"),
])
def test_urls_that_are_not_plain_http_are_refused(url, why):
    with pytest.raises(netguard.Refused, match=why):
        netguard.Guard(allow_private=True).check(url)


# Submitting: refused URLs are a 400 naming the field, and make no job.

@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize(("body", "field"), [
    ({"webhook": "http://127.0.0.1:8080/hook"}, "webhook"),
    ({"webhook": "http://169.254.169.254/latest/meta-data/"}, "webhook"),
    ({"webhook": "http://localhost/hook"}, "webhook"),
    ({"webhook": "http://[::1]/hook"}, "webhook"),
    ({"webhook": "https://10.0.0.8/hook"}, "webhook"),
    ({"webhook": "http://[::ffff:169.254.169.254]/"}, "webhook"),
    ({"webhook": "https://user:secret@93.184.216.34/hook"}, "webhook"),
    ({"webhook": "gopher://93.184.216.34/"}, "webhook"),
    ({"webhook": ""}, "webhook"),
    ({"webhook": "https://93.184.216.34/", "webhookEvents": ["done"]}, "webhookEvents"),
    ({"webhook": "https://93.184.216.34/", "webhookEvents": []}, "webhookEvents"),
    ({"webhookEvents": ["completed"]}, "webhookEvents"),
])
def test_a_refused_webhook_is_a_validation_error_and_makes_no_job(api_stack, body, field):
    _env, rt, client, company = api_stack(CREDITS)
    resp = client.post("/v1/jobs", headers=auth(company.api_key), json={**TEXT_JOB, **body})
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["code"] == "VALIDATION_ERROR"
    assert resp.get_json()["details"]["field"].partition(".")[0] == field  # or its item
    assert count_jobs(rt.engine, company.company_id) == 0


@pytest.mark.postgres
@pytest.mark.redis
def test_a_public_webhook_is_accepted_and_stored_with_its_events(api_stack):
    _env, rt, client, company = api_stack(CREDITS)
    resp = client.post("/v1/jobs", headers=auth(company.api_key), json={
        **TEXT_JOB, "webhook": "https://93.184.216.34/hook",
        "webhookEvents": ["completed", "start", "completed"]})
    assert resp.status_code == 202, resp.get_json()
    with rt.engine.connect() as conn:
        job = get_job(conn, uuid.UUID(resp.get_json()["jobId"]))
    assert (job.webhook_url, job.webhook_events) == ("https://93.184.216.34/hook",
                                                     ["start", "completed"])


# Through real workers: signed, verified, retried with the same id; a receiver that is
# down never holds the job up, and the job is charged once.

@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.e2e
def test_real_workers_deliver_signed_events_and_retry_with_the_same_id(
        own_stack, start_worker, receiver):
    env, rt, client, company = own_stack(CREDITS, **E2E_ENV)
    flaky = receiver(fail_first=2)
    down_url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    start_worker(env, queues=["pipeline", "local", "maintenance"], concurrency=2, beat=True)

    resp = client.post("/v1/jobs", headers=auth(company.api_key),
                       json={**TEXT_JOB, "webhook": flaky.url()})
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["jobId"]
    down = client.post("/v1/jobs", headers=auth(company.api_key), json={
        **TEXT_JOB, "webhook": down_url, "webhookEvents": ["completed"]}).get_json()["jobId"]
    # The jobs end as they would without webhooks, whatever the receivers do.
    assert wait_terminal(rt.engine, [job_id, down], timeout=60) == {
        job_id: "completed", down: "completed"}

    wait_for(lambda: len(flaky.of_type("job.completed")) == 3, timeout=60,
             message="the completed event's third attempt")
    secret = _secret(client, company)
    for request in flaky.requests:  # every attempt of every event verifies
        payload = Webhook(secret).verify(request["body"], request["headers"])
        assert payload["data"]["jobId"] == job_id
        assert request["headers"]["webhook-id"].startswith("msg_")
    completed = flaky.of_type("job.completed")
    assert len({r["headers"]["webhook-id"] for r in completed}) == 1  # one id, 3 attempts
    body = json.loads(completed[-1]["body"])
    assert body["data"]["status"] == "completed"
    assert body["data"]["actualCost"] is not None
    assert flaky.of_type("job.start")  # the default is every event
    assert not flaky.of_type("job.failed")
    assert not flaky.of_type("job.cancelled")
    with pytest.raises(WebhookVerificationError):  # the signature is not decoration
        Webhook(webhook_secrets.new_secret()).verify(completed[-1]["body"],
                                                     completed[-1]["headers"])

    log = _deliveries(client, company.api_key, job_id)
    assert log["completed"]["status"] == "delivered"
    assert log["completed"]["attempts"] == 3
    assert log["completed"]["lastResponseStatus"] == 204
    assert log["completed"]["webhookId"] == completed[0]["headers"]["webhook-id"]

    # The receiver that never listened: 1 + 3 retries, then failed; charged once anyway.
    wait_for(lambda: _deliveries(client, company.api_key, down)["completed"]["status"]
             == "failed", timeout=60, message="the unreachable webhook to fail")
    failed = _deliveries(client, company.api_key, down)
    assert list(failed) == ["completed"]
    assert failed["completed"]["attempts"] == 4
    assert failed["completed"]["lastError"].startswith("could not connect")
    assert ledger_entries(rt.engine, uuid.UUID(down)).count("debit") == 1
    assert_wallet_matches_ledger(rt.engine, company.company_id)
    assert secret not in json.dumps(failed)
    assert "token=abc" not in json.dumps(log)


# The use cases, without workers: rebinding, rotation, progress throttling, isolation.

def _job_with_webhook(rt, company, url: str, events=None, guard=None):
    return submit_job(
        rt.engine, rt.registry, principal=Principal(company.company_id, company.user_id, None),
        req=JobRequest("text", "a webhook test", {}, webhook=url, webhook_events=events),
        max_prompt_length=4000, webhook_guard=guard or netguard.Guard(allow_private=True))


def _event(rt, job_id, event: str, **changes) -> None:
    """What a job change does (pipeline/jobevents.py): record the event in a transaction."""
    with rt.engine.begin() as conn:
        row = SimpleNamespace(**{**get_job(conn, job_id)._mapping, **changes})
        jobevents.record(conn, row, event)


def _send_due(rt, guard, *, ttl=3600) -> list[str]:
    policy = webhooks.Policy(guard, (1.0,), 3.0, timedelta(hours=1))
    cipher = provider_keys.cipher(rt.settings.provider_key_secrets)
    return [webhooks.deliver(rt.engine, rt.storage, cipher, policy, delivery_id=i, token=t,
                             link_ttl=ttl)
            for i, t in webhooks.claim_due(rt.engine, limit=100, lease_seconds=60)]


def _rows(rt, job_id):
    with rt.engine.connect() as conn:
        return conn.execute(select(webhook_deliveries)
                            .where(webhook_deliveries.c.job_id == job_id)
                            .order_by(webhook_deliveries.c.created_at)).all()


@pytest.mark.postgres
@pytest.mark.redis
def test_a_name_that_rebinds_to_a_private_address_is_refused_at_send(own_stack, receiver):
    _env, rt, client, company = own_stack(CREDITS)
    hook = receiver()
    url = hook.url("hooks.example.test")
    # At submit the name is public...
    job = _job_with_webhook(rt, company, url, events=["start"],
                            guard=netguard.Guard(resolver=resolving_to("93.184.216.34")))
    _event(rt, job["id"], "processing")
    # ...and at send time it points at this machine, where our receiver listens.
    assert _send_due(rt, netguard.Guard(resolver=resolving_to("127.0.0.1"))) == ["failed"]
    assert hook.requests == []
    [row] = _rows(rt, job["id"])
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, None)
    assert "127.0.0.1" in row.last_error
    assert row.last_error.startswith("refused")

    # The same name allowed to resolve there: sent to the checked address, Host kept.
    allowed = netguard.Guard(allow_private=True, resolver=resolving_to("127.0.0.1"))
    other = _job_with_webhook(rt, company, url, events=["start"], guard=allowed)
    _event(rt, other["id"], "processing")
    assert _send_due(rt, allowed) == ["delivered"]
    [request] = hook.requests
    assert request["headers"]["host"] == f"hooks.example.test:{hook.port}"
    assert Webhook(_secret(client, company)).verify(request["body"], request["headers"])


@pytest.mark.postgres
@pytest.mark.redis
def test_both_secrets_sign_during_the_grace_period_after_a_rotation(own_stack, receiver):
    _env, rt, client, company = own_stack(CREDITS)
    hook = receiver()
    first = _secret(client, company)
    assert first.startswith("whsec_")
    assert _secret(client, company) == first
    # Client keys may not read or rotate it: it lets its holder forge webhooks.
    assert client.get("/v1/webhooks/secret", headers=auth(company.api_key)).status_code == 403
    assert client.post("/v1/webhooks/secret/rotate",
                       headers=auth(company.api_key)).status_code == 403

    resp = client.post("/v1/webhooks/secret/rotate", headers=auth(company.admin_key))
    assert resp.status_code == 200, resp.get_json()
    second = resp.get_json()["secret"]
    assert second != first
    assert _secret(client, company) == second
    assert resp.get_json()["previousExpiresAt"] > resp.get_json()["rotatedAt"]
    guard = netguard.Guard(allow_private=True)
    job = _job_with_webhook(rt, company, hook.url(), events=["completed"])
    _event(rt, job["id"], "completed", status="completed")
    assert _send_due(rt, guard) == ["delivered"]
    [request] = hook.requests
    assert len(request["headers"]["webhook-signature"].split(" ")) == 2
    for secret in (first, second):
        assert Webhook(secret).verify(request["body"], request["headers"])["type"] == (
            "job.completed")

    # A second rotation drops the first secret at once; the second still signs.
    third = client.post("/v1/webhooks/secret/rotate",
                        headers=auth(company.admin_key)).get_json()["secret"]
    job = _job_with_webhook(rt, company, hook.url(), events=["failed"])
    _event(rt, job["id"], "failed", status="failed")
    assert _send_due(rt, guard) == ["delivered"]
    latest = hook.requests[-1]
    for secret in (second, third):
        Webhook(secret).verify(latest["body"], latest["headers"])
    with pytest.raises(WebhookVerificationError):
        Webhook(first).verify(latest["body"], latest["headers"])
    # Past the grace period only the current secret signs.
    with rt.engine.begin() as conn:
        conn.execute(webhook_secrets.webhook_secrets.update()
                     .where(webhook_secrets.webhook_secrets.c.company_id == company.company_id)
                     .values(previous_expires_at=utcnow() - timedelta(seconds=1)))
    job = _job_with_webhook(rt, company, hook.url(), events=["cancelled"])
    _event(rt, job["id"], "cancelled", status="cancelled")
    assert _send_due(rt, guard) == ["delivered"]
    assert len(hook.requests[-1]["headers"]["webhook-signature"].split(" ")) == 1


@pytest.mark.postgres
@pytest.mark.redis
def test_progress_sends_one_webhook_per_tenth_and_the_filter_holds(own_stack):
    _env, rt, _client, company = own_stack(CREDITS)
    job = _job_with_webhook(rt, company, "http://127.0.0.1:9/hook")
    for progress in (0.01, 0.05, 0.12, 0.19, 0.5, 0.55, 0.99, 1.0, 1.0):
        _event(rt, job["id"], "progress", progress=progress)
    _event(rt, job["id"], "processing")
    _event(rt, job["id"], "processing")  # a repeat of an event is not a second webhook
    rows = _rows(rt, job["id"])
    assert sorted((r.event, r.sequence) for r in rows) == [
        ("progress", 0), ("progress", 1), ("progress", 5), ("progress", 9),
        ("progress", 10), ("start", 0)]

    only_done = _job_with_webhook(rt, company, "http://127.0.0.1:9/hook", events=["completed"])
    for event in ("processing", "progress", "failed"):
        _event(rt, only_done["id"], event, progress=0.5)
    assert _rows(rt, only_done["id"]) == []
    _event(rt, only_done["id"], "completed")
    assert [r.event for r in _rows(rt, only_done["id"])] == ["completed"]


@pytest.mark.postgres
@pytest.mark.redis
def test_another_companys_deliveries_and_secret_are_not_found(own_stack):
    _env, rt, client, company = own_stack(CREDITS)
    other = make_company(rt.engine, CREDITS, name="other")
    theirs = _job_with_webhook(rt, other, "http://127.0.0.1:9/hook")
    _event(rt, theirs["id"], "processing")
    assert _rows(rt, theirs["id"])
    for job_id in (str(theirs["id"]), str(uuid.uuid4()), "not-a-uuid"):
        resp = client.get(f"/v1/jobs/{job_id}/deliveries", headers=auth(company.admin_key))
        assert resp.status_code == 404, job_id
        assert resp.get_json()["code"] == "JOB_NOT_FOUND"
        assert "deliveries" not in resp.get_json()
    assert list(_deliveries(client, other.api_key, theirs["id"])) == ["start"]
    assert _secret(client, company) != _secret(client, other)



@pytest.fixture
def embedded_runtime(tmp_path):
    """A runtime on the embedded SQLite database (its secrets made on the spot)."""
    from pipeline.config import Settings
    from pipeline.db import init_db
    from service.runtime import build_runtime

    rt = build_runtime(Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path / "var"), "PIPELINE_ENV_FILE": str(tmp_path / "x")}))
    init_db(rt.engine)
    yield rt
    rt.engine.dispose()


def test_the_embedded_database_queues_claims_and_delivers_too(embedded_runtime, receiver):
    rt = embedded_runtime
    company, hook = make_company(rt.engine, CREDITS), receiver()
    job = _job_with_webhook(rt, company, hook.url(), events=["completed"])
    _event(rt, job["id"], "completed")
    _event(rt, job["id"], "completed")
    assert _send_due(rt, netguard.Guard(allow_private=True)) == ["delivered"]
    assert _send_due(rt, netguard.Guard(allow_private=True)) == []  # nothing left due
    with rt.engine.begin() as conn:
        secret = webhook_secrets.current(
            conn, provider_keys.cipher(rt.settings.provider_key_secrets),
            company.company_id).current
    [request] = hook.requests
    payload = Webhook(secret).verify(request["body"], request["headers"])
    assert payload["data"]["jobId"] == str(job["id"])


def test_a_lost_delivery_message_only_delays_the_webhook(embedded_runtime, receiver):
    rt = embedded_runtime
    company, hook = make_company(rt.engine, CREDITS), receiver()
    job = _job_with_webhook(rt, company, hook.url(), events=["completed"])
    _event(rt, job["id"], "completed")
    # The relay claims it and its task message is lost: nothing is sent...
    [(delivery_id, lost)] = webhooks.claim_due(rt.engine, limit=10, lease_seconds=0.2)
    assert webhooks.claim_due(rt.engine, limit=10, lease_seconds=0.2) == []  # claimed
    # ...until the lease runs out and the next relay claims it again.
    again = wait_for(lambda: webhooks.claim_due(rt.engine, limit=10, lease_seconds=60),
                     timeout=5, interval=0.1)
    assert [d for d, _token in again] == [delivery_id]
    policy = webhooks.Policy(netguard.Guard(allow_private=True), (1.0,), 3.0,
                             timedelta(hours=1))
    cipher = provider_keys.cipher(rt.settings.provider_key_secrets)
    assert webhooks.deliver(rt.engine, rt.storage, cipher, policy, delivery_id=delivery_id,
                            token=lost, link_ttl=60) == "skipped"  # the stale message
    assert webhooks.deliver(rt.engine, rt.storage, cipher, policy, delivery_id=delivery_id,
                            token=again[0][1], link_ttl=60) == "delivered"
    assert len(hook.requests) == 1


def test_a_name_that_stops_resolving_is_retried_not_failed(embedded_runtime):
    def nowhere(*_args, **_kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    rt = embedded_runtime
    company = make_company(rt.engine, CREDITS)
    job = _job_with_webhook(rt, company, "https://hooks.example.test/in", events=["completed"],
                            guard=netguard.Guard(resolver=resolving_to("93.184.216.34")))
    _event(rt, job["id"], "completed")
    assert _send_due(rt, netguard.Guard(resolver=nowhere)) == ["retrying"]
    [row] = _rows(rt, job["id"])
    assert (row.status, row.attempts) == ("pending", 1)
    assert "does not resolve" in row.last_error


def test_secrets_are_stored_encrypted_and_follow_a_fernet_key_rotation(embedded_runtime):
    from cryptography.fernet import Fernet

    rt = embedded_runtime
    company = make_company(rt.engine, CREDITS)
    old = provider_keys.cipher(rt.settings.provider_key_secrets)
    with rt.engine.begin() as conn:
        secret = webhook_secrets.current(conn, old, company.company_id).current
        stored = conn.execute(select(webhook_secrets.webhook_secrets.c.secret_data)).scalar()
    assert secret not in stored
    new_key = Fernet.generate_key().decode()
    both = provider_keys.cipher((new_key, *rt.settings.provider_key_secrets))
    assert webhook_secrets.reencrypt(rt.engine, both) == 1
    with rt.engine.begin() as conn:  # the old Fernet key can go now
        assert webhook_secrets.current(conn, provider_keys.cipher((new_key,)),
                                       company.company_id).current == secret
