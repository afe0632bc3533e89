"""Builds the optional C kernel (bema_offline/engine/_kernel.c); everything else is in pyproject.toml.

The kernel is optional: where no C compiler is found, the install goes on without it and bema-average runs the
same arithmetic, with the same bits, as torch ops (slower; `bema-offline --version` says which is in use).
"""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: every product in the kernel rounds on its own, as in the torch ops it reproduces
flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-math-errno"]

setup(ext_modules=[Extension("bema_offline.engine._kernel", ["bema_offline/engine/_kernel.c"], extra_compile_args=flags, optional=True)])
