"""Tests for advjax.models: shapes, parameter counts, dropout and kernel inits."""

from __future__ import annotations

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from advjax import data, models, train
from configs import default

pytestmark = pytest.mark.usefixtures("quick_compile_module")

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


# ----------------------------------------------------------------------------
# Helpers.


def model_config(name: str, **overrides):
    """The default model config with `name` and other fields overridden."""
    config = default.get_config().model
    config.name = name
    config.update(overrides)
    return config


def build(name: str, **overrides):
    return models.build_model(model_config(name, **overrides))


def images(batch: int, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, *IMAGE_SHAPE), jnp.float32)


@functools.cache
def init_params(name: str, init: str = "glorot_uniform") -> dict:
    """model.init of the named model, once per (name, init), jitted: op by op, a CNN init costs seconds on a CPU."""
    model = build(name, init=init)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False)["params"])
    return init(jax.random.key(0))


def param_shapes(model) -> dict:
    """Parameter shapes without computing any values (the CNN is 3.3M parameters)."""
    abstract = jax.eval_shape(
        lambda key: model.init(key, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False),
        jax.random.key(0),
    )["params"]
    return jax.tree.map(lambda leaf: tuple(leaf.shape), abstract)


def count(shapes: dict) -> int:
    return sum(math.prod(shape) for shape in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))


