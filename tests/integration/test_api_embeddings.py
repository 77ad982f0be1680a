"""POST /v1/embeddings: OpenAI's wire format, the backbone's own embedding (parity with
sentence-transformers), and the official `openai` client against a real process."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from procs import Replica

from app.engine.backbone import resolve_backbone_path

pytestmark = pytest.mark.model
MODEL = "all-MiniLM-L6-v2"
JSON = {"content-type": "application/json"}

TEXTS = [
    "a gorgeous, witty and moving film",
    "how do I reset my card pin?",
    "stocks fell sharply after the bank raised interest rates",
    # Longer than MiniLM's max_seq_length (256): both sides must truncate at the same place.
    " ".join(["the committee discussed the annual budget in great detail"] * 60),
]


@pytest.fixture(scope="module")
def reference(cache_dir: Path) -> torch.Tensor:
    """sentence-transformers' own embeddings of TEXTS (fp32), from the same model folder."""
    from sentence_transformers import SentenceTransformer

    folder = resolve_backbone_path("all-MiniLM-L6-v2", cache_dir)
    model = SentenceTransformer(folder, device="cpu")
    return torch.tensor(model.encode(TEXTS, convert_to_numpy=True))


def post(settings: Any, serve: Any, body: dict[str, Any]) -> httpx.Response:
    async def scenario() -> httpx.Response:
        async with serve(settings) as (_, client):
            return await client.post("/v1/embeddings", json=body)

    return asyncio.run(scenario())


def test_embeddings_equal_sentence_transformers(
    reference: torch.Tensor, settings_for: Any, serve: Any
) -> None:
    response = post(settings_for(), serve, {"input": TEXTS, "model": "all-MiniLM-L6-v2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert all(d["object"] == "embedding" for d in body["data"])
    served = torch.tensor([d["embedding"] for d in body["data"]])
    assert served.shape == (len(TEXTS), 384)
    cosine = torch.nn.functional.cosine_similarity(served, reference)
    assert cosine.min() >= 0.9999, cosine
    torch.testing.assert_close(served.norm(dim=-1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)  # Normalize
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"]
    assert 3 * 5 < body["usage"]["prompt_tokens"] <= 3 * 20 + 256  # the long text counts 256, truncated


def test_base64_single_string_and_refusals(settings_for: Any, serve: Any) -> None:
    settings = settings_for()

    async def scenario() -> list[httpx.Response]:
        async with serve(settings) as (_, client):
            bodies = [
                {"input": "dull", "model": "all-MiniLM-L6-v2"},
                {
                    "input": "dull",
                    "model": "all-MiniLM-L6-v2",
                    "encoding_format": "base64",
                    "dimensions": 384,
                },
                {"input": "dull", "model": "all-MiniLM-L6-v2", "dimensions": 128},
                {"input": "dull", "model": "text-embedding-3-small"},
                {"input": [101, 2023, 102], "model": "all-MiniLM-L6-v2"},
                {"input": [], "model": "all-MiniLM-L6-v2"},
                {"input": ["fine", "\ud800"], "model": "all-MiniLM-L6-v2"},
            ]
            # json.dumps escapes the lone surrogate as \\ud800: valid JSON, as a hostile client sends it.
            responses = [
                await client.post("/v1/embeddings", content=json.dumps(b), headers=JSON) for b in bodies
            ]
            responses.append(await client.get("/v1/models"))
            return responses

    plain, packed, narrow, other_model, token_ids, empty, surrogate, models = asyncio.run(scenario())
    assert plain.status_code == 200, plain.text
    assert packed.status_code == 200, packed.text
    vector = plain.json()["data"][0]["embedding"]
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vector, abs=1e-7)
    for response, words in [
        (narrow, "dimensions"), (other_model, "model"), (token_ids, "input"), (empty, "at least one"),
        (surrogate, "surrogate"),
    ]:  # fmt: skip
        assert response.status_code == 422, response.text
        assert response.json()["error"]["type"] in {"invalid_input", "invalid_request"}
        assert words in response.json()["error"]["message"], response.text
    assert models.json()["data"][0]["id"] == "all-MiniLM-L6-v2"


def test_openai_client_against_a_real_process(reference: torch.Tensor, tmp_path: Path) -> None:
    """The official client, pointed at `spartan serve` (default precision, a predict key): the same
    vectors, within bf16's agreement when the CPU has native bf16."""
    import openai

    key = "k" * 32
    memories = tmp_path / "memories"
    memories.mkdir()
    env = {
        "SPARTAN_MEMORY_DIR": str(memories),
        "SPARTAN_PREDICT_API_KEY": key,
        "SPARTAN_STORE_POLL_INTERVAL_S": "0",
    }
    replica = Replica("embeddings", env, tmp_path).start_ready()
    try:
        with openai.OpenAI(base_url=f"{replica.url}/v1", api_key=key, max_retries=0) as client:
            result = client.embeddings.create(model=MODEL, input=TEXTS)
            packed = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="base64")
        assert [d.index for d in result.data] == list(range(len(TEXTS)))
        served = torch.tensor([d.embedding for d in result.data])
        cosine = torch.nn.functional.cosine_similarity(served, reference)
        assert cosine.min() >= 0.999, cosine  # bf16 by default: ~0.9999 (docs/ENGINE.md)
        assert result.usage.prompt_tokens > 0
        raw = base64.b64decode(packed.data[0].embedding)  # type: ignore[arg-type]
        decoded = torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw))
        # The same text alone, not in a batch of four: equal up to the precision's rounding.
        assert torch.nn.functional.cosine_similarity(decoded, served[0], dim=0) > 0.9999
        with (
            openai.OpenAI(base_url=f"{replica.url}/v1", api_key="wrong" * 8, max_retries=0) as stranger,
            pytest.raises(openai.AuthenticationError),
        ):
            stranger.embeddings.create(model=MODEL, input="dull")
    finally:
        replica.stop()
