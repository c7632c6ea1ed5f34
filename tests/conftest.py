import os
import sys

import pytest
import torch

# Tests import the shared helpers (helpers.py, tiny_models.py) from this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without a GPU, the Triton backend runs in Triton's CPU interpreter, so every shared
# backend test (tests/ops/test_op.py, test_registration.py, ...) exercises it too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def single_thread():
    """Every test runs on one intra-op thread: the shapes are tiny, and on a busy 2-core machine a
    second OpenMP thread makes every small matmul wait (100x slower measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
