"""XLA CPU flags this package needs, applied before JAX creates its CPU backend.

jaxlib 0.10.2's concurrency-optimized CPU scheduler deadlocks on some of our gradient
programs (the backward of the memory writers): every XLA thread parks and the caller
waits in BlockUntilReady forever. `python tests/stress_gradients.py` hangs within
seconds with it and runs clean without it. The flag only changes how XLA orders work on
the CPU; a value the user set in XLA_FLAGS is left alone.
"""

import os

_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {_FLAG}".strip()
