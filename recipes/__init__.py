"""Shipped recipes (TOML files)."""
