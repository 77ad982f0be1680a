"""Task memories in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, ...), shared by every replica.

A task's file is the object `<prefix><task>.safetensors`. The object's ETag is its stamp: a listing
tells every replica, in one cheap call per 1,000 tasks, which memories are new, replaced or gone.
Writes are conditional (`If-None-Match: *` to create, `If-Match: <etag>` to replace), so of two
replicas that replace one task at once, the store accepts exactly one; the other gets StoreConflict.
An object PUT is atomic: a reader sees the old object or the new one, never a part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.errors import StoreUnavailable, TaskNotFound
from app.registry.names import TASK_NAME_RE, validate_task_name
from app.registry.store import ANY_VERSION, MEMORY_SUFFIX, StoredFile, conflict

if TYPE_CHECKING:
    from app.settings import Settings

T = TypeVar("T")

_MISSING = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict"}


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client of the settings' endpoint, region and keys, with short bounded timeouts."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=_secret(settings.s3_access_key_id),
        aws_secret_access_key=_secret(settings.s3_secret_access_key),
        config=Config(
            connect_timeout=settings.s3_timeout_s,
            read_timeout=settings.s3_timeout_s,
            # At most 2 attempts of s3_timeout_s each: a hung server frees the calling thread
            # in seconds (GuardedStore gives up on the call after store_timeout_s anyway).
            retries={"total_max_attempts": 2, "mode": "standard"},
            # Path-style URLs work with every S3-compatible server; virtual hosts need DNS per bucket.
            s3={"addressing_style": "path"},
        ),
    )


def s3_call(action: Callable[[], T]) -> T:
    """Run one S3 call, turning its failures into the domain's errors (no endpoint or key leaks):
    S3Missing for an absent object or bucket, S3PreconditionFailed for a refused conditional write,
    StoreUnavailable for the rest."""
    try:
        return action()
    except ClientError as err:
        code = _code(err)
        if code in _MISSING:
            raise S3Missing from None
        if code in _PRECONDITION:
            raise S3PreconditionFailed from None
        raise StoreUnavailable(f"the memory store refused the call ({code or 'unknown error'})") from err
    except BotoCoreError as err:
        raise StoreUnavailable(f"the memory store cannot be reached ({type(err).__name__})") from err


class S3Store:
    """The `MemoryStore` over one bucket and key prefix."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, endpoint: str | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self._endpoint = endpoint or "aws"

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        assert settings.s3_bucket is not None  # the settings validator requires it for store = s3
        client = s3_client(settings)
        store = cls(client, settings.s3_bucket, settings.s3_prefix, endpoint=settings.s3_endpoint_url)
        if settings.s3_create_bucket:
            store.create_bucket()
        return store

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self._endpoint}"

    def key(self, task: str) -> str:
        return f"{self.prefix}{validate_task_name(task)}{MEMORY_SUFFIX}"

    # ------------------------------------------------------------------------------------ MemoryStore

    def scan(self) -> dict[str, StoredFile]:
        found: dict[str, StoredFile] = {}
        pages = self._call(
            lambda: list(
                self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            )
        )
        for page in pages:
            for item in page.get("Contents", []):
                task = item["Key"][len(self.prefix) :].removesuffix(MEMORY_SUFFIX)
                # Foreign objects, "folders" below the prefix and other suffixes are not tasks.
                if item["Key"].endswith(MEMORY_SUFFIX) and TASK_NAME_RE.fullmatch(task):
                    found[task] = StoredFile(task, int(item["Size"]), str(item["ETag"]))
        return found

    def stat(self, task: str) -> StoredFile | None:
        key = self.key(task)
        try:
            head = self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except S3Missing:
            return None
        return StoredFile(task, int(head["ContentLength"]), str(head["ETag"]))

    def read(self, task: str) -> tuple[bytes, StoredFile]:
        key = self.key(task)

        def get() -> tuple[bytes, str]:
            # The ETag of the GET response belongs to exactly the bytes it returns.
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), str(response["ETag"])

        try:
            data, etag = self._call(get)
        except S3Missing:
            raise TaskNotFound(f"task {task!r} is not in the memory store") from None
        return data, StoredFile(task, len(data), etag)

    def write(self, task: str, data: bytes, *, expected: str | None = ANY_VERSION) -> StoredFile:
        key = self.key(task)
        condition: dict[str, str] = {}
        if expected is None:
            condition["IfNoneMatch"] = "*"
        elif expected != ANY_VERSION:
            condition["IfMatch"] = expected
        try:
            response = self._call(
                lambda: self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ContentType="application/octet-stream",
                    **condition,
                )
            )
        except S3PreconditionFailed:
            raise conflict(task, expected) from None
        return StoredFile(task, len(data), str(response["ETag"]))

    def delete(self, task: str) -> bool:
        # Conditional on the ETag just seen (If-Match on DeleteObject: AWS S3 since 2024, SeaweedFS
        # 4.x; tested on it), so a version another replica wrote after the check is never removed.
        current = self.stat(task)
        if current is None:
            return False
        key = self.key(task)
        try:
            self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=current.stamp))
        except S3PreconditionFailed:
            if self.stat(task) is None:
                return False  # another writer deleted it first: the outcome asked for
            raise conflict(task, current.stamp, "delete") from None
        return True

    def recover(self) -> int:
        return 0  # an object PUT is atomic: a crashed writer leaves nothing behind

    # ------------------------------------------------------------------------------------ internals

    def create_bucket(self) -> None:
        """Create the bucket unless it exists (several replicas may race to do it: all succeed)."""
        try:
            self._call(lambda: self.client.head_bucket(Bucket=self.bucket))
            return
        except S3Missing:
            pass
        try:
            self._call(lambda: self.client.create_bucket(Bucket=self.bucket))
        except StoreUnavailable as err:
            if "BucketAlreadyOwnedByYou" not in str(err) and "BucketAlreadyExists" not in str(err):
                raise

    def _call(self, action: Callable[[], T]) -> T:
        return s3_call(action)


class S3Missing(Exception):
    """The object (or bucket) does not exist (each caller says what that means)."""


class S3PreconditionFailed(Exception):
    """The store refused a conditional write (turned into StoreConflict by `S3Store.write`)."""


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None
