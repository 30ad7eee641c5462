"""The paper's two classifiers, Wong et al.'s two, as Linen modules with pure `init`/`apply`.

Each takes float32 images [B, H, W, C] in [0, 1] and returns logits [B, num_classes]; `build_model`
takes the image shape and the class count from the data (MNIST's [28, 28, 1] and 10 by default), and
`train.init_params` initialises on the module's `image_shape`.
Dropout (CNN only) is active only when `train=True`, and so are the batch statistics of BatchNorm
(the PreAct ResNet only); attacks and evaluation always go through `eval_apply`, which calls with
`train=False`, and the training step alone through `train_apply` (docs/design.md, "Attacks in eval mode").
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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


# model.dtype -> the dtype layers compute in (params stay float32): None is float32, as the layers infer it.
DTYPES: dict[str, Any] = {"float32": None, "bfloat16": jnp.bfloat16}


def as_logits(x: jax.Array, dtype) -> jax.Array:
    """The last layer's output as float32 logits, so that losses and attacks' gradients start in float32."""
    return x if dtype is None else x.astype(jnp.float32)


def dense(features: int, x: jax.Array, kernel_init: Initializer, bias_init: BiasInit, dtype=None) -> jax.Array:
    return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init(x.shape[-1]), dtype=dtype)(x)


def conv(
    features: int,
    window: tuple[int, int],
    strides: int,
    padding,
    x: jax.Array,
    kernel_init: Initializer,
    bias_init: BiasInit,
    dtype=None,
) -> jax.Array:
    fan_in = window[0] * window[1] * x.shape[-1]
    return nn.Conv(
        features,
        window,
        strides=strides,
        padding=padding,
        kernel_init=kernel_init,
        bias_init=bias_init(fan_in),
        dtype=dtype,
    )(x)


class BP(nn.Module):
    """The paper's back-propagation net: 784-256-256-10, ReLU."""

    hidden: Sequence[int] = (256, 256)
    num_classes: int = MNIST.num_classes
    image_shape: Sequence[int] = MNIST.image_shape  # what init_params initialises on
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    bias_init: BiasInit = zero_bias
    dtype: Any = None  # of the computation (DTYPES); params are float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no stochastic layers; the argument keeps one signature for both models
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(dense(width, x, self.kernel_init, self.bias_init, self.dtype))
        return as_logits(dense(self.num_classes, x, self.kernel_init, self.bias_init, self.dtype), self.dtype)


class CNN(nn.Module):
    """The paper's CNN: conv5x5x32-pool-conv5x5x64-pool-dense1024-dropout-dense10."""

    num_classes: int = MNIST.num_classes
    image_shape: Sequence[int] = MNIST.image_shape
    dropout_rate: float = 0.4
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    bias_init: BiasInit = zero_bias
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for features in (32, 64):
            x = conv(features, (5, 5), 1, "SAME", x, self.kernel_init, self.bias_init, self.dtype)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(dense(1024, x, self.kernel_init, self.bias_init, self.dtype))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return as_logits(dense(self.num_classes, x, self.kernel_init, self.bias_init, self.dtype), self.dtype)


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
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no stochastic layers
        for features in (16, 32):
            x = nn.relu(conv(features, (4, 4), 2, ((1, 1), (1, 1)), x, self.kernel_init, self.bias_init, self.dtype))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(dense(100, x, self.kernel_init, self.bias_init, self.dtype))
        return as_logits(dense(self.num_classes, x, self.kernel_init, self.bias_init, self.dtype), self.dtype)


