"""Build script. The CUDA extension (flix_kernels._C, built with CMake from csrc/) is added by
a later release; until then this installs the pure-Python package."""

from setuptools import setup

setup()
