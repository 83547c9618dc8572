import os

# Kernels run on CPU through Triton's interpreter; this must be set before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Subprocesses the tests start (the entry points, torchrun's workers) inherit one OpenMP thread
# unless a test says otherwise; the entry points' own --threads still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

# One intra-op thread for the whole session, module fixtures included: at the tiny shapes of the
# tests more threads only add synchronisation. On the 2-core machine under load,
# tests/test_exact_score.py's four sampler cases took 66 s with the default two threads and 4.3 s
# with one. A test that wants more sets them itself; `one_thread` puts the count back after it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread during every test, and after it: an in-process entry point (``--threads``)
    or a test may change the count, and the next test must not inherit it."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sedd_cache(tmp_path_factory):
    """One token cache (``SEDD_CACHE``: trained tokenizers, token streams) for the modules that
    train through train/run.py on the same text, so each tokenizer is trained once a session."""
    return tmp_path_factory.mktemp("sedd-cache")
