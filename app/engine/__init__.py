"""Backbone loading, the batched forward pass and the dynamic batcher (no FastAPI here)."""
