"""POST /v1/embeddings: the frozen backbone's sentence embeddings, OpenAI-compatible.

The request and response follow OpenAI's embeddings API, so its clients (and tools built on them) work
unchanged against the service: `input` is a string or a list of strings, `model` names the backbone,
`encoding_format` is float or base64 (little-endian float32), `dimensions` must equal the width (this
model is not truncatable). Token-id inputs are refused (422): the service tokenises itself.
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api.deps import ServicesDep, reader_dependencies
from app.api.errors import error_responses
from app.api.predict import predict_body_limit
from app.errors import InvalidInput
from app.settings import Settings


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Annotated[str | list[str], Field(description="A text, or a list of texts.")]
    model: str = Field(description="The served backbone's name (GET /v1/models lists it).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description="Must equal the embedding width if given.")
    user: str | None = Field(default=None, description="Accepted for compatibility; not used.")

    @field_validator("input")
    @classmethod
    def _texts_are_utf8(cls, value: str | list[str]) -> str | list[str]:
        for index, text in enumerate([value] if isinstance(value, str) else value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"input {index} is not valid UTF-8 text (a lone surrogate?)") from None
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingsUsage


def _base64_float32(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create_embeddings(body: EmbeddingsRequest, svc: ServicesDep) -> EmbeddingsResponse:
    """Embed texts with the frozen backbone (its own pooling and normalisation)."""
    embedder = svc.embedder
    if body.model != embedder.model:
        raise InvalidInput(f"model: this service embeds with {embedder.model!r}, not {body.model!r}")
    result = await embedder.embed(body.texts(), dimensions=body.dimensions)
    encode = _base64_float32 if body.encoding_format == "base64" else (lambda vector: vector)
    data = [EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(result.vectors)]
    usage = EmbeddingsUsage(prompt_tokens=result.tokens, total_tokens=result.tokens)
    return EmbeddingsResponse(data=data, model=embedder.model, usage=usage)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "spartan-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


async def list_models(svc: ServicesDep) -> ModelList:
    """The embedding model this service serves (OpenAI-compatible listing)."""
    return ModelList(data=[ModelCard(id=svc.embedder.model)])


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["embeddings"])
    router.add_api_route(
        "/v1/embeddings",
        create_embeddings,
        methods=["POST"],
        response_model=EmbeddingsResponse,
        dependencies=reader_dependencies(settings),
        responses=error_responses(401, 413, 422, 429, 503, 504),
        max_body_size=predict_body_limit(settings),
        summary="Sentence embeddings of the backbone (OpenAI-compatible)",
    )
    router.add_api_route(
        "/v1/models",
        list_models,
        methods=["GET"],
        response_model=ModelList,
        dependencies=reader_dependencies(settings),
        responses=error_responses(401, 503),
        summary="The embedding model served (OpenAI-compatible)",
    )
    return router
