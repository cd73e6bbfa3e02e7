"""Measuring during training: when to measure, on how many processes, and where results go."""

from lawwatch.watch.config import WatchConfig

__all__ = ["WatchConfig"]
