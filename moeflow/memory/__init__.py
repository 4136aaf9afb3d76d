"""Python face of the Rust memory core: tiers, the expert cache and its policies, async transfers."""

from moeflow.memory.transfers import AsyncTransfers, TransferTicket

__all__ = ["AsyncTransfers", "TransferTicket"]
