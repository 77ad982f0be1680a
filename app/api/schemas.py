"""Wire models: what clients send and get back, with limits and examples for the OpenAPI schema.

Limits that come from the settings (inputs per request, text length) are checked by the predictor
(InvalidInput), with the same 422 error shape as schema validation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.inputs import TextInput
from app.engine.predictor import PredictionResult
from app.engine.routing_tally import RoutingSnapshot
from app.jobs.records import JobRecord
from app.registry.records import TaskInfo
from app.spartan.routing_stats import (
    label_entropy_bits,
    mutual_information_ceiling_bits,
    summarise_layers,
)

TextPair = Annotated[
    list[str], Field(min_length=2, max_length=2, description="A text pair: [text, second text].")
]

_SENTIMENT_VERSION = "d671c003e929edc33af15a1e5ac4ffb76e5d82cfc33913b6fdcad09a8f5ca50f"


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": ["a gripping, beautifully acted film", "dull and far too long"]},
                {"inputs": [["how do I reset my card?", "I forgot my PIN"]], "return_all_scores": True},
                {"inputs": ["an unexpected delight"], "return_routing": True},
            ]
        },
    )

    inputs: list[str | TextPair] = Field(
        min_length=1,
        description="Texts, or text pairs [text, second text] for tasks trained on pairs. At most "
        "SPARTAN_MAX_INPUTS_PER_REQUEST inputs (default 64), each text at most SPARTAN_MAX_TEXT_CHARS "
        "characters (default 10,000). Longer token sequences are truncated to the task's max_length.",
    )
    return_all_scores: bool = Field(
        default=False, description="Also return every label's probability (classification)."
    )
    return_routing: bool = Field(
        default=False,
        description="Also return, per layer, which memory parents fired: for the pooled token "
        "(first-token pooling) or the parents most used over the input's real tokens, with counts "
        "(mean pooling).",
    )

    @field_validator("inputs")
    @classmethod
    def _texts_are_unicode(cls, inputs: list[str | list[str]]) -> list[str | list[str]]:
        # JSON can carry a lone surrogate ("\ud800"), which no UTF-8 text contains: the tokenizer would
        # raise on it in the batch worker, failing the whole batch. Refused here, before it is queued.
        for index, item in enumerate(inputs):
            for text in (item,) if isinstance(item, str) else item:
                if not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as err:
                        raise ValueError(
                            f"input {index} is not valid Unicode text: a lone surrogate at character "
                            f"{err.start} (every text must be encodable as UTF-8)"
                        ) from None
        return inputs

    def text_inputs(self) -> list[TextInput]:
        return [(item, None) if isinstance(item, str) else (item[0], item[1]) for item in self.inputs]


class RoutedParent(BaseModel):
    parent: int = Field(description="Parent index in this layer's memory.")
    count: int = Field(description="Real tokens that chose this parent (1 for first-token pooling).")


class PredictionOut(BaseModel):
    label: str | None = Field(default=None, description="Most probable label (classification).")
    score: float | None = Field(default=None, description="Its probability (classification).")
    scores: dict[str, float] | None = Field(default=None, description="Every label's probability, if asked.")
    value: float | None = Field(default=None, description="Predicted value (regression).")
    routing: list[list[RoutedParent]] | None = Field(
        default=None,
        description="Per memory layer, the parents that fired, if asked: one list per layer from the "
        "task's first_memory_layer up (every layer for most memories).",
    )


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "sentiment",
                    "version": _SENTIMENT_VERSION,
                    "task_type": "classification",
                    "routing_token": None,
                    "predictions": [
                        {"label": "positive", "score": 0.94, "scores": None, "value": None, "routing": None},
                        {"label": "negative", "score": 0.88, "scores": None, "value": None, "routing": None},
                    ],
                }
            ]
        }
    )

    task: str
    version: str = Field(description="sha256 of the memory file that produced these predictions.")
    task_type: Literal["classification", "regression"]
    routing_token: Literal["first", "mean"] | None = Field(
        default=None,
        description="With routing: 'first' (the pooled first token) or 'mean' (all real tokens).",
    )
    predictions: list[PredictionOut]

    @classmethod
    def of(cls, result: PredictionResult, routing: bool) -> PredictResponse:
        return cls(
            task=result.task,
            version=result.version,
            task_type=result.task_type,
            routing_token=result.pooling if routing else None,
            predictions=[
                PredictionOut(
                    label=p.label,
                    score=p.score,
                    scores=p.scores,
                    value=p.value,
                    routing=None
                    if p.routing is None
                    else [[RoutedParent(parent=e, count=c) for e, c in layer] for layer in p.routing],
                )
                for p in result.predictions
            ],
        )


class TaskOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "sentiment",
                    "status": "loaded",
                    "version": _SENTIMENT_VERSION,
                    "loaded_version": _SENTIMENT_VERSION,
                    "task_type": "classification",
                    "labels": ["negative", "positive"],
                    "text_pairs": False,
                    "max_length": 128,
                    "first_memory_layer": 0,
                    "file_bytes": 1664312,
                    "memory_bytes": 1663488,
                    "pinned": False,
                    "load_seconds": 0.012,
                    "error": None,
                    "requests": {"ok": 1520, "invalid": 3},
                }
            ]
        }
    )

    name: str
    status: Literal["loaded", "on_disk", "invalid"] = Field(
        description="loaded: resident; on_disk: in the store, loaded on first use; invalid: its file "
        "cannot be served (see error)."
    )
    version: str | None = Field(description="sha256 of the stored memory file.")
    loaded_version: str | None = Field(
        description="sha256 of the resident memory; differs from version while a bad new file is refused."
    )
    task_type: Literal["classification", "regression"] | None
    labels: list[str]
    text_pairs: bool | None = Field(description="Whether the task takes text pairs.")
    max_length: int | None = Field(description="Tokens per input; longer inputs are truncated.")
    first_memory_layer: int | None = Field(
        default=None,
        description="The lowest Transformer layer with a memory (0 = every layer has one); the layers "
        "below run as the bare backbone.",
    )
    file_bytes: int | None = Field(description="Size of the stored memory file.")
    memory_bytes: int = Field(
        description="Bytes resident: parameters and inference caches (0 when not loaded)."
    )
    pinned: bool = Field(description="Pinned tasks are never evicted.")
    load_seconds: float | None = Field(description="Time the last load (read, validate, build) took.")
    error: str | None = Field(description="Why the stored file cannot be served, if so.")
    requests: dict[str, int] = Field(description="Prediction requests by outcome since start.")

    @classmethod
    def of(cls, info: TaskInfo) -> TaskOut:
        return cls(
            name=info.name,
            status=info.status,
            version=info.version,
            loaded_version=info.loaded_version,
            task_type=info.task_type,
            labels=list(info.labels),
            text_pairs=info.text_pairs,
            max_length=info.max_length,
            first_memory_layer=info.spec.first_memory_layer if info.spec else None,
            file_bytes=info.file_bytes,
            memory_bytes=info.memory_bytes,
            pinned=info.pinned,
            load_seconds=info.load_seconds,
            error=info.error,
            requests=info.requests,
        )


class TaskList(BaseModel):
    tasks: list[TaskOut]
    loaded: int = Field(description="Task memories resident.")
    loaded_bytes: int = Field(description="Bytes of task memories resident (parameters and caches).")


class RoutingLayerOut(BaseModel):
    layer: int = Field(
        description="Transformer layer the memory follows (0 = the first); layers without a memory "
        "(below the task's first_memory_layer) are not listed."
    )
    counts: dict[str, list[int]] = Field(
        description="Per predicted label (regression: the one bucket 'all'), how often each parent was "
        "chosen: list index = parent. Each real token chooses top_k parents per layer."
    )
    parent_entropy_bits: float = Field(
        description="Entropy of parent usage over all choices: log2(num_parents) = perfectly even use."
    )
    mutual_information_bits: float = Field(
        description="I(parent; predicted label) over the choices: 0 = the parents say nothing about "
        "the label; at most mutual_information_ceiling_bits."
    )


class RoutingOut(BaseModel):
    """Aggregate routing of one task since its current memory version was installed."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task": "sentiment",
                    "version": _SENTIMENT_VERSION,
                    "task_type": "classification",
                    "labels": ["negative", "positive"],
                    "rows": 2,
                    "tokens": 19,
                    "num_parents": 16,
                    "top_k": 8,
                    "label_entropy_bits": 0.998,
                    "mutual_information_ceiling_bits": 0.998,
                    "layers": [
                        {
                            "layer": 0,
                            "counts": {
                                "negative": [9, 0, 9, 2, 9, 9, 0, 9, 1, 9, 9, 9, 0, 1, 3, 0],
                                "positive": [10, 2, 10, 0, 9, 10, 1, 10, 0, 10, 10, 10, 1, 0, 7, 0],
                            },
                            "parent_entropy_bits": 3.21,
                            "mutual_information_bits": 0.04,
                        }
                    ],
                }
            ]
        }
    )

    task: str
    version: str = Field(description="sha256 of the memory version these counts belong to.")
    task_type: Literal["classification", "regression"]
    labels: list[str] = Field(description="What the counts are split by: predicted labels, or ['all'].")
    rows: int = Field(description="Inputs counted since this version was installed.")
    tokens: int = Field(description="Real (non-padding) tokens of those inputs.")
    num_parents: int = Field(description="Parents per layer.")
    top_k: int = Field(description="Parents each token chooses per layer.")
    label_entropy_bits: float = Field(description="Entropy of the predicted label over the choices.")
    mutual_information_ceiling_bits: float = Field(
        description="The most the mutual information can reach: min(label_entropy_bits, "
        "log2(num_parents / top_k)), since no parent can take more than 1/top_k of a label's choices."
    )
    layers: list[RoutingLayerOut]

    @classmethod
    def of(cls, snapshot: RoutingSnapshot) -> RoutingOut:
        summaries = summarise_layers(snapshot.counts)
        label_entropy = label_entropy_bits(snapshot.counts)
        return cls(
            task=snapshot.task,
            version=snapshot.version,
            task_type=snapshot.task_type,
            labels=list(snapshot.labels),
            rows=snapshot.rows,
            tokens=snapshot.tokens,
            num_parents=snapshot.num_parents,
            top_k=snapshot.top_k,
            label_entropy_bits=label_entropy,
            mutual_information_ceiling_bits=mutual_information_ceiling_bits(
                label_entropy, snapshot.num_parents, snapshot.top_k
            ),
            layers=[
                RoutingLayerOut(
                    layer=index,
                    counts=dict(zip(snapshot.labels, counts.tolist(), strict=True)),
                    parent_entropy_bits=summary.parent_entropy_bits,
                    mutual_information_bits=summary.mutual_information_bits,
                )
                for index, counts, summary in zip(snapshot.layers, snapshot.counts, summaries, strict=True)
            ],
        )


