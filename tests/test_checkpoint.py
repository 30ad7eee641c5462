"""Per-epoch orbax checkpoints, resuming from them, and restoring a model for use in a notebook."""

import errno
import logging
import os
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from advjax import checkpoint, evaluators, models, overfitting, seeds, train, workdir
from tests.helpers import ScriptedCheck, run_experiment, synthetic_config, tiny_config

# Reading a damaged checkpoint, orbax leaves asyncio callbacks behind that
# complain ("Event loop is closed") whenever they run, often in a later test.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.usefixtures("quick_compile_module"),
]


def fresh_state(config, seed: int = 0) -> train.TrainState:
    model = models.build_model(config.model)
    return train.create_train_state(jax.random.key(seed), model, config.train, steps_per_epoch=10)


def save_epochs(run_dir, config, states: list, keep: int = 2) -> None:
    """Checkpoints states[i] as epoch i + 1, with one dummy metrics record per epoch."""
    workdir.save_config(str(run_dir), config)
    with checkpoint.open_manager(str(run_dir), keep=keep) as manager:
        for epoch, state in enumerate(states, 1):
            checkpoint.save_epoch(manager, epoch, state, config, [{"epoch": e} for e in range(1, epoch + 1)])


def later(state: train.TrainState, steps: int) -> train.TrainState:
    return state.replace(step=state.step + steps, params=jax.tree.map(lambda p: p + float(steps), state.params))


