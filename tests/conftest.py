"""Test session setup: exactness claims are checked in float64.

float32 paths are exercised by passing float32 arrays explicitly.
"""

import jax

jax.config.update("jax_enable_x64", True)
