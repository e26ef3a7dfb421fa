"""Package discovery only; all metadata is in pyproject.toml.

The trainer lives in ./trainer but installs as `hadw_trainer`: an unrelated `trainer` distribution exists on
PyPI and we must not shadow it. setuptools cannot express a renamed folder with sub-packages in pyproject
alone, so the list is computed here.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["hadw_kernels", "hadw_kernels.*"])
packages += ["hadw_trainer"] + [f"hadw_trainer.{p}" for p in find_packages("trainer")]

setup(packages=packages, package_dir={"hadw_trainer": "trainer"})
