"""Sufficient statistics of the probe's examples and their solve: PR and what builds on it."""
