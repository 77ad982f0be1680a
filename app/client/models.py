"""The wire models, as a client sees them: thin mirrors of app/api/schemas.py.

They are mirrors, not imports, because app/api/schemas.py imports engine modules (for its `of`
constructors) that pull in torch, and a client machine has only httpx and pydantic. Field names,
types, defaults and limits match the service's models exactly; tests/integration/test_client.py
compares each one's JSON schema with the service's (descriptions and examples aside), so they cannot
drift apart unnoticed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TextPair = Annotated[list[str], Field(min_length=2, max_length=2)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str | TextPair] = Field(min_length=1)
    return_all_scores: bool = False
    return_routing: bool = False


class RoutedParent(BaseModel):
    parent: int
    count: int


class PredictionOut(BaseModel):
    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    value: float | None = None
    routing: list[list[RoutedParent]] | None = None


class PredictResponse(BaseModel):
    task: str
    version: str
    task_type: Literal["classification", "regression"]
    routing_token: Literal["first", "mean"] | None = None
    predictions: list[PredictionOut]


class TaskOut(BaseModel):
    name: str
    status: Literal["loaded", "on_disk", "invalid"]
    version: str | None
    loaded_version: str | None
    task_type: Literal["classification", "regression"] | None
    labels: list[str]
    text_pairs: bool | None
    max_length: int | None
    first_memory_layer: int | None = None  # absent from services older than issue 14
    file_bytes: int | None
    memory_bytes: int
    pinned: bool
    load_seconds: float | None
    error: str | None
    requests: dict[str, int]


class TaskList(BaseModel):
    tasks: list[TaskOut]
    loaded: int
    loaded_bytes: int


class RoutingLayerOut(BaseModel):
    layer: int
    counts: dict[str, list[int]]
    parent_entropy_bits: float
    mutual_information_bits: float


class RoutingOut(BaseModel):
    task: str
    version: str
    task_type: Literal["classification", "regression"]
    labels: list[str]
    rows: int
    tokens: int
    num_parents: int
    top_k: int
    label_entropy_bits: float
    mutual_information_ceiling_bits: float
    layers: list[RoutingLayerOut]


class TrainingRowIn(BaseModel):
    text: str
    text_pair: str | None = None
    label: str | float | int | bool


class TrainingDataIn(BaseModel):
    rows: list[TrainingRowIn]
    dev_rows: list[TrainingRowIn] | None = None
    test_rows: list[TrainingRowIn] | None = None


class TrainingProgressOut(BaseModel):
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None
    elapsed_s: float
    eta_s: float | None
    examples_per_s: float | None


class TrainingEpochOut(BaseModel):
    epoch: int
    train_loss: float
    dev: dict[str, float]
    seconds: float


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class TrainingJobOut(BaseModel):
    id: str
    task: str
    state: JobState
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    replica: str
    worker_pid: int | None
    task_type: Literal["classification", "regression"]
    labels: list[str]
    text_pairs: bool
    examples: dict[str, int]
    config: dict[str, Any]
    replace: bool
    if_match: str | None
    progress: TrainingProgressOut
    epochs: list[TrainingEpochOut]
    best_epoch: int | None
    dev: dict[str, float]
    test: dict[str, float]
    version: str | None
    error: str | None
    error_type: str | None
    cancel_requested: bool

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


class TrainingJobList(BaseModel):
    jobs: list[TrainingJobOut]


class ErrorDetail(BaseModel):
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["alive", "ready", "not_ready"]
    reasons: list[str] = Field(default_factory=list)
    store: Literal["up", "down"] | None = None


# The models the service defines, by name: what the schema comparison test walks.
WIRE_MODELS: tuple[type[BaseModel], ...] = (
    PredictRequest,
    RoutedParent,
    PredictionOut,
    PredictResponse,
    TaskOut,
    TaskList,
    RoutingLayerOut,
    RoutingOut,
    TrainingRowIn,
    TrainingDataIn,
    TrainingProgressOut,
    TrainingEpochOut,
    TrainingJobOut,
    TrainingJobList,
    ErrorDetail,
    ErrorBody,
    Health,
)
