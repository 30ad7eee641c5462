"""AutoAttack (Croce & Hein, ICML 2020): a cascade of attacks, each on the points still robust, and the worst case.

The standard version, L-inf: APGD-CE; APGD-T (targeted DLR, the 9 most likely
other classes); FAB-T (9 targets); Square (5000 queries). The "plus" version,
as the reference's `set_version`: APGD-CE and APGD-DLR from 5 random starts
each, untargeted FAB from 5 starts (the clean image, then random ones),
Square, then APGD-T and FAB-T. The "rand" version, for a randomised model
(`logits_fn(images, key)`, advjax.eot): APGD-CE and APGD-DLR, one start each,
every gradient averaged over 20 draws (EoT), each verdict one fresh draw per
example, as the reference's. An example counts as robust only while every
attack so far has left it correctly classified, and the adversarial image kept
for it is the first that fooled the model.

Static shapes meet the shrinking robust set by compaction between attacks: the
examples still robust are gathered, padded up to a sixteenth of their power of
two (so each attack compiles for a handful of sizes and wastes at most a
sixteenth on padding), attacked, and scattered back.
`compact=False` masks instead: every attack runs on every example, and the
whole cascade is one traceable function.

AutoAttack's own warnings (its `flags_doc.md`) are returned as `flags`: outputs
that look like probabilities, a randomised model (two calls on the same images
disagree, as the reference checks), examples with a zero input gradient, and
Square lowering the accuracy after the white-box attacks (a sign of gradient
masking). A pure JAX `logits_fn` never trips the randomness check; one that
draws from state of its own between calls does.

The attacks that differ only in their target (APGD-T's and FAB-T's nine ranks)
share one compiled fold: the rank is a traced argument of `init`, and steps
read the targets from the state (`compiled_family`).
"""

import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advjax import apgd, attacks, eot, fab, iterative, loops, square
from advjax.losses import LogitsFn

# Each version's attacks in cascade order, as the reference's set_version gives them.
VERSION_ATTACKS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
VERSIONS: tuple[str, ...] = tuple(VERSION_ATTACKS)
RANDOMISED_VERSIONS: tuple[str, ...] = ("rand",)  # their logits_fn takes (images, key)
DETERMINISTIC_VERSIONS: tuple[str, ...] = tuple(v for v in VERSIONS if v not in RANDOMISED_VERSIONS)
EOT_SAMPLES = 20  # the rand version's draws per gradient (the reference's eot_iter)
VERDICT_STREAM = 1 << 20  # folded into the key for a randomised model's verdict draws, apart from the attacks' keys
FLAGS_DRAW = 1 << 16  # the verdict stream's draw for the flags' checks, past any cascade's verdicts
STANDARD_ATTACKS: tuple[str, ...] = VERSION_ATTACKS["standard"]
PLUS_RESTARTS = 5  # the plus version's starts of APGD-CE, APGD-DLR and FAB (the reference's n_restarts)
NORMS: tuple[str, ...] = ("linf",)
# The reference's tolerances: outputs within 1e-5 of a distribution are taken for probabilities, and Square
# warns when it lowers the accuracy by more than 0.2 points after the white-box attacks.
PROBABILITY_TOLERANCE, SQUARE_TOLERANCE = 1e-5, 0.002


class AutoAttackResult(NamedTuple):
    adversarial: jax.Array  # per example, the first image that fooled the model; the clean image if none did
    robust: dict[str, np.ndarray]  # "clean", then each attack: which examples are still robust after it (bool [B])
    flags: list[str]  # AutoAttack's warnings, each one line
    seconds: dict[str, float]  # each attack's wall-clock time, compilation included


