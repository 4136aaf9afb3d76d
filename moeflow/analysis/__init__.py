"""Offline analysis of routing: locality metrics and the budget advisor (traces live in scheduling/traces.py)."""
