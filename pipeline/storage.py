"""Object storage behind one small interface: local files (embedded default) or S3."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlparse

from pipeline.security import signed_query


class StorageError(Exception):
    pass


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def size(self, key: str) -> int | None:
        """Bytes stored under the key, or None when nothing is there."""
        ...

    def url(self, key: str, ttl_seconds: int) -> str:
        """A link a client can fetch the object from until it expires."""
        ...


def object_key(company_id, job_id, filename: str) -> str:
    return f"{company_id}/{job_id}/{filename}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key: {key!r}")
    return key


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

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"no object at {key}") from None

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def url(self, key: str, ttl_seconds: int) -> str:
        path = f"/v1/files/{quote(_check_key(key))}"
        return f"{self.public_url}{path}?{signed_query(self._secret_key, path, ttl_seconds)}"


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
            config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3}),
        )

    def _full(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._client.put_object(
            Bucket=self.bucket, Key=self._full(key), Body=data, ContentType=content_type
        )

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except ClientError as exc:
            raise StorageError(f"no object at {key}: {exc.response['Error']['Code']}") from None

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError:
            return None
        return head["ContentLength"]

    def url(self, key: str, ttl_seconds: int) -> str:
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(key)},
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
    raise StorageError(f"unsupported STORAGE_URL scheme: {parsed.scheme!r}")