# ----------------------------------------------------------------------------------- training jobs


class TrainingRowIn(BaseModel):
    """One labelled example of a training job's JSON body (documentation: the body is checked row by
    row by the service itself, so that each refusal names its row)."""

    text: str
    text_pair: str | None = Field(default=None, description="The second text of a pair task.")
    label: str | float | int | bool = Field(
        description="The class (text, or an integer), or the target value of a regression task."
    )


class TrainingDataIn(BaseModel):
    rows: list[TrainingRowIn] = Field(description="Training rows; dev and test are cut from them if absent.")
    dev_rows: list[TrainingRowIn] | None = Field(default=None, description="Dev rows (the epoch kept).")
    test_rows: list[TrainingRowIn] | None = Field(default=None, description="Test rows (the final score).")


class TrainingProgressOut(BaseModel):
    epoch: int = Field(description="The epoch in progress (or the last one).")
    epochs: int
    step: int = Field(description="Optimizer steps done, over every epoch.")
    steps: int = Field(description="Optimizer steps in all.")
    loss: float | None = Field(description="Training loss, mean of the latest steps.")
    elapsed_s: float = Field(description="Seconds of training so far (after the backbone loaded).")
    eta_s: float | None = Field(description="Seconds of training left, at the pace so far.")
    examples_per_s: float | None = Field(description="Training examples per second so far.")


