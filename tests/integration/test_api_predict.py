"""POST /v1/tasks/{task}/predict: parity with `spartan eval` for the shipped memory on the real MiniLM;
routing, regression values, limits, unknown tasks, auth and the OpenAPI documentation on the tiny
random backbone (plumbing: the API must agree with the encoder it serves, whichever it is)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from parity import assert_f32_close

from app.spartan.memfile import memory_to_bytes

SENTIMENT = Path(__file__).resolve().parents[2] / "memories" / "sentiment.safetensors"
FALLBACK_TEXTS = [
    "a gripping, beautifully acted film",
    "dull, predictable and far too long",
    "I laughed, I cried, I want my money back.",
    "The plot is thin but the performances carry it.",
    "an unexpected delight from start to finish",
    "Nothing works here: not the jokes, not the pacing, not the ending.",
    "ok",
    "A film about a film about a film, which is exactly as tiring as it sounds, and yet somehow "
    "it keeps finding new corners of its own premise to explore with real wit and some warmth.",
]


def parity_case(make_memory: Any, cache_dir: Path) -> tuple[bytes, list[Any]]:
    """The trained sentiment memory on 64 movie test examples if the lead has trained it; otherwise a
    random memory on the same examples (or on handmade texts if the dataset is not fetched)."""
    from app.training.datasets import Example, load_named

    try:
        examples = load_named("movie", cache_dir).test[:64]
    except Exception:  # the dataset is optional for this test; the backbone is what matters
        examples = [Example(text, "positive") for text in FALLBACK_TEXTS]
    if SENTIMENT.is_file():
        return SENTIMENT.read_bytes(), examples
    return memory_to_bytes(make_memory(seed=7)), examples


@pytest.mark.model
def test_api_prediction_equals_eval_path_scoring(
    minilm_encoder: Any, make_memory: Any, cache_dir: Path, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    from app.spartan.memfile import load_memory
    from app.training.trainer import predict_outputs

    data, examples = parity_case(make_memory, cache_dir)
    memory = load_memory(data, minilm_encoder.identity())
    expected = torch.softmax(predict_outputs(minilm_encoder, memory, examples), dim=-1)
    settings = settings_for(max_inputs_per_request=64)
    write_memory(settings, "sentiment", data)

    async def scenario() -> list[dict[str, Any]]:
        async with serve(settings) as (_, client):
            body = {"inputs": [ex.text for ex in examples], "return_all_scores": True}
            response = await client.post("/v1/tasks/sentiment/predict", json=body)
            assert response.status_code == 200, response.text
            payload = response.json()
            assert payload["version"] == memory.version
            return payload["predictions"]

    predictions = asyncio.run(scenario())
    labels = memory.spec.labels
    served = torch.tensor([[p["scores"][label] for label in labels] for p in predictions])
    assert_f32_close(served, expected)
    assert [p["label"] for p in predictions] == [labels[i] for i in expected.argmax(-1).tolist()]
    assert [p["score"] for p in predictions] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)


def test_routing_reports_the_parents_per_layer(
    api_encoder: Any, memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for()
    write_memory(settings, "topics", memory_file(seed=3))

    async def scenario() -> dict[str, Any]:
        async with serve(settings) as (_, client):
            body = {"inputs": ["the central bank raised interest rates"], "return_routing": True}
            response = await client.post("/v1/tasks/topics/predict", json=body)
            assert response.status_code == 200, response.text
            return response.json()

    payload = asyncio.run(scenario())
    assert payload["routing_token"] == "mean"  # mean-pooled, like MiniLM (a sentence-transformers model)
    routing = payload["predictions"][0]["routing"]
    assert len(routing) == api_encoder.backbone.num_layers
    tokens = len(api_encoder.encode(["the central bank raised interest rates"], None, 128)["input_ids"][0])
    for layer in routing:
        counts = [entry["count"] for entry in layer]
        assert 0 < len(layer) <= 8  # at most top_k parents reported
        assert counts == sorted(counts, reverse=True)
        assert all(0 <= entry["parent"] < 16 for entry in layer)
        assert max(counts) <= tokens  # each real token picks a parent at most once


def test_regression_tasks_return_values(
    api_encoder: Any, make_memory: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    from app.training.datasets import Example
    from app.training.trainer import predict_outputs

    memory = make_memory(seed=5, task_type="regression")
    settings = settings_for()
    write_memory(settings, "score", memory_to_bytes(memory))
    texts = ["fine", "a long and winding sentence about nothing at all"]
    expected = predict_outputs(api_encoder, memory, [Example(t, 0.0) for t in texts]).squeeze(-1)

    async def scenario() -> dict[str, Any]:
        async with serve(settings) as (_, client):
            response = await client.post("/v1/tasks/score/predict", json={"inputs": texts})
            return response.json()

    payload = asyncio.run(scenario())
    assert payload["task_type"] == "regression"
    values = [p["value"] for p in payload["predictions"]]
    assert values == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(p["label"] is None for p in payload["predictions"])


def test_request_errors_have_clear_statuses(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for(max_inputs_per_request=4, max_text_chars=50)
    write_memory(settings, "sentiment", memory_file(seed=1))
    cases = [
        ("/v1/tasks/unknown/predict", {"inputs": ["x"]}, 404, "task_not_found"),
        ("/v1/tasks/sentiment/predict", {"inputs": ["x"] * 5}, 422, "invalid_input"),
        ("/v1/tasks/sentiment/predict", {"inputs": ["x" * 51]}, 422, "invalid_input"),
        ("/v1/tasks/sentiment/predict", {"inputs": [["a", "b"]]}, 422, "invalid_input"),  # not a pair task
        ("/v1/tasks/sentiment/predict", {"inputs": []}, 422, "invalid_request"),
        ("/v1/tasks/sentiment/predict", {"inputs": [["a", "b", "c"]]}, 422, "invalid_request"),
        ("/v1/tasks/sentiment/predict", {"texts": ["x"]}, 422, "invalid_request"),
        ("/v1/tasks/bad.name/predict", {"inputs": ["x"]}, 422, "invalid_task_name"),
        ("/v1/tasks/..%2Fetc/predict", {"inputs": ["x"]}, 404, None),
    ]

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        async with serve(settings) as (_, client):
            return [
                (r.status_code, r.json())
                for r in [await client.post(path, json=body) for path, body, _, _ in cases]
            ]

    for (path, body, status, kind), (got, payload) in zip(cases, asyncio.run(scenario()), strict=True):
        assert got == status, (path, body, payload)
        assert set(payload) == {"error"}, payload
        if kind is not None:
            assert payload["error"]["type"] == kind, payload
        assert payload["error"]["message"]


def test_oversized_bodies_get_413_in_the_error_shape(settings_for: Any, serve: Any) -> None:
    settings = settings_for(max_inputs_per_request=2, max_text_chars=10)
    body = b'{"inputs": ["' + b"a" * 20_000 + b'"]}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    async def scenario() -> list[httpx.Response]:
        async with serve(settings) as (_, client):
            url, headers = "/v1/tasks/sentiment/predict", {"Content-Type": "application/json"}
            declared = await client.post(url, content=body, headers=headers)
            streamed = await client.post(url, content=chunks(), headers=headers)  # no Content-Length
            return [declared, streamed]

    for response in asyncio.run(scenario()):
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "payload_too_large"


def test_unknown_task_never_falls_back_to_the_bare_backbone(settings_for: Any, serve: Any) -> None:
    async def scenario() -> int:
        async with serve(settings_for()) as (app, client):
            response = await client.post("/v1/tasks/sentiment/predict", json={"inputs": ["x"]})
            metrics = app.state.metrics.registry
            assert metrics.get_sample_value(
                "spartan_requests_total", {"task": "unknown", "outcome": "not_found"}
            )
            return response.status_code

    assert asyncio.run(scenario()) == 404


READER_KEY, ADMIN_KEY = "reader-key-0123456789", "admin-key-0123456789"
READER, ADMIN = {"Authorization": f"Bearer {READER_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_predict_key_guards_predictions_and_listings(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for(predict_api_key=READER_KEY, admin_api_key=ADMIN_KEY)
    write_memory(settings, "sentiment", memory_file(seed=1))
    body = {"inputs": ["x"]}

    async def scenario() -> list[int]:
        async with serve(settings) as (_, client):
            url = "/v1/tasks/sentiment/predict"
            statuses = [
                (await client.post(url, json=body)).status_code,
                (await client.post(url, json=body, headers={"Authorization": "Bearer wrong"})).status_code,
                (await client.post(url, json=body, headers=READER)).status_code,
                (await client.post(url, json=body, headers=ADMIN)).status_code,
                (await client.get("/v1/tasks")).status_code,
                (await client.get("/v1/tasks", headers=READER)).status_code,
                (await client.get("/healthz")).status_code,  # probes stay open
            ]
            unauthorized = await client.post(url, json=body)
            assert unauthorized.headers["WWW-Authenticate"].startswith("Bearer")
            return statuses

    assert asyncio.run(scenario()) == [401, 401, 200, 200, 401, 200, 200]


def test_openapi_documents_the_api_with_examples(settings_for: Any, serve: Any) -> None:
    async def scenario() -> tuple[dict[str, Any], int]:
        async with serve(settings_for()) as (_, client):
            schema = (await client.get("/openapi.json")).json()
            return schema, (await client.get("/docs")).status_code

    schema, docs_status = asyncio.run(scenario())
    assert docs_status == 200
    paths = schema["paths"]
    assert set(paths) >= {
        "/v1/tasks/{task}/predict",
        "/v1/tasks/{task}/memory",
        "/v1/tasks",
        "/v1/tasks/{task}",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    upload = paths["/v1/tasks/{task}/memory"]["put"]
    assert set(upload["requestBody"]["content"]) == {"application/octet-stream", "multipart/form-data"}
    assert {"201", "200", "409", "413", "422"} <= set(upload["responses"])
    assert schema["components"]["schemas"]["PredictRequest"]["examples"]
    assert "429" in paths["/v1/tasks/{task}/predict"]["post"]["responses"]


@pytest.mark.model
def test_a_pair_task_served_equals_the_eval_path(
    minilm_encoder: Any, make_memory: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    """Text pairs (and a single text, whose pair is empty as in training) through the API score
    exactly as the training/eval path scores them."""
    from app.spartan.memfile import load_memory, memory_to_bytes
    from app.training.datasets import Example
    from app.training.trainer import predict_outputs

    data = memory_to_bytes(make_memory(seed=12, text_pairs=True, labels=("same", "different")))
    memory = load_memory(data, minilm_encoder.identity())
    examples = [
        Example("how do I reset my pin?", "same", "I forgot my card's pin"),
        Example("what is the weather tomorrow", "different", "book a table for two"),
        Example("transfer money to my savings", "same", "move funds between my accounts"),
        Example("a single text, no pair", "same", None),
    ]
    expected = torch.softmax(predict_outputs(minilm_encoder, memory, examples), dim=-1)
    settings = settings_for()
    write_memory(settings, "pairs", data)

    async def scenario() -> list[dict[str, Any]]:
        async with serve(settings) as (_, client):
            inputs = [[ex.text, ex.text_pair] if ex.text_pair else ex.text for ex in examples]
            body = {"inputs": inputs, "return_all_scores": True}
            response = await client.post("/v1/tasks/pairs/predict", json=body)
            assert response.status_code == 200, response.text
            return response.json()["predictions"]

    predictions = asyncio.run(scenario())
    served = torch.tensor([[p["scores"][label] for label in memory.spec.labels] for p in predictions])
    assert_f32_close(served, expected)
    assert (served[0] - served[1]).abs().max() > 1e-3  # the pair changes the answer: pairs were read