def dense_count(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out  # kernel + bias


def conv_count(kernel: int, channels_in: int, channels_out: int) -> int:
    return kernel * kernel * channels_in * channels_out + channels_out


def kernel_fans(kernel: jax.Array) -> tuple[int, int]:
    """(fan_in, fan_out) as Glorot/LeCun define them: receptive field times channels."""
    receptive = math.prod(kernel.shape[:-2])
    return receptive * kernel.shape[-2], receptive * kernel.shape[-1]


@pytest.fixture(scope="module")
def cnn_and_params():
    return build("cnn"), init_params("cnn")


# ----------------------------------------------------------------------------
# Shapes and parameter counts.


@pytest.mark.parametrize("name, batch", [("bp", 3), ("cnn", 2), ("small_cnn", 2)])
def test_logits_have_shape_batch_by_ten(name, batch):
    logits = jax.jit(models.eval_apply(build(name).apply))(init_params(name), images(batch))
    chex.assert_shape(logits, (batch, NUM_CLASSES))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize(
    "info",
    [data.DATASETS["cifar10"], data.DatasetInfo("cifar100", (32, 32, 3), 100), data.DatasetInfo("odd", (20, 12, 2), 3)],
    ids=lambda info: info.name,
)
def test_the_datas_image_shape_and_class_count_reach_the_model_and_its_init(name, info):
    model = models.build_model(model_config(name), info)
    variables = jax.eval_shape(lambda key: train.init_variables(key, model), jax.random.key(0))
    params = variables["params"] if name != "preact_resnet18" else models.Variables(**variables)
    first = variables["params"][{"bp": "Dense_0", "preact_resnet18": "conv1"}.get(name, "Conv_0")]["kernel"]
    height, width, channels = info.image_shape
    # BP's first layer sees every pixel; a convolution's kernel sees the channels.
    assert first.shape[0] == height * width * channels if name == "bp" else first.shape[2] == channels
    logits = jax.eval_shape(
        lambda p, x: models.eval_apply(model.apply)(p, x),
        params,
        jax.ShapeDtypeStruct((3, *info.image_shape), jnp.float32),
    )
    assert logits.shape == (3, info.num_classes)


def test_a_model_built_without_data_is_mnists():
    model = build("cnn")
    assert (tuple(model.image_shape), model.num_classes) == (IMAGE_SHAPE, NUM_CLASSES)


def test_bp_parameter_count_and_layer_shapes():
    shapes = param_shapes(build("bp"))
    widths = (28 * 28, 256, 256, NUM_CLASSES)
    expected_count = sum(dense_count(a, b) for a, b in zip(widths[:-1], widths[1:]))
    assert expected_count == 269_322  # 784*256+256 + 256*256+256 + 256*10+10
    assert count(shapes) == expected_count
    assert shapes == {
        f"Dense_{i}": {"kernel": (a, b), "bias": (b,)} for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
    }


def test_cnn_parameter_count_and_layer_shapes():
    shapes = param_shapes(build("cnn"))
    # SAME padding keeps 28x28; each 2x2/2 pool halves it: 28 -> 14 -> 7.
    flat = (28 // 2 // 2) ** 2 * 64
    assert flat == 3136
    expected_count = conv_count(5, 1, 32) + conv_count(5, 32, 64) + dense_count(flat, 1024) + dense_count(1024, 10)
    assert expected_count == 3_274_634
    assert count(shapes) == expected_count
    assert shapes == {
        "Conv_0": {"kernel": (5, 5, 1, 32), "bias": (32,)},
        "Conv_1": {"kernel": (5, 5, 32, 64), "bias": (64,)},
        "Dense_0": {"kernel": (flat, 1024), "bias": (1024,)},
        "Dense_1": {"kernel": (1024, NUM_CLASSES), "bias": (NUM_CLASSES,)},
    }


def test_small_cnn_is_wong_et_al_s_network():
    shapes = param_shapes(build("small_cnn"))
    # 4x4 kernels, stride 2, one pixel of padding: 28 -> 14 -> 7, as in PyTorch.
    flat = 7 * 7 * 32
    expected_count = conv_count(4, 1, 16) + conv_count(4, 16, 32) + dense_count(flat, 100) + dense_count(100, 10)
    assert expected_count == 166_406
    assert count(shapes) == expected_count
    assert shapes == {
        "Conv_0": {"kernel": (4, 4, 1, 16), "bias": (16,)},
        "Conv_1": {"kernel": (4, 4, 16, 32), "bias": (32,)},
        "Dense_0": {"kernel": (flat, 100), "bias": (100,)},
        "Dense_1": {"kernel": (100, NUM_CLASSES), "bias": (NUM_CLASSES,)},
    }


def test_small_cnn_equals_a_hand_written_forward_pass_with_pytorch_padding():
    # Wong et al.'s PyTorch net pads one pixel on every side; 'SAME' would pad
    # (1, 2) for a 4x4 kernel at stride 2 and give different logits.
    params = init_params("small_cnn")
    x = images(2)

    def conv(h, layer):
        out = jax.lax.conv_general_dilated(
            h, params[layer]["kernel"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.relu(out + params[layer]["bias"])

    h = conv(conv(x, "Conv_0"), "Conv_1").reshape(2, -1)
    h = jax.nn.relu(h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    expected = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    logits = build("small_cnn").apply({"params": params}, x)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_bp_hidden_widths_come_from_the_config():
    shapes = param_shapes(build("bp", hidden=(32, 16, 8)))
    assert [shapes[f"Dense_{i}"]["kernel"] for i in range(4)] == [(784, 32), (32, 16), (16, 8), (8, 10)]


def test_unknown_model_name_raises_value_error():
    with pytest.raises(ValueError, match="resnet"):
        build("resnet")


# ----------------------------------------------------------------------------
# Dropout: on only when train=True.


def test_cnn_eval_mode_is_deterministic_and_ignores_dropout_rng(cnn_and_params):
    model, params = cnn_and_params
    x = images(2)
    without_rng = model.apply({"params": params}, x, train=False)
    with_rng_a = model.apply({"params": params}, x, train=False, rngs={"dropout": jax.random.key(1)})
    with_rng_b = model.apply({"params": params}, x, train=False, rngs={"dropout": jax.random.key(2)})
    chex.assert_trees_all_equal(with_rng_a, without_rng)
    chex.assert_trees_all_equal(with_rng_b, without_rng)


def test_cnn_train_mode_applies_dropout_drawn_from_the_rng(cnn_and_params):
    model, params = cnn_and_params
    x = images(2)
    evaluated = model.apply({"params": params}, x, train=False)
    train_a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_a_again = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    # Same rng -> same mask; different rngs -> different masks; any mask differs from eval.
    chex.assert_trees_all_equal(train_a, train_a_again)
    assert not np.allclose(train_a, train_b, atol=1e-6)
    assert not np.allclose(train_a, evaluated, atol=1e-6)


def test_cnn_train_mode_needs_a_dropout_rng(cnn_and_params):
    # A missing rng must be an error, not a silent fall-back to eval mode.
    model, params = cnn_and_params
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, images(2), train=True)


def test_cnn_dropout_rate_comes_from_the_config():
    model = build("cnn", dropout=0.0)
    assert model.dropout_rate == 0.0
    assert build("cnn").dropout_rate == default.get_config().model.dropout
    params = init_params("cnn")  # dropout has no parameters
    x = images(2)
    # With rate 0 the train-mode pass is the eval pass.
    chex.assert_trees_all_close(
        model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)}),
        model.apply({"params": params}, x, train=False),
        rtol=1e-6,
        atol=1e-6,
    )


def test_bp_train_mode_equals_eval_mode():
    model = build("bp")
    params = init_params("bp")
    x = images(4)
    chex.assert_trees_all_equal(
        model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(5)}),
        model.apply({"params": params}, x, train=False),
    )


