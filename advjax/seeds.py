"""The seed axis: K independently seeded models trained and evaluated in one vmapped computation.

With `num_seeds = 1` nothing is vmapped and arrays carry no seed axis, so a
one-seed run is exactly the single-model program. With K > 1 every per-seed
array (params, optimizer state, BatchNorm's running statistics, keys, totals)
has a leading axis of K, while the data are shared. This module is the one
place that knows the difference:
the rest of the library calls these helpers instead of testing `num_seeds == 1`.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from advjax import loops


def seed_shape(num_seeds: int) -> tuple[int, ...]:
    """The leading shape of a per-seed array: () for one seed, (K,) for K."""
    return () if num_seeds == 1 else (num_seeds,)


def map_over_seeds(fn: Callable, num_seeds: int, in_axes: int | tuple = 0) -> Callable:
    """Vmaps `fn` over a leading seed axis of the arguments marked 0 in `in_axes`.

    With one seed `fn` is returned untouched: K=1 costs nothing extra.

    >>> init_all = map_over_seeds(lambda key: model.init(key, x), 4)  # keys [4] -> params [4, ...]
    """
    return fn if num_seeds == 1 else jax.vmap(fn, in_axes=in_axes)


def map_body_over_seeds(body: Callable, num_seeds: int, *, unrolled: bool = False) -> Callable:
    """A fold body `body(carry, step, seeded, shared)` mapped over the seed axis of `carry` and `seeded`.

    Every fold (training epochs, evaluation) passes its per-seed operands in
    `seeded` and the shared ones (the data, strengths, grids) in `shared`, so
    this one rule replaces a positional `in_axes` per fold.

    vmapped by default; `unrolled`: one body per seed, Python-unrolled in the same program, and the results
    stacked. A vmapped convolution is a grouped one, one group per seed, which XLA:CPU runs many times slower
    than the seeds' convolutions one by one (docs/design.md, "Seeds of a convnet").
    """
    if num_seeds == 1 or not unrolled:
        return map_over_seeds(body, num_seeds, in_axes=(0, None, 0, None))

    def each_seed(carry, step, seeded, shared):
        outs = [
            body(select_seed(carry, i, num_seeds), step, select_seed(seeded, i, num_seeds), shared)
            for i in range(num_seeds)
        ]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)

    return each_seed


@functools.partial(loops.jit_once, static_argnums=1)
def _seed_keys(seed: jax.Array, num_seeds: int) -> tuple[jax.Array, ...]:
    if num_seeds == 1:
        return tuple(jax.random.split(jax.random.key(seed), 4))
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 4))(seed + jnp.arange(num_seeds))
    return tuple(keys[:, i] for i in range(4))


def seed_keys(seed: int, num_seeds: int) -> tuple[jax.Array, ...]:
    """(init, shuffle, step, eval) keys of seeds seed..seed+K-1; each with a leading seed axis when K > 1.

    One compiled call for every seed (it is traced): run eagerly, each key operation would be its own
    small compilation (docs/design.md, "Counting executables").
    """
    return _seed_keys(np.uint32(seed), num_seeds)


@functools.partial(loops.jit_once, static_argnums=2)
def _fold_in(keys: jax.Array, data: jax.Array, num_seeds: int) -> jax.Array:
    return map_over_seeds(lambda key: jax.random.fold_in(key, data), num_seeds)(keys)


def fold_in(keys: jax.Array, data: int, num_seeds: int) -> jax.Array:
    """`jax.random.fold_in(key, data)` for each seed's key, one compiled call for every `data` (it is traced).

    >>> split_key = fold_in(eval_keys, 2, num_seeds=4)  # keys [4] -> keys [4]
    """
    return _fold_in(keys, np.uint32(data), num_seeds)


def per_seed(values, num_seeds: int) -> np.ndarray:
    """A host array with its seed axis made explicit: [K, ...] whether or not K = 1."""
    values = np.asarray(values)
    return values.reshape((num_seeds,) + values.shape[len(seed_shape(num_seeds)) :])


def seed_summary(values, num_seeds: int) -> dict:
    """Per-seed values [K?, ...] -> the summary's mean, std and per-seed lists (every curve of summary.json)."""
    values = per_seed(values, num_seeds).reshape(num_seeds, -1)
    return {
        "accuracy": values.mean(0).tolist(),
        "accuracy_std": values.std(0).tolist(),
        "accuracy_per_seed": values.tolist(),
    }


def as_reported(values, num_seeds: int):
    """A per-seed value as a record states it: a float for one seed, a list for several."""
    values = per_seed(values, num_seeds)
    return float(values[0]) if num_seeds == 1 else values.tolist()


def select_seed(tree, index: int, num_seeds: int):
    """Seed `index` of a per-seed pytree (the tree itself for one seed)."""
    return tree if num_seeds == 1 else jax.tree.map(lambda leaf: leaf[index], tree)


def pick_per_seed(params_by_epoch: dict[int, dict], epochs: list[int], num_seeds: int) -> dict:
    """Seed i's params from the epoch epochs[i], stacked along the seed axis as in training."""
    if num_seeds == 1:
        return params_by_epoch[epochs[0]]
    pick = lambda *per_epoch: jnp.stack(
        [per_epoch[sorted(params_by_epoch).index(e)][seed] for seed, e in enumerate(epochs)]
    )
    return jax.tree.map(pick, *(params_by_epoch[e] for e in sorted(params_by_epoch)))