@pytest.mark.parametrize("model_name", ["bp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_restore_returns_config_params_and_a_jittable_eval_apply(tmp_path, model_name):
    config = tiny_config(model_name)
    model = models.build_model(config.model)
    state = fresh_state(config, seed=3)
    save_epochs(tmp_path, config, [state])

    restored = checkpoint.restore(str(tmp_path))

    assert restored.config.model.name == model_name
    chex.assert_trees_all_equal(restored.params, state.params)
    images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    logits = jax.jit(restored.apply_fn)(restored.params, images)
    chex.assert_shape(logits, (4, 10))
    # Eval mode: dropout off, so the result is the deterministic apply.
    expected = model.apply({"params": state.params}, images, train=False)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_restore_of_a_directory_without_a_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.restore(str(tmp_path))


def test_restore_without_checkpoint_says_so(tmp_path):
    workdir.save_config(str(tmp_path), tiny_config())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(str(tmp_path))


def test_only_the_latest_epochs_are_kept_and_restore_takes_the_last(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    save_epochs(tmp_path, config, [state, later(state, 5), later(state, 10)], keep=2)

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    chex.assert_trees_all_close(
        checkpoint.restore(str(tmp_path)).params, jax.tree.map(jnp.asarray, later(state, 10).params)
    )
    # An earlier kept epoch on request; one not kept is refused, naming those kept.
    chex.assert_trees_all_close(
        checkpoint.restore(str(tmp_path), epoch=2).params, jax.tree.map(jnp.asarray, later(state, 5).params)
    )
    with pytest.raises(FileNotFoundError, match=r"epoch 1 .*kept: \[2, 3\]"):
        checkpoint.restore(str(tmp_path), epoch=1)


def test_restore_latest_gives_state_step_optimizer_and_records(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    stepped = later(state, 7)
    save_epochs(tmp_path, config, [state, stepped])

    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        resumed = checkpoint.restore_latest(manager, fresh_state(config, seed=9), config, log=lambda m: None)

    assert resumed.epoch == 2 and resumed.records == [{"epoch": 1}, {"epoch": 2}]
    assert int(resumed.state.step) == 7
    chex.assert_trees_all_equal(resumed.state.params, stepped.params)
    chex.assert_trees_all_equal(resumed.state.opt_state, stepped.opt_state)


def test_restore_latest_of_an_empty_workdir_is_none(tmp_path):
    config = tiny_config()
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        assert checkpoint.restore_latest(manager, fresh_state(config), config, log=lambda m: None) is None


def test_a_checkpoint_of_another_config_is_refused_naming_the_field(tmp_path):
    config = tiny_config()
    save_epochs(tmp_path, config, [fresh_state(config)])
    other = tiny_config()
    other.train.learning_rate = 0.5
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        with pytest.raises(workdir.WorkdirError, match="config.train.learning_rate: 0.002 there, 0.5 now"):
            checkpoint.restore_latest(manager, fresh_state(other), other, log=lambda m: None)


def damage(epoch_dir) -> None:
    """Truncates every array data file of a checkpoint to nothing."""
    for path in (epoch_dir / checkpoint.STATE_ITEM).rglob("*"):
        if path.is_file() and "ocdbt" in str(path.relative_to(epoch_dir)) and path.stat().st_size:
            path.write_bytes(b"")


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    save_epochs(tmp_path, config, [state, later(state, 5)])
    damage(tmp_path / "checkpoints" / "2")
    messages = []

    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        resumed = checkpoint.restore_latest(manager, fresh_state(config), config, log=messages.append)

    assert resumed.epoch == 1
    chex.assert_trees_all_equal(resumed.state.params, state.params)
    assert any("epoch 2 cannot be restored" in m for m in messages)
    # Deleted, so that epoch 2 can be trained and saved again.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_when_every_checkpoint_is_damaged_the_run_is_refused(tmp_path):
    config = tiny_config()
    save_epochs(tmp_path, config, [fresh_state(config)])
    damage(tmp_path / "checkpoints" / "1")
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        with pytest.raises(workdir.WorkdirError, match="--overwrite"):
            checkpoint.restore_latest(manager, fresh_state(config), config, log=lambda m: None)


# ----------------------------------------------------------------------------
# advjax.restore of whole runs: which epochs it loads.


@pytest.mark.slow  # a two-seed run of four epochs
def test_restore_of_a_keep_best_run_loads_each_seeds_evaluated_epoch(tmp_path, synthetic_mnist_dir, monkeypatch):
    config = synthetic_config(synthetic_mnist_dir, "bp", "fast")
    config.train.epochs, config.num_seeds, config.train.max_examples = 4, 2, 256
    config.train.keep_best, config.train.checkpoints_to_keep = True, 1
    config.model.hidden = (16,)
    config.eval.num_train = config.eval.num_validation = config.eval.num_test = 100
    # Seed 0 is best at epoch 2, seed 1 at epoch 4 (the latest of a tie with epoch 3).
    monkeypatch.setattr(
        overfitting, "make_configured_check", ScriptedCheck([[0.5, 0.1], [0.9, 0.2], [0.2, 0.3], [0.1, 0.3]])
    )
    evaluated = {}
    original = evaluators.evaluate_trained

    def capture(config, apply_fn, params, mnist, *args, **kwargs):
        evaluated["params"] = params
        return original(config, apply_fn, params, mnist, *args, **kwargs)

    monkeypatch.setattr(evaluators, "evaluate_trained", capture)
    summary = run_experiment(config, tmp_path)
    assert summary["evaluated_epochs"] == [2, 4]

    restored = checkpoint.restore(str(tmp_path))
    assert restored.epochs == [2, 4]
    chex.assert_trees_all_equal(restored.params, evaluated["params"])  # what the summary reports on
    at_2, at_4 = checkpoint.restore(str(tmp_path), epoch=2), checkpoint.restore(str(tmp_path), epoch=4)
    assert at_2.epochs == [2, 2] and at_4.epochs == [4, 4]
    seed = lambda tree, s: jax.tree.map(lambda leaf: leaf[s], tree)
    chex.assert_trees_all_equal(seed(restored.params, 0), seed(at_2.params, 0))
    chex.assert_trees_all_equal(seed(restored.params, 1), seed(at_4.params, 1))
    # The epochs differ, so loading the wrong one would show.
    assert not np.array_equal(at_2.params["Dense_0"]["kernel"][0], at_4.params["Dense_0"]["kernel"][0])


@pytest.mark.slow  # a whole run; test_restore_loads_the_epochs_summary_json_says_were_evaluated covers the rule
def test_restore_of_a_finished_run_without_keep_best_loads_the_last_epoch(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.train.epochs = 2
    summary = run_experiment(config, tmp_path)
    assert summary["evaluated_epochs"] is None

    restored = checkpoint.restore(str(tmp_path))
    assert restored.epochs == [2]
    chex.assert_trees_all_equal(restored.params, checkpoint.restore(str(tmp_path), epoch=2).params)
    first = checkpoint.restore(str(tmp_path), epoch=1)
    assert first.epochs == [1]
    assert not np.array_equal(first.params["Dense_0"]["kernel"], restored.params["Dense_0"]["kernel"])


def test_restore_loads_the_epochs_summary_json_says_were_evaluated(tmp_path):
    config = tiny_config()
    config.num_seeds, config.model.hidden = 2, (16,)
    model = models.build_model(config.model)
    state = train.create_states(seeds.seed_keys(0, 2)[0], model, config.train, 10, 2)
    states = [later(state, 5 * e) for e in range(3)]  # epochs 1, 2, 3 with params +0, +5, +10
    save_epochs(tmp_path, config, states, keep=3)
    workdir.write_summary(str(tmp_path), {"evaluated_epochs": [3, 2]})  # as train.keep_best writes it

    restored = checkpoint.restore(str(tmp_path))

    assert restored.epochs == [3, 2]
    seed = lambda tree, s: jax.tree.map(lambda leaf: np.asarray(leaf)[s], tree)
    chex.assert_trees_all_close(seed(restored.params, 0), seed(states[2].params, 0))
    chex.assert_trees_all_close(seed(restored.params, 1), seed(states[1].params, 1))
    every = checkpoint.restore(str(tmp_path), epoch=1)
    assert every.epochs == [1, 1]
    chex.assert_trees_all_close(every.params, jax.tree.map(np.asarray, states[0].params))
    workdir.write_summary(str(tmp_path), {"evaluated_epochs": None})  # no keep_best: the last epoch
    assert checkpoint.restore(str(tmp_path)).epochs == [3, 3]
    workdir.write_summary(str(tmp_path), {"evaluated_epochs": [3]})  # one epoch for two seeds: refused
    with pytest.raises(workdir.WorkdirError, match="1 evaluated epochs for 2 seeds"):
        checkpoint.restore(str(tmp_path))


def test_restore_prints_no_read_only_warnings(tmp_path, caplog, capfd):
    config = tiny_config()
    save_epochs(tmp_path, config, [fresh_state(config)])
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="absl"):
        checkpoint.restore(str(tmp_path))
        checkpoint.restore(str(tmp_path), epoch=1)
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert "read_only=True" not in text and "read only" not in text, text


# ----------------------------------------------------------------------------
# Verified checkpoints: a digest of the state in the run item, checked on every restore.


def plain_orbax_params(run_dir, epoch: int, target) -> dict:
    """The params of a checkpoint as orbax alone restores them: no digest, no check."""
    with checkpoint.open_manager(str(run_dir)) as manager:
        args = ocp.args.Composite(**{checkpoint.STATE_ITEM: ocp.args.StandardRestore(target)})
        return manager.restore(epoch, args=args)[checkpoint.STATE_ITEM].params


def same_tree(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def flip_a_byte_silently(run_dir, epoch: int, target, saved_params) -> None:
    """Flips one bit of one of the largest files of the epoch's `state`, from its middle outwards, where orbax
    still restores the checkpoint but with params unlike the saved ones: the silent corruption only a digest sees.

    Tensorstore packs the arrays into files differently from save to save, so the middle of the largest
    file may hold the optimizer state, and a few positions are tried."""
    state_dir = run_dir / "checkpoints" / str(epoch) / checkpoint.STATE_ITEM
    files = [pathlib.Path(root, name) for root, _, names in os.walk(state_dir) for name in names]
    for path in sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:3]:
        original = path.read_bytes()
        for fraction in (0.5, 0.3, 0.7, 0.1, 0.9, 0.2, 0.4, 0.6, 0.8):
            damaged = bytearray(original)
            damaged[int(len(original) * fraction)] ^= 0x10
            path.write_bytes(bytes(damaged))
            try:
                params = plain_orbax_params(run_dir, epoch, target)
            except Exception:  # this byte breaks decoding: orbax would notice it without the digest
                continue
            if not same_tree(params, saved_params):
                return
        path.write_bytes(original)
    pytest.fail(f"no byte of the largest files under {state_dir} changes the params silently")


def save_without_digest(run_dir, config, states: list) -> None:
    """Checkpoints as advjax did before it recorded digests: the run item has no state_sha256."""
    workdir.save_config(str(run_dir), config)
    with checkpoint.open_manager(str(run_dir), keep=3) as manager:
        for epoch, state in enumerate(states, 1):
            run = {"epoch": epoch, "config": workdir.config_as_json(config), "records": [{"epoch": 1}] * epoch}
            items = {checkpoint.STATE_ITEM: ocp.args.StandardSave(state), checkpoint.RUN_ITEM: ocp.args.JsonSave(run)}
            manager.save(epoch, args=ocp.args.Composite(**items))
            manager.wait_until_finished()


def test_the_run_item_holds_the_state_digest_and_the_data_identity(tmp_path):
    config = tiny_config()
    state = later(fresh_state(config), 3)
    identity = {"source": "idx", "sha256": {"train-images": "ab12"}}
    workdir.save_config(str(tmp_path), config)
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        checkpoint.save_epoch(manager, 1, state, config, [{"epoch": 1}])
        checkpoint.save_epoch(manager, 2, state, config, [{"epoch": 1}, {"epoch": 2}], data_identity=identity)

    run = checkpoint.newest_run_item(str(tmp_path))

    assert run["epoch"] == 2 and run["records"] == [{"epoch": 1}, {"epoch": 2}]
    assert run["config"] == workdir.config_as_json(config)
    assert run["data"] == identity
    assert run["state_sha256"] == checkpoint.state_digest(state)
    # The digest sees every part of the state: params, optimizer state and step.
    assert checkpoint.state_digest(later(state, 0)) == run["state_sha256"]
    assert checkpoint.state_digest(state.replace(step=state.step + 1)) != run["state_sha256"]
    adam, *rest = state.opt_state
    moved = adam._replace(mu=jax.tree.map(lambda x: x + 1.0, adam.mu))
    assert checkpoint.state_digest(state.replace(opt_state=(moved, *rest))) != run["state_sha256"]


def test_newest_run_item_is_none_without_checkpoints_and_skips_a_damaged_one(tmp_path):
    assert checkpoint.newest_run_item(str(tmp_path)) is None
    with checkpoint.open_manager(str(tmp_path), keep=2):
        pass  # creates an empty checkpoints/
    assert checkpoint.newest_run_item(str(tmp_path)) is None

    config = tiny_config()
    save_epochs(tmp_path, config, [fresh_state(config)] * 2)
    for path in (tmp_path / "checkpoints" / "2" / checkpoint.RUN_ITEM).iterdir():
        path.write_bytes(b"{not json")
    assert checkpoint.newest_run_item(str(tmp_path))["epoch"] == 1


def test_a_silently_flipped_byte_is_found_and_the_epoch_before_restored(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    save_epochs(tmp_path, config, [state, later(state, 5)])
    flip_a_byte_silently(tmp_path, 2, fresh_state(config), later(state, 5).params)
    messages = []

    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        resumed = checkpoint.restore_latest(manager, fresh_state(config), config, log=messages.append)

    assert resumed.epoch == 1
    chex.assert_trees_all_equal(resumed.state.params, state.params)
    assert any("epoch 2 cannot be restored" in m and "digest does not match" in m for m in messages), messages
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_restore_of_a_silently_damaged_epoch_is_one_workdir_error_naming_it(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    save_epochs(tmp_path, config, [state, later(state, 5)])
    flip_a_byte_silently(tmp_path, 2, fresh_state(config), later(state, 5).params)

    with pytest.raises(workdir.WorkdirError) as info:
        checkpoint.restore(str(tmp_path))
    message = str(info.value)
    assert f"{tmp_path / 'checkpoints' / '2'}" in message and "digest does not match" in message
    assert "\n" not in message
    chex.assert_trees_all_equal(checkpoint.restore(str(tmp_path), epoch=1).params, state.params)


def test_a_checkpoint_of_non_finite_params_is_damaged(tmp_path):
    config = tiny_config()
    state = fresh_state(config)
    poisoned = state.replace(params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params))
    save_epochs(tmp_path, config, [state, poisoned])  # its digest matches: only the params are wrong
    messages = []

    with pytest.raises(workdir.WorkdirError, match=r"checkpoints/2 holds non-finite params"):
        checkpoint.restore(str(tmp_path))
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        resumed = checkpoint.restore_latest(manager, fresh_state(config), config, log=messages.append)

    assert resumed.epoch == 1
    assert any("epoch 2 cannot be restored" in m and "non-finite" in m for m in messages), messages


def test_a_checkpoint_from_before_digests_is_accepted_with_a_warning(tmp_path, caplog):
    config = tiny_config()
    state = fresh_state(config)
    save_without_digest(tmp_path, config, [state, later(state, 5)])
    messages = []

    with checkpoint.open_manager(str(tmp_path), keep=3) as manager:
        resumed = checkpoint.restore_latest(manager, fresh_state(config), config, log=messages.append)
    assert resumed.epoch == 2
    chex.assert_trees_all_equal(resumed.state.params, later(state, 5).params)
    unverified = [m for m in messages if "cannot be verified" in m]
    assert len(unverified) == 1 and "checkpoints/2" in unverified[0], messages


def test_restore_warns_through_logging_of_a_checkpoint_without_digest(tmp_path, caplog):
    config = tiny_config()
    state = fresh_state(config)
    save_without_digest(tmp_path, config, [state])
    with caplog.at_level(logging.WARNING):
        chex.assert_trees_all_equal(checkpoint.restore(str(tmp_path)).params, state.params)
    assert sum("cannot be verified" in m for m in caplog.messages) == 1, caplog.messages


@pytest.mark.slow  # two whole runs
def test_a_silently_damaged_run_warns_falls_back_and_relaunches_to_the_same_summary(tmp_path, synthetic_mnist_dir):
    config = synthetic_config(synthetic_mnist_dir)
    config.train.epochs = 2
    run_dir = tmp_path / "run"
    run_experiment(config, run_dir)
    summary = (run_dir / "summary.json").read_bytes()
    model = models.build_model(config.model)
    template = lambda: train.create_states(seeds.seed_keys(config.seed, 1)[0], model, config.train, 1, 1)
    flip_a_byte_silently(run_dir, 2, jax.eval_shape(template), checkpoint.restore(str(run_dir)).params)

    # (c) A notebook's restore refuses the damaged epoch, naming it.
    with pytest.raises(workdir.WorkdirError, match=rf"digest does not match .*{run_dir / 'checkpoints' / '2'}"):
        checkpoint.restore(str(run_dir))
    # (a) On a copy (restore_latest deletes what it skips): a warning, and the epoch before.
    shutil.copytree(run_dir, tmp_path / "copy")
    messages = []
    with checkpoint.open_manager(str(tmp_path / "copy"), keep=2) as manager:
        resumed = checkpoint.restore_latest(manager, template(), config, log=messages.append)
    assert resumed.epoch == 1
    assert any("epoch 2 cannot be restored" in m and "digest does not match" in m for m in messages), messages
    # (b) A relaunch resumes after epoch 1, retrains epoch 2 and ends where the undamaged run did.
    messages = []
    run_experiment(config, run_dir, log=messages.append)
    assert any("digest does not match" in m for m in messages) and any("resumed after epoch 1/2" in m for m in messages)
    assert (run_dir / "summary.json").read_bytes() == summary


# ----------------------------------------------------------------------------
# advjax.restore checks config.json against the checkpoint, and says what a paper run's directory is.


def test_restore_refuses_a_checkpoint_that_config_json_does_not_describe(tmp_path):
    config = tiny_config()
    save_epochs(tmp_path, config, [fresh_state(config)])
    workdir.save_config(str(tmp_path), tiny_config("cnn"))  # config.json replaced after training

    with pytest.raises(workdir.WorkdirError) as info:
        checkpoint.restore(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{tmp_path}/config.json and the checkpoint {tmp_path / 'checkpoints' / '1'} disagree")
    assert 'config.model.name: "bp" there, "cnn" now' in message and "\n" not in message


@pytest.mark.slow  # compiles a whole attack or run: in the full tier
def test_restore_of_a_tree_unlike_the_model_is_one_workdir_error(tmp_path):
    config = tiny_config()
    workdir.save_config(str(tmp_path), config)
    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:  # a CNN's state recorded as a BP's
        checkpoint.save_epoch(manager, 1, fresh_state(tiny_config("cnn")), config, [{"epoch": 1}])

    with pytest.raises(workdir.WorkdirError) as info:
        checkpoint.restore(str(tmp_path))
    message = str(info.value)
    assert f"the checkpoint {tmp_path / 'checkpoints' / '1'} cannot be restored" in message
    assert "bp model" in message and "Structure mismatch" not in message and "\n" not in message


def test_restore_of_a_paper_runs_directory_lists_its_runs(tmp_path):
    for name in ("cnn", "bp_adv", "bp"):
        (tmp_path / name).mkdir()
        workdir.save_config(str(tmp_path / name), tiny_config())
    (tmp_path / "figures").mkdir()

    with pytest.raises(FileNotFoundError) as info:
        checkpoint.restore(str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path} is a paper run's directory; restore one of its runs: "
        f"{tmp_path / 'bp'}, {tmp_path / 'bp_adv'}, {tmp_path / 'cnn'}"
    )


# ----------------------------------------------------------------------------
# A full disk while saving.


def no_space(kind: str) -> Exception:
    """A failed write as orbax may raise it: the OSError chained, or only its message wrapped in another error."""
    if kind == "message":
        return ValueError('DATA_LOSS: Error writing local file "/x/d/1f2e": [OS error 28: No space left on device]')
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
        try:
            raise RuntimeError("async save failed") from e
        except RuntimeError as wrapped:
            return wrapped


@pytest.mark.parametrize("method", ["save", "wait_until_finished"])
@pytest.mark.parametrize("kind", ["chained", "message"])
def test_a_full_disk_while_saving_is_one_oserror_line(tmp_path, monkeypatch, method, kind):
    config = tiny_config()
    error = no_space(kind)

    def fail(*args, **kwargs):
        raise error

    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        monkeypatch.setattr(manager, method, fail)
        with pytest.raises(OSError) as info:
            checkpoint.save_epoch(manager, 3, fresh_state(config), config, [{"epoch": e} for e in (1, 2, 3)])
        monkeypatch.undo()

    where = tmp_path / "checkpoints" / "3"
    assert str(info.value) == f"cannot write the checkpoint of epoch 3 to {where}: No space left on device"
    assert info.value.__cause__ is error


def test_a_save_failing_for_another_reason_is_not_called_a_full_disk(tmp_path, monkeypatch):
    config = tiny_config()

    def fail(*args, **kwargs):
        raise TypeError("a bug")

    with checkpoint.open_manager(str(tmp_path), keep=2) as manager:
        monkeypatch.setattr(manager, "save", fail)
        with pytest.raises(TypeError, match="a bug"):
            checkpoint.save_epoch(manager, 1, fresh_state(config), config, [{"epoch": 1}])
        monkeypatch.undo()
