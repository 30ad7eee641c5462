"""The Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), L-inf, as an IterativeAttack.

A score-based black-box attack: it never sees a gradient, only the logits of
the images it queries. It starts from vertical stripes of +-eps and then, once
per step, redraws the perturbation of one random square to +-eps (one sign per
channel), keeping the candidate only where it lowers the margin loss
`logit_label - max other logit`. The square shrinks on a fixed schedule of its
area fraction `p` (`p_selection`). An example is fooled once its margin is at
most zero; from then on it stops changing and stops spending queries.

It follows AutoAttack's `autoattack/square.py` (`SquareAttack`, untargeted,
loss 'margin'), with three details from the authors' first code
(`square_attack_linf` in max-andr/square-attack's `attack.py`): each example
draws its own square and signs, the signs are redrawn until the square changes
the image, and `num_queries` counts the initialisation, so the steps are
`num_queries - 1`.

Images are float32 [B, H, W, C] in [0, 1]. The state leads with the batch
axis, and a step draws from keys folded in per example and per iteration, so
every example's attack is independent of the others in its batch.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from advjax import iterative
from advjax.losses import LogitsFn
from advjax.norms import clip_to_pixels, per_example, project_linf

# The reference's schedule: p halves each time the (rescaled) iteration passes one of these.
SCHEDULE_THRESHOLDS: tuple[int, ...] = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# The number of queries the schedule was written for; with rescaling, every budget runs through all of it.
SCHEDULE_QUERIES = 10000
# Sign vectors drawn per step: the first that changes the square is used, standing in for the
# reference's redraw-until-it-changes loop, whose length a static shape cannot follow.
SIGN_DRAWS = 16


class SquareState(NamedTuple):
    """Per example, every leaf leading with the batch axis."""

    images: jax.Array  # the clean images, the centres of the eps balls
    labels: jax.Array  # the labels whose margin the attack lowers
    adversarial: jax.Array  # the best candidate so far
    margin: jax.Array  # its margin loss; the example is fooled once it is <= 0
    queries: jax.Array  # forward passes spent on this example, int32
    fooled: jax.Array  # margin <= 0: the example takes no more steps
    key: jax.Array  # this example's key, folded in with each iteration


def schedule_halvings(iteration: jax.Array | int, num_queries: int, *, rescale: bool = True) -> jax.Array:
    """How many times the schedule has halved p by `iteration`, 0 to 9.

    Integer division stands in for the reference's float `int(it / n_queries * 10000)`,
    so that a traced iteration stays exact; tests/test_square.py checks both pick the same piece.

    >>> schedule_halvings(6, 5000)  # 1: the rescaled iteration 12 is past 10
    """
    scaled = jnp.asarray(iteration) * SCHEDULE_QUERIES // num_queries if rescale else jnp.asarray(iteration)
    return jnp.sum(scaled[..., None] > jnp.asarray(SCHEDULE_THRESHOLDS), axis=-1)


def p_selection(p_init: float, iteration: jax.Array | int, num_queries: int, *, rescale: bool = True) -> jax.Array:
    """The fraction of the image's area the square covers at `iteration`: the reference's piecewise schedule.

    `rescale=True` (the reference's `resc_schedule`) maps the iteration onto 10000
    queries first, so a smaller budget still runs through the whole schedule.

    >>> p_selection(0.8, 26, 5000)  # 0.2: the rescaled iteration 52 is past 10 and 50
    """
    return p_init / 2.0 ** schedule_halvings(iteration, num_queries, rescale=rescale)


def square_sides(p_init: float, height: int, width: int) -> tuple[int, ...]:
    """The square's side for each piece of the schedule, rounded in Python as the reference rounds it.

    >>> square_sides(0.8, 8, 8)  # (7, 5, 4, 3, 2, 1, 1, 1, 1, 1)
    """
    pieces = range(len(SCHEDULE_THRESHOLDS) + 1)
    sides = (max(round(math.sqrt(p_init / 2**k * height * width)), 1) for k in pieces)
    return tuple(min(side, height, width) for side in sides)


def square_side(
    p_init: float, iteration: jax.Array | int, num_queries: int, height: int, width: int, *, rescale: bool = True
) -> jax.Array:
    """The side of the square at `iteration`, max(round(sqrt(p * H * W)), 1), at most min(H, W).

    >>> square_side(0.8, 0, 5000, 8, 8)  # 7
    """
    sides = jnp.asarray(square_sides(p_init, height, width))
    return sides[schedule_halvings(iteration, num_queries, rescale=rescale)]


def margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logit_label - max other logit per example, [B]: at most zero once the label is no longer predicted.

    >>> margins(jnp.array([[2.0, 0.5, 1.0]]), jnp.array([0]))  # [1.]
    """
    labelled = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    is_label = jnp.arange(logits.shape[-1]) == labels[:, None]
    return labelled - jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)


