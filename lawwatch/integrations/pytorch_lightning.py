"""LightningWatch for ``pytorch_lightning`` (the package's other import path).

``from lawwatch.integrations.pytorch_lightning import LightningWatch`` gives the callback built
on ``pytorch_lightning.Callback``, for a ``pytorch_lightning.Trainer``; see
:mod:`lawwatch.integrations.lightning`, whose events it shares.
"""

from lawwatch.integrations.lightning import lightning_callback

__all__ = ["LightningWatch"]

LightningWatch = lightning_callback("pytorch_lightning")
