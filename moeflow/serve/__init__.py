"""moeflow's OpenAI-compatible HTTP server: `create_app(engine)` for embedding, `moeflow serve` for the command line."""

from moeflow.serve.app import create_app

__all__ = ["create_app"]
