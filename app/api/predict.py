"""POST /v1/tasks/{task}/predict: route inputs through the task's memory, batched with other requests."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServicesDep, TaskName, reader_dependencies
from app.api.errors import error_responses
from app.api.schemas import PredictRequest, PredictResponse
from app.settings import Settings


async def predict(body: PredictRequest, task: TaskName, svc: ServicesDep) -> PredictResponse:
    """Predict labels (or values) for a list of texts or text pairs with the task's memory.

    The response names the memory version that produced it. An unknown task is a 404: there is no
    fallback to the bare backbone.
    """
    result = await svc.predictor.predict(
        task, body.text_inputs(), all_scores=body.return_all_scores, routing=body.return_routing
    )
    return PredictResponse.of(result, body.return_routing)


def predict_body_limit(settings: Settings) -> int:
    # Worst case JSON: every character \\u-escaped (6 bytes), every input a pair, plus syntax.
    per_input = 2 * 6 * settings.max_text_chars + 64
    return settings.max_inputs_per_request * per_input + 4096


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["predict"])
    router.add_api_route(
        "/v1/tasks/{task}/predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        dependencies=reader_dependencies(settings),
        responses=error_responses(401, 404, 413, 422, 429, 503, 504),
        max_body_size=predict_body_limit(settings),
        summary="Predict with a task's memory",
    )
    return router
