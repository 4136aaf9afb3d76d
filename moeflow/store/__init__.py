"""The expert store: experts copied out of safetensors into aligned, checksummed blobs on disk."""

from moeflow.store.codecs import Codec, codec_for
from moeflow.store.convert import convert, open_or_convert
from moeflow.store.layout import BlobLayout
from moeflow.store.store import ExpertStore, store_root

__all__ = ["BlobLayout", "Codec", "ExpertStore", "codec_for", "convert", "open_or_convert", "store_root"]