def stripes_start(key: jax.Array, image: jax.Array, eps: jax.Array | float) -> jax.Array:
    """One image [H, W, C] plus vertical stripes of +-eps, one sign per column and channel, clipped to [0, 1].

    Stripes are the reference's start because they work best for untargeted attacks.

    >>> start = stripes_start(jax.random.key(0), images[0], 0.1)  # constant down each column
    """
    _, width, channels = image.shape
    signs = jax.random.rademacher(key, (1, width, channels), image.dtype)
    return clip_to_pixels(image + eps * signs)


def square_mask(key: jax.Array, side: jax.Array | int, height: int, width: int) -> jax.Array:
    """A [H, W] boolean mask of one side x side square at a random position.

    The corner is drawn from [0, H - side) and [0, W - side), as both references
    draw it, so a square that does not span the image never touches its last
    row or column; comparing against `jnp.arange` keeps the shape static while
    `side` is traced.

    >>> square_mask(jax.random.key(0), 3, 8, 8).sum()  # 9
    """
    row_key, column_key = jax.random.split(key)
    top = jax.random.randint(row_key, (), 0, jnp.maximum(height - side, 1))
    left = jax.random.randint(column_key, (), 0, jnp.maximum(width - side, 1))
    rows, columns = jnp.arange(height), jnp.arange(width)
    in_rows = (rows >= top) & (rows < top + side)
    in_columns = (columns >= left) & (columns < left + side)
    return in_rows[:, None] & in_columns[None, :]


def changing_signs(key: jax.Array, raise_changes: jax.Array, lower_changes: jax.Array) -> jax.Array:
    """One sign per channel [C], the first of SIGN_DRAWS draws under which the square changes the image.

    `raise_changes[c]` says whether +eps changes channel c of the square, and
    `lower_changes[c]` whether -eps does; if no draw changes any channel the
    first draw is kept, since then no sign would.

    >>> signs = changing_signs(jax.random.key(0), jnp.array([False]), jnp.array([True]))  # [-1]
    """
    draws = jax.random.rademacher(key, (SIGN_DRAWS, raise_changes.shape[0]))
    changes = jnp.any(jnp.where(draws > 0, raise_changes, lower_changes), axis=-1)
    return draws[jnp.argmax(changes)]


def square_candidate(
    key: jax.Array, image: jax.Array, adversarial: jax.Array, eps: jax.Array | float, side: jax.Array | int
) -> jax.Array:
    """One image's next candidate [H, W, C]: the square's pixels set to image +-eps per channel, clipped to [0, 1].

    As in the reference, +-2 eps is added and then projected, which lands on
    the ball's faces whatever the current perturbation is.

    >>> candidate = square_candidate(jax.random.key(0), images[0], adversarial[0], 0.1, 3)
    """
    mask_key, sign_key = jax.random.split(key)
    height, width, _ = image.shape
    mask = square_mask(mask_key, side, height, width)[..., None]
    raised = project_linf(adversarial + 2.0 * eps, image, eps)
    lowered = project_linf(adversarial - 2.0 * eps, image, eps)
    changes = lambda moved: jnp.any(mask & (moved != adversarial), axis=(0, 1))
    signs = changing_signs(sign_key, changes(raised), changes(lowered))
    return jnp.where(mask, jnp.where(signs > 0, raised, lowered), adversarial)


