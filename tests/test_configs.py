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
