"""Analyses of pools and merged models (task-vector geometry, representation bias)."""
