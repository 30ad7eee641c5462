"""The paper's two classifiers as Linen modules with pure `init`/`apply`.

Both take float32 images [B, 28, 28, 1] in [0, 1] and return logits [B, 10].
Dropout (CNN only) is active only when `train=True`; attacks and evaluation
always call with `train=False` (DESIGN.md pitfall 1).
"""

from typing import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections

Initializer = Callable[..., jax.Array]

# The paper's code was TensorFlow, whose layers default to Glorot-uniform
# kernels; Flax defaults to LeCun-normal. Noise-robustness curves depend on it,
# so it is a config choice rather than a hidden default.
KERNEL_INITS: dict[str, Initializer] = {
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "lecun_normal": nn.initializers.lecun_normal(),
}


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 as a reshape and a max.

    The same values as `nn.max_pool(x, (2, 2), strides=(2, 2))` on even sizes.
    Its gradient is elementwise, where `nn.max_pool`'s is XLA's
    select-and-scatter, which XLA:CPU runs slowly.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class BP(nn.Module):
    """The paper's back-propagation net: 784-256-256-10, ReLU."""

    hidden: Sequence[int] = (256, 256)
    num_classes: int = 10
    kernel_init: Initializer = nn.initializers.glorot_uniform()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no stochastic layers; the argument keeps one signature for both models
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=self.kernel_init)(x))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


class CNN(nn.Module):
    """The paper's CNN: conv5x5x32-pool-conv5x5x64-pool-dense1024-dropout-dense10."""

    num_classes: int = 10
    dropout_rate: float = 0.4
    kernel_init: Initializer = nn.initializers.glorot_uniform()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for features in (32, 64):
            x = nn.Conv(features, (5, 5), padding="SAME", kernel_init=self.kernel_init)(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(1024, kernel_init=self.kernel_init)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


class SmallCNN(nn.Module):
    """Wong et al.'s (2020) MNIST network for fast adversarial training, not the paper's:
    conv4x4x16/2-conv4x4x32/2-dense100-dense10, ReLU, about 20x cheaper than the CNN.

    Strided convolutions (PyTorch's padding 1) instead of pooling; it is the
    network their 88.8% PGD accuracy at eps = 0.3 was measured on.
    """

    num_classes: int = 10
    kernel_init: Initializer = nn.initializers.glorot_uniform()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no stochastic layers
        for features in (16, 32):
            x = nn.relu(nn.Conv(features, (4, 4), strides=2, padding=((1, 1), (1, 1)), kernel_init=self.kernel_init)(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(100, kernel_init=self.kernel_init)(x))
        return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)


MODELS = ("bp", "cnn", "small_cnn")


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the model named by `model_config.name` (one of MODELS)."""
    if model_config.init not in KERNEL_INITS:
        raise ValueError(f"model.init={model_config.init!r} is not one of {tuple(KERNEL_INITS)}")
    kernel_init = KERNEL_INITS[model_config.init]
    if model_config.name == "bp":
        return BP(hidden=tuple(model_config.hidden), kernel_init=kernel_init)
    if model_config.name == "cnn":
        return CNN(dropout_rate=model_config.dropout, kernel_init=kernel_init)
    if model_config.name == "small_cnn":
        return SmallCNN(kernel_init=kernel_init)
    raise ValueError(f"model.name={model_config.name!r} is not one of {MODELS}")


def is_deterministic(model_config: ml_collections.ConfigDict) -> bool:
    """Whether train mode equals eval mode: no dropout (BP and the small CNN always; the CNN with dropout 0)."""
    return model_config.name != "cnn" or float(model_config.dropout) == 0.0
