"""The shipped configs: the defense configs take the network after the colon, and the older names are the same
configs."""

import importlib

import pytest

from configs import default


@pytest.mark.parametrize("name", ["cnn_pgd", "cnn_fast", "cnn_trades"])
def test_defense_configs_are_madrys_network_at_eps_03_with_the_robustness_report(name):
    config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
    assert (config.model.name, config.model.dropout, config.train.eps, config.eval.eps) == ("cnn", 0.0, 0.3, 0.3)
    assert config.train.mode == name.split("_")[1] and config.robust.enabled


DEFENSES = ("pgd", "fast", "trades")
# The older names: one file per (network, defense), each now configs/<defense>.py:<network>.
OLD_NAMES = [(f"{model}_{defense}", defense, model) for defense in DEFENSES for model in ("cnn", "bp")]


def config_module(name: str):
    return importlib.import_module(f"configs.{name}")


@pytest.mark.parametrize("defense", DEFENSES)
def test_a_defense_config_takes_the_network_after_the_colon(defense):
    module = config_module(defense)
    on_bp = module.get_config("bp")
    assert on_bp.model.name == "bp" and on_bp.eval.sigma == 0.3
    on_cnn = module.get_config()
    assert on_cnn.model.name == "cnn"
    assert on_cnn.to_dict() == module.get_config("cnn").to_dict()
    assert on_bp.train.mode == on_cnn.train.mode == defense
    # Everything but the network (and the paper's sigma for it) is the same recipe.
    on_bp.model.name, on_bp.eval.sigma = on_cnn.model.name, on_cnn.eval.sigma
    assert on_bp.to_dict() == on_cnn.to_dict()


@pytest.mark.parametrize("defense", DEFENSES)
@pytest.mark.parametrize("argument", ["mlp", "CNN", "small_cnn"])
def test_a_defense_config_refuses_another_network_naming_the_choices(defense, argument):
    with pytest.raises(ValueError) as info:
        config_module(defense).get_config(argument)
    message = str(info.value)
    assert f"configs/{defense}.py" in message and repr(argument) in message
    assert str(default.DEFENSE_MODELS) in message and "'cnn'" in message and "'bp'" in message


@pytest.mark.parametrize("old, defense, model", OLD_NAMES, ids=[old for old, _, _ in OLD_NAMES])
def test_the_old_config_names_give_the_same_configs(old, defense, model):
    assert config_module(old).get_config().to_dict() == config_module(defense).get_config(model).to_dict()


def test_the_paper_certifies_its_noise_trained_runs_at_their_training_sigma_and_no_other():
    from advjax import validation
    from configs import paper

    config = paper.get_config()
    for name, run in config.runs.items():
        assert run.certify.enabled == (run.train.mode == "gaussian"), name
        if run.certify.enabled:
            assert tuple(run.certify.sigma) == (run.train.sigma,)
            assert max(run.certify.radii) <= 0.75  # past sigma * Phi^-1(alpha^(1/n)) every row is zero
            validation.validate(run)


@pytest.mark.parametrize("dataset", [None, "fashion_mnist"])
def test_the_paper_config_takes_its_dataset_after_the_colon_and_every_run_reads_it(dataset):
    from advjax import paper as paper_lib
    from configs import paper

    config = paper.get_config(dataset)
    assert config.data.name == (dataset or "mnist")
    assert {run.data.name for run in paper_lib.run_configs(config).values()} == {dataset or "mnist"}


def test_the_paper_config_refuses_an_unknown_dataset_naming_the_field():
    from advjax import paper as paper_lib
    from configs import paper

    with pytest.raises(ValueError, match="data.name"):
        paper_lib.validate(paper.get_config("fashoin_mnist"))


def test_cifar10_fast_is_wong_et_al_s_recipe_and_validates_and_builds():
    import jax

    from advjax import data, memory, models, train, validation
    from configs import cifar10_fast

    config = cifar10_fast.get_config()
    validation.validate(config)
    assert (config.data.name, config.model.name, config.train.mode) == ("cifar10", "preact_resnet18", "fast")
    assert config.train.eps == config.eval.eps == 8 / 255 and config.train.fast_step_size * config.train.eps == 10 / 255
    assert (config.train.epochs, config.train.batch_size, config.train.schedule) == (15, 128, "cyclic")
    assert config.train.cyclic_peak == 0.5  # their CIFAR-10 CyclicLR peaks halfway
    assert (config.train.optimizer, config.train.learning_rate, config.train.momentum) == ("sgd", 0.2, 0.9)
    assert (config.train.weight_decay, config.train.augment) == (5e-4, "crop_flip")
    assert config.eval.num_validation <= config.data.num_validation == 5000
    robust = config.robust
    assert (robust.pgd_steps, robust.pgd_restarts, robust.pgd_step_size) == (50, 10, 2 / 255)
    assert (robust.num_examples, robust.split, tuple(robust.eps_grid)) == (1000, "test", (8 / 255,))
    info = data.dataset_info(config.data)
    model = models.build_model(config.model, info)
    assert (tuple(model.image_shape), model.num_classes, model.width) == ((32, 32, 3), 10, 64)
    state = jax.eval_shape(lambda: train.create_states(jax.random.key(0), model, config.train, 351, 1))
    assert isinstance(state, train.BatchNormState) and "batch_stats" not in state.params
    assert memory.parameter_count(config.model, info) == 11_172_170


@pytest.mark.parametrize("argument, steps", [(None, 10), ("2", 2)])
def test_small_cnn_pgd_is_small_cnn_fast_with_pgd_of_the_steps_after_the_colon(argument, steps):
    from configs import small_cnn_fast, small_cnn_pgd

    config = small_cnn_pgd.get_config(argument)
    assert (config.train.mode, config.train.attack_steps) == ("pgd", steps)
    assert config.train.attack_step_size == pytest.approx(2.5 * 0.3 / steps)
    fast = small_cnn_fast.get_config()
    fast.train.mode, fast.train.attack_steps = "pgd", steps
    fast.train.attack_step_size = config.train.attack_step_size
    assert config.to_dict() == fast.to_dict()


@pytest.mark.parametrize("argument", ["0", "-1", "two", "2.5"])
def test_small_cnn_pgd_refuses_steps_that_are_not_a_positive_integer(argument):
    from configs import small_cnn_pgd

    with pytest.raises(ValueError, match=r"configs/small_cnn_pgd\.py.*positive integer.*" + repr(argument)):
        small_cnn_pgd.get_config(argument)
