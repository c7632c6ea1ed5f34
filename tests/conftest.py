import os

import pytest
import torch

# Keep CPU runs reproducible and light on this 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU, the Triton backend runs in Triton's CPU interpreter, so every shared
# backend test (tests/test_op.py, test_registration.py, ...) exercises it too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
