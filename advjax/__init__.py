"""advjax: adversarial robustness in JAX, from the paper "Fooling neural networks by adding noises"."""

from advjax.checkpoint import Restored, restore

__all__ = ["Restored", "restore"]
