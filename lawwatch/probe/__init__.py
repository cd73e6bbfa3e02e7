"""The probe: a fixed, held-out set of token sequences, how it is built, saved and sharded.

:class:`ProbeSet` holds the tokens; :class:`ProbeSpec` says how to build one (from text files,
a saved dataset or a token file); the readers turn those sources into texts or token ids.
"""

from lawwatch.probe.set import FORMAT, ProbeSet, example_mask, example_targets
from lawwatch.probe.spec import ProbeSpec

__all__ = ["FORMAT", "ProbeSet", "ProbeSpec", "example_mask", "example_targets"]
