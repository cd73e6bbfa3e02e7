"""Measuring during training: when to measure, on how many processes, and where results go."""
