"""The probe: a fixed, held-out set of token sequences, how it is built, saved and sharded.

:class:`ProbeSet` holds the tokens (:mod:`.set`); :class:`ProbeSpec` says how to build one from
text files, a saved dataset or a token file (:mod:`.spec`); the readers turn those sources into
texts or token ids (:mod:`.readers`); :func:`load_tokenizer` loads the tokenizer for texts, by
name or a checkpoint's own (:mod:`.tokenizer`); :func:`retrieval_probe` builds the synthetic
retrieval probe (:mod:`.retrieval`).
"""

from lawwatch.probe.retrieval import retrieval_probe
from lawwatch.probe.set import FORMAT, ProbeSet, example_mask, example_targets
from lawwatch.probe.spec import ProbeSpec
from lawwatch.probe.tokenizer import load_tokenizer

__all__ = [
    "FORMAT",
    "ProbeSet",
    "ProbeSpec",
    "example_mask",
    "example_targets",
    "load_tokenizer",
    "retrieval_probe",
]
