import os

# Kernels run on CPU through Triton's interpreter; this must be set before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Subprocesses the tests start (the entry points, torchrun's workers) inherit one OpenMP thread
# unless a test says otherwise; the entry points' own --threads still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

# pytest-xdist (the `dev` extra): the suite runs on this many worker processes unless the command
# line says otherwise (-n N, -n 0, -p no:xdist). Two: CI's 2-core machine, one thread each.
WORKERS = 2
# The modules that take longest, run first (seconds of one worker on the 2-core machine, fresh
# Triton cache: 85, 55, 44, 28 of ~360 in all), so that neither worker ends on one of them alone
# while the other idles. xdist would otherwise start the modules with the most tests first, and
# the GPU build (4 tests) came last: 3:46 instead of the ~3 min of an even split.
FIRST = ("test_kernels_gpu_build.py", "test_device_check.py", "test_kernels_sampling.py", "test_train.py")

# One intra-op thread for the whole session, module fixtures included: at the tiny shapes of the
# tests more threads only add synchronisation. On the 2-core machine under load,
# tests/test_exact_score.py's four sampler cases took 66 s with the default two threads and 4.3 s
# with one. A test that wants more sets them itself; `one_thread` puts the count back after it.
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run the suite on WORKERS processes, a test module to a process (``--dist loadscope``: its
    module fixtures are built once). Here rather than in pyproject's addopts, which every pytest
    run in the checkout reads: `pytest benchmarks/...` (pytest-benchmark refuses to time under
    xdist) and a machine without pytest-xdist would fail on ``-n``. Before xdist's own hook
    (tryfirst), which turns ``numprocesses`` into worker processes."""
    option = config.option
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if (option.numprocesses is not None or option.dist != "no" or option.tx or option.usepdb or option.trace
            or option.collectonly or option.capture == "no"):
        return  # the command line chose, or a debugger, -s or a collection wants this one process
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < WORKERS:
        return
    option.numprocesses, option.dist = WORKERS, "loadscope"
    option.loadscopereorder = False  # the modules in collection order: FIRST first


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(FIRST)))  # stable: the rest keep their order


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
    """The session's token cache (trained tokenizers, token streams): ``SEDD_CACHE`` for every
    test that sets no other, so nothing is written to the user's ~/.cache/sedd and two workers
    never share a file; the modules that train through train/run.py on the same text share it,
    so each tokenizer is trained once a session (a worker)."""
    return tmp_path_factory.mktemp("sedd-cache")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(sedd_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEDD_CACHE", str(sedd_cache))
        yield


@pytest.fixture(scope="session")
def argparse_bpe(tmp_path_factory):
    """A 300-id byte-level BPE trained on argparse.py (tests.helpers.ARGPARSE): the modules that
    need a real BPE and no test data share one."""
    from sedd.data import get_corpus, train_bpe
    from tests.helpers import ARGPARSE

    return train_bpe(get_corpus(ARGPARSE, "all"), 300, cache_dir=tmp_path_factory.mktemp("bpe-cache"),
                     progress=False)


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory, argparse_bpe):
    """A tiny random GPT-2 judge over ``argparse_bpe``, with a context (256) long enough that every
    sample of the tests is scored in one window."""
    from tests.helpers import tiny_judge

    return tiny_judge(argparse_bpe, tmp_path_factory.mktemp("judge"), n_positions=256)