def square_init(
    logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, eps: jax.Array | float
) -> SquareState:
    """The state after the stripes: one query per example, and fooled where the stripes already fool.

    >>> state = square_init(logits_fn, images, labels, jax.random.key(0), 0.1)
    """
    if images.ndim != 4:
        raise ValueError(f"the Square attack needs images [B, H, W, C], got shape {images.shape}")
    key_pairs = jax.vmap(jax.random.split)(jax.random.split(key, images.shape[0]))
    stripe_keys, search_keys = key_pairs[:, 0], key_pairs[:, 1]
    start = jax.vmap(stripes_start, in_axes=(0, 0, None))(stripe_keys, images, eps)
    margin = margins(logits_fn(start), labels)
    queries = jnp.ones(images.shape[0], jnp.int32)
    return SquareState(images, labels, start, margin, queries, margin <= 0, search_keys)


def square_search_step(
    logits_fn: LogitsFn, state: SquareState, iteration: jax.Array | int, eps: jax.Array | float, side: jax.Array | int
) -> SquareState:
    """One query per example not yet fooled: a new square, kept where it lowers the margin.

    Fooled examples are computed alongside, since shapes are static, but their
    results are dropped and their queries are not counted.

    >>> state = square_search_step(logits_fn, state, 0, 0.1, 3)
    """
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.key, iteration)
    candidates = jax.vmap(square_candidate, in_axes=(0, 0, 0, None, None))(
        keys, state.images, state.adversarial, eps, side
    )
    margin = margins(logits_fn(candidates), state.labels)
    searching = ~state.fooled
    # The reference also accepts a misclassified candidate, which with the margin loss is already a lower margin.
    improved = searching & (margin < state.margin)
    best_margin = jnp.where(improved, margin, state.margin)
    return state._replace(
        adversarial=jnp.where(per_example(improved, candidates), candidates, state.adversarial),
        margin=best_margin,
        queries=state.queries + searching.astype(jnp.int32),
        fooled=best_margin <= 0,
    )


def make_square(
    logits_fn: LogitsFn,
    eps: jax.Array | float,
    *,
    num_queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
) -> iterative.IterativeAttack:
    """The L-inf Square attack within eps of each image, spending at most `num_queries` forward passes per example.

    The stripes take the first query and each of the `num_queries - 1` steps one
    more. The defaults are AutoAttack's standard version: 5000 queries, p_init
    0.8, its schedule not rescaled (`resc_schedule=False`). `rescale_schedule=True`
    maps a shorter budget onto the 10000-query schedule, as the authors' first
    code does. The state is a SquareState, so `queries`,
    `margin` and `fooled` can be read after any step; `finalize` returns the
    best candidate of every example, fooled or not.

    >>> x_adv = iterative.run(make_square(logits_fn, 8 / 255, num_queries=1000), images, labels, jax.random.key(0))
    """
    if num_queries < 1:
        raise ValueError(f"num_queries must be at least 1 (the stripes' query), got {num_queries}")

    def init(images: jax.Array, labels: jax.Array, key: jax.Array) -> SquareState:
        return square_init(logits_fn, images, labels, key, eps)

    def step(state: SquareState, iteration: jax.Array) -> SquareState:
        _, height, width, _ = state.images.shape
        side = square_side(p_init, iteration, num_queries, height, width, rescale=rescale_schedule)
        search = lambda s: square_search_step(logits_fn, s, iteration, eps, side)
        # Once every example is fooled the forward pass is skipped, as the reference stops its loop.
        return jax.lax.cond(jnp.all(state.fooled), lambda s: s, search, state)

    def finalize(state: SquareState) -> jax.Array:
        return state.adversarial

    return iterative.IterativeAttack(init=init, step=step, finalize=finalize, num_steps=num_queries - 1)
