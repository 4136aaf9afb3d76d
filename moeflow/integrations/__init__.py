"""Bridges to other systems (Ray Data); each needs its optional extra, e.g. `pip install moeflow[ray]`."""
