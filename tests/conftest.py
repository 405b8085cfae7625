"""Test isolation for kvfx: every test starts with a fresh Dynamo and zeroed kvfx counters."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test directory
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "coverage"))  # `import archs`

import kvfx  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    kvfx.counters.clear()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread. Two OpenMP threads on a busy 2-core machine spin-wait on each other
    (a 32x64 linear then takes ~20 ms instead of ~20 µs). Use with pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
