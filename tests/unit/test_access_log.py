"""The access log never shows a query value the API does not define: a key put in the URL is redacted."""

from __future__ import annotations

import logging

from app.http_server import REDACTED, RedactQueryValues, access_log_config, redact_query

KEEP = frozenset({"replace"})


def test_only_the_values_of_the_apis_own_parameters_are_kept() -> None:
    assert redact_query("/v1/tasks", KEEP) == "/v1/tasks"
    assert redact_query("/v1/tasks/a/memory?replace=true", KEEP) == "/v1/tasks/a/memory?replace=true"
    assert redact_query("/v1/tasks?api_key=s3cret-0123456789", KEEP) == f"/v1/tasks?api_key={REDACTED}"
    assert (
        redact_query("/x?replace=1&token=abc&k=def&s3cret&&%72eplace=2", KEEP)
        == f"/x?replace=1&token={REDACTED}&k={REDACTED}&{REDACTED}&&%72eplace=2"
    )
    assert redact_query("/x?", KEEP) == "/x?"


def test_the_filter_rewrites_uvicorns_access_records() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/tasks?api_key=s3cret-0123456789", "1.1", 401), None,
    )  # fmt: skip
    assert RedactQueryValues(["replace"]).filter(record)
    assert "s3cret" not in record.getMessage()
    assert f"/v1/tasks?api_key={REDACTED}" in record.getMessage()


def test_the_config_puts_the_filter_on_uvicorns_access_logger() -> None:
    config = access_log_config(["replace"])
    assert config["loggers"]["uvicorn.access"]["filters"] == ["redact_query"]
    assert config["filters"]["redact_query"] == {"()": RedactQueryValues, "keep": ["replace"]}
