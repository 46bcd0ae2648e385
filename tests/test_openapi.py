"""The OpenAPI document: valid, complete, every error our envelope; /docs with no CDN."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from openapi_spec_validator import validate

from api import create_app
from tests.conftest import runtime_for

ENVELOPE = "#/components/schemas/ErrorEnvelope"
# Routes that serve the document and its viewer, not the API.
DOC_BLUEPRINTS = ("static", "api-docs.", "docs-assets.")
# Documented with another body on purpose: /readyz names what is down.
NOT_ENVELOPE = {("/readyz", "get", "503")}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openapi")
    runtime = runtime_for({"PIPELINE_DATA_DIR": str(tmp / "var"),
                           "PIPELINE_ENV_FILE": str(tmp / "no.env")})
    yield create_app(runtime)
    runtime.engine.dispose()


@pytest.fixture(scope="module")
def spec(app):
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def _operations(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method != "parameters":
                yield path, method, operation


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_the_document_validates(spec):
    validate(spec)


def test_every_route_of_the_app_is_documented(app, spec):
    documented = {(path, method.upper()) for path, method, _ in _operations(spec)}
    routes = {(_openapi_path(rule.rule), method)
              for rule in app.url_map.iter_rules()
              if not rule.endpoint.startswith(DOC_BLUEPRINTS)
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes - documented == set()
    # The seeds' endpoints and the operators' ones are among them.
    assert {("/api/generate", "POST"), ("/functions/v1/media-status", "GET"),
            ("/v1/files/{key}", "GET"), ("/metrics", "GET"),
            ("/readyz", "GET")} <= documented


def test_every_error_response_is_the_envelope_with_its_codes(spec):
    for path, method, operation in _operations(spec):
        errors = {status: response for status, response in operation["responses"].items()
                  if status == "default" or status[0] in "45"}
        assert {"400", "500", "default"} <= set(errors), (path, method)
        for status, response in errors.items():
            if (path, method, status) in NOT_ENVELOPE:
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": ENVELOPE}, (path, method, status)
            if status != "default":
                assert re.search(r"\b[A-Z][A-Z_]{4,}\b", response["description"]), (
                    path, method, status, response["description"])


def test_domain_codes_are_documented_where_they_happen(spec):
    def described(path, method, status):
        return spec["paths"][path][method]["responses"][status]["description"]

    for path in ("/v1/jobs", "/api/generate", "/functions/v1/media-start"):
        assert "BUDGET_EXCEEDED" in described(path, "post", "402")
        assert "PROVIDER_NOT_CONFIGURED" in described(path, "post", "400")
        assert "IDEMPOTENCY_KEY_REUSED" in described(path, "post", "422")
        assert "PROVIDER_UNAVAILABLE" in described(path, "post", "503")
    assert "JOB_NOT_FOUND" in described("/api/preview/{job_id}", "get", "404")
    assert "LINK_EXPIRED" in described("/v1/files/{key}", "get", "403")
    assert "UNAUTHORIZED" in described("/v1/wallet", "get", "401")
    assert "FORBIDDEN" in described("/v1/wallet/deposits", "post", "403")


def test_security_public_endpoints_and_the_metrics_token(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["metricsToken"]["scheme"] == "bearer"
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"metricsToken": []}]
    for path in ("/healthz", "/readyz", "/v1/files/{key}"):
        assert spec["paths"][path]["get"]["security"] == []
    assert "security" not in spec["paths"]["/api/generate"]["post"]  # the API key


def test_schemas_are_json_schema_with_numbers_enums_and_lengths(app, spec):
    schemas = spec["components"]["schemas"]
    amount = schemas["Deposit"]["properties"]["amount"]
    assert amount["type"] == "number"
    assert amount["minimum"] == 0
    assert amount["exclusiveMinimum"] is True
    registry = app.extensions["runtime"].registry
    for name in ("JobCreate", "GenerateRequest"):
        props = schemas[name]["properties"]
        assert props["contentType"]["enum"] == ["text", "image", "audio", "video"]
        assert props["prompt"]["minLength"] == 1
        assert props["prompt"]["maxLength"] == app.extensions["runtime"].settings \
            .max_prompt_length
        assert set(props["providerName"]["enum"]) == {*registry.names(), None}
    media = schemas["MediaStartRequest"]["properties"]
    assert media["jobType"]["enum"] == ["image", "video", "audio"]
    assert set(media["provider"]["enum"]) == {*registry.names(), None}
    assert "Default error response" not in str(spec)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_docs_load_everything_from_this_server(app):
    client = app.test_client()
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert not re.search(r"https?://", html), "the docs page names another origin"
    parser = _Links()
    parser.feed(html)
    assert any(url.endswith(".js") for url in parser.urls)
    for url in parser.urls:
        parts = urlsplit(url)
        assert not parts.scheme, url
        assert not parts.netloc, url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.get_data(), url
    # Without an API key: the docs are public, their assets too.
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/assets/no-such-file.js").status_code == 404
