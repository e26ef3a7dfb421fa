"""Test-suite set-up.

TRITON_INTERPRET must be set before any Triton kernel module is imported: with it, the Triton kernels run on CPU
tensors (slowly, one program at a time), which is how the kernel is tested on machines without a GPU. On a CUDA
machine, set TRITON_INTERPRET=0 to test the compiled kernels instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