def _check_arguments(labels: jax.Array, num_classes: int, eps: float, norm: str, version: str, budgets: dict) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version={version!r} is not one of {VERSIONS}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS} (the L2 cascade needs L2 FAB and Square)")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be positive")
    for name, value in budgets.items():
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive integer")
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1} for a model of {num_classes} classes")
    if version not in RANDOMISED_VERSIONS and num_classes < max(apgd.STANDARD_TARGET_RANKS):
        raise ValueError(f"the {version} version's 9 targets need at least 10 classes; the model has {num_classes}")


class Family(NamedTuple):
    """Attacks that differ only in their target rank, which enters `make(rank).init` alone,
    so that one compiled fold serves every rank (`compiled_family`)."""

    make: Callable[[int | jax.Array], iterative.IterativeAttack]
    ranks: tuple[int, ...]  # one attack per rank, in cascade order; (0,) for an untargeted attack


def version_families(
    logits_fn: LogitsFn, eps: float, version: str = "standard", *, num_steps: int = 100, num_queries: int = 5000
) -> dict[str, Family]:
    """A version's attacks, L-inf, in cascade order: {name: Family}. A family's ranks are its targets, or for the
    plus version's untargeted attacks its restarts (each from its own key; FAB's first from the clean image).
    For the rand version `logits_fn` takes (images, key).

    >>> apgd_t = version_families(logits_fn, 0.3)["apgd-t"]  # 9 ranks, the 2nd to 10th most likely classes
    >>> attack = apgd_t.make(apgd_t.ranks[0])
    """
    ranks, once = apgd.STANDARD_TARGET_RANKS, (0,)
    if version in RANDOMISED_VERSIONS:
        eot_apgd = lambda loss: eot.make_apgd_eot(
            logits_fn, eps, loss=loss, num_steps=num_steps, eot_samples=EOT_SAMPLES
        )
        return {"apgd-ce": Family(lambda _: eot_apgd("ce"), once), "apgd-dlr": Family(lambda _: eot_apgd("dlr"), once)}
    starts = tuple(range(PLUS_RESTARTS)) if version == "plus" else once
    every = {
        "apgd-ce": Family(lambda _: apgd.make_apgd(logits_fn, eps, loss="ce", num_steps=num_steps), starts),
        "apgd-dlr": Family(lambda _: apgd.make_apgd(logits_fn, eps, loss="dlr", num_steps=num_steps), starts),
        "fab": Family(lambda r: fab.make_fab(logits_fn, eps, num_steps=num_steps, random_start=r > 0), starts),
        "apgd-t": Family(lambda r: apgd.make_apgd_targeted(logits_fn, eps, num_steps=num_steps, target_rank=r), ranks),
        "fab-t": Family(lambda r: fab.make_fab_targeted(logits_fn, eps, num_steps=num_steps, target_rank=r), ranks),
        "square": Family(lambda _: square.make_square(logits_fn, eps, num_queries=num_queries), once),
    }
    return {name: every[name] for name in VERSION_ATTACKS[version]}


def compiled_family(family: Family, form: str = "auto", chunk_size: int = 4, name: str = "attack") -> Callable:
    """(images, labels, key, rank) -> adversarial images, compiled once for every rank of the family.

    The rank is a traced argument of `init` only: a step reads the targets from
    the state, so every rank shares one compiled fold per shape. The steps run in
    the loop form the backend runs fast. `name` names its executables in timings.json.

    >>> run = compiled_family(version_families(logits_fn, 0.3)["apgd-t"])
    >>> x_adv = run(images, labels, key, 3)  # toward each image's third most likely class
    """
    template = family.make(family.ranks[0])
    init = lambda images, labels, key, rank: family.make(rank).init(images, labels, key)
    init = jax.jit(loops.named(init, f"{name}_init"))
    finalize = jax.jit(loops.named(template.finalize, f"{name}_finalize"))
    # XLA:CPU runs convolution gradients slowly inside loops (docs/design.md, "Convolutions in XLA:CPU loops").
    fold = loops.make_fold(template.step, form=form, chunk_size=chunk_size, name=name)

    def run(images, labels, key, rank):
        return finalize(fold(template.num_steps, init(images, labels, key, jnp.int32(rank))))

    return run


