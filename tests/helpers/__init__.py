"""Test-only helpers (not fixtures): model converters and the like."""
