"""`tinyllm serve`: an OpenAI-compatible HTTP API and a web chat page for one loaded model."""
from tinyllm.server.app import create_app

__all__ = ["create_app"]
