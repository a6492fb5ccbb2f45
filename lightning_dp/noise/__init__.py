"""Noise sources for DP-SGD.

- :class:`SecureRNG`: cryptographically secure Gaussian, uniform and Bernoulli draws from a ChaCha20
  keystream (OpenSSL through ``cryptography`` on CPU, a tensor implementation on CUDA), keyed from the
  OS. Use it for every run whose privacy guarantee matters.
- :class:`GaussianNoise`: seeded, fast and reproducible, but **not** secure (anyone with the seed can
  regenerate the noise): on CPU an AES-128-CTR keystream with float32 Box–Muller, about twice as fast as
  ``torch.randn``; elsewhere a seeded ``torch.Generator``.
- :func:`chacha20_keystream`: the RFC 8439 keystream both backends produce, byte for byte.

Both noise sources share ``normal(shape, std, device, dtype)``, ``seeded``, ``state_dict()`` and
``load_state_dict()``, so either can be handed to :class:`~lightning_dp.DPOptimizer` (as can any object
with ``normal``); :meth:`GaussianNoise.add_normal_` adds noise into a list of tensors in place.
"""
from .chacha import chacha20_keystream
from .gaussian import GaussianNoise
from .secure import SecureRNG

__all__ = ["GaussianNoise", "SecureRNG", "chacha20_keystream"]
