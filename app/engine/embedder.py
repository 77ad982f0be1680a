"""Sentence embeddings of the frozen backbone itself (the OpenAI-compatible embeddings API).

Embedding rows are rows without a memory: they share the batcher's queue, its admission by cost and its
deadlines with task predictions, and its forward passes too (bare rows in a mixed batch). The
embedding is the backbone's own, as its sentence-transformers configuration defines it (pooling,
normalisation, max_seq_length); heads and memories never touch it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from app.engine.batcher import Batcher
from app.engine.inputs import InputLimits, check_limits
from app.errors import InvalidInput, outcome_of
from app.metrics import Metrics

# The requests metric's task label for embeddings (not a valid task name, so never a task's own).
EMBEDDINGS_LABEL = "_embeddings"


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    tokens: int  # real tokens read, after truncation, over every input


class Embedder:
    """Embeds texts with the bare backbone through the shared batcher, and accounts for them."""

    def __init__(
        self,
        batcher: Batcher,
        metrics: Metrics,
        limits: InputLimits,
        *,
        model: str,
        width: int,
        max_length: int,
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits
        self.model = model
        self.width = width
        self.max_length = max_length

    async def embed(self, texts: Sequence[str], *, dimensions: int | None = None) -> Embeddings:
        started = time.perf_counter()
        outcome = "ok"
        try:
            if dimensions is not None and dimensions != self.width:
                raise InvalidInput(
                    f"dimensions: {self.model} embeds into {self.width} dimensions, not {dimensions}"
                )
            inputs = [(text, None) for text in texts]
            check_limits(inputs, self.limits)
            result = await self.batcher.submit(EMBEDDINGS_LABEL, None, inputs, max_length=self.max_length)
        except BaseException as err:
            outcome = outcome_of(err)
            raise
        finally:
            self.metrics.requests.labels(EMBEDDINGS_LABEL, outcome).inc()
            self.metrics.request_duration.labels(EMBEDDINGS_LABEL).observe(time.perf_counter() - started)
        self.metrics.queue_wait.labels(EMBEDDINGS_LABEL).observe(result.queue_wait_s)
        self.metrics.inference_duration.labels(EMBEDDINGS_LABEL).observe(result.inference_s)
        return Embeddings([row.outputs for row in result.rows], sum(row.tokens for row in result.rows))
