"""Storage backends: what each failure means (missing, unavailable, refused) and the happy path.

S3 runs as boto3 against moto's server, directly and through the fault proxy, which answers
PutObject with real S3 errors for longer than boto3's own retries last.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import pickle
import subprocess
import sys
import time
import uuid
from urllib.request import urlopen

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from pipeline.storage import (
    S3_RETRIES,
    LocalStorage,
    ObjectMissing,
    S3Storage,
    StorageError,
    StorageRefused,
    StorageUnavailable,
    classify_s3_error,
    s3_error,
)
from service.stack import free_port
from tests.conftest import ROOT
from tests.fakes.s3_faults import S3FaultProxy, counts_at, fail_puts_at

SECRET_KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def client_error(code: str, status: int | None, operation: str = "PutObject",
                 **error_fields) -> ClientError:
    """A ClientError as botocore builds it from an S3 answer."""
    response: dict = {"Error": {"Code": code, "Message": "as S3 words it", **error_fields}}
    if status is not None:
        response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, operation)


# ---------------------------------------------------------------- what S3's answers mean

@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("NoSuchKey", 404, ObjectMissing),
        ("404", 404, ObjectMissing),  # HEAD: no body, botocore's code is the status
        ("NotFound", 404, ObjectMissing),
        ("InternalError", 500, StorageUnavailable),
        ("ServiceUnavailable", 503, StorageUnavailable),
        ("SlowDown", 503, StorageUnavailable),
        ("RequestTimeout", 400, StorageUnavailable),  # a 400 that means "try again"
        ("OperationAborted", 409, StorageUnavailable),
        ("Throttling", 400, StorageUnavailable),
        ("ThrottlingException", 400, StorageUnavailable),
        ("TooManyRequestsException", 429, StorageUnavailable),
        ("BandwidthLimitExceeded", 509, StorageUnavailable),
        ("500", 500, StorageUnavailable),
        ("502", 502, StorageUnavailable),
        ("503", 503, StorageUnavailable),
        ("504", 504, StorageUnavailable),
        ("429", 429, StorageUnavailable),
        ("503", None, StorageUnavailable),  # a HEAD error without response metadata
        ("AccessDenied", 403, StorageRefused),
        ("403", 403, StorageRefused),
        ("AllAccessDisabled", 403, StorageRefused),
        ("InvalidAccessKeyId", 403, StorageRefused),
        ("SignatureDoesNotMatch", 403, StorageRefused),
        ("RequestTimeTooSkewed", 403, StorageRefused),
        ("ExpiredToken", 400, StorageRefused),
        ("NoSuchBucket", 404, StorageRefused),
        ("InvalidBucketName", 400, StorageRefused),
        ("KeyTooLongError", 400, StorageRefused),
        ("PermanentRedirect", 301, StorageRefused),  # a bucket in another region
        ("SomethingNewIn2030", 400, StorageRefused),  # unknown 4xx
        ("SomethingNewIn2030", 507, StorageUnavailable),  # unknown 5xx
        ("SomethingNewIn2030", None, StorageRefused),
    ],
)
def test_s3_error_codes_map_onto_missing_unavailable_refused(code, status, expected):
    error = s3_error(client_error(code, status), "put of s3://bkt/a/b")
    assert type(error) is expected
    assert classify_s3_error(client_error(code, status)) is expected
    assert error.retryable is (expected is StorageUnavailable)
    assert error.code == code
    assert isinstance(error, StorageError)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (EndpointConnectionError(endpoint_url="http://s3.internal:9000/bkt"), StorageUnavailable),
        (ConnectTimeoutError(endpoint_url="http://s3.internal:9000/bkt"), StorageUnavailable),
        (ReadTimeoutError(endpoint_url="http://s3.internal:9000/bkt"), StorageUnavailable),
        (ConnectionClosedError(endpoint_url="http://s3.internal:9000/bkt"), StorageUnavailable),
        (ResponseStreamingError(error="connection reset"), StorageUnavailable),
        (OSError(errno.ECONNRESET, "reset"), StorageUnavailable),
        (NoCredentialsError(), StorageRefused),
        (ParamValidationError(report="Bucket is required"), StorageRefused),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_botocore_failures_map_onto_unavailable_or_refused(exc, expected):
    error = s3_error(exc, "get of s3://bkt/a/b")
    assert type(error) is expected
    assert error.retryable is (expected is StorageUnavailable)
    assert error.code == type(exc).__name__


def test_error_messages_carry_no_credentials_or_signed_links():
    # S3's SignatureDoesNotMatch body echoes the key id and what was signed.
    refused = s3_error(
        client_error("SignatureDoesNotMatch", 403, AWSAccessKeyId=SECRET_KEY_ID,
                     StringToSign=f"AWS4-HMAC-SHA256 {SECRET_KEY_ID}",
                     Message=f"signature for {SECRET_KEY_ID} does not match"),
        "put of s3://bkt/a/b",
    )
    signed = "http://s3.internal/bkt/a?X-Amz-Credential=AKIAXXX&X-Amz-Signature=abcdef"
    unavailable = s3_error(EndpointConnectionError(endpoint_url=signed), "get of s3://bkt/a")
    for error in (refused, unavailable):
        text = str(error)
        assert SECRET_KEY_ID not in text
        assert "X-Amz-" not in text
        assert "AKIA" not in text
    assert str(refused) == "S3 put of s3://bkt/a/b failed: SignatureDoesNotMatch (HTTP 403)"


@pytest.mark.parametrize("kind", [ObjectMissing, StorageUnavailable, StorageRefused])
def test_errors_survive_pickling_as_celery_ships_them(kind):
    error = kind("S3 put of s3://bkt/k failed: SlowDown (HTTP 503)", code="SlowDown")
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes)
    assert type(copy) is kind
    assert (str(copy), copy.code, copy.retryable) == (str(error), "SlowDown", error.retryable)


# ---------------------------------------------------------------- S3 through boto3 and moto

def new_bucket() -> str:
    return f"cp-storage-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def proxy(s3_server):
    with S3FaultProxy(s3_server) as running:
        yield running


@pytest.fixture(params=["direct", "proxied"])
def endpoint(request, s3_server):
    """moto's URL, or the fault proxy's in front of it (with nothing scripted)."""
    if request.param == "direct":
        yield s3_server
    else:
        yield request.getfixturevalue("proxy").url


@pytest.fixture
def s3(endpoint):
    storage = S3Storage(new_bucket(), "jobs", endpoint_url=endpoint)
    storage.ensure_bucket()
    return storage


def test_s3_put_get_size_url_round_trip(s3):
    data = b"\x00binary output\xff" * 1000
    s3.put("c1/j1/output.png", data, "image/png")

    assert s3.get("c1/j1/output.png") == data
    assert s3.size("c1/j1/output.png") == len(data)
    with urlopen(s3.url("c1/j1/output.png", 300), timeout=10) as response:  # noqa: S310
        assert response.read() == data
        assert response.headers["Content-Type"] == "image/png"


def test_s3_large_upload_goes_through(s3):
    # Above 1 MB botocore sends Expect: 100-continue and waits for the go-ahead.
    data = os.urandom(3 * 1024 * 1024)
    s3.put("c1/j1/output.mp4", data, "video/mp4")
    assert s3.get("c1/j1/output.mp4") == data


def test_s3_missing_key_is_none_for_size_and_missing_for_get(s3):
    assert s3.size("c1/j1/nothing.txt") is None
    with pytest.raises(ObjectMissing) as caught:
        s3.get("c1/j1/nothing.txt")
    assert caught.value.code == "NoSuchKey"


def test_s3_wrong_bucket_is_refused_not_missing(endpoint):
    storage = S3Storage(new_bucket(), "jobs", endpoint_url=endpoint)  # never created

    # HEAD says a bare 404 for a missing bucket as for a missing key: not "no object".
    with pytest.raises(StorageRefused) as caught:
        storage.size("c1/j1/output.txt")
    assert caught.value.code == "NoSuchBucket"
    with pytest.raises(StorageRefused, match="NoSuchBucket"):
        storage.get("c1/j1/output.txt")
    with pytest.raises(StorageRefused, match="NoSuchBucket"):
        storage.put("c1/j1/output.txt", b"x", "text/plain")


def test_s3_ensure_bucket_is_idempotent(endpoint):
    storage = S3Storage(new_bucket(), endpoint_url=endpoint)
    storage.ensure_bucket()
    storage.ensure_bucket()
    storage.put("k", b"x", "text/plain")
    assert storage.size("k") == 1


def test_s3_invalid_key_is_refused_before_any_request(s3):
    with pytest.raises(StorageRefused):
        s3.put("a/../b", b"x", "text/plain")


def test_s3_unreachable_endpoint_is_unavailable():
    storage = S3Storage(new_bucket(), endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable) as caught:
        storage.put("c1/j1/output.txt", b"x", "text/plain")
    assert caught.value.code == "EndpointConnectionError"
    assert caught.value.retryable


@pytest.fixture(scope="module")
def signing_s3():
    """A moto server of its own that checks SigV4 signatures and IAM policies, as S3 does
    (the shared one accepts anything); yields its URL and a key allowed s3:*."""
    import boto3

    port = free_port()
    # The first three calls (user, key, policy) go unchecked; every later one is checked.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urlopen(f"{url}/moto-api/", timeout=1).close()  # noqa: S310
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="unchecked", aws_secret_access_key="unchecked")
        iam.create_user(UserName="pipeline")
        key = iam.create_access_key(UserName="pipeline")["AccessKey"]
        iam.put_user_policy(UserName="pipeline", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def signed_storage(endpoint: str, key_id: str, secret: str) -> S3Storage:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key_id, aws_secret_access_key=secret,
                          config=Config(retries={"mode": "standard", "max_attempts": 0}))
    return S3Storage(new_bucket(), "jobs", client=client)


def test_sigv4_signatures_stay_valid_through_the_proxy(signing_s3):
    url, key_id, secret = signing_s3
    with S3FaultProxy(url) as proxy:
        storage = signed_storage(proxy.url, key_id, secret)
        storage.ensure_bucket()
        storage.put("c1/j1/output.txt", b"signed", "text/plain")
        assert storage.get("c1/j1/output.txt") == b"signed"
        assert storage.size("c1/j1/output.txt") == 6
        assert proxy.counts()["forwarded_puts"] == 1

        # The same server does check: a wrong secret is refused, not read as "no object".
        forged = signed_storage(proxy.url, key_id, "not-the-secret")
        forged.bucket = storage.bucket
        with pytest.raises(StorageRefused) as caught:
            forged.put("c1/j1/output.txt", b"x", "text/plain")
        assert caught.value.code == "SignatureDoesNotMatch"
        assert secret not in str(caught.value)
        with pytest.raises(StorageRefused) as caught:
            forged.size("c1/j1/output.txt")  # HEAD: a bare 403
        assert caught.value.code == "403"


# ---------------------------------------------------------------- SlowDown and friends

@pytest.fixture
def proxied(proxy):
    storage = S3Storage(new_bucket(), "jobs", endpoint_url=proxy.url)
    storage.ensure_bucket()
    return storage


@pytest.mark.slow
@pytest.mark.parametrize("code", ["SlowDown", "InternalError"])
def test_a_burst_longer_than_boto3_retries_is_unavailable_then_a_put_succeeds(
        proxy, proxied, code):
    attempts = S3_RETRIES + 1
    proxy.fail_puts(attempts + 1, code)  # one more than a single put() will try

    with pytest.raises(StorageUnavailable) as caught:
        proxied.put("c1/j1/output.png", b"paid for", "image/png")
    assert caught.value.code == code
    assert caught.value.retryable
    assert proxy.counts() == {"failed_puts": attempts, "forwarded_puts": 0,
                              "pending_failures": 1}
    assert proxied.size("c1/j1/output.png") is None  # reads are not failed

    # The task's own retry, later: boto3 rides over the last failure and the bytes land.
    proxied.put("c1/j1/output.png", b"paid for", "image/png")
    assert proxy.counts() == {"failed_puts": attempts + 1, "forwarded_puts": 1,
                              "pending_failures": 0}
    assert proxied.get("c1/j1/output.png") == b"paid for"


def test_the_proxy_fails_object_puts_only(proxy):
    proxy.fail_puts(50)
    storage = S3Storage(new_bucket(), endpoint_url=proxy.url)
    storage.ensure_bucket()  # PUT /bucket: not a PutObject
    assert storage.size("k") is None
    assert proxy.counts() == {"failed_puts": 0, "forwarded_puts": 0, "pending_failures": 50}


def test_the_proxy_is_scripted_over_http_as_another_process_would(proxy, proxied):
    assert fail_puts_at(proxy.url, 1, "InternalError")["pending_failures"] == 1
    proxied.put("c1/j1/output.txt", b"hello", "text/plain")  # boto3 retries once
    assert counts_at(proxy.url) == {"failed_puts": 1, "forwarded_puts": 1,
                                    "pending_failures": 0}


def test_the_proxy_runs_as_a_process_of_its_own(s3_server):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.s3_faults", "--target", s3_server],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        storage = S3Storage(new_bucket(), endpoint_url=url)
        storage.ensure_bucket()
        fail_puts_at(url, 1)
        storage.put("k", b"hello", "text/plain")
        assert storage.get("k") == b"hello"
        assert counts_at(url) == {"failed_puts": 1, "forwarded_puts": 1, "pending_failures": 0}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------- local files

@pytest.fixture
def local(tmp_path):
    return LocalStorage(tmp_path / "store", "http://testserver", "secret")


def test_local_put_get_size(local):
    local.put("c1/j1/output.txt", b"hello", "text/plain")
    assert local.get("c1/j1/output.txt") == b"hello"
    assert local.size("c1/j1/output.txt") == 5


def test_local_missing_is_none_for_size_and_missing_for_get(local):
    assert local.size("c1/j1/nothing.txt") is None
    with pytest.raises(ObjectMissing):
        local.get("c1/j1/nothing.txt")
    local.put("c1/j1/output.txt", b"hello", "text/plain")
    # A folder, or a path through a file, is no object either.
    assert local.size("c1/j1") is None
    with pytest.raises(ObjectMissing):
        local.get("c1/j1")
    with pytest.raises(ObjectMissing):
        local.get("c1/j1/output.txt/more")


def test_local_keys_that_can_never_be_stored_are_refused(local):
    local.put("c1/j1/output.txt", b"hello", "text/plain")
    with pytest.raises(StorageRefused):
        local.put("c1/j1/output.txt/more", b"x", "text/plain")  # a file where a folder goes
    with pytest.raises(StorageRefused) as caught:
        local.put(f"c1/j1/{'x' * 300}.txt", b"x", "text/plain")
    assert caught.value.code == "ENAMETOOLONG"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_local_read_only_folder_is_unavailable(local):
    local.put("c1/j1/output.txt", b"hello", "text/plain")
    folder = local.root / "c1" / "j1"
    folder.chmod(0o555)
    try:
        with pytest.raises(StorageUnavailable) as caught:
            local.put("c1/j1/output.png", b"paid for", "image/png")
        assert caught.value.code == "EACCES"
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES,
                                  errno.EROFS])
def test_local_disk_trouble_on_put_is_unavailable_and_leaves_no_part_file(
        local, monkeypatch, code):
    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_replace)
        with pytest.raises(StorageUnavailable) as caught:
            local.put("c1/j1/output.png", b"paid for", "image/png")
    assert caught.value.code == errno.errorcode[code]
    assert caught.value.retryable
    assert list((local.root / "c1" / "j1").iterdir()) == []


def test_local_disk_trouble_on_read_is_unavailable_not_missing(local, monkeypatch):
    local.put("c1/j1/output.txt", b"hello", "text/plain")

    def failing(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "read_bytes", failing)
        with pytest.raises(StorageUnavailable, match="EIO"):
            local.get("c1/j1/output.txt")
    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "stat", failing)
        with pytest.raises(StorageUnavailable, match="EIO"):
            local.size("c1/j1/output.txt")
