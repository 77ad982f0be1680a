"""Every Prometheus object of the service, in one per-app CollectorRegistry (tests build several apps).

Names carry the `spartan_` prefix and base units (seconds, bytes). The `task` label is bounded: the
first `max_task_labels` tasks seen get their own label, every later one shares "other", and requests
for tasks that do not exist are counted under "unknown" (a client must not be able to grow the label
set by inventing names).
"""

from __future__ import annotations

import threading
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

OTHER_TASKS = "other"
UNKNOWN_TASK = "unknown"

# Latencies of a CPU encoder server: from a millisecond (a cached tiny batch) to tens of seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A training job: seconds (a few hundred examples on the tiny backbone) to an hour (thousands on MPNet).
_JOB_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)


class TaskLabels:
    """Maps task names to a bounded set of label values (thread-safe); None: every task its own."""

    def __init__(self, max_labels: int | None) -> None:
        self._max = max_labels
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task: str) -> str:
        if task in self._known:
            return task
        with self._lock:
            if task in self._known:
                return task
            if self._max is None or len(self._known) < self._max:
                self._known.add(task)
                return task
        return OTHER_TASKS


def package_version() -> str:
    try:
        return metadata.version("spartan-serve")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """The service's metrics; every component receives this object instead of global collectors.

    The service bounds the `task` label with its setting (metrics_max_task_labels); without a bound
    (tests, tools) every task gets its own label."""

    def __init__(self, max_task_labels: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self.task_label = TaskLabels(max_task_labels)
        r = self.registry
        self.request_duration = Histogram(
            "spartan_request_duration_seconds",
            "Prediction request latency, from arrival to response, by task.",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "spartan_queue_wait_seconds",
            "Time a prediction request waited in the batch queue, by task.",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "spartan_inference_duration_seconds",
            "Backbone forward time of the batches a request's rows ran in, by task.",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "spartan_batch_duration_seconds",
            "Time the worker spent on one batch (tokenising, every forward pass); rate(sum) = worker busy.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "spartan_batch_size", "Rows per backbone forward pass.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "spartan_batch_tasks",
            "Distinct tasks per backbone forward pass.",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("spartan_queue_depth", "Rows waiting in the batch queue.", registry=r)
        self.queue_capacity = Gauge(
            "spartan_queue_capacity_rows",
            "Most rows the batch queue holds before requests get 429 (max_queue_rows).",
            registry=r,
        )
        self.requests = Counter(
            "spartan_requests",
            "Prediction requests by task and outcome (ok, invalid, not_found, overloaded, timeout, error).",
            ["task", "outcome"],
            registry=r,
        )
        self.batch_failures = Counter(
            "spartan_batch_failures", "Forward passes that raised (their requests got a 500).", registry=r
        )
        self.nonfinite_outputs = Counter(
            "spartan_nonfinite_outputs",
            "Rows whose task memory produced a non-finite score (their requests got a 500, never a null).",
            registry=r,
        )
        self.memory_loads = Counter(
            "spartan_memory_loads",
            "Task memory loads by source (store, upload) and outcome (ok, invalid).",
            ["source", "outcome"],
            registry=r,
        )
        self.memory_evictions = Counter(
            "spartan_memory_evictions", "Task memories evicted by the LRU capacity.", registry=r
        )
        self.memory_load_seconds = Histogram(
            "spartan_memory_load_seconds",
            "Time to read, validate and build one task memory.",
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.memories_loaded = Gauge("spartan_memories_loaded", "Task memories resident.", registry=r)
        self.memory_bytes = Gauge(
            "spartan_memory_bytes",
            "Bytes of task memories resident (parameters and inference caches).",
            registry=r,
        )
        self.tasks_registered = Gauge(
            "spartan_tasks_registered",
            "Tasks known to the registry (resident or only in the store).",
            registry=r,
        )
        self.store_polls = Counter(
            "spartan_store_polls",
            "Polls of the memory store for added, changed and removed memories, by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.store_poll_duration = Histogram(
            "spartan_store_poll_duration_seconds",
            "Time of one store poll (listing, and reading the memories that changed).",
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.store_conflicts = Counter(
            "spartan_store_conflicts",
            "Uploads refused because another writer changed the task in the store first.",
            registry=r,
        )
        self.store_up = Gauge(
            "spartan_store_up",
            "1 while the memory store answers its calls in time, 0 after a call failed or timed out "
            "(until the next call it answers).",
            registry=r,
        )
        self.store_up.set(1)
        self.store_call_timeouts = Counter(
            "spartan_store_call_timeouts",
            "Memory store calls given up after SPARTAN_STORE_TIMEOUT_S without an answer.",
            registry=r,
        )
        self.training_jobs = Gauge(
            "spartan_training_jobs",
            "Training jobs this replica holds, by state (queued, running).",
            ["state"],
            registry=r,
        )
        for state in ("queued", "running"):
            self.training_jobs.labels(state).set(0)
        self.training_jobs_finished = Counter(
            "spartan_training_jobs_finished",
            "Training jobs this replica finished, by final state (succeeded, failed, cancelled).",
            ["state"],
            registry=r,
        )
        self.training_job_duration = Histogram(
            "spartan_training_job_duration_seconds",
            "Wall time of a training job from its start to its end (process, training, install), by "
            "final state.",
            ["state"],
            buckets=_JOB_BUCKETS,
            registry=r,
        )
        self.training_examples_per_second = Histogram(
            "spartan_training_examples_per_second",
            "Training examples a succeeded job processed per second of its training (epochs x examples "
            "/ training time, dev scoring included).",
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.build_info = Info(
            "spartan_build", "Version of spartan-serve and the backbone served.", registry=r
        )

    def set_build_info(self, backbone: str, fingerprint: str, runtime: str) -> None:
        self.build_info.info(
            {
                "version": package_version(),
                "backbone": backbone,
                "backbone_fingerprint": fingerprint[:16],
                "runtime": runtime,
            }
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