# ----------------------------------------------------------------------------
# Kernel initialisers.


def test_glorot_and_lecun_inits_give_different_params():
    glorot = init_params("bp", "glorot_uniform")
    lecun = init_params("bp", "lecun_normal")
    chex.assert_trees_all_equal_shapes(glorot, lecun)
    for layer in glorot:
        assert not np.allclose(glorot[layer]["kernel"], lecun[layer]["kernel"]), layer
        # Biases start at zero whatever the kernel init.
        chex.assert_trees_all_equal(glorot[layer]["bias"], jnp.zeros_like(glorot[layer]["bias"]))
        chex.assert_trees_all_equal(lecun[layer]["bias"], jnp.zeros_like(lecun[layer]["bias"]))


@pytest.mark.parametrize("name", ["bp", "cnn"])
@pytest.mark.parametrize("init", sorted(models.KERNEL_INITS))
def test_kernel_init_is_taken_from_the_config(name, init):
    # The CNN's own lecun init is not run (its compile costs seconds); the
    # distributions are checked on the BP net and the CNN's Glorot params.
    assert build(name, init=init).kernel_init is models.KERNEL_INITS[init]


@pytest.mark.parametrize("name", ["bp", "cnn"])
def test_glorot_uniform_kernels_fill_the_glorot_bound(name):
    params = init_params(name, "glorot_uniform")
    for layer, leaves in params.items():
        kernel = np.asarray(leaves["kernel"])
        fan_in, fan_out = kernel_fans(kernel)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        largest = np.abs(kernel).max()
        assert largest <= bound, (layer, largest, bound)
        # Every kernel has >= 800 entries: a uniform sample reaches 90% of its bound
        # (a too-narrow init, e.g. LeCun's, would not fill it).
        assert largest >= 0.9 * bound, (layer, largest, bound)
        # Uniform on [-b, b] has std b / sqrt(3); 5% is ~3 standard errors for the 800-entry conv.
        np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3.0), rtol=0.05, err_msg=layer)


def test_lecun_normal_kernels_have_variance_one_over_fan_in():
    params = init_params("bp", "lecun_normal")
    for layer, leaves in params.items():
        kernel = np.asarray(leaves["kernel"])
        fan_in, _ = kernel_fans(kernel)
        # Dense_2 has 2,560 entries: a std's relative standard error is ~1.4%.
        np.testing.assert_allclose(kernel.std(), 1.0 / math.sqrt(fan_in), rtol=0.06, err_msg=layer)
        np.testing.assert_allclose(kernel.mean(), 0.0, atol=4.0 / math.sqrt(fan_in * kernel.size))


