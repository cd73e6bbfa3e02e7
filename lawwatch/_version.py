"""The package's version: one owner, read by the package top, the report page and the build."""

__version__ = "0.1.0"
