"""The job records the settings name: the one place that knows both record stores, so that the
S3 backend imports the local one and nothing imports back."""

from __future__ import annotations

from app.jobs.records import JOBS_FOLDER, JobRecords, LocalJobRecords
from app.settings import Settings


def open_job_records(settings: Settings) -> JobRecords:
    """The records beside the memories of the store the settings name."""
    if settings.store == "s3":
        from app.jobs.s3records import S3JobRecords  # boto3 only where it is used

        return S3JobRecords.from_settings(settings)
    return LocalJobRecords(settings.memory_dir / JOBS_FOLDER)
