"""Tests for advjax.auto_attack: the cascade's robust sets, its adversarial images, its flags and its refusals."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import attacks, auto_attack, eot, iterative
from tests.helpers import linf_norms, noisy_gradient_model, random_linear_model, uniform_images

# The AutoAttack attacks compile whole attacks per test: they run in the full tier, which CI runs.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("quick_compile_module")]


EPS = 0.03
SHORT = {"num_steps": 5, "num_queries": 20}  # budgets that keep the cascade to seconds
FAST_STAGES = ("apgd-ce", "square")


@pytest.fixture(scope="module")
def model():
    _, _, logits_fn = random_linear_model(0, scale=0.02)
    images = jnp.asarray(uniform_images(16))
    labels = jnp.argmax(logits_fn(images), -1)  # every example starts correctly classified
    return logits_fn, images, labels


def run(model, **kwargs):
    logits_fn, images, labels = model
    options = {"eps": EPS, "key": jax.random.key(0), "attacks_to_run": FAST_STAGES, "form": "scan", **SHORT, **kwargs}
    return auto_attack.autoattack(logits_fn, images, labels, **options)


@pytest.mark.slow  # four attacks compiled
def test_the_cascades_robust_set_is_the_intersection_of_its_stages(model):
    logits_fn, images, labels = model
    result = run(model, compact=False)
    # Masked, each stage attacks every example with the cascade's key: alone it gives the same verdicts.
    families = auto_attack.version_families(logits_fn, EPS, **SHORT)
    expected = result.robust["clean"]
    for stage, name in enumerate(FAST_STAGES):
        (rank,) = families[name].ranks
        key = jax.random.fold_in(jax.random.key(0), 16 * stage)
        alone = iterative.run(families[name].make(rank), images, labels, key)
        expected = expected & np.asarray(attacks.predicted_labels(logits_fn, alone) == labels)
        np.testing.assert_array_equal(result.robust[name], expected, err_msg=name)
    assert result.robust["apgd-ce"].sum() < len(labels)  # the budget fools some: the test has teeth


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
@pytest.mark.parametrize("compact", [False, True])
def test_adversarial_images_fool_where_the_cascade_says_and_stay_in_the_ball(model, compact):
    logits_fn, images, labels = model
    result = run(model, compact=compact)
    broken = ~result.robust[FAST_STAGES[-1]]
    predicted = np.asarray(attacks.predicted_labels(logits_fn, result.adversarial))
    assert np.all(predicted[broken] != np.asarray(labels)[broken])
    np.testing.assert_array_equal(np.asarray(result.adversarial)[~broken], np.asarray(images)[~broken])
    assert linf_norms(np.asarray(result.adversarial) - np.asarray(images)).max() <= EPS + 1e-6
    for before, after in zip(list(result.robust.values()), list(result.robust.values())[1:]):
        assert np.all(after <= before)  # robustness only shrinks


@pytest.mark.slow  # six attacks compiled
def test_the_plus_cascade_runs_every_start_and_target_on_its_own_key_and_intersects_them(model):
    logits_fn, images, labels = model
    eps = EPS / 6  # small enough that the first attacks leave some examples for the later ones
    result = run(model, version="plus", attacks_to_run=None, compact=False, eps=eps)
    assert list(result.robust) == ["clean", *auto_attack.VERSION_ATTACKS["plus"]]
    families = auto_attack.version_families(logits_fn, eps, "plus", **SHORT)
    assert {name: len(family.ranks) for name, family in families.items()} == {
        "apgd-ce": 5,
        "apgd-dlr": 5,
        "fab": 5,
        "square": 1,
        "apgd-t": 9,
        "fab-t": 9,
    }
    expected = result.robust["clean"]
    for stage, (name, family) in enumerate(families.items()):
        for i, rank in enumerate(family.ranks):
            key = jax.random.fold_in(jax.random.key(0), 16 * stage + i)
            alone = iterative.run(family.make(rank), images, labels, key)
            expected = expected & np.asarray(attacks.predicted_labels(logits_fn, alone) == labels)
        np.testing.assert_array_equal(result.robust[name], expected, err_msg=name)
    assert 0 < result.robust["fab-t"].sum() < result.robust["apgd-ce"].sum() < len(labels)  # the test has teeth
    # FAB's first start is the clean image, its later ones random, as the reference's restarts.
    starts = [families["fab"].make(r).init(images, labels, jax.random.key(1)).point for r in (0, 1)]
    np.testing.assert_array_equal(starts[0], images)
    assert 0 < linf_norms(np.asarray(starts[1]) - np.asarray(images)).max() <= eps / 2 + 1e-6


@pytest.mark.slow  # two EoT attacks compiled
@pytest.mark.parametrize("compact", [False, True])
def test_the_rand_cascade_runs_eot_apgd_ce_then_dlr_and_intersects_them(model, compact):
    logits_fn, images, labels = model
    keyed = noisy_gradient_model(logits_fn, 0.1)  # outputs are logits_fn's: the verdicts are exact
    result = run((keyed, images, labels), version="rand", attacks_to_run=None, compact=compact)
    assert list(result.robust) == ["clean", "apgd-ce", "apgd-dlr"]
    assert not any("randomised" in flag for flag in result.flags)  # the rand version expects randomness
    broken = ~result.robust["apgd-dlr"]
    assert 0 < broken.sum() < len(labels)  # the test has teeth
    assert np.all(np.asarray(attacks.predicted_labels(logits_fn, result.adversarial))[broken] != labels[broken])
    assert linf_norms(np.asarray(result.adversarial) - np.asarray(images)).max() <= EPS + 1e-6
    if compact:
        return
    expected = result.robust["clean"]
    for stage, name in enumerate(("apgd-ce", "apgd-dlr")):
        # Each stage alone, written out: EoT APGD with 20 draws per gradient on the cascade's key.
        key = jax.random.fold_in(jax.random.key(0), 16 * stage)
        twenty = eot.make_apgd_eot(keyed, EPS, loss=name[5:], num_steps=SHORT["num_steps"], eot_samples=20)
        alone = jax.jit(functools.partial(iterative.run, twenty))(images, labels, key)
        expected = expected & np.asarray(attacks.predicted_labels(logits_fn, alone) == labels)
        np.testing.assert_array_equal(result.robust[name], expected, err_msg=name)


def test_a_model_and_a_version_that_disagree_on_the_key_are_refused_naming_both(model):
    logits_fn, images, labels = model
    with pytest.raises(TypeError, match=re.escape("the rand version calls logits_fn(images, key)")):
        run(model, version="rand", attacks_to_run=None)
    with pytest.raises(TypeError, match=re.escape("the standard version calls logits_fn(images)")):
        run((noisy_gradient_model(logits_fn, 0.1), images, labels))


def test_compaction_pads_to_sixteenths_of_a_power_of_two_no_larger_than_the_batch():
    sizes = (1, 2, 3, 17, 64, 65, 100, 802, 1000, 1025)
    assert [auto_attack._bucket(n, 2000) for n in sizes] == [1, 2, 3, 17, 64, 68, 100, 832, 1024, 1088]
    assert auto_attack._bucket(100, 100) == 100
    assert all(n <= auto_attack._bucket(n, 10**6) <= n * 17 / 16 for n in range(1, 5000))


@pytest.mark.parametrize("name", ["apgd-t", "fab-t"])
def test_one_compiled_family_serves_every_rank_as_its_own_attack_would(model, name):
    logits_fn, images, labels = model
    family = auto_attack.version_families(logits_fn, EPS, **SHORT)[name]
    shared = auto_attack.compiled_family(family, form="scan")
    for rank in (2, 5, 10):
        # The same compiled structure with the rank a Python constant: one attack, built for that rank alone.
        alone = auto_attack.compiled_family(auto_attack.Family(lambda _, r=rank: family.make(r), (rank,)), form="scan")
        key = jax.random.key(rank)
        np.testing.assert_array_equal(shared(images, labels, key, rank), alone(images, labels, key, 0), str(rank))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"version": "random"}, "version='random'"),
        ({"version": "plus", "attacks_to_run": ("apgd-ce", "apgd-t", "apgd-l2")}, "attacks_to_run names ['apgd-l2']"),
        ({"norm": "l1"}, "norm='l1'"),
        ({"eps": 0.0}, "eps=0.0 must be positive"),
        ({"num_steps": 0}, "num_steps=0 must be a positive integer"),
        ({"num_queries": -1}, "num_queries=-1 must be a positive integer"),
        ({"attacks_to_run": ("apgd-ce", "pgd")}, "attacks_to_run names ['pgd']"),
    ],
)
def test_bad_arguments_are_refused_naming_them(model, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run(model, **override)


def test_labels_out_of_range_are_refused(model):
    logits_fn, images, labels = model
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        auto_attack.autoattack(logits_fn, images, labels.at[0].set(10), eps=EPS, key=jax.random.key(0), **SHORT)


@pytest.mark.slow  # three cascades
def test_probabilities_and_zero_gradients_are_flagged(model):
    logits_fn, images, labels = model
    probabilities = run((lambda x: jax.nn.softmax(logits_fn(x)), images, labels))
    assert any("look like probabilities" in flag for flag in probabilities.flags)
    assert not any("probabilities" in flag for flag in run(model).flags)
    # Gradients blocked at the input: the white-box attacks see nothing, and say so.
    masked = run((lambda x: logits_fn(jax.lax.stop_gradient(x)), images, labels))
    assert any(f"{len(labels)} examples have a zero input gradient" in flag for flag in masked.flags)


@pytest.mark.slow  # a cascade
def test_a_model_whose_calls_disagree_is_flagged_as_randomised(model):
    logits_fn, images, labels = model
    calls = iter(range(10**6))
    noisy = lambda x: logits_fn(x) + 1e-3 * next(calls)  # a new output at every call, as a randomised model gives
    assert any("randomised" in flag for flag in run((noisy, images, labels), attacks_to_run=("apgd-ce",)).flags)
    assert not any("randomised" in flag for flag in run(model, attacks_to_run=("apgd-ce",)).flags)


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_square_doing_better_than_the_white_box_attacks_is_flagged(model):
    logits_fn, images, labels = model
    masked = (lambda x: logits_fn(jax.lax.stop_gradient(x)), images, labels)
    result = run(masked, num_queries=200)
    assert result.robust["square"].mean() < result.robust["apgd-ce"].mean() - auto_attack.SQUARE_TOLERANCE
    assert any("Square lowered the robust accuracy" in flag for flag in result.flags)
