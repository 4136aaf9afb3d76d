"""The expert store: experts copied out of safetensors into aligned, checksummed blobs on disk."""

from moeflow.store.codecs import Codec, codec_for
from moeflow.store.convert import convert, open_or_convert, open_or_convert_async, store_spec
from moeflow.store.layout import BlobLayout
from moeflow.store.location import StoreLocation, located_store, resolve_store_root, store_root
from moeflow.store.manifest import StoreSpec
from moeflow.store.store import ExpertStore

__all__ = [
    "BlobLayout",
    "Codec",
    "ExpertStore",
    "StoreLocation",
    "StoreSpec",
    "codec_for",
    "convert",
    "located_store",
    "open_or_convert",
    "open_or_convert_async",
    "resolve_store_root",
    "store_root",
    "store_spec",
]
