"""The paper's two classifiers as Linen modules with pure `init`/`apply`.

Each takes float32 images [B, H, W, C] in [0, 1] and returns logits [B, num_classes]; `build_model`
takes the image shape and the class count from the data (MNIST's [28, 28, 1] and 10 by default), and
`train.init_params` initialises on the module's `image_shape`.
Dropout (CNN only) is active only when `train=True`; attacks and evaluation
always go through `eval_apply`, which calls with `train=False` (docs/design.md,
"Attacks in eval mode").
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from advjax.data import DATASETS, DatasetInfo

Initializer = Callable[..., jax.Array]
# The default data, for a model built without naming any.
MNIST = DATASETS["mnist"]

# fan_in -> the bias initializer of a layer with that many inputs per output.
BiasInit = Callable[[int], Initializer]

# The paper's code was TensorFlow, whose layers default to Glorot-uniform
# kernels; Flax defaults to LeCun-normal; Wong et al.'s fast-training code was
# PyTorch, whose layers draw kernels and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
# Robustness results depend on it, so it is a config choice rather than a hidden default.
KERNEL_INITS: dict[str, Initializer] = {
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "lecun_normal": nn.initializers.lecun_normal(),
    # U(-b, b) has variance b^2 / 3: scale 1/3 over fan_in gives b = 1/sqrt(fan_in).
    "torch_default": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
}


def zero_bias(fan_in: int) -> Initializer:
    del fan_in
    return nn.initializers.zeros


def torch_default_bias(fan_in: int) -> Initializer:
    bound = 1.0 / fan_in**0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


BIAS_INITS: dict[str, BiasInit] = {
    "glorot_uniform": zero_bias,
    "lecun_normal": zero_bias,
    "torch_default": torch_default_bias,
}


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 as a reshape and a max.

    The same values as `nn.max_pool(x, (2, 2), strides=(2, 2))` on even sizes.
    Its gradient is elementwise, where `nn.max_pool`'s is XLA's
    select-and-scatter, which XLA:CPU runs slowly.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def dense(features: int, x: jax.Array, kernel_init: Initializer, bias_init: BiasInit) -> jax.Array:
    return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init(x.shape[-1]))(x)


def conv(
    features: int,
    window: tuple[int, int],
    strides: int,
    padding,
    x: jax.Array,
    kernel_init: Initializer,
    bias_init: BiasInit,
) -> jax.Array:
    fan_in = window[0] * window[1] * x.shape[-1]
    return nn.Conv(
        features, window, strides=strides, padding=padding, kernel_init=kernel_init, bias_init=bias_init(fan_in)
    )(x)


class BP(nn.Module):
    """The paper's back-propagation net: 784-256-256-10, ReLU."""

    hidden: Sequence[int] = (256, 256)
    num_classes: int = MNIST.num_classes
    image_shape: Sequence[int] = MNIST.image_shape  # what init_params initialises on
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    bias_init: BiasInit = zero_bias

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no stochastic layers; the argument keeps one signature for both models
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(dense(width, x, self.kernel_init, self.bias_init))
        return dense(self.num_classes, x, self.kernel_init, self.bias_init)


class CNN(nn.Module):
    """The paper's CNN: conv5x5x32-pool-conv5x5x64-pool-dense1024-dropout-dense10."""

    num_classes: int = MNIST.num_classes
    image_shape: Sequence[int] = MNIST.image_shape
    dropout_rate: float = 0.4
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    bias_init: BiasInit = zero_bias

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for features in (32, 64):
            x = conv(features, (5, 5), 1, "SAME", x, self.kernel_init, self.bias_init)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(dense(1024, x, self.kernel_init, self.bias_init))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return dense(self.num_classes, x, self.kernel_init, self.bias_init)


class SmallCNN(nn.Module):
    """Wong et al.'s (2020) MNIST network for fast adversarial training, not the paper's:
    conv4x4x16/2-conv4x4x32/2-dense100-dense10, ReLU, far cheaper than the CNN.

    Strided convolutions (PyTorch's padding 1) instead of pooling; it is the
    network their 88.8% PGD accuracy at eps = 0.3 was measured on.
    """

    num_classes: int = MNIST.num_classes
    image_shape: Sequence[int] = MNIST.image_shape
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    bias_init: BiasInit = zero_bias

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no stochastic layers
        for features in (16, 32):
            x = nn.relu(conv(features, (4, 4), 2, ((1, 1), (1, 1)), x, self.kernel_init, self.bias_init))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(dense(100, x, self.kernel_init, self.bias_init))
        return dense(self.num_classes, x, self.kernel_init, self.bias_init)


MODELS = ("bp", "cnn", "small_cnn")


def build_model(model_config: ml_collections.ConfigDict, info: DatasetInfo = MNIST) -> nn.Module:
    """Builds the model named by `model_config.name` (one of MODELS) for images of `info.image_shape` and
    `info.num_classes` classes (`data.dataset_info(config.data)`).

    >>> model = build_model(config.model, data.dataset_info(config.data))
    """
    if model_config.init not in KERNEL_INITS:
        raise ValueError(f"model.init={model_config.init!r} is not one of {tuple(KERNEL_INITS)}")
    inits = {"kernel_init": KERNEL_INITS[model_config.init], "bias_init": BIAS_INITS[model_config.init]}
    inits |= {"image_shape": tuple(info.image_shape), "num_classes": info.num_classes}
    if model_config.name == "bp":
        return BP(hidden=tuple(model_config.hidden), **inits)
    if model_config.name == "cnn":
        return CNN(dropout_rate=model_config.dropout, **inits)
    if model_config.name == "small_cnn":
        return SmallCNN(**inits)
    raise ValueError(f"model.name={model_config.name!r} is not one of {MODELS}")


CONVOLUTIONAL = ("cnn", "small_cnn")


def has_convolutions(model_config: ml_collections.ConfigDict) -> bool:
    """Whether the model has convolutions, which XLA:CPU runs slowly inside loops
    (docs/design.md, "Convolutions in XLA:CPU loops")."""
    if model_config.name not in MODELS:
        raise ValueError(f"model.name={model_config.name!r} is not one of {MODELS}")
    return model_config.name in CONVOLUTIONAL


def is_deterministic(model_config: ml_collections.ConfigDict) -> bool:
    """Whether train mode equals eval mode: no dropout (BP and the small CNN always; the CNN with dropout 0)."""
    return model_config.name != "cnn" or float(model_config.dropout) == 0.0


# A model in eval mode: (params, float32 images [B, H, W, C] in [0, 1]) -> logits [B, num_classes].
ApplyFn = Callable[[Any, jax.Array], jax.Array]


def eval_apply(flax_apply: Callable) -> ApplyFn:
    """`apply_fn(params, images) -> logits` with dropout off, from a Linen module's `apply`:
    the one way attacks and evaluation call a model.

    >>> logits = eval_apply(build_model(config.model).apply)(params, images)
    """

    def apply_fn(params, images):
        return flax_apply({"params": params}, images, train=False)

    return apply_fn
