"""Object storage behind one small interface: local files (embedded default) or S3."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlparse

from pipeline.security import signed_query


class StorageError(Exception):
    """Storage failed. `retryable` says whether the same call may succeed later.

    `code` names what the store said (an S3 error code, an errno name) for logs and
    metrics. Messages name the operation and the key, never credentials or signed links.
    """

    retryable = False

    def __init__(self, message: str, *, code: str = ""):
        super().__init__(message)
        self.code = code


class ObjectMissing(StorageError):
    """Nothing is stored at that key."""


class StorageUnavailable(StorageError):
    """The store cannot answer now (5xx, throttling, timeouts, a full disk): retry later.

    An output already paid for must be retried into storage with backoff, never
    requested from the vendor again.
    """

    retryable = True


class StorageRefused(StorageError):
    """The store will not take this request as configured (credentials, permissions,
    a missing bucket, an invalid key): retrying will not help until someone fixes it."""


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store the bytes; raises StorageUnavailable or StorageRefused."""
        ...

    def get(self, key: str) -> bytes:
        """The stored bytes; raises ObjectMissing, StorageUnavailable or StorageRefused."""
        ...

    def size(self, key: str) -> int | None:
        """Bytes stored under the key, or None when nothing is there (and only then:
        raises StorageUnavailable or StorageRefused when the store cannot tell)."""
        ...

    def url(self, key: str, ttl_seconds: int) -> str:
        """A link a client can fetch the object from until it expires."""
        ...


def object_key(company_id, job_id, filename: str) -> str:
    return f"{company_id}/{job_id}/{filename}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageRefused(f"invalid storage key: {key!r}", code="InvalidKey")
    return key


# What an OSError from the local disk means. Reading, "nothing there" is a missing object.
# Writing, a key that clashes with the tree (a file where a folder must go, or the
# reverse) or is too long can never be stored, so retrying is pointless. Everything else,
# ENOSPC, EDQUOT, EIO, ESTALE and also EACCES, EPERM and EROFS, is unavailable: on a worker
# the permission kind mostly comes from a volume mounted late, remounted read-only after
# an I/O error or chowned by a deploy, which an operator fixes while the job backs off;
# calling it refused would throw away an output already paid for.
_LOCAL_MISSING_ON_READ = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})
_LOCAL_REFUSED = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST})


def _local_error(exc: OSError, action: str, key: str, *, reading: bool) -> StorageError:
    if reading and exc.errno in _LOCAL_MISSING_ON_READ:
        kind: type[StorageError] = ObjectMissing
    elif exc.errno in _LOCAL_REFUSED:
        kind = StorageRefused
    else:
        kind = StorageUnavailable
    code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return kind(f"local {action} of {key} failed: {code}", code=code)


class LocalStorage:
    """Files under a root folder, served by the API through signed, expiring links."""

    def __init__(self, root: Path, public_url: str, secret_key: str):
        self.root = Path(root)
        self.public_url = public_url.rstrip("/")
        self._secret_key = secret_key

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so a reader (or a killed worker) never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise _local_error(exc, "put", key, reading=False) from exc

    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise _local_error(exc, "get", key, reading=True) from exc

    def size(self, key: str) -> int | None:
        path = self.path(key)
        try:
            info = path.stat()
        except OSError as exc:
            error = _local_error(exc, "size", key, reading=True)
            if isinstance(error, ObjectMissing):
                return None
            raise error from exc
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def url(self, key: str, ttl_seconds: int) -> str:
        path = f"/v1/files/{quote(_check_key(key))}"
        return f"{self.public_url}{path}?{signed_query(self._secret_key, path, ttl_seconds)}"


