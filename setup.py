"""Metadata lives in ``setup.cfg``; this file adds the optional native noise kernel.

``lightning_dp.noise._boxmuller`` (Box–Muller over a keystream piece, vectorised through glibc's
libmvec) is built on Linux with a C compiler. It is optional: where it cannot be built the package
installs without it and :class:`~lightning_dp.noise.GaussianNoise` computes the same stream with
torch ops (about 1.5× slower on CPU).
"""
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "lightning_dp.noise._boxmuller",
            sources=["lightning_dp/noise/_boxmuller.c"],
            # -ffast-math at compile time only (glibc then declares its vector logf/cosf/sinf); the
            # link step gets no -ffast-math, so crtfastmath.o (flush-to-zero for the whole process)
            # is not linked in.
            extra_compile_args=["-O3", "-ffast-math"],
            libraries=["mvec", "m"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
