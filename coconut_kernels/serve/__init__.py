"""The OpenAI-compatible HTTP server over `LatentEngine` (FastAPI + uvicorn; the `serve` extra)."""
from .app import EngineWorker, create_app, serve

__all__ = ["EngineWorker", "create_app", "serve"]
