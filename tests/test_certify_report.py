"""Randomized smoothing in the summary (advjax/certify_report.py): its evaluator, config, table, figure and the
Gaussian training noise it relies on."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advjax import certify_report, data, evaluators, models, objectives, report, seeds, smoothing, train, validation
from advjax import workdir as workdir_lib
from configs import bp_smooth, cnn_smooth, default
from tests.helpers import run_experiment, small_config, synthetic_config

pytestmark = pytest.mark.usefixtures("quick_compile_module")

RADII = (0.0, 0.25, 0.5)


def tiny_certify(config, sigma=(0.5,), num_examples=8, batch=8):
    """Budgets that certify in a second: n0=10, n=40 in chunks of 20."""
    c = config.certify
    c.enabled, c.sigma, c.n0, c.n, c.chunk_size = True, sigma, 10, 40, 20
    c.num_examples, c.batch, c.radii = num_examples, batch, RADII
    return config


def context(config, mnist, num_seeds=1):
    """An evaluators.Context for the certification evaluator: the model is a narrow BP, untrained."""
    config.num_seeds = num_seeds
    model = models.build_model(config.model)
    init = seeds.map_over_seeds(lambda key: train.init_params(key, model), num_seeds)
    params = init(seeds.seed_keys(config.seed, num_seeds)[0])
    eval_rng = seeds.seed_keys(config.seed, num_seeds)[3]
    sets = evaluators.eval_sets(mnist, config.eval)
    apply_fn = models.eval_apply(model.apply)
    return evaluators.Context(config, apply_fn, params, mnist, None, sets, {}, eval_rng, None)


@pytest.fixture(scope="module")
def mnist(synthetic_mnist_dir):
    return data.load_mnist(synthetic_config(synthetic_mnist_dir).data)


@pytest.fixture
def config(synthetic_mnist_dir):
    config = small_config(mode="gaussian")
    config.data = synthetic_config(synthetic_mnist_dir).data
    return tiny_certify(config)


@pytest.mark.parametrize("num_seeds, sigma", [(1, (0.5,)), (2, (0.25, 0.5))])
def test_the_summary_holds_the_budgets_and_per_sigma_curves_for_every_seed(config, mnist, num_seeds, sigma):
    tiny_certify(config, sigma=sigma)
    entry = evaluators.certification(context(config, mnist, num_seeds))["certification"]
    assert entry["sigma"] == list(sigma) and (entry["n0"], entry["n"], entry["alpha"]) == (10, 40, 0.001)
    assert entry["num_examples"] == 8 and entry["radii"] == list(RADII) and entry["split"] == "test"
    assert list(entry["by_sigma"]) == [str(s) for s in sigma]
    for per_sigma in entry["by_sigma"].values():
        curve = per_sigma["certified_accuracy"]
        assert len(curve["accuracy"]) == len(curve["accuracy_std"]) == len(RADII)
        assert np.shape(curve["accuracy_per_seed"]) == (num_seeds, len(RADII))
        assert np.all(np.diff(curve["accuracy"]) <= 0)  # certified accuracy falls with the radius
        for name in ("acr", "abstention_rate"):
            assert len(per_sigma[f"{name}_per_seed"]) == num_seeds and per_sigma[f"{name}_std"] >= 0
        assert 0 <= per_sigma["abstention_rate"] <= 1
    seconds = entry["seconds"]  # what experiment.py moves into timings.json
    assert seconds["samples"] == num_seeds * len(sigma) * 8 * (10 + 40) and seconds["samples_per_second"] > 0
    json.dumps(entry)


def direct_certificates(ctx, key, sigma, batches):
    """smoothing.certify itself on each batch (start, stop) with its batch key and the clipping base classifier."""
    images, labels = certify_report.examples(ctx.mnist.test, ctx.config.certify.num_examples)
    logits_fn = certify_report.base_classifier(ctx.apply_fn, ctx.params)
    c = ctx.config.certify
    parts = [
        smoothing.certify(
            logits_fn,
            images[start:stop],
            certify_report.batch_key(key, b),
            sigma=sigma,
            n0=c.n0,
            n=c.n,
            alpha=c.alpha,
            chunk_size=c.chunk_size,
        )
        for b, (start, stop) in enumerate(batches)
    ]
    return smoothing.Certificate(*(np.concatenate([p[f] for p in parts]) for f in range(3))), labels


@pytest.mark.parametrize("sigma", [(0.5,), (0.25, 1.0)], ids=["one sigma", "two sigmas vmapped"])
def test_the_evaluator_certifies_as_smoothing_certify_does_on_the_same_images_and_keys(config, mnist, sigma):
    tiny_certify(config, sigma=sigma, num_examples=8, batch=5)  # two batches, the second padded from 3 to 5
    ctx = context(config, mnist)
    entry = evaluators.certification(ctx)["certification"]
    key = jax.random.fold_in(ctx.eval_rng, len(ctx.sets) + 1)  # the certification's key
    for s in sigma:
        direct, labels = direct_certificates(ctx, key, s, [(0, 5), (5, 8)])
        got = entry["by_sigma"][str(s)]
        np.testing.assert_allclose(
            got["certified_accuracy"]["accuracy"], smoothing.certified_accuracy(direct, labels, RADII)
        )
        assert got["acr"] == pytest.approx(smoothing.average_certified_radius(direct, labels))
        assert got["abstention_rate"] == pytest.approx(np.mean(direct.prediction == smoothing.ABSTAIN))
    # An untrained model certifies little: the certificates themselves are compared too, bound by bound.
    images, _ = certify_report.examples(mnist.test, 8)
    raw = certify_report.run_certification(ctx.apply_fn, ctx.params, images, key, config.certify, 1)
    for i, s in enumerate(sigma):
        direct, _ = direct_certificates(ctx, key, s, [(0, 5), (5, 8)])
        np.testing.assert_array_equal(raw.prediction[0, i], direct.prediction)
        np.testing.assert_array_equal(raw.p_lower[0, i], direct.p_lower)
        assert len(set(direct.p_lower.tolist())) > 1 and np.any(direct.prediction != smoothing.ABSTAIN)


def test_certification_logs_its_progress_after_each_batch_naming_the_seed(config, mnist):
    tiny_certify(config, num_examples=8, batch=5)
    ctx, lines = context(config, mnist), []
    ctx = ctx._replace(log=lines.append)
    evaluators.certification(ctx)
    assert len(lines) == 2, lines  # two batches of 5 over 8 images
    assert lines[0].startswith(f"certification, seed {config.seed}: 5/8 images, ")
    assert lines[1].startswith(f"certification, seed {config.seed}: 8/8 images, ") and "about 0 s left" in lines[1]


@pytest.mark.parametrize("sigma", [(0.5,), (0.25, 0.5)])
def test_every_seed_shares_one_compiled_sampler_per_sample_count(config, mnist, sigma):
    tiny_certify(config, sigma=sigma, num_examples=8, batch=5)
    ctx, traces = context(config, mnist, num_seeds=3), []

    def counted_apply(params, images):
        traces.append(images.shape)
        return ctx.apply_fn(params, images)

    images, _ = certify_report.examples(mnist.test, 8)
    certificates = certify_report.run_certification(counted_apply, ctx.params, images, ctx.eval_rng, config.certify, 3)
    # n0 = 10 samples in one chunk and n = 40 in chunks of 20: two shapes, each traced once for all three seeds.
    assert sorted(traces) == [(5 * 10, 28, 28, 1), (5 * 20, 28, 28, 1)], traces
    assert not np.array_equal(certificates.p_lower[0], certificates.p_lower[1])  # each seed's own params and key


def test_the_base_classifier_clips_to_pixels_unless_training_left_its_noise_unclipped():
    apply_fn = lambda params, x: x.reshape(len(x), -1)[:, :2] * params
    logits = certify_report.base_classifier(apply_fn, 1.0)(jnp.full((1, 28, 28, 1), 3.0))
    np.testing.assert_array_equal(logits, [[1.0, 1.0]])
    unclipped = certify_report.base_classifier(apply_fn, 1.0, clip=False)(jnp.full((1, 28, 28, 1), 3.0))
    np.testing.assert_array_equal(unclipped, [[3.0, 3.0]])


def test_the_evaluator_certifies_the_unclipped_classifier_when_training_was_unclipped(config, mnist):
    tiny_certify(config, num_examples=8, batch=8)
    config.train.noise_clip = False
    ctx = context(config, mnist)
    entry = evaluators.certification(ctx)["certification"]
    assert entry["base_classifier"] == certify_report.BASE_CLASSIFIERS[False]
    key = jax.random.fold_in(ctx.eval_rng, len(ctx.sets) + 1)
    images, labels = certify_report.examples(mnist.test, 8)
    c = config.certify
    direct = smoothing.certify(
        certify_report.base_classifier(ctx.apply_fn, ctx.params, clip=False),
        images,
        certify_report.batch_key(key, 0),
        sigma=0.5,
        n0=c.n0,
        n=c.n,
        alpha=c.alpha,
        chunk_size=c.chunk_size,
    )
    assert entry["by_sigma"]["0.5"]["acr"] == pytest.approx(smoothing.average_certified_radius(direct, labels))


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("sigma", (0.0,), "numbers in (0, 10]"),
        ("sigma", (0.5, -1.0), "numbers in (0, 10]"),
        ("sigma", (), "non-empty"),
        ("n0", 0, "a positive integer"),
        ("n", -5, "a positive integer"),
        ("alpha", 0.0, "(0, 1)"),
        ("alpha", 1.0, "(0, 1)"),
        ("chunk_size", 30, "a batch the sample count cannot fill"),
        ("chunk_size", 0, "a positive integer"),
        ("num_examples", 0, "a positive integer"),
        ("batch", 0, "a positive integer"),
        ("split", "tset", "one of"),
        ("radii", (-1.0,), "non-negative"),
    ],
)
def test_a_bad_certify_value_is_one_error_naming_the_field(field, value, expected):
    config = default.get_config()
    config.certify[field] = value
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config)
    assert f"config.certify.{field}" in str(info.value) and expected in str(info.value)


def test_a_chunk_larger_than_n0_draws_the_selection_in_one_pass():
    config = default.get_config()
    config.certify.n0, config.certify.n, config.certify.chunk_size = 10, 100, 50
    validation.validate(config)
    config.certify.n = 120
    with pytest.raises(validation.ConfigError, match=r"config\.certify\.n=120"):
        validation.validate(config)


def summary_entry():
    return {
        "split": "test",
        "sigma": [0.25, 0.5],
        "n0": 10,
        "n": 40,
        "alpha": 0.001,
        "num_examples": 8,
        "radii": [0.0, 1.25, 2.5],
        "by_sigma": {
            str(s): {
                "certified_accuracy": {"accuracy": [0.75, 0.5, 0.0], "accuracy_std": [0.0, 0.0, 0.0]},
                "acr": 0.625,
                "abstention_rate": 0.125,
            }
            for s in (0.25, 0.5)
        },
    }


def test_the_printed_table_names_the_radii_the_image_count_the_acr_and_the_abstentions():
    table = report.certification_table(summary_entry())
    header, _, first, second = table.splitlines()
    assert all(f"r = {r}" in header for r in ("0", "1.25", "2.5")) and "ACR" in header and "abstained" in header
    assert first.startswith("| 0.25 | 8 | 0.7500 | 0.5000 | 0.0000 | 0.625 | 0.1250 |")
    assert second.startswith("| 0.5 | 8 |")


def test_the_figure_is_written(tmp_path):
    path = tmp_path / "certification.png"
    report.plot_certification(summary_entry(), str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_figure_marks_the_largest_radius_each_sigmas_samples_can_certify(tmp_path, monkeypatch):
    import matplotlib.axes

    lines, labels = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda ax, x, **style: lines.append(x))
    original_legend = matplotlib.axes.Axes.legend
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "legend",
        lambda ax, *a, **kw: labels.extend(ax.get_legend_handles_labels()[1]) or original_legend(ax, *a, **kw),
    )
    entry = summary_entry()  # n = 40 at alpha 0.001: p_lower <= 0.841, so radii up to 1.0 sigma, both on the grid
    entry["radii"] = [0.0, 0.3, 0.6]
    report.plot_certification(entry, str(tmp_path / "certification.png"))
    assert lines == pytest.approx([smoothing.largest_radius(s, 40, 0.001) for s in (0.25, 0.5)])
    assert "largest radius at n = 40" in labels
    lines.clear(), labels.clear()
    entry["radii"] = [0.0, 0.1, 0.2]  # both limits past the grid: no line, and no legend entry about lines
    report.plot_certification(entry, str(tmp_path / "certification.png"))
    assert lines == [] and not any("largest radius" in label for label in labels) and labels


def spy_objective():
    """The Gaussian objective on a model whose logits are its input: the logits are the noisy images."""
    train_config = default.experiment("bp", "gaussian").train
    spy = lambda variables, images, train, rngs: images.reshape(len(images), -1)
    return jax.jit(objectives.make_objective(spy, train_config)), train_config.sigma


def test_gaussian_training_draws_fresh_noise_for_every_step_and_every_example():
    objective, sigma = spy_objective()
    image = jnp.full((1, 28, 28, 1), 0.5)
    images, labels, rng = jnp.concatenate([image, image]), jnp.array([0, 1]), jax.random.key(0)
    # train.make_epoch gives step s the key fold_in(rng, s).
    step_noise = [np.asarray(objective({}, images, labels, jax.random.fold_in(rng, s))[1]) - 0.5 for s in (0, 1)]
    assert not np.allclose(step_noise[0], step_noise[1])  # two steps, the same images: other noise
    assert not np.allclose(step_noise[0][0], step_noise[0][1])  # two copies of one image in a batch: other noise
    assert 0.8 * sigma < step_noise[0].std() < 1.2 * sigma  # about sigma: at 0.5 +- 0.3, clipping is rare


@pytest.mark.parametrize("module", [cnn_smooth, bp_smooth], ids=["cnn_smooth", "bp_smooth"])
@pytest.mark.parametrize("arg", [None, "0.25", "0.5", "1.0"])
def test_the_smoothing_configs_train_and_certify_at_one_sigma_and_build(module, arg):
    config = module.get_config(arg) if arg else module.get_config()
    validation.validate(config)
    sigma = float(arg or "0.25")
    assert config.train.mode == "gaussian" and config.train.epochs == 5
    assert config.train.sigma == sigma and tuple(config.certify.sigma) == (sigma,) and config.certify.enabled
    assert config.train.noise_clip is False  # Cohen et al.'s unclipped noise, in training and certification alike
    assert config.train.learning_rate == (
        1e-3 if config.model.name == "cnn" else default.get_config().train.learning_rate
    )
    assert config.model.name == module.__name__.split(".")[-1].split("_")[0]
    objectives.make_objective(models.build_model(config.model).apply, config.train)


@pytest.mark.parametrize("arg", ["abc", "0", "-0.5"])
def test_a_smoothing_config_refuses_a_sigma_that_is_no_positive_number(arg):
    with pytest.raises(ValueError, match="configs/cnn_smooth.py") as info:
        cnn_smooth.get_config(arg)
    assert repr(arg) in str(info.value)


@pytest.mark.parametrize("module", [cnn_smooth, bp_smooth], ids=["cnn_smooth", "bp_smooth"])
@pytest.mark.parametrize("sigma, lam", [("0.25", 10.0), ("0.5", 5.0), ("1.0", 5.0), ("0.3", 10.0)])
def test_a_smoothing_config_trains_with_consistency_after_the_sigma_at_their_mnist_settings(module, sigma, lam):
    config = module.get_config(f"{sigma},consistency")
    validation.validate(config)
    assert config.train.mode == "consistency" and config.train.sigma == float(sigma)
    assert tuple(config.certify.sigma) == (float(sigma),) and config.certify.enabled
    # Jeong & Shin's MNIST runs: m = 2, eta = 0.5, lambda 10 at 0.25 and 5 at 0.5 and 1.0 (the default elsewhere).
    t = config.train
    assert (t.consistency_copies, t.consistency_lambda, t.consistency_eta) == (2, lam, 0.5)
    objectives.make_objective(models.build_model(config.model).apply, config.train)
    # Everything else is the Gaussian config's, and ',gaussian' is the plain sigma's config.
    plain = module.get_config(sigma)
    assert module.get_config(f"{sigma},gaussian").to_dict() == plain.to_dict()
    t.mode, t.consistency_lambda = "gaussian", default.get_config().train.consistency_lambda
    assert config.to_dict() == plain.to_dict()


def test_a_smoothing_config_without_a_sigma_before_the_comma_takes_the_default_sigma():
    config = bp_smooth.get_config(",consistency")
    assert config.train.mode == "consistency" and config.train.sigma == 0.25 and config.train.consistency_lambda == 10


@pytest.mark.parametrize("arg", ["0.5,madry", "0.5,", "0.5,consistency,2", "0.5,Consistency"])
def test_a_smoothing_config_refuses_another_mode_naming_the_choices(arg):
    with pytest.raises(ValueError, match="configs/bp_smooth.py") as info:
        bp_smooth.get_config(arg)
    message = str(info.value)
    assert (
        repr(arg) in message
        and str(default.SMOOTHING_MODES) in message
        and "configs/bp_smooth.py:0.5,consistency" in message
    )


def test_a_bad_sigma_before_the_mode_is_refused_as_a_bad_sigma():
    with pytest.raises(ValueError, match="sigma in \\(0, 10\\]") as info:
        cnn_smooth.get_config("abc,consistency")
    assert repr("abc,consistency") in str(info.value)


@pytest.mark.slow  # trains
def test_a_consistency_run_trains_and_certifies(tmp_path, synthetic_mnist_dir):
    config = tiny_certify(synthetic_config(synthetic_mnist_dir, mode="consistency"), sigma=(0.5,))
    config.model.hidden = (32,)
    config.train.epochs, config.train.sigma = 2, 0.5
    summary = run_experiment(config, tmp_path)
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and all(np.isfinite(e["train_loss"]) for e in epochs)
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    # Learnable synthetic digits, chance 0.1: Gaussian training reaches 1.0 here and lambda = 10 holds it back
    # early (0.315 after these two epochs; 0.635 after four).
    assert epochs[1]["validation_accuracy"] > 0.2
    assert summary["certification"]["num_examples"] == 8 and summary["config"]["train"]["mode"] == "consistency"


def test_an_older_run_without_the_certify_section_is_still_the_same_config(tmp_path):
    config = small_config()
    older = workdir_lib.config_as_json(config)
    del older["certify"]
    workdir_lib.write_summary(str(tmp_path), {"config": older})
    assert workdir_lib.read_finished_summary(str(tmp_path), config) is not None
    certification = next(e for e in evaluators.EVALUATORS if e.run is evaluators.certification)
    assert evaluators.reusable(certification, config, {"config": older, "certification": {}})
    config.certify.enabled = True  # a certification an older run never had: it must run
    assert workdir_lib.read_finished_summary(str(tmp_path), config) is None
    assert not evaluators.reusable(certification, config, {"config": older, "certification": {}})


def test_a_paper_config_gains_no_certify_section():
    assert "certify" not in workdir_lib.with_added_fields({"runs": {}, "seed": 0})


@pytest.mark.slow  # trains
def test_a_run_puts_the_certification_in_the_summary_and_its_seconds_in_the_timings(tmp_path, synthetic_mnist_dir):
    config = tiny_certify(synthetic_config(synthetic_mnist_dir, mode="gaussian"))
    summary = run_experiment(config, tmp_path)
    assert "seconds" not in summary["certification"] and summary["certification"]["num_examples"] == 8
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["certification_seconds"]["samples"] == 8 * 50
