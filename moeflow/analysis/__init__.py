"""Offline analysis of routing: locality metrics, traces, the budget advisor."""
