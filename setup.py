"""Metadata lives in ``setup.cfg``; this file adds the optional native noise kernels.

``lightning_dp.noise._boxmuller`` (Box–Muller over keystream chunks, vectorised: float32 through glibc's
libmvec for :class:`~lightning_dp.noise.GaussianNoise`, float64 sums of normals for
:class:`~lightning_dp.noise.SecureRNG`) is built on Linux with a C compiler. It is optional: where it
cannot be built the package installs without it and both generators compute the same streams with
torch ops (about 1.5× slower for GaussianNoise, about 3× for SecureRNG, on CPU). The same extension
holds secure aggregation's kernels (``_discrete_gaussian.c``: the discrete Gaussian samplers;
``_secure_aggregation.c``: encoding and decoding); ``_kernels.h`` is what the three files share.
"""
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "lightning_dp.noise._boxmuller",
            sources=["lightning_dp/noise/_boxmuller.c", "lightning_dp/noise/_discrete_gaussian.c",
                     "lightning_dp/noise/_secure_aggregation.c"],
            depends=["lightning_dp/noise/_kernels.h"],
            # No -ffast-math: the float64 kernel needs IEEE evaluation as written (exact angle
            # reduction), and crtfastmath.o (flush-to-zero for the whole process) is never linked in.
            # The source declares glibc's vector logf/cosf/sinf itself; calls to them vectorise with
            # errno off. -ffp-contract=off: products and sums rounded as in the torch paths.
            # -fopenmp: the secure kernel shares torch's OpenMP team (torch's libgomp.so.1, loaded
            # first, also serves this module).
            extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            libraries=["mvec", "m"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