def _bucket(count: int, total: int) -> int:
    """The padded size for `count` examples: rounded up to a sixteenth of its power of two, at most the batch.

    Sixteen sizes per octave waste at most a sixteenth of the work on padding, and
    the few examples each attack fools rarely move the robust set to a new size.
    """
    granularity = 1 << max(0, count.bit_length() - 5)  # a sixteenth of the power of two at or below count
    return min(total, -(-max(count, 1) // granularity) * granularity)


def _attack_robust(run: Callable, predict: Callable, images, labels, key, robust: np.ndarray, compact: bool):
    """(still robust after the attack [B], its adversarial images where it fooled the model).

    `predict(images, index)` labels the images of examples `index` (a randomised model draws by example)."""
    if not compact:
        adversarial = run(images, labels, key)
        return np.asarray(predict(adversarial, np.arange(len(robust))) == labels) & robust, adversarial
    index = np.flatnonzero(robust)
    padded = np.resize(index, _bucket(len(index), len(robust)))  # repeats of real examples: no effect on them
    adversarial = run(images[padded], labels[padded], key)
    fooled = np.asarray(predict(adversarial, padded) != labels[padded])[: len(index)]
    survived = robust.copy()
    survived[index[fooled]] = False
    full = jnp.asarray(images).at[index].set(adversarial[: len(index)])
    return survived, full


def _num_classes(logits_fn, images: jax.Array, key: jax.Array, version: str) -> int:
    arguments, takes = (
        ((images[:1], key), "(images, key)") if version in RANDOMISED_VERSIONS else ((images[:1],), "(images)")
    )
    try:
        return int(jax.eval_shape(logits_fn, *arguments).shape[-1])
    except TypeError as error:
        raise TypeError(
            f"the {version} version calls logits_fn{takes}, and that call failed: {error}; a randomised model that "
            "takes a key is attacked by version='rand', a deterministic one by 'standard' or 'plus'"
        ) from error


def _draws(logits_fn, key: jax.Array, num_examples: int, randomised: bool) -> Callable[[int], Callable]:
    """draw -> ((images, index) -> logits for examples `index`): the model, or a randomised model's draw `draw` of
    each example's own key, so that a verdict does not depend on the batch compaction gives it."""
    if not randomised:
        return lambda draw: lambda images, index: logits_fn(images)
    keys = jax.random.split(jax.random.fold_in(key, VERDICT_STREAM), num_examples)
    # The draw is traced: one compile per batch shape serves every verdict.
    model = jax.jit(lambda images, keys, draw: eot.each_with_its_key(logits_fn)(images, eot.draw_keys(keys, draw, 0)))
    return lambda draw: lambda images, index: model(images, keys[index], draw)


def _flags(logits_fn, images, labels, robust: dict[str, np.ndarray], randomised: bool) -> list[str]:
    flags = []
    outputs = logits_fn(images)
    if bool(jnp.all(jnp.abs(outputs.sum(-1) - 1) < PROBABILITY_TOLERANCE) & (outputs.min() > -PROBABILITY_TOLERANCE)):
        flags.append("the outputs look like probabilities (they sum to one): pass logits, not softmax outputs")
    # As the reference, the rand version skips the randomness check: its model is randomised by design.
    if not randomised and not bool(jnp.array_equal(outputs, logits_fn(images))):
        flags.append(
            "two calls on the same images disagree: the model is randomised, and the standard version's "
            "robust accuracy does not hold for it (version='rand' attacks it with EoT, given a logits_fn that "
            "takes a key)"
        )
    gradient = attacks.input_gradient(logits_fn, images, labels)
    zero = int(jnp.sum(jnp.all(gradient.reshape(len(labels), -1) == 0, axis=-1)))
    if zero:
        flags.append(f"{zero} examples have a zero input gradient: gradient-based attacks cannot be trusted on them")
    if "square" in robust and list(robust).index("square") > 1:
        # The white-box stages before Square: all of them in the standard version, as the reference's check; in
        # "plus" the reference's min also takes the stages after Square, which never lie above it.
        before = list(robust)[1 : list(robust).index("square")]
        white_box = min(float(robust[name].mean()) for name in before)
        if float(robust["square"].mean()) < white_box - SQUARE_TOLERANCE:
            flags.append(
                f"Square lowered the robust accuracy by {white_box - float(robust['square'].mean()):.2%} after the "
                "white-box attacks: a sign of gradient masking; run Square longer or an adaptive attack"
            )
    return flags


def autoattack(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    *,
    eps: float,
    key: jax.Array,
    norm: str = "linf",
    version: str = "standard",
    attacks_to_run: Sequence[str] | None = None,
    num_steps: int = 100,
    num_queries: int = 5000,
    compact: bool = True,
    form: str = "auto",
    log: Callable[[str], None] = lambda line: None,
) -> AutoAttackResult:
    """AutoAttack's cascade on float images in [0, 1]: the adversarial images, who is robust after each attack, flags.

    `attacks_to_run` picks some of the version's attacks (all by default), which run in the version's order.
    `log` receives one line after each attack (its robust count and seconds): progress for a long cascade.
    For version="rand", `logits_fn(images, key)` is a randomised model (advjax.eot): each verdict is one draw.

    >>> result = advjax.autoattack(logits_fn, x, y, eps=0.3, key=jax.random.key(0))
    >>> float(result.robust["square"].mean())  # AutoAttack's robust accuracy
    """
    num_classes = _num_classes(logits_fn, images, key, version)
    _check_arguments(labels, num_classes, eps, norm, version, {"num_steps": num_steps, "num_queries": num_queries})
    attacks_to_run = VERSION_ATTACKS[version] if attacks_to_run is None else attacks_to_run
    unknown = sorted(set(attacks_to_run) - set(VERSION_ATTACKS[version]))
    if unknown:
        raise ValueError(
            f"attacks_to_run names {unknown}; each must be one of the {version} version's {VERSION_ATTACKS[version]}"
        )
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    randomised, everyone = version in RANDOMISED_VERSIONS, np.arange(len(labels))
    draw = _draws(logits_fn, key, len(labels), randomised)
    predict = lambda d: lambda x, index: jnp.argmax(draw(d)(x, index), axis=-1)
    robust = {"clean": np.asarray(predict(0)(images, everyone) == labels)}
    adversarial, current = images, robust["clean"]
    families = version_families(logits_fn, eps, version, num_steps=num_steps, num_queries=num_queries)
    seconds = {}
    for stage, name in enumerate(n for n in VERSION_ATTACKS[version] if n in attacks_to_run):
        start = time.perf_counter()
        run = compiled_family(families[name], form, name=name.replace("-", "_"))
        for i, rank in enumerate(families[name].ranks):
            if not current.any():
                break
            key_i = jax.random.fold_in(key, 16 * stage + i)
            survived, candidate = _attack_robust(
                functools.partial(run, rank=rank), predict(1 + 16 * stage + i), images, labels, key_i, current, compact
            )
            fooled_now = jnp.asarray(current & ~survived).reshape((-1,) + (1,) * (images.ndim - 1))
            adversarial = jnp.where(fooled_now, candidate, adversarial)
            current = survived
        robust[name] = current
        seconds[name] = time.perf_counter() - start  # the verdicts came to the host: the attack has finished
        count = f"{int(current.sum())} of {len(current)} still robust ({current.mean():.2%})"
        log(f"AutoAttack {name}: {count}, {seconds[name]:.1f} s")
    fixed = lambda x: draw(FLAGS_DRAW)(x, everyone)
    return AutoAttackResult(adversarial, robust, _flags(fixed, images, labels, robust, randomised), seconds)
