"""Training-job records in the S3-compatible bucket of the memories: `<prefix>jobs/<id>.json`, and
`<prefix>jobs/<id>.cancel` for a cancel asked of another replica (see records.py).

The memory listing of S3Store passes over these keys (they do not end in `.safetensors`, and hold a
'/' below the prefix); an object PUT is atomic, so a reader sees a whole record.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from app.jobs.records import (
    CANCEL_SUFFIX,
    JOB_ID_RE,
    JOBS_FOLDER,
    RECORD_SUFFIX,
    JobRecord,
    parse_record,
    validate_job_id,
)
from app.registry.s3store import S3Missing, s3_call, s3_client

if TYPE_CHECKING:
    from app.settings import Settings


class S3JobRecords:
    """`JobRecords` under `<prefix>jobs/` of one bucket."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix}{JOBS_FOLDER}/"

    @classmethod
    def from_settings(cls, settings: Settings) -> S3JobRecords:
        assert settings.s3_bucket is not None  # the settings validator requires it for store = s3
        return cls(s3_client(settings), settings.s3_bucket, settings.s3_prefix)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _key(self, job_id: str, suffix: str = RECORD_SUFFIX) -> str:
        return f"{self.prefix}{validate_job_id(job_id)}{suffix}"

    def write(self, record: JobRecord) -> None:
        key, body = self._key(record.id), record.model_dump_json().encode()
        s3_call(
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType="application/json"
            )
        )

    def read(self, job_id: str) -> JobRecord | None:
        key = self._key(job_id)
        try:
            data = s3_call(lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except S3Missing:
            return None
        return parse_record(data)

    def ids(self) -> list[str]:
        pages = s3_call(
            lambda: list(
                self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            )
        )
        found = []
        for page in pages:
            for item in page.get("Contents", []):
                name = str(item["Key"])[len(self.prefix) :]
                job_id = name.removesuffix(RECORD_SUFFIX)
                if name.endswith(RECORD_SUFFIX) and JOB_ID_RE.fullmatch(job_id):
                    found.append(job_id)
        return sorted(found)

    def delete(self, job_id: str) -> None:
        for suffix in (RECORD_SUFFIX, CANCEL_SUFFIX):
            key = self._key(job_id, suffix)
            with contextlib.suppress(S3Missing):
                self._delete_key(key)

    def _delete_key(self, key: str) -> None:
        s3_call(lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def request_cancel(self, job_id: str) -> None:
        key = self._key(job_id, CANCEL_SUFFIX)
        s3_call(lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=b"cancel\n"))

    def cancel_requested(self, job_id: str) -> bool:
        key = self._key(job_id, CANCEL_SUFFIX)
        try:
            s3_call(lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except S3Missing:
            return False
        return True
