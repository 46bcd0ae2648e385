"""The shared adapter plumbing: Retry-After parsing, status mapping, redaction, settings."""

from __future__ import annotations

import pytest
import requests

from pipeline.provider_errors import (
    AuthError,
    NotConfiguredError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)
from providers.http import HttpClient, Settings, error_class, parse_retry_after, redact
from tests.fakes.base import FakeServer, Reply

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After-Ms": "20.5"}, 0.0205),
        ({"retry-after": "120"}, 120.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after": "Tue, 14 Nov 2023 22:14:20 GMT"}, 60.0),
        ({"retry-after": "Tue, 14 Nov 2023 22:00:00 GMT"}, 0.0),  # in the past: go now
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "junk", "retry-after": "3"}, 3.0),
        ({"retry-after-ms": "100", "retry-after": "3"}, 0.1),
        ({}, None),
    ],
)
def test_parse_retry_after(headers, wait):
    assert parse_retry_after(headers, now=NOW) == wait


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, RejectedError),
        (404, RejectedError),
        (413, RejectedError),
        (422, RejectedError),
        (401, AuthError),
        (403, AuthError),
        (402, QuotaExhaustedError),
        (408, TransientError),
        (409, TransientError),
        (429, TransientError),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (504, TransientError),
    ],
)
def test_default_status_mapping(status, error):
    assert error_class(status) is error


def test_redact_removes_secrets_and_bounds_length():
    assert redact("key sk-1 and sk-1 again", ["sk-1", ""]) == "key [redacted] and [redacted] again"
    assert len(redact("x" * 5000, [])) == 503


class Echo(FakeServer):
    routes = [("GET", "/thing", "thing")]

    def handle_thing(self, request):
        return Reply(200, [1, 2])


def describe(body):
    return [body.get("code", "")] if isinstance(body, dict) else [], str(body)


def test_send_maps_vendor_codes_before_statuses():
    with Echo() as fake:
        http = HttpClient(
            "x",
            fake.url,
            timeout=1,
            describe=describe,
            codes={"broke": QuotaExhaustedError},
            statuses={418: AuthError},
        )
        fake.push("thing", Reply(429, {"code": "broke"}), Reply(418, {}), Reply(429, {}))
        for expected in (QuotaExhaustedError, AuthError, TransientError):
            with pytest.raises(expected):
                http.send("GET", "/thing")
        assert http.send("GET", f"{fake.url}/thing").json() == [1, 2]  # absolute URLs too
        with pytest.raises(TransientError, match="JSON object"):
            http.json(http.send("GET", "/thing"))


def test_credentials_in_headers_are_scrubbed_from_errors():
    with Echo() as fake:
        http = HttpClient("x", fake.url, timeout=1, describe=describe)
        fake.push("thing", Reply(401, {"code": "no", "echo": "Bearer tok-123 xi-456"}))
        with pytest.raises(AuthError) as raised:
            http.send(
                "GET", "/thing", headers={"Authorization": "Bearer tok-123", "xi-api-key": "xi-456"}
            )
        assert "tok-123" not in str(raised.value)
        assert "xi-456" not in str(raised.value)


def test_calls_with_a_key_do_not_follow_redirects():
    with Echo() as fake:
        http = HttpClient("x", fake.url, timeout=1, describe=describe)
        fake.push("thing", Reply(302, "", {"Location": "http://elsewhere.example/steal"}))
        with pytest.raises(NotConfiguredError, match=r"redirects to elsewhere\.example/steal"):
            http.send("GET", "/thing", headers={"X-Api-Key": "k-1"})
        fake.push("thing", Reply(302, "", {"Location": f"{fake.url}/thing"}))
        assert http.send("GET", "/thing").json() == [1, 2]  # keyless calls (downloads) follow


def test_a_malformed_base_url_is_not_configured():
    http = HttpClient("x", "not-a-url", timeout=1, describe=describe)
    with pytest.raises(NotConfiguredError):
        http.send("GET", "/thing")


def test_a_given_session_is_used():
    session = requests.Session()
    session.headers["X-Trace"] = "t1"
    with Echo() as fake:
        HttpClient("x", fake.url, timeout=1, session=session, describe=describe).send(
            "GET", "/thing"
        )
        assert fake.received("thing")[0].headers["x-trace"] == "t1"


@pytest.mark.parametrize(
    ("method", "args", "value", "expected"),
    [
        ("integer", (5, 1, 10), 8.0, 8),
        ("integer", (5, 1, 10), None, 5),
        ("number", (1.0, 0, 2), 2, 2.0),
        ("choice", ("4", ("4", "8")), 8, "8"),
        ("text", ("d", 5), "abc", "abc"),
        ("flag", (False,), True, True),
    ],
)
def test_settings_accept(method, args, value, expected):
    assert getattr(Settings("x", {"s": value}), method)("s", *args) == expected


@pytest.mark.parametrize(
    ("method", "args", "value"),
    [
        ("integer", (5, 1, 10), True),
        ("integer", (5, 1, 10), 11),
        ("integer", (5, 1, 10), 2.5),
        ("integer", (5, 1, 10), "7"),
        ("number", (1.0, 0, 2), "1"),
        ("choice", ("4", ("4", "8")), "5"),
        ("text", ("d", 5), "toolong"),
        ("flag", (False,), "yes"),
    ],
)
def test_settings_reject_naming_the_setting(method, args, value):
    with pytest.raises(RejectedError, match="setting 's'"):
        getattr(Settings("x", {"s": value}), method)("s", *args)
