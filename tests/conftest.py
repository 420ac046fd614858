"""Test-wide setup, before any test module imports JAX."""

import deltamem_jax._xla_flags  # noqa: F401  (XLA CPU flags the package needs; see that module)

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
