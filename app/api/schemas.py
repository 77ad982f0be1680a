"""Wire models: what clients send and get back, with limits and examples for the OpenAPI schema.

Limits that come from the settings (inputs per request, text length) are checked by the predictor
(InvalidInput), with the same 422 error shape as schema validation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.inputs import TextInput
from app.engine.predictor import PredictionResult
from app.engine.routing_tally import RoutingSnapshot
from app.registry.registry import TaskInfo
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


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable error kind, e.g. task_not_found, memory_invalid.")
    message: str = Field(description="What went wrong, for people.")
    details: list[dict[str, Any]] | None = Field(default=None, description="Per-field validation errors.")


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
