"""Tests for advjax.seeds: the seed axis, its keys, and its reporting; K seeds at once against K runs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import advjax
from advjax import seeds
from tests.helpers import run_experiment, synthetic_config


def test_seed_keys_for_k_seeds_are_those_of_each_seed_alone():
    together = seeds.seed_keys(3, 2)
    for i in range(2):
        alone = seeds.seed_keys(3 + i, 1)
        for key_together, key_alone in zip(together, alone):
            np.testing.assert_array_equal(jax.random.key_data(key_together[i]), jax.random.key_data(key_alone))


@pytest.mark.parametrize("num_seeds", [1, 3])
def test_seed_keys_are_each_seeds_split_of_key_seed_plus_i(num_seeds):
    keys = seeds.seed_keys(5, num_seeds)
    assert len(keys) == 4
    for i in range(num_seeds):
        expected = jax.random.split(jax.random.key(5 + i), 4)
        for j, key in enumerate(keys):
            assert key.shape == seeds.seed_shape(num_seeds)
            own = key if num_seeds == 1 else key[i]
            np.testing.assert_array_equal(jax.random.key_data(own), jax.random.key_data(expected[j]))


def test_seed_shape_and_select_seed_carry_no_axis_for_one_seed():
    assert seeds.seed_shape(1) == () and seeds.seed_shape(3) == (3,)
    tree = {"w": np.arange(6).reshape(3, 2)}
    assert seeds.select_seed(tree, 0, 1) is tree
    np.testing.assert_array_equal(seeds.select_seed(tree, 2, 3)["w"], [4, 5])


def test_per_seed_seed_summary_and_as_reported_for_one_seed():
    value = np.float32(0.75)  # one seed: no seed axis
    assert seeds.per_seed(value, 1).shape == (1,)
    assert seeds.as_reported(value, 1) == 0.75 and isinstance(seeds.as_reported(value, 1), float)
    curve = np.array([0.9, 0.5, 0.25])  # one seed's accuracy at three strengths
    np.testing.assert_array_equal(seeds.per_seed(curve, 1), [[0.9, 0.5, 0.25]])
    assert seeds.seed_summary(curve, 1) == {
        "accuracy": [0.9, 0.5, 0.25],
        "accuracy_std": [0.0, 0.0, 0.0],
        "accuracy_per_seed": [[0.9, 0.5, 0.25]],
    }


def test_per_seed_seed_summary_and_as_reported_for_three_seeds():
    values = np.array([0.5, 0.75, 1.0])  # one value per seed
    np.testing.assert_array_equal(seeds.per_seed(values, 3), values)
    assert seeds.as_reported(values, 3) == [0.5, 0.75, 1.0]
    curves = np.array([[0.9, 0.5], [0.7, 0.3], [0.8, 0.1]])  # [seeds, strengths]
    summary = seeds.seed_summary(curves, 3)
    assert set(summary) == {"accuracy", "accuracy_std", "accuracy_per_seed"}
    np.testing.assert_allclose(summary["accuracy"], [0.8, 0.3])
    np.testing.assert_allclose(summary["accuracy_std"], [np.std([0.9, 0.7, 0.8]), np.std([0.5, 0.3, 0.1])])
    assert summary["accuracy_per_seed"] == curves.tolist()


@pytest.mark.parametrize("unrolled", [False, True])
def test_map_body_over_seeds_equals_a_python_loop_over_seeds(unrolled):
    # A fold body: the carry and `seeded` are per seed, `shared` is the same for every seed.
    def body(carry, step, seeded, shared):
        weights, key = seeded
        noise = jax.random.normal(jax.random.fold_in(key, step), (2,))
        return carry * 2.0 + weights * shared[step] + noise

    num_seeds = 3
    carry = jnp.arange(num_seeds * 2, dtype=jnp.float32).reshape(num_seeds, 2)
    weights = jnp.array([[1.0, -1.0], [0.5, 2.0], [3.0, 0.0]])
    keys = jax.random.split(jax.random.key(0), num_seeds)
    shared = jnp.array([0.25, 4.0])

    mapped = seeds.map_body_over_seeds(body, num_seeds, unrolled=unrolled)
    mapped = jax.jit(mapped, static_argnums=1)(carry, 1, (weights, keys), shared)

    looped = jnp.stack([body(carry[s], 1, (weights[s], keys[s]), shared) for s in range(num_seeds)])
    chex.assert_trees_all_close(mapped, looped, rtol=1e-6)
    assert not np.allclose(looped[0], looped[1])  # the seeds differ, so a mix-up would show
    # One seed: the body itself, untouched.
    assert seeds.map_body_over_seeds(body, 1, unrolled=unrolled) is body


@pytest.mark.slow
@pytest.mark.usefixtures("quick_compile")  # tiny runs: XLA's full passes cost more than they save
def test_k_seeds_at_once_equal_k_separate_runs_and_differ_from_each_other(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir, mode="gaussian")  # noise too must differ per seed
    config.seed, config.num_seeds = 5, 3
    config.eval.sigma_grid = (0.0, 0.6)
    together = run_experiment(config, tmp_path / "k3")
    restored = advjax.restore(str(tmp_path / "k3"))

    for i in range(3):
        single = synthetic_config(synthetic_mnist_dir, mode="gaussian")
        single.seed = 5 + i
        single.eval.sigma_grid = (0.0, 0.6)
        alone = run_experiment(single, tmp_path / f"seed{5 + i}")
        params_alone = advjax.restore(str(tmp_path / f"seed{5 + i}")).params
        chex.assert_trees_all_close(
            jax.tree.map(lambda p, i=i: p[i], restored.params), params_alone, rtol=1e-4, atol=1e-5
        )
        for split, by_perturbation in alone["accuracy"].items():
            for name, value in by_perturbation.items():
                assert together["accuracy_per_seed"][split][name][i] == pytest.approx(value, abs=0.011), (split, name)
        np.testing.assert_allclose(
            together["sweeps"]["gaussian"]["accuracy_per_seed"][i], alone["sweeps"]["gaussian"]["accuracy"], atol=0.011
        )

    first_layer = np.asarray(restored.params["Dense_0"]["kernel"])
    assert not np.allclose(first_layer[0], first_layer[1]) and not np.allclose(first_layer[1], first_layer[2])
    per_seed = np.asarray(together["accuracy_per_seed"]["validation"]["clean"])
    assert together["accuracy"]["validation"]["clean"] == pytest.approx(per_seed.mean())
    assert together["accuracy_std"]["validation"]["clean"] == pytest.approx(per_seed.std())