class TrainingEpochOut(BaseModel):
    epoch: int
    train_loss: float
    dev: dict[str, float] = Field(description="Metrics of the dev rows after this epoch.")
    seconds: float


class TrainingJobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "20261201-101500-3fa2c1d0", "task": "reviews", "state": "running",
                    "created_at": "2026-12-01T10:15:00Z", "started_at": "2026-12-01T10:15:00Z",
                    "finished_at": None, "replica": "spartan-0:8000", "worker_pid": 4242,
                    "task_type": "classification", "labels": ["negative", "positive"], "text_pairs": False,
                    "examples": {"train": 160, "dev": 20, "test": 20}, "config": {"epochs": 10, "lr": 0.003},
                    "replace": False, "if_match": None,
                    "progress": {"epoch": 2, "epochs": 10, "step": 14, "steps": 100, "loss": 0.61,
                                 "elapsed_s": 4.2, "eta_s": 25.8, "examples_per_s": 53.3},
                    "epochs": [{"epoch": 1, "train_loss": 0.68, "dev": {"accuracy": 0.7}, "seconds": 3.1}],
                    "best_epoch": None, "dev": {}, "test": {}, "version": None, "error": None,
                    "error_type": None, "cancel_requested": False,
                }
            ]
        }
    )  # fmt: skip

    id: str
    task: str = Field(description="The task the trained memory is installed as.")
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    replica: str = Field(description="The replica that accepted the job and runs it.")
    worker_pid: int | None = Field(description="The training process's pid on that replica.")
    task_type: Literal["classification", "regression"]
    labels: list[str]
    text_pairs: bool
    examples: dict[str, int] = Field(description="Rows per split (train, after the few-shot sample).")
    config: dict[str, Any] = Field(description="The trainer's configuration the job runs with.")
    replace: bool
    if_match: str | None
    progress: TrainingProgressOut
    epochs: list[TrainingEpochOut]
    best_epoch: int | None = Field(description="The epoch kept (best dev score), once done.")
    dev: dict[str, float] = Field(description="Dev metrics of the kept epoch, once done.")
    test: dict[str, float] = Field(description="Test metrics of the kept epoch, once done.")
    version: str | None = Field(description="The memory version (sha256) the job installed.")
    error: str | None = Field(description="Why the job failed or was cancelled.")
    error_type: str | None = Field(
        description="interrupted, worker_died, training_failed, cancelled, or the upload path's error "
        "type (memory_conflict, memory_invalid, store_unavailable, ...)."
    )
    cancel_requested: bool

    @classmethod
    def of(cls, record: JobRecord) -> TrainingJobOut:
        def when(seconds: float | None) -> datetime | None:
            return None if seconds is None else datetime.fromtimestamp(seconds, UTC)

        created = when(record.created_at)
        assert created is not None
        return cls(
            id=record.id, task=record.task, state=record.state, created_at=created,
            started_at=when(record.started_at), finished_at=when(record.finished_at), replica=record.replica,
            worker_pid=record.worker_pid, task_type=record.task_type, labels=record.labels,
            text_pairs=record.text_pairs, examples=record.examples, config=record.config,
            replace=record.replace, if_match=record.if_match,
            progress=TrainingProgressOut(**record.progress.model_dump()),
            epochs=[TrainingEpochOut(**epoch.model_dump()) for epoch in record.epochs],
            best_epoch=record.best_epoch, dev=record.dev, test=record.test, version=record.version,
            error=record.error, error_type=record.error_type, cancel_requested=record.cancel_requested,
        )  # fmt: skip


class TrainingJobList(BaseModel):
    jobs: list[TrainingJobOut] = Field(description="Newest first.")


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable error kind, e.g. task_not_found, memory_invalid.")
    message: str = Field(description="What went wrong, for people.")
    details: list[dict[str, Any]] | None = Field(
        default=None,
        description="Per-field validation errors; for training data, where: split, row, line, reason.",
    )


class ErrorBody(BaseModel):
    """The one error shape of every endpoint."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "type": "task_not_found",
                        "message": "no memory is registered for task 'nope'",
                        "details": None,
                    }
                }
            ]
        }
    )

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["alive", "ready", "not_ready"]
    reasons: list[str] = Field(default_factory=list, description="Why the service is not ready.")
    store: Literal["up", "down"] | None = Field(
        default=None,
        description="/readyz: whether the memory store answers (a down store is shown, not a reason to "
        "be unready: resident tasks still serve).",
    )
