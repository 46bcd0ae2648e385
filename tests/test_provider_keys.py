"""Per-company provider keys: the API over real PostgreSQL, encryption at rest, rotation."""

from __future__ import annotations

import hashlib
from datetime import datetime

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from api import create_app
from api.provider_keys import blp
from pipeline import provider_keys as pk
from pipeline.config import Settings
from pipeline.db import init_db, make_engine
from pipeline.tables import provider_keys
from service.runtime import build_runtime
from tests.builders import auth, make_company
from tests.conftest import distributed_env

pytestmark = [pytest.mark.postgres]

SECRET = "sk-proj-Zq7vN2xKp9LmR4tW8yB3cD6fH1jS5gA0"
OTHER_SECRET = "sk-proj-Yh3kL9mN2pQ6rT8vX1zA4cE7gJ0bD5fW"


@pytest.fixture(scope="module")
def runtime(pg_database, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("provider-keys")
    # No broker is touched here: these endpoints publish nothing.
    env = distributed_env(tmp, pg_database, "cp-test-provider-keys-unused:",
                          storage_url=f"file://{tmp}/storage",
                          PROVIDER_KEY_SECRETS=Fernet.generate_key().decode())
    rt = build_runtime(Settings.from_env(environ=env))
    init_db(rt.engine)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def client(runtime):
    app = create_app(runtime)
    if not any(r.rule.startswith("/v1/provider-keys") for r in app.url_map.iter_rules()):
        # Until create_app registers the blueprint itself; through the Api, so it is documented.
        app.extensions["flask-smorest"]["apis"][""]["ext_obj"].register_blueprint(blp)
    return app.test_client()


@pytest.fixture
def company(runtime):
    return make_company(runtime.engine, credits=0)


@pytest.fixture
def fresh_engine(empty_pg_database):
    """A database of its own: rotate() touches every row, whoever wrote it."""
    engine = make_engine(empty_pg_database)
    init_db(engine)
    yield engine
    engine.dispose()


def _assert_envelope(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error", "code", "details"}
    assert body["code"] == code
    assert body["error"]
    return body


def _rows(engine, company_id) -> list:
    with engine.connect() as conn:
        return conn.execute(select(provider_keys)
                            .where(provider_keys.c.company_id == company_id)).all()


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _cipher(runtime):
    return pk.cipher(runtime.settings.provider_key_secrets)


def test_set_list_replace_delete(client, company, runtime):
    admin = auth(company.admin_key)
    bodies = []

    resp = client.put("/v1/provider-keys/openai", headers=admin, json={"apiKey": SECRET + "\n"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    first = resp.get_json()
    bodies.append(resp.get_data(as_text=True))
    assert set(first) == {"provider", "fingerprint", "createdAt", "updatedAt"}
    assert first["provider"] == "openai"
    assert first["fingerprint"] == pk.fingerprint(SECRET)
    # A pasted trailing newline is not part of the key.
    assert pk.lookup(runtime.engine, _cipher(runtime), company.company_id, "openai") == SECRET

    client.put("/v1/provider-keys/runway", headers=admin, json={"apiKey": "rw-short-key"})
    resp = client.get("/v1/provider-keys", headers=admin)
    bodies.append(resp.get_data(as_text=True))
    listed = resp.get_json()["providerKeys"]
    assert [k["provider"] for k in listed] == ["openai", "runway"]
    assert listed[0] == first

    resp = client.put("/v1/provider-keys/openai", headers=admin, json={"apiKey": OTHER_SECRET})
    assert resp.status_code == 200
    bodies.append(resp.get_data(as_text=True))
    replaced = resp.get_json()
    assert replaced["fingerprint"] == pk.fingerprint(OTHER_SECRET) != first["fingerprint"]
    assert replaced["createdAt"] == first["createdAt"]
    assert _when(replaced["updatedAt"]) > _when(first["updatedAt"])
    assert len(_rows(runtime.engine, company.company_id)) == 2
    assert pk.lookup(runtime.engine, _cipher(runtime), company.company_id,
                     "openai") == OTHER_SECRET

    resp = client.delete("/v1/provider-keys/openai", headers=admin)
    assert resp.status_code == 204
    assert resp.get_data() == b""
    listed = client.get("/v1/provider-keys", headers=admin).get_json()["providerKeys"]
    assert [k["provider"] for k in listed] == ["runway"]
    assert pk.lookup(runtime.engine, _cipher(runtime), company.company_id, "openai") is None
    body = _assert_envelope(client.delete("/v1/provider-keys/openai", headers=admin), 404,
                            "PROVIDER_KEY_NOT_FOUND")
    assert body["details"] == {"provider": "openai"}

    for text in bodies:
        assert SECRET not in text
        assert OTHER_SECRET not in text


def test_the_secret_is_stored_only_as_ciphertext(client, company, runtime):
    resp = client.put("/v1/provider-keys/stability", headers=auth(company.admin_key),
                      json={"apiKey": SECRET})
    assert resp.status_code == 200
    assert SECRET not in resp.get_data(as_text=True)
    assert SECRET not in str(dict(resp.headers))
    (row,) = _rows(runtime.engine, company.company_id)
    assert row.key_data != SECRET
    for value in row:
        assert SECRET not in str(value)
    # Not even its body: the fingerprint shows a hash prefix and the last four only.
    assert SECRET[3:-4] not in row.fingerprint
    assert Fernet(runtime.settings.provider_key_secrets[0]).decrypt(
        row.key_data.encode()).decode() == SECRET


def test_fingerprint_is_a_hash_prefix_and_last4_only_for_long_keys():
    digest = hashlib.sha256(SECRET.encode()).hexdigest()[:12]
    assert pk.fingerprint(SECRET) == f"sha256:{digest} \u2026{SECRET[-4:]}"
    short = "abc123def456"
    assert pk.fingerprint(short) == f"sha256:{hashlib.sha256(short.encode()).hexdigest()[:12]}"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("get", "/v1/provider-keys", None),
    ("put", "/v1/provider-keys/openai", {"apiKey": SECRET}),
    ("put", "/v1/provider-keys/openai", {"wrong": 1}),  # refused before the body is read
    ("delete", "/v1/provider-keys/openai", None),
])
def test_a_client_scoped_key_is_forbidden(client, company, method, path, body):
    admin = auth(company.admin_key)
    stored = client.put("/v1/provider-keys/openai", headers=admin,
                        json={"apiKey": OTHER_SECRET}).get_json()
    call = getattr(client, method)
    _assert_envelope(call(path, headers=auth(company.api_key), json=body), 403, "FORBIDDEN")
    _assert_envelope(call(path, json=body), 401, "UNAUTHORIZED")
    listed = client.get("/v1/provider-keys", headers=admin).get_json()["providerKeys"]
    assert listed == [stored]  # neither replaced nor deleted


def test_another_company_cannot_see_replace_or_delete_it(client, company, runtime):
    other = make_company(runtime.engine, credits=0, name="other")
    client.put("/v1/provider-keys/heygen", headers=auth(company.admin_key),
               json={"apiKey": SECRET})

    listed = client.get("/v1/provider-keys", headers=auth(other.admin_key)).get_json()
    assert listed == {"providerKeys": []}
    _assert_envelope(client.delete("/v1/provider-keys/heygen", headers=auth(other.admin_key)),
                     404, "PROVIDER_KEY_NOT_FOUND")
    resp = client.put("/v1/provider-keys/heygen", headers=auth(other.admin_key),
                      json={"apiKey": OTHER_SECRET})
    assert resp.status_code == 200

    cipher = _cipher(runtime)
    assert pk.lookup(runtime.engine, cipher, company.company_id, "heygen") == SECRET
    assert pk.lookup(runtime.engine, cipher, other.company_id, "heygen") == OTHER_SECRET


@pytest.mark.parametrize(("provider", "body", "field"), [
    ("nobody", {"apiKey": SECRET}, "provider"),
    ("comfyui", {"apiKey": SECRET}, "provider"),
    ("local", {"apiKey": SECRET}, "provider"),
    ("openai", {"apiKey": ""}, "apiKey"),
    ("openai", {"apiKey": "   \n"}, "apiKey"),
    ("openai", {"apiKey": "sk-with inner-space"}, "apiKey"),
    ("openai", {"apiKey": "sk-tab\tinside"}, "apiKey"),
    ("openai", {"apiKey": "sk-ключ-secret"}, "apiKey"),
    ("openai", {"apiKey": "x" * 4097}, "apiKey"),
    ("openai", {"apiKey": 12345}, "apiKey"),
    ("openai", {}, "apiKey"),
    ("openai", {"apiKey": SECRET, "surprise": 1}, "surprise"),
])
def test_bad_input_gets_the_envelope_and_writes_nothing(client, company, provider, body,
                                                        field):
    resp = client.put(f"/v1/provider-keys/{provider}", headers=auth(company.admin_key),
                      json=body)
    envelope = _assert_envelope(resp, 400, "VALIDATION_ERROR")
    assert field in str(envelope["details"]) or field in envelope["error"]
    value = body.get("apiKey")
    if isinstance(value, str) and value.strip():
        assert value.strip() not in resp.get_data(as_text=True)
    listed = client.get("/v1/provider-keys", headers=auth(company.admin_key)).get_json()
    assert listed == {"providerKeys": []}


def test_comfyui_is_refused_with_a_reason(client, company):
    resp = client.put("/v1/provider-keys/comfyui", headers=auth(company.admin_key),
                      json={"apiKey": SECRET})
    body = _assert_envelope(resp, 400, "VALIDATION_ERROR")
    assert "needs no API key" in body["error"]
    assert body["details"]["field"] == "provider"


def test_the_endpoints_are_documented(client):
    spec = client.get("/openapi.json").get_json()
    assert {"get"} <= set(spec["paths"]["/v1/provider-keys"])
    assert {"put", "delete"} <= set(spec["paths"]["/v1/provider-keys/{provider}"])
    assert "apiKey" not in spec["components"]["schemas"]["ProviderKey"]["properties"]


def test_rotation_keeps_keys_readable_and_moves_them_to_the_new_secret(fresh_engine):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    first, second = make_company(fresh_engine), make_company(fresh_engine, name="second")
    pk.set_key(fresh_engine, pk.cipher((old,)), first.company_id, "openai", SECRET)
    pk.set_key(fresh_engine, pk.cipher((old,)), second.company_id, "runway", OTHER_SECRET)
    before = {r.provider: r for r in _rows(fresh_engine, first.company_id)
              + _rows(fresh_engine, second.company_id)}

    # The new secret is prepended: old ciphertext still reads.
    both = pk.cipher((new, old))
    assert pk.lookup(fresh_engine, both, first.company_id, "openai") == SECRET

    assert pk.rotate(fresh_engine, both) == 2

    only_new = pk.cipher((new,))
    assert pk.lookup(fresh_engine, only_new, first.company_id, "openai") == SECRET
    assert pk.lookup(fresh_engine, only_new, second.company_id, "runway") == OTHER_SECRET
    with pytest.raises(pk.ProviderKeyUnreadable):
        pk.lookup(fresh_engine, pk.cipher((old,)), first.company_id, "openai")
    after = {r.provider: r for r in _rows(fresh_engine, first.company_id)
             + _rows(fresh_engine, second.company_id)}
    for provider, row in after.items():
        assert row.key_data != before[provider].key_data
        assert row.fingerprint == before[provider].fingerprint
        assert row.updated_at == before[provider].updated_at  # the key itself is unchanged


def test_a_key_whose_secret_was_removed_is_unreadable_not_leaked(fresh_engine):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    company = make_company(fresh_engine)
    pk.set_key(fresh_engine, pk.cipher((old,)), company.company_id, "openai", SECRET)
    (row,) = _rows(fresh_engine, company.company_id)

    with pytest.raises(pk.ProviderKeyUnreadable) as caught:
        pk.lookup(fresh_engine, pk.cipher((new,)), company.company_id, "openai")
    error = caught.value
    assert error.code == "PROVIDER_KEY_UNREADABLE"
    assert error.details == {"companyId": str(company.company_id), "provider": "openai"}
    text = f"{error} {error.message} {error.details} {error.__cause__!r}"
    assert row.key_data not in text
    assert SECRET not in text
    assert error.__suppress_context__


def test_rotate_changes_nothing_when_one_row_is_unreadable(fresh_engine):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    readable, lost = make_company(fresh_engine), make_company(fresh_engine, name="lost")
    pk.set_key(fresh_engine, pk.cipher((new,)), readable.company_id, "openai", SECRET)
    pk.set_key(fresh_engine, pk.cipher((old,)), lost.company_id, "openai", OTHER_SECRET)
    before = [r.key_data for r in _rows(fresh_engine, readable.company_id)
              + _rows(fresh_engine, lost.company_id)]

    with pytest.raises(pk.ProviderKeyUnreadable) as caught:
        pk.rotate(fresh_engine, pk.cipher((new,)))
    assert caught.value.details["companyId"] == str(lost.company_id)
    after = [r.key_data for r in _rows(fresh_engine, readable.company_id)
             + _rows(fresh_engine, lost.company_id)]
    assert after == before


def test_an_empty_secret_list_is_refused():
    with pytest.raises(ValueError, match="PROVIDER_KEY_SECRETS"):
        pk.cipher(())
