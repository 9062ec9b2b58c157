"""`tinyllm serve`: an OpenAI-compatible HTTP API and a web chat page for one loaded model."""
from .app import create_app

__all__ = ["create_app"]
