"""lightning-dp for ``import lightning as L`` (the ``lightning.pytorch`` namespace).

``from lightning_dp import DPStrategy`` gives these classes whenever ``lightning`` is installed; import
them from here to be explicit (e.g. with both Lightning packages installed).
"""
from .adapter import PUBLIC_NAMES, bind

globals().update(bind("lightning.pytorch"))

__all__ = sorted(PUBLIC_NAMES)
