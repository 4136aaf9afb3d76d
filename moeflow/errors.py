"""The exception vocabulary of moeflow: one base class, a typed error per kind of failure."""

from __future__ import annotations

from moeflow._core import (
    AlignmentError,
    ArenaError,
    BlockPinned,
    ChecksumMismatch,
    CudaError,
    CudaUnavailable,
    EngineClosed,
    ForeignHandle,
    HazardError,
    InvalidHandle,
    MoeflowError,
    OutOfBudget,
    ShortRead,
    StaleHandle,
    TransferError,
)

__all__ = [
    "AlignmentError",
    "ArenaError",
    "BlockPinned",
    "CheckpointError",
    "ChecksumMismatch",
    "ConfigError",
    "CudaError",
    "CudaUnavailable",
    "EngineClosed",
    "ForeignHandle",
    "HazardError",
    "InvalidHandle",
    "InvalidRequest",
    "KernelTableError",
    "MoeflowError",
    "OutOfBudget",
    "PredictorError",
    "ShortRead",
    "StaleHandle",
    "StoreError",
    "TransferError",
    "UnsupportedModel",
]


class ConfigError(MoeflowError, ValueError):
    """A user-given option has a bad value (the message names the option and value)."""


class CheckpointError(MoeflowError):
    """A checkpoint directory is missing a file, a tensor or a config field, or is truncated."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class UnsupportedModel(CheckpointError):
    """The checkpoint's architecture or one of its config options is not supported."""


class StoreError(MoeflowError):
    """The expert store is missing, stale or corrupt."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class InvalidRequest(MoeflowError, ValueError):
    """A generation request is malformed: empty prompt, token id out of range, bad length."""


class PredictorError(MoeflowError):
    """A routing predictor file is missing, corrupt, or made for another model."""


class KernelTableError(MoeflowError):
    """A measured kernel table (runtime/kernel_choice.py) cannot be read or is malformed; the
    message names the file and the field. Tune again (`python benches/bench_kernels.py --tune`)
    or delete the file to run the untuned kernel choice."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field
