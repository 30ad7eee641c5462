"""An estimate of a run's peak memory, checked before anything compiles.

Every one of `num_seeds` seeds carries its own parameters, optimizer state and
activations (advjax.seeds vmaps them), so memory grows linearly in the seed
count, and a few thousand seeds exhaust any device long after the config was
accepted. The estimate is computed from shapes alone (`jax.eval_shape`):
nothing is compiled or allocated. It counts what is certain to be alive and
leaves out XLA's workspace, compiled code and the host's copies, so it errs
low: it refuses a run only when even this count exceeds the memory, and a run
it accepts may still not fit.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from advjax import data, evaluate, models, validation
from advjax.attack_specs import ATTACK_NORMS

FLOAT_BYTES = 4  # parameters, optimizer state and activations are float32
# Per seed, the parameter-sized arrays alive in a training step: the parameters,
# Adam's two moments, the gradient and the update.
STATE_COPIES = 5
# Activations of one example alive at once, in forward passes: a training step
# keeps its forward pass for the backward pass and its cotangents, and an inner
# attack or TRADES adds a pass.
TRAIN_PASSES = 3
# An attack's gradient keeps a forward pass and its cotangents.
GRADIENT_PASSES = 2
# The evaluator's pass over a batch: the clean forward pass, the FGSM gradient's
# two, and the FGSM, Gaussian and matched-Gaussian images' forward passes.
EVAL_PASSES = 6
# An int32 label beside each image's uint8 pixels: the data stay uint8 on the device.
LABEL_BYTES = 4
# MNIST's training-set size stands in for the data's when the data are not given.
MNIST_TRAIN_SIZE = 60_000


def _image(model) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, *model.image_shape), jnp.float32)


def _abstract_variables(model) -> dict:
    """Every collection of the model's variables: "params", and "batch_stats" with BatchNorm."""
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), _image(model))


def _abstract_params(model) -> dict:
    return _abstract_variables(model)["params"]


def data_info(config: ml_collections.ConfigDict, dataset: data.Dataset | None = None) -> data.DatasetInfo:
    """The image shape and class count the estimate assumes: the named dataset's (MNIST's for a TFDS set,
    whose shape is known only once read), with the loaded images' shape when `dataset` is given."""
    info = data.DATASETS.get(data.dataset_name(config.data), data.DATASETS["mnist"])
    return info if dataset is None else info._replace(image_shape=tuple(dataset.train.images.shape[1:]))


def parameter_count(model_config: ml_collections.ConfigDict, info: data.DatasetInfo = models.MNIST) -> int:
    """The number of parameters of the configured model for `info`'s images and classes, from shapes alone.

    >>> parameter_count(configs.bp.get_config().model)  # 784*256+256 + 256*256+256 + 256*10+10
    """
    params = _abstract_params(models.build_model(model_config, info))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def activations_per_example(model_config: ml_collections.ConfigDict, info: data.DatasetInfo = models.MNIST) -> int:
    """The floats one image puts through the configured model in a forward pass: the image and every layer's output.

    >>> activations_per_example(configs.bp.get_config().model)  # 784 + 256 + 256 + 10 + 10
    """
    model = models.build_model(model_config, info)

    def forward(variables, x):
        return model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])

    image = _image(model)
    _, state = jax.eval_shape(forward, _abstract_variables(model), image)
    return int(np.prod(image.shape)) + sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state))


def _copies_per_image(train_config: ml_collections.ConfigDict) -> int:
    """Images a training step passes forward per example: consistency regularization's m noisy copies, else 1."""
    return train_config.consistency_copies if train_config.mode == "consistency" else 1