# S3 error codes, as the S3 API reference lists them (docs.aws.amazon.com/AmazonS3/latest/
# API/ErrorResponses.html), and what each means to us. An answer to HEAD has no body, so
# botocore reports its bare HTTP status as the code ("404", "403", "503").
S3_ERROR_CODES: dict[str, type[StorageError]] = {
    "NoSuchKey": ObjectMissing,
    "NotFound": ObjectMissing,
    "404": ObjectMissing,  # HEAD; a missing bucket says the same, see S3Storage.size
    # S3's best practices: retry InternalError; SlowDown asks for a lower request rate.
    "InternalError": StorageUnavailable,
    "ServiceUnavailable": StorageUnavailable,
    "SlowDown": StorageUnavailable,
    # A 400, but it means the connection idled past S3's timeout mid-request.
    "RequestTimeout": StorageUnavailable,
    "RequestTimeoutException": StorageUnavailable,
    "PriorRequestNotComplete": StorageUnavailable,
    # 409: "a conflicting conditional operation is in progress ... try again".
    "OperationAborted": StorageUnavailable,
    # The throttling codes botocore's standard retry mode treats as transient.
    "Throttling": StorageUnavailable,
    "ThrottlingException": StorageUnavailable,
    "ThrottledException": StorageUnavailable,
    "RequestThrottled": StorageUnavailable,
    "RequestThrottledException": StorageUnavailable,
    "TooManyRequestsException": StorageUnavailable,
    "RequestLimitExceeded": StorageUnavailable,
    "BandwidthLimitExceeded": StorageUnavailable,
    "NoSuchBucket": StorageRefused,
    "AccessDenied": StorageRefused,
    "AllAccessDisabled": StorageRefused,
    "AccountProblem": StorageRefused,
    "InvalidAccessKeyId": StorageRefused,
    "SignatureDoesNotMatch": StorageRefused,
    "InvalidToken": StorageRefused,
    "ExpiredToken": StorageRefused,
    "RequestTimeTooSkewed": StorageRefused,
    "InvalidBucketName": StorageRefused,
    "KeyTooLongError": StorageRefused,
}


def _s3_status_class(status: int | None) -> type[StorageError]:
    """For a code the table does not know: S3's server side (and 408, 429) may recover,
    a client error will not."""
    if status is not None and (status >= 500 or status in (408, 429)):
        return StorageUnavailable
    return StorageRefused


@cache
def _botocore_errors() -> tuple[tuple[type[Exception], type[StorageError]], ...]:
    """botocore's own exceptions (no answer from S3), first match wins. Built on first use
    so that importing this module does not import botocore."""
    from botocore import exceptions as bc

    return (
        # Connection refused or reset, DNS, TLS, proxy, connect and read timeouts, a body
        # cut short: the network or the endpoint may come back.
        (bc.ConnectionError, StorageUnavailable),
        (bc.HTTPClientError, StorageUnavailable),
        (bc.IncompleteReadError, StorageUnavailable),
        # The instance metadata or container credential endpoint did not answer in time.
        (bc.CredentialRetrievalError, StorageUnavailable),
        (bc.MetadataRetrievalError, StorageUnavailable),
        # No or partial credentials, a bad parameter, an unknown region: configuration.
        (bc.BotoCoreError, StorageRefused),
    )


def _s3_response(exc: Exception) -> dict:
    """A ClientError's parsed S3 answer; {} for anything else (urllib3's errors have
    a `response` of None)."""
    response = getattr(exc, "response", None)
    return response if isinstance(response, dict) else {}


def s3_error_code(exc: Exception) -> str:
    """The S3 error code of a ClientError, else the exception's class name."""
    response = _s3_response(exc)
    if response:
        return str(response.get("Error", {}).get("Code") or "Unknown")
    return type(exc).__name__


