"""The server's text layer lives in moeflow.text (the engine's stream_text uses it too); re-exported here."""

from __future__ import annotations

from moeflow.text import TextStream, _Detokenizer

__all__ = ["TextStream", "_Detokenizer"]