def _examples_at_once(config: ml_collections.ConfigDict, backend: str) -> int:
    """Per seed and device, the most activations any phase of the run holds at once, in images' forward passes."""
    # On CPU every device shares the host's memory, so splitting a batch across them saves nothing.
    shards = 1 if backend == "cpu" else config.num_devices or jax.device_count()
    grids = (config.eval.sigma_grid, config.eval.eps_grid, config.eval.table_eps)
    grid_chunk = evaluate.resolve_grid_chunk(config.eval.grid_chunk, max(map(len, grids), default=1) or 1, backend)
    phases = [
        config.train.batch_size * _copies_per_image(config.train) * TRAIN_PASSES / shards,
        # A sweep vmaps a chunk of its grid over each batch, after FGSM's one gradient per batch.
        config.eval.batch_size * max(EVAL_PASSES, grid_chunk + GRADIENT_PASSES) / shards,
    ]
    if config.robust.enabled:
        # The robustness report runs on one device and vmaps its eps grid over each batch.
        l2 = any(ATTACK_NORMS[name] == "l2" for name in config.robust.attacks)
        grid = max(len(config.robust.eps_grid), len(config.robust.l2_eps_grid) if l2 else 0)
        phases.append(config.robust.batch_size * grid * GRADIENT_PASSES)
    return int(np.ceil(max(phases)))


def _data_bytes(config: ml_collections.ConfigDict, mnist: data.MNIST | None) -> int:
    """The data on the device: the training images, the whole validation split and the evaluation subsets."""
    if mnist is None:
        num_train = MNIST_TRAIN_SIZE - config.data.num_validation
    else:
        num_train = len(mnist.train.labels)
    examples = (config.train.max_examples or num_train) + config.data.num_validation
    examples += config.eval.num_train + config.eval.num_validation + config.eval.num_test
    if config.robust.enabled:
        examples += config.robust.num_examples
    return examples * (int(np.prod(data_info(config, mnist).image_shape)) + LABEL_BYTES)


def seed_bytes(
    config: ml_collections.ConfigDict, backend: str | None = None, info: data.DatasetInfo | None = None
) -> int:
    """The estimated bytes of one seed on one device: its parameters and optimizer state, and its activations.
    `info`: the data's shape and classes (default: `data_info(config)`).

    >>> seed_bytes(configs.cnn.get_config())
    """
    backend, info = backend or jax.default_backend(), info or data_info(config)
    state = STATE_COPIES * parameter_count(config.model, info)
    activations = activations_per_example(config.model, info) * _examples_at_once(config, backend)
    return FLOAT_BYTES * (state + activations)


def estimate_bytes(
    config: ml_collections.ConfigDict, mnist: data.MNIST | None = None, backend: str | None = None
) -> int:
    """The estimated peak bytes of the run on one device: `num_seeds` times `seed_bytes`, plus the data.

    `mnist`: the data, when loaded (else MNIST's sizes are assumed); `backend`: 'cpu', 'gpu' or 'tpu'
    (default: JAX's), which decides how much of an evaluation grid is vmapped at once.

    >>> estimate_bytes(configs.bp_adv.get_config()) / 2**20  # MiB
    """
    return config.num_seeds * seed_bytes(config, backend, data_info(config, mnist)) + _data_bytes(config, mnist)


def available_memory() -> tuple[int, str]:
    """(bytes, what they are) of the first device: its allocator's limit on an accelerator, else the host's memory.

    >>> available_memory()  # (25_769_803_776, 'cpu')
    """
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{device.platform} device {device.device_kind}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), device.platform


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def check_fits(
    config: ml_collections.ConfigDict, available_bytes: int | None = None, mnist: data.MNIST | None = None
) -> None:
    """Raises ConfigError when the run needs more memory than there is, by `estimate_bytes`.

    `available_bytes`: the memory to fit in (default: `available_memory()`, the first device's).

    >>> check_fits(configs.bp_adv.get_config())
    """
    if available_bytes is None:
        available_bytes, where = available_memory()
        where = f"the {_size(available_bytes)} of memory of {where}"
    else:
        where = f"the {_size(available_bytes)} available"
    needed = estimate_bytes(config, mnist)
    if needed <= available_bytes:
        return
    per_seed = seed_bytes(config, info=data_info(config, mnist))
    fitting = (available_bytes - _data_bytes(config, mnist)) // per_seed
    if fitting >= 1:
        advice = f"lower num_seeds (by this estimate, which errs low, at most {fitting} fit at {_size(per_seed)} each)"
    else:
        advice = "not even one seed fits: lower train.batch_size, eval.batch_size or robust.batch_size"
    raise validation.ConfigError(
        f"config.num_seeds={config.num_seeds} needs about {_size(needed)} by advjax's estimate (parameters, "
        f"optimizer state and activations of each seed), more than {where}; {advice}"
    )
