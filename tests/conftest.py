"""Test-wide settings, applied before JAX initializes.

XLA's CPU runtime can wedge its multi-threaded Eigen pool (every thread parked, the
caller waiting in BlockUntilReady forever); we saw it twice in this suite on the 2-core
machines, in the gradient tests. Single-threaded Eigen avoids it (reported with an A/B in
PyAutoLabs/PyAutoFit#1530) and costs these tiny shapes nothing. The benchmarks and the
library keep XLA's defaults.
"""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_cpu_multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
