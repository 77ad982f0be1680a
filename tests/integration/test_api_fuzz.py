"""API fuzzing: schemathesis generates requests from the service's own OpenAPI schema and sends them
to a real `spartan serve` process; every response must be a non-5xx that matches the schema."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from procs import ROOT, Replica
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

pytestmark = [pytest.mark.model, pytest.mark.slow]

ADMIN_KEY = "fuzz-admin-key-0123456789"
# Per operation and mode: schema-valid (positive) and schema-invalid (negative) requests. Operations
# without parameters (listings, probes) have only a handful of distinct cases.
EXAMPLES_PER_MODE = 100
CASES: Counter[str] = Counter()
# Every check runs (no 5xx, status codes, content types, headers and bodies match the schema, schema-
# invalid requests are refused, auth is enforced) but one: a schema-valid request may still be refused
# with 422 for what a schema cannot express per task (a text pair sent to a single-text task, an
# upload whose bytes are not a memory file).
SEMANTIC = [positive_data_acceptance]
LEAK_MARKERS = ("Traceback", 'File "', "site-packages", str(ROOT), "/tmp/")


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    workdir = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(ROOT / "memories", workdir / "memories")
    env = {
        "SPARTAN_MEMORY_DIR": str(workdir / "memories"),
        "SPARTAN_ADMIN_API_KEY": ADMIN_KEY,
        "SPARTAN_STORE_POLL_INTERVAL_S": "0",
        "SPARTAN_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024),
        "SPARTAN_LOG_LEVEL": "warning",
    }
    running = Replica("fuzzed", env, workdir).start_ready()
    yield running
    running.stop()
    print(f"\nschemathesis: {sum(CASES.values())} cases, {dict(CASES)}")


@schemathesis.check
def no_internals_in_the_body(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """Error bodies never carry a stack trace, a source path or the service's own folders."""
    text = response.text if hasattr(response, "text") else str(response.content)
    leaks = [marker for marker in LEAK_MARKERS if marker in text]
    if leaks:
        raise AssertionError(f"the response body leaks internals: {leaks}")
    return None


def fuzz_operation(operation: Any, mode: GenerationMode) -> None:
    """Hypothesis drives one operation: up to EXAMPLES_PER_MODE generated cases, each checked."""

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])  # fmt: skip
    def run(case: schemathesis.Case) -> None:
        CASES[f"{case.method} {case.path} {mode.value}"] += 1
        case.call_and_validate(
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            excluded_checks=SEMANTIC,
            additional_checks=[no_internals_in_the_body],
            timeout=30,
        )

    run()


def test_every_generated_request_gets_a_schema_conformant_non_5xx_answer(replica: Replica) -> None:
    schema = schemathesis.openapi.from_url(f"{replica.url}/openapi.json")
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            try:
                fuzz_operation(operation, mode)
            except Unsatisfiable:
                # No parameters and no body (listings, probes): there is no schema-invalid request.
                assert mode is GenerationMode.NEGATIVE, operation.label
            except Exception as err:  # every operation runs; all failures are reported together
                failures[f"{operation.label} {mode.value}"] = f"{type(err).__name__}: {err}"[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    assert sum(CASES.values()) >= 20 * EXAMPLES_PER_MODE  # 22 operations x modes draw cases
