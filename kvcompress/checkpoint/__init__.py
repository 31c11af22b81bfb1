"""Checkpoints: export (writer), manifest (plan, checksums, shape checks), loading (reader)."""
