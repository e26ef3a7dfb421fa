"""Helpers of the framework-integration tests (real verl and TRL, installed by scripts/setup_integrations.sh).

Without the packages these tests skip, unless HADW_REQUIRE_INTEGRATIONS=1 (scripts/test.sh sets it after installing
them), where a missing or broken install fails the run instead of hiding behind a skip.
"""

import importlib
import os

import pytest


def require(module: str):
    """Import `module`, or skip the calling test module when it is not installed (fail when it is required)."""
    if os.environ.get("HADW_REQUIRE_INTEGRATIONS", "0") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
