"""Worker scripts that tests/test_distributed.py launches with torchrun (2 processes, gloo)."""
