"""Thin adapters that decide when to snapshot and where results go; they hold no math."""
