"""Unit tests of single functions: no database, no broker, no network."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from pipeline.config import Settings, credits
from pipeline.errors import PipelineError
from pipeline.generation import MAX_BACKOFF_SECONDS, backoff
from pipeline.jobs import JobRequest, validate_request
from pipeline.pricing import PriceTable, UnpricedUsage
from pipeline.security import hash_api_key, new_api_key, signed_query, verify_signature
from pipeline.storage import StorageError, _check_key, object_key
from service.demo import check_file

PRICES = PriceTable({"p": {"text": {"tokens": "0.0002", "images": "3"}}})


def test_cost_is_exact_and_rounded_up_to_the_micro_credit():
    assert PRICES.cost("p", "text", {"tokens": 3}) == Decimal("0.000600")
    assert PRICES.cost("p", "text", {"tokens": 0.1}) == Decimal("0.000020")
    assert PRICES.cost("p", "text", {"tokens": 0.001}) == Decimal("0.000001")  # ceiling
    assert PRICES.cost("p", "text", {"tokens": 1, "images": 2}) == Decimal("6.000200")


@pytest.mark.parametrize(("usage", "error"), [
    ({"seconds": 1}, UnpricedUsage),
    ({"tokens": -5}, PipelineError),
])
def test_unpriced_or_negative_usage_is_refused(usage, error):
    with pytest.raises(error):
        PRICES.cost("p", "text", usage)


def test_credits_never_go_through_binary_floats():
    assert credits(0.1) + credits(0.2) == Decimal("0.300000")
    assert credits("1.0000004") == Decimal("1.000000")


def test_api_keys_are_random_and_stored_only_as_hashes():
    secret, prefix, digest = new_api_key()
    assert secret.startswith("cp_")
    assert secret.startswith(prefix)
    assert digest == hash_api_key(secret)
    assert secret not in digest
    assert new_api_key()[0] != secret


def test_signed_links_expire_and_bind_the_path():
    query = dict(p.split("=") for p in signed_query("k", "/v1/files/a", 60).split("&"))
    assert verify_signature("k", "/v1/files/a", query["expires"], query["signature"])
    assert not verify_signature("k", "/v1/files/b", query["expires"], query["signature"])
    assert not verify_signature("other", "/v1/files/a", query["expires"], query["signature"])
    assert not verify_signature("k", "/v1/files/a", query["expires"], query["signature"],
                                now=time.time() + 120)
    assert not verify_signature("k", "/v1/files/a", "soon", query["signature"])


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/./b", ".."])
def test_storage_keys_cannot_escape_their_folder(key):
    with pytest.raises(StorageError):
        _check_key(key)


def test_object_keys_are_company_job_file():
    assert object_key("c", "j", "output.png") == "c/j/output.png"


@pytest.mark.parametrize(("req", "field"), [
    (JobRequest("sculpture", "x", {}), "contentType"),
    (JobRequest("text", "", {}), "prompt"),
    (JobRequest("text", "x" * 11, {}), "prompt"),
    (JobRequest("text", "x", ["not", "a", "dict"]), "settings"),
])
def test_validation_names_the_field(req, field):
    with pytest.raises(PipelineError) as refused:
        validate_request(req, max_prompt_length=10)
    assert refused.value.details["field"] == field
    assert refused.value.status == 400


def test_backoff_grows_is_capped_and_honours_retry_after():
    assert all(0 <= backoff(0, None) <= 2 for _ in range(50))
    assert all(backoff(30, None) <= MAX_BACKOFF_SECONDS for _ in range(50))
    assert backoff(0, 42.0) >= 42.0


def test_settings_read_the_environment_once_with_embedded_defaults(tmp_path):
    settings = Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path),
                                          "PIPELINE_ENV_FILE": str(tmp_path / "none")})
    assert settings.database_url == f"sqlite:///{tmp_path / 'pipeline.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.embedded
    again = Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path)})
    assert again.secret_key == settings.secret_key  # kept beside the data
    assert settings.secret_key not in repr(settings)


def test_dotenv_fills_in_but_the_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_PROMPT_LENGTH=77\n# a comment\nLINK_TTL_SECONDS='60'\n")
    settings = Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path),
                                          "PIPELINE_ENV_FILE": str(dotenv),
                                          "LINK_TTL_SECONDS": "90"})
    assert (settings.max_prompt_length, settings.link_ttl_seconds) == (77, 90)


@pytest.mark.parametrize(("ctype", "data", "ok"), [
    ("image", b"\x89PNG\r\n\x1a\n...", True),
    ("image", b"GIF89a", False),
    ("audio", b"RIFF\x00\x00\x00\x00WAVEfmt ", True),
    ("video", b"\x00\x00\x00\x18ftypmp42", True),
    ("text", b"  \n", False),
])
def test_demo_file_checks(ctype, data, ok):
    assert (check_file(ctype, data) is None) is ok
