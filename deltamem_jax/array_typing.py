"""Shape-annotated array aliases used across the package.

Axis letters:
  l  layers            b  batch              t  tokens (or messages)
  s  cache slots       n  query heads        k  key/value heads
  h  head dim          d  model width        f  MLP width
  v  vocabulary        m  memory sub-states  r  memory rank (rows = values, cols = keys)
  c  chunk length
"""

from jaxtyping import Array, Bool, Float, Int

__all__ = ["Array", "Bool", "Float", "Int"]
