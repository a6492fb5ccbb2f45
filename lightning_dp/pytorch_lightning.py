"""lightning-dp for ``import pytorch_lightning as pl``.

``from lightning_dp import DPStrategy`` gives these classes when ``pytorch_lightning`` is the Lightning
package in use (see :mod:`lightning_dp`); import them from here to be explicit.
"""
from .adapter import PUBLIC_NAMES, bind

globals().update(bind("pytorch_lightning"))

__all__ = sorted(PUBLIC_NAMES)