@pytest.mark.parametrize("name", ["bp", "small_cnn"])
def test_torch_default_init_draws_kernels_and_biases_from_pytorch_s_bound(name):
    # PyTorch's Linear and Conv2d: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    # which Wong et al.'s fast-training results were measured with.
    params = init_params(name, "torch_default")
    for layer, leaves in params.items():
        kernel, bias = np.asarray(leaves["kernel"]), np.asarray(leaves["bias"])
        fan_in, _ = kernel_fans(kernel)
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, layer
        # Every kernel has >= 256 entries: a uniform sample comes within 2% of its bound.
        assert np.abs(kernel).max() >= 0.98 * bound, layer
        np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3.0), rtol=0.1, err_msg=layer)
        # Biases are drawn too (Glorot and LeCun leave them at zero), and differ from one another.
        assert np.unique(bias).size == bias.size, layer


def test_unknown_init_name_is_rejected():
    with pytest.raises(ValueError, match="model.init=.he_normal"):
        build("bp", init="he_normal")


@pytest.mark.slow
def test_reshape_max_pool_equals_flax_max_pool_values_and_gradients():
    # The CNN pools with a reshape and a max because XLA:CPU runs the gradient
    # of nn.max_pool (select-and-scatter) slowly; it must compute the same thing.
    from advjax.models import max_pool_2x2

    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 5))
    reference = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2))
    chex.assert_trees_all_equal(max_pool_2x2(x), reference(x))
    weights = jax.random.normal(jax.random.key(1), (3, 14, 14, 5))
    grad = lambda pool: jax.grad(lambda z: jnp.sum(pool(z) * weights))(x)
    # Continuous random inputs have no ties within a window, so the gradients agree exactly.
    chex.assert_trees_all_close(grad(max_pool_2x2), grad(reference), atol=0, rtol=0)


@pytest.mark.parametrize("name,expected", [("bp", False), ("cnn", True), ("small_cnn", True)])
def test_has_convolutions(name, expected):
    assert models.has_convolutions(ml_collections.ConfigDict({"name": name})) is expected


def test_has_convolutions_rejects_an_unknown_model():
    with pytest.raises(ValueError, match="model.name"):
        models.has_convolutions(ml_collections.ConfigDict({"name": "resnet"}))


@pytest.mark.parametrize("name", ["bp", "cnn", "small_cnn", "preact_resnet18"])
def test_bfloat16_computes_in_bfloat16_from_float32_params_to_float32_logits(name):
    overrides = {"width": 4} if name == "preact_resnet18" else {}
    info = data.DATASETS["cifar10"] if name == "preact_resnet18" else data.DATASETS["mnist"]
    full, half = (models.build_model(model_config(name, dtype=d, **overrides), info) for d in ("float32", "bfloat16"))
    x = jax.random.uniform(jax.random.key(1), (4, *info.image_shape), jnp.float32)
    variables = jax.jit(lambda key: full.init(key, x[:1], train=False))(jax.random.key(0))
    # The same params serve both: the dtype changes the computation, not the params.
    half_shapes = jax.eval_shape(lambda key: half.init(key, x[:1], train=False), jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, half_shapes)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits = jax.jit(lambda v: half.apply(v, x, train=False))(variables)
    assert logits.dtype == jnp.float32
    program = str(jax.make_jaxpr(lambda v: half.apply(v, x, train=False))(variables))
    assert "bf16[4," in program and "bf16" not in str(
        jax.make_jaxpr(lambda v: full.apply(v, x, train=False))(variables)
    )
    reference = jax.jit(lambda v: full.apply(v, x, train=False))(variables)
    assert not np.array_equal(logits, reference)  # rounded differently ...
    np.testing.assert_allclose(logits, reference, atol=0.1 * float(jnp.max(jnp.abs(reference))) + 0.05)  # ... close


def test_an_unknown_dtype_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        build("bp", dtype="float16")
