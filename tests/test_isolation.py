"""Tenant isolation: every route that takes an id, found from the app itself (its URL map,
and the OpenAPI document for ids in a query or a body), answers another company's real
id exactly as it answers an id that does not exist: 404 in the envelope, nothing of the
other company's job in it, and the other company's job and money untouched."""

from __future__ import annotations

import json
import re
import uuid
from typing import NamedTuple

import pytest
from sqlalchemy import func, select

from pipeline.tables import jobs, transactions, wallets
from tests.builders import auth, make_company

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

# How to name another company's object for each kind of id a route takes. A route that
# takes an id of a new kind fails the test until it is added here.
ID_ARGUMENTS = {"job_id", "jobId"}
# Path arguments that are not ids of a company's objects, with why.
NOT_IDS = {
    "filename": "static and Swagger UI assets, the same for everyone",
    "name": "the console's static files, the same for everyone",
    "provider": "a provider's name; the company comes from the key",
    "key": "a signed download link: the signature is the credential (tests/test_storage.py)",
}
# The rest of a valid body for the operations that take an id in their body.
BODIES = {"POST /v1/wallet/refunds": {"reference": "isolation-test"}}
_PATH_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
_IGNORED_METHODS = {"HEAD", "OPTIONS"}
_METHODS = {"get", "put", "post", "delete", "patch"}


class Probe(NamedTuple):
    """One way to hand a route an id: in its path, a query parameter or a body property."""

    method: str
    route: str
    where: str = "path"
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.route} ({self.where} {self.name or ''})"


def _by_path(app) -> list[Probe]:
    """Each route with a path argument that is an id, once per method."""
    found = []
    for rule in app.url_map.iter_rules():
        arguments = set(rule.arguments)
        unknown = arguments - ID_ARGUMENTS - set(NOT_IDS)
        assert not unknown, f"{rule.rule}: is {sorted(unknown)} an id? add it to the lists"
        if arguments & ID_ARGUMENTS:
            found += [Probe(method, rule.rule)
                      for method in sorted(rule.methods - _IGNORED_METHODS)]
    return found


def _schema(document, schema):
    if "$ref" in schema:
        return document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _by_query_or_body(document) -> list[Probe]:
    """Each documented query parameter or body property that is an id."""
    found = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method not in _METHODS:
                continue
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query" and parameter["name"] in ID_ARGUMENTS:
                    found.append(Probe(method.upper(), path, "query", parameter["name"]))
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                properties = _schema(document, body["schema"]).get("properties", {})
                found += [Probe(method.upper(), path, "body", name)
                          for name in properties if name in ID_ARGUMENTS]
    return found


def _send(client, key: str, probe: Probe, job_id: str):
    url, body, query = probe.route, None, None
    if probe.where == "path":
        url = _PATH_ARGUMENT.sub(job_id, probe.route)
    elif probe.where == "query":
        query = {probe.name: job_id}
    else:
        body = {**BODIES.get(f"{probe.method} {probe.route}", {}), probe.name: job_id}
    if body is None and probe.method in ("POST", "PUT", "PATCH"):
        body = {}
    return client.open(url, method=probe.method, headers=auth(key), query_string=query,
                       json=body, buffered=False)


def _answer(response, sent: str) -> tuple[int, str]:
    """Status and body, the id we sent replaced: what the caller learns beyond its own input."""
    try:
        return response.status_code, response.get_data(as_text=True).replace(sent, "<id>")
    finally:
        response.close()


def _snapshot(engine, company, job_id):
    with engine.connect() as conn:
        job = dict(conn.execute(select(jobs).where(jobs.c.id == job_id)).one()._mapping)
        wallet = dict(conn.execute(select(wallets)
                                   .where(wallets.c.company_id == company.company_id))
                      .one()._mapping)
        moves = conn.scalar(select(func.count()).select_from(transactions)
                            .where(transactions.c.wallet_id == wallet["id"]))
    return job, wallet, moves


def test_another_companys_ids_are_not_found_on_every_route(api_stack):
    _env, rt, client, ours = api_stack(1000)
    theirs = make_company(rt.engine, credits=1000, name="theirs")
    secret = f"their secret prompt {uuid.uuid4().hex}"
    resp = client.post("/v1/jobs", headers=auth(theirs.api_key), json={
        "contentType": "image", "prompt": secret, "settings": {"width": 64, "height": 64}})
    assert resp.status_code == 202, resp.get_json()
    their_job = resp.get_json()["jobId"]
    before = _snapshot(rt.engine, theirs, uuid.UUID(their_job))
    reveals = [secret, before[0]["status"], str(theirs.company_id), str(before[0]["user_id"]),
               str(before[0]["api_key_id"]), str(before[0]["estimated_cost"])]

    document = client.get("/openapi.json").get_json()
    probes = _by_path(client.application) + _by_query_or_body(document)
    # The routes the issue names are among those found (others join by themselves).
    assert {(p.method, p.route) for p in probes} >= {
        ("GET", "/v1/jobs/<job_id>"), ("POST", "/v1/jobs/<job_id>/cancel"),
        ("GET", "/api/preview/<job_id>"), ("GET", "/functions/v1/media-status"),
        ("POST", "/v1/wallet/refunds")}

    for probe in probes:
        label = str(probe)
        for key in (ours.admin_key, ours.api_key):
            answer = _answer(_send(client, key, probe, their_job), their_job)
            nobody = str(uuid.uuid4())
            unknown = _answer(_send(client, key, probe, nobody), nobody)
            status, text = answer
            if (status, key) == (403, ours.api_key):
                assert unknown[0] == 403, label  # an admin route: refused before the id
                continue
            assert status == 404, (label, status, text)
            assert answer == unknown, (label, answer, unknown)
            assert set(json.loads(text)) == {"error", "code", "details"}, (label, text)
            for value in reveals:
                assert value not in text.replace("<id>", ""), (label, value, text)
    assert _snapshot(rt.engine, theirs, uuid.UUID(their_job)) == before

