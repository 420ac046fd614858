"""Test-wide setup, before any test module imports JAX."""

import os
import shutil
import tempfile

import deltamem_jax._xla_flags  # noqa: F401  (XLA CPU flags the package needs; see that module)

# Many tests compile the same programs (the tiny backbones' train steps, decode loops) in
# other tests, other xdist workers and their subprocesses: JAX's persistent compilation
# cache, in a folder made empty for this run (so a run never reuses an earlier one's
# programs), lets the later ones load instead of compile. The controller sets it before the
# workers start, and they and their subprocesses inherit it; a folder the user set is kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="deltamem-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)  # a size limit turns on its file lock, for the workers

# The files that take minutes (multi-process and mesh runs, real-model tests), measured with
# `bash scripts/test.sh` (--durations). Collected first, and scripts/test.sh keeps that order
# (--no-loadscope-reorder; xdist's default orders files by their number of tests, which put
# these few-test, long files last), so with two workers and --dist loadfile the long files
# start at once and the short ones fill in around them instead of one running on alone.
# test_sharding.py comes first: it runs the one-device reference that test_multiprocess.py
# reuses (a file lock makes the second to ask wait), so that one comes third, when the
# reference is usually ready.
LONG_FILES = ("test_sharding.py", "test_training.py", "test_multiprocess.py", "test_session.py", "test_default_adapter.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file kept


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller (or a run without xdist) made it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
