"""Only here to hand cffi's out-of-line API module to setuptools (pyproject has the rest)."""

from setuptools import setup

setup(cffi_modules=["cube/vmm/kvm_build.py:ffibuilder"])
