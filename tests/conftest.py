"""Test isolation for kvfx: every test starts with a fresh Dynamo and zeroed kvfx counters."""
import os
import sys

# Under `pytest -n N` (pytest-xdist, as README's test command runs) the workers share the machine's cores: one
# intra-op thread each, and so for the processes they start. Two OpenMP threads per worker on 2 busy cores
# spin-wait on each other (see `one_thread`).
XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests (hypothesis) draw the same examples on every run by default, so README's test command (and CI) pass
# or fail alike each time: a random draw once failed a run on an exact tie of two lattice points (session 42,
# tests/ops/test_quantize_rows.py). HYPOTHESIS_PROFILE=explore draws new examples (and replays saved failures).
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test directory
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "coverage"))  # `import archs`

import kvfx  # noqa: E402

# The longest test files (seconds of a worker, `--durations`, sessions 24-25, with cold Inductor and extension caches
# as on CI's machine), started first: `pytest -n 2 --dist loadfile` hands files to its workers in collection order,
# so the short ones fill in around these and no worker is left running one long file alone at the end.
LONG_FIRST = ("test_real_model.py", "test_lowbit_attention.py", "test_cli.py", "test_cache.py", "test_refine.py",
              "test_quant.py", "test_speed_bench.py", "test_decode.py", "test_expand.py", "test_models.py",
              "test_dynamic.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: the rest keep their order


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
    torch.set_num_threads(1 if XDIST else min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread. Two OpenMP threads on a busy 2-core machine spin-wait on each other
    (a 32x64 linear then takes ~20 ms instead of ~20 µs). Use with pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
