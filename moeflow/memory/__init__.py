"""Python face of the Rust memory core: tiers, the expert cache and its policies, async transfers."""

from moeflow.memory.aio import AsyncTransfers, TransferTicket

__all__ = ["AsyncTransfers", "TransferTicket"]
