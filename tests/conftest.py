"""Test-wide setup, before any test module imports JAX."""

import deltamem_jax._xla_flags  # noqa: F401  (XLA CPU flags the package needs; see that module)
