"""Noise sources for DP-SGD.

- :class:`SecureRNG`: cryptographically secure Gaussian, uniform and Bernoulli draws, keyed from the
  OS: an AES-256-CTR keystream from OpenSSL on CPUs with AES instructions, else ChaCha20 (OpenSSL
  through ``cryptography`` on CPU, a tensor implementation on CUDA). Use it for every run whose privacy
  guarantee matters.
- :class:`GaussianNoise`: seeded, fast and reproducible, but **not** secure (anyone with the seed can
  regenerate the noise): on CPU an AES-128-CTR keystream with float32 Box–Muller, about twice as fast as
  ``torch.randn``; elsewhere a seeded ``torch.Generator``.
- :func:`chacha20_keystream`: the RFC 8439 keystream both backends produce, byte for byte.

Both noise sources share ``normal(shape, std, device, dtype)``, ``seeded``, ``state_dict()`` and
``load_state_dict()``, so either can be handed to :class:`~lightning_dp.DPOptimizer` (as can any object
with ``normal``); ``add_normal_(tensors, std)`` (both have it) adds noise into a list of tensors in place.
"""
from .chacha import chacha20_keystream
from .gaussian import GaussianNoise
from .secure import SecureRNG

__all__ = ["GaussianNoise", "SecureRNG", "chacha20_keystream"]