# Wong et al.'s CIFAR-10 input normalisation (their CIFAR10/utils.py), done inside the model so that images, eps
# and every clip stay in pixel units, [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def batch_norm(train: bool, name: str, dtype=None) -> nn.BatchNorm:
    """PyTorch's BatchNorm2d as Wong et al. use it: running averages with momentum 0.1 of the new value (Flax's
    momentum 0.9 of the old), eps 1e-5, the variance in two passes; batch statistics in train mode only."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name
    )


def conv_no_bias(
    features: int, window: int, strides: int, x: jax.Array, kernel_init: Initializer, name: str, dtype=None
) -> jax.Array:
    """PyTorch's Conv2d(bias=False), padding 1 for a 3x3 window (same on both sides, unlike Flax's SAME at stride 2)."""
    padding = ((window // 2, window // 2),) * 2
    conv_layer = nn.Conv(
        features, (window, window), strides, padding, use_bias=False, kernel_init=kernel_init, dtype=dtype, name=name
    )
    return conv_layer(x)


class PreActBlock(nn.Module):
    """Wong et al.'s pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input, through a strided
    1x1 convolution where the shape changes (of the block's input x, as in their code, not of BN-ReLU(x))."""

    features: int
    strides: int
    kernel_init: Initializer
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dtype, init = self.dtype, self.kernel_init
        out = nn.relu(batch_norm(train, "bn1", dtype)(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv_no_bias(self.features, 1, self.strides, x, init, "shortcut", dtype)
        out = conv_no_bias(self.features, 3, self.strides, out, init, "conv1", dtype)
        out = conv_no_bias(self.features, 3, 1, nn.relu(batch_norm(train, "bn2", dtype)(out)), init, "conv2", dtype)
        return out + shortcut


class PreActResNet18(nn.Module):
    """The PreAct ResNet-18 of Wong et al.'s (2020) CIFAR-10 fast-training code (their CIFAR10/preact_resnet.py):
    conv3x3, four stages of two PreActBlocks (width, 2, 4 and 8 times width channels; stride 2 from the second),
    BN-ReLU, the spatial mean (their 4x4 average pooling of a 32x32 image's 4x4 map), dense.

    The input is normalised inside (`mean`, `std`: CIFAR-10's for three channels), so images stay in [0, 1].
    Its BatchNorm layers keep running statistics (the `batch_stats` collection): train mode normalises by the
    batch's statistics and updates them, eval mode normalises by them and leaves them alone.
    """

    num_classes: int = 10
    image_shape: Sequence[int] = (32, 32, 3)
    width: int = 64  # Wong et al.'s; smaller only to test quickly
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    kernel_init: Initializer = KERNEL_INITS["torch_default"]
    bias_init: BiasInit = torch_default_bias
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
        x = conv_no_bias(self.width, 3, 1, x, self.kernel_init, "conv1", self.dtype)
        for stage in range(4):
            for block in range(2):
                strides = 2 if stage > 0 and block == 0 else 1
                name = f"layer{stage + 1}_{block}"
                x = PreActBlock(self.width * 2**stage, strides, self.kernel_init, self.dtype, name=name)(x, train)
        x = jnp.mean(nn.relu(batch_norm(train, "bn", self.dtype)(x)), axis=(1, 2))
        bias_init = self.bias_init(x.shape[-1])
        linear = nn.Dense(
            self.num_classes, kernel_init=self.kernel_init, bias_init=bias_init, dtype=self.dtype, name="linear"
        )
        return as_logits(linear(x), self.dtype)


MODELS = ("bp", "cnn", "small_cnn", "preact_resnet18")


def build_model(model_config: ml_collections.ConfigDict, info: DatasetInfo = MNIST) -> nn.Module:
    """Builds the model named by `model_config.name` (one of MODELS) for images of `info.image_shape` and
    `info.num_classes` classes (`data.dataset_info(config.data)`).

    >>> model = build_model(config.model, data.dataset_info(config.data))
    """
    if model_config.init not in KERNEL_INITS:
        raise ValueError(f"model.init={model_config.init!r} is not one of {tuple(KERNEL_INITS)}")
    inits = {"kernel_init": KERNEL_INITS[model_config.init], "bias_init": BIAS_INITS[model_config.init]}
    inits |= {"image_shape": tuple(info.image_shape), "num_classes": info.num_classes}
    if model_config.dtype not in DTYPES:
        raise ValueError(f"model.dtype={model_config.dtype!r} is not one of {tuple(DTYPES)}")
    inits["dtype"] = DTYPES[model_config.dtype]
    if model_config.name == "bp":
        return BP(hidden=tuple(model_config.hidden), **inits)
    if model_config.name == "cnn":
        return CNN(dropout_rate=model_config.dropout, **inits)
    if model_config.name == "small_cnn":
        return SmallCNN(**inits)
    if model_config.name == "preact_resnet18":
        return PreActResNet18(width=model_config.width, **inits, **input_normalisation(info))
    raise ValueError(f"model.name={model_config.name!r} is not one of {MODELS}")


def input_normalisation(info: DatasetInfo) -> dict:
    """The PreAct ResNet's input mean and std: Wong et al.'s CIFAR-10 statistics for three channels; images of
    another channel count go in as they are (the first block's BatchNorm normalises what its convolution makes)."""
    channels = info.image_shape[-1]
    if channels == 3:
        return {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    return {"mean": (0.0,) * channels, "std": (1.0,) * channels}


CONVOLUTIONAL = ("cnn", "small_cnn", "preact_resnet18")


def has_convolutions(model_config: ml_collections.ConfigDict) -> bool:
    """Whether the model has convolutions, which XLA:CPU runs slowly inside loops
    (docs/design.md, "Convolutions in XLA:CPU loops")."""
    if model_config.name not in MODELS:
        raise ValueError(f"model.name={model_config.name!r} is not one of {MODELS}")
    return model_config.name in CONVOLUTIONAL


def is_deterministic(model_config: ml_collections.ConfigDict) -> bool:
    """Whether train mode equals eval mode: no dropout (BP and the small CNN always; the CNN with dropout 0)
    and no BatchNorm (the PreAct ResNet's train mode normalises by the batch)."""
    if model_config.name == "preact_resnet18":
        return False
    return model_config.name != "cnn" or float(model_config.dropout) == 0.0


class Variables(NamedTuple):
    """A model with BatchNorm as `eval_apply` and `train_apply` take it: its params and its running statistics.

    A model without BatchNorm is taken as its bare params, as ever, so its programs, checkpoints and numbers
    do not change; `train.eval_variables(state)` gives whichever the state's model has.
    """

    params: Any
    batch_stats: Any


def _variables(params_or_variables) -> dict:
    if isinstance(params_or_variables, Variables):
        return {"params": params_or_variables.params, "batch_stats": params_or_variables.batch_stats}
    return {"params": params_or_variables}


# A model in eval mode: (params, or Variables with BatchNorm; float32 images [B, H, W, C] in [0, 1]) -> logits.
ApplyFn = Callable[[Any, jax.Array], jax.Array]


def eval_apply(flax_apply: Callable) -> ApplyFn:
    """`apply_fn(params, images) -> logits` with dropout off and BatchNorm on its running statistics, which it
    leaves alone, from a Linen module's `apply`: the one way attacks and evaluation call a model. `params` is
    the model's params, or `Variables(params, batch_stats)` for a model with BatchNorm.

    >>> logits = eval_apply(build_model(config.model).apply)(params, images)
    """

    def apply_fn(params, images):
        return flax_apply(_variables(params), images, train=False)

    return apply_fn


def train_apply(flax_apply: Callable) -> Callable:
    """`apply_fn(params, images, dropout_rng) -> (logits, params)` in train mode, from a Linen module's `apply`:
    the one way the training step's passes call a model. For `Variables`, BatchNorm normalises by the batch and
    the `Variables` returned hold the running statistics it updated; bare params come back as they went in.

    >>> logits, variables = train_apply(model.apply)(models.Variables(params, batch_stats), images, key)
    """

    def apply_fn(params, images, dropout_rng):
        rngs = {"dropout": dropout_rng}
        if isinstance(params, Variables):
            logits, updated = flax_apply(_variables(params), images, train=True, rngs=rngs, mutable=["batch_stats"])
            return logits, params._replace(batch_stats=updated["batch_stats"])
        return flax_apply({"params": params}, images, train=True, rngs=rngs), params

    return apply_fn
