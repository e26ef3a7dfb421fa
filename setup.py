"""Package discovery only; all metadata is in pyproject.toml.

The trainer lives in ./trainer but installs as `hadw_trainer`: an unrelated `trainer` distribution exists on
PyPI and we must not shadow it. setuptools cannot express a renamed folder with sub-packages in pyproject
alone, so the list is computed here.

The optional native CPU kernel (hadw_kernels/csrc: plain C++, no torch or Python headers) is built here as
hadw_kernels/_hadw_cpu*.so and loaded with ctypes (hadw_kernels/ops/cpu_loss.py). It is optional: without a C++
compiler the build only warns, and backend="auto" on CPU then uses torch.compile of the reference (with one
warning at run time saying how to get the kernel). It is built with OpenMP where the compiler has it (GCC: the
kernel then runs on the libgomp.so.1 pool of torch's own ops), else without (threads of its own).
"""

import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

packages = find_packages(include=["hadw_kernels", "hadw_kernels.*"])
packages += ["hadw_trainer"] + [f"hadw_trainer.{p}" for p in find_packages("trainer")]

# No -march: the kernel chooses its AVX-512 / AVX2 / baseline code at run time (hadw_kernels/csrc/hadw_cpu.cpp).
# -g0 overrides Python's -g: debug info took a quarter of the build (~31 s -> ~23 s of CPU on the loaded 2 cores).
unix = sys.platform != "win32"
native = Extension(
    "hadw_kernels._hadw_cpu",
    sources=["hadw_kernels/csrc/hadw_cpu.cpp"],
    depends=["hadw_kernels/csrc/hadw_cpu.h"],
    language="c++",
    extra_compile_args=["-O3", "-g0", "-std=c++17", "-fno-math-errno", "-fvisibility=hidden"] if unix
    else ["/O2", "/std:c++17"],
    extra_link_args=["-pthread"] if unix else [],
    optional=True,
)


class BuildExt(build_ext):
    """Builds the kernel with OpenMP, and again without it where the compiler has none (Apple's clang)."""

    def build_extension(self, ext):
        if not unix:
            return super().build_extension(ext)
        plain = ext.extra_compile_args, ext.extra_link_args
        ext.extra_compile_args, ext.extra_link_args = plain[0] + ["-fopenmp"], plain[1] + ["-fopenmp"]
        try:
            return super().build_extension(ext)
        except Exception as e:  # CompileError / LinkError (setuptools' own or distutils')
            print(f"warning: the native CPU kernel does not build with OpenMP ({e}); building it without "
                  "(threads of its own)", file=sys.stderr)
        ext.extra_compile_args, ext.extra_link_args = plain
        return super().build_extension(ext)


setup(packages=packages, package_dir={"hadw_trainer": "trainer"}, ext_modules=[native],
      cmdclass={"build_ext": BuildExt})