def classify_s3_error(exc: Exception) -> type[StorageError]:
    """Which of our errors an exception raised by a boto3 S3 call means."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = s3_error_code(exc)
        if code in S3_ERROR_CODES:
            return S3_ERROR_CODES[code]
        status = _s3_response(exc).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is None and code.isdigit():
            status = int(code)
        return _s3_status_class(status)
    for exc_class, kind in _botocore_errors():
        if isinstance(exc, exc_class):
            return kind
    if isinstance(exc, OSError):
        return StorageUnavailable
    return StorageRefused


def s3_error(exc: Exception, doing: str) -> StorageError:
    """Our error for a boto3 failure while `doing` something. Only the code and the HTTP
    status are kept: botocore's own messages can carry endpoint URLs, and S3's error
    bodies the access key id and the string that was signed."""
    code = s3_error_code(exc)
    status = _s3_response(exc).get("ResponseMetadata", {}).get("HTTPStatusCode")
    detail = f"{code} (HTTP {status})" if status else code
    return classify_s3_error(exc)(f"S3 {doing} failed: {detail}", code=code)


# Retries inside boto3, after the first try (4 attempts in all). Standard mode rather than
# legacy: it retries what S3_ERROR_CODES mostly calls unavailable (SlowDown and the other
# throttling codes by name, RequestTimeout, 500-504, connection errors) with jittered
# backoff capped at 20s, and its retry quota stops a worker's threads from hammering an S3
# that asked them to slow down; a longer outage then reaches the task as StorageUnavailable,
# and the task retries the upload with its own backoff.
S3_RETRIES = 3


class S3Storage:
    """Any S3-compatible endpoint through boto3 (AWS, MinIO, moto); links are presigned."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str = "us-east-1", client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(connect_timeout=5, read_timeout=60,
                          retries={"mode": "standard", "max_attempts": S3_RETRIES}),
        )

    def _full(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, OSError) as exc:
            raise s3_error(exc, doing) from exc

    def _bucket_exists(self) -> bool:
        try:
            with self._translated(f"check of bucket {self.bucket}"):
                self._client.head_bucket(Bucket=self.bucket)
        except ObjectMissing:  # HEAD's bare 404: for a bucket, no such bucket
            return False
        return True

    def ensure_bucket(self) -> None:
        """Create the bucket unless it is there; raises StorageUnavailable or StorageRefused."""
        if self._bucket_exists():
            return
        from botocore.exceptions import ClientError

        options = {}
        region = self._client.meta.region_name
        if region and region != "us-east-1":  # S3 refuses an explicit us-east-1
            options["CreateBucketConfiguration"] = {"LocationConstraint": region}
        with self._translated(f"creation of bucket {self.bucket}"):
            try:
                self._client.create_bucket(Bucket=self.bucket, **options)
            except ClientError as exc:
                if s3_error_code(exc) != "BucketAlreadyOwnedByYou":  # another process won
                    raise

    def put(self, key: str, data: bytes, content_type: str) -> None:
        full = self._full(key)
        with self._translated(f"put of s3://{self.bucket}/{full}"):
            self._client.put_object(
                Bucket=self.bucket, Key=full, Body=data, ContentType=content_type
            )

    def get(self, key: str) -> bytes:
        full = self._full(key)
        # The body is read inside: a connection cut mid-download is unavailable too.
        with self._translated(f"get of s3://{self.bucket}/{full}"):
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

    def size(self, key: str) -> int | None:
        full = self._full(key)
        try:
            with self._translated(f"size of s3://{self.bucket}/{full}"):
                head = self._client.head_object(Bucket=self.bucket, Key=full)
        except ObjectMissing:
            # S3 answers HEAD for a missing bucket with the same bare 404 as for a missing
            # key; ask about the bucket so a wrong bucket name is not read as "no object".
            if not self._bucket_exists():
                raise StorageRefused(f"S3 bucket {self.bucket} does not exist",
                                     code="NoSuchBucket") from None
            return None
        return head["ContentLength"]

    def url(self, key: str, ttl_seconds: int) -> str:
        full = self._full(key)
        # Signed locally, so only configuration fails here (no credentials, say).
        with self._translated(f"presigning of s3://{self.bucket}/{full}"):
            return self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": full},
                ExpiresIn=ttl_seconds,
            )


def open_storage(settings) -> Storage:
    """The backend named by STORAGE_URL: file:///path or s3://bucket[/prefix]."""
    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path), settings.public_url, settings.secret_key)
    if parsed.scheme == "s3":
        return S3Storage(
            parsed.netloc,
            parsed.path,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    raise StorageRefused(f"unsupported STORAGE_URL scheme: {parsed.scheme!r}",
                         code="UnsupportedScheme")
