"""advjax: adversarial robustness in JAX, from the paper "Fooling neural networks by adding noises".

What a notebook needs, for a model trained here or one of its own: a model is
`apply_fn(params, images) -> logits`, in eval mode, on float32 images in [0, 1].

    import advjax, jax
    config, params, apply_fn, epochs = advjax.restore("runs/bp_adv")
    eval_set = advjax.make_eval_set(images_uint8, labels, 1000, 500)
    advjax.make_evaluator(apply_fn)(params, eval_set, jax.random.key(0), eps=0.1, sigma=0.3)["accuracy"]
    pgd = advjax.make_robust_sweep(apply_fn, advjax.AttackSpec("pgd", num_steps=50, num_restarts=10))
    pgd(params, eval_set, jax.random.key(0), (0.1, 0.3)).accuracy
    x_adv = advjax.attacks.pgd(lambda x: apply_fn(params, x), x, y, 0.3, jax.random.key(0))
    result = advjax.autoattack(lambda x: apply_fn(params, x), x, y, eps=0.3, key=jax.random.key(0))
"""

from advjax import apgd, attacks, deepfool, eot, fab, iterative, noise, norms, square
from advjax.attack_specs import AttackSpec
from advjax.auto_attack import AutoAttackResult, autoattack
from advjax.checkpoint import Restored, restore
from advjax.eval_fold import EvalSet, make_eval_set
from advjax.evaluate import make_evaluator, make_sweep
from advjax.robustness import RobustResult, make_robust_sweep, worst_case

__all__ = [
    "AttackSpec",
    "AutoAttackResult",
    "EvalSet",
    "Restored",
    "RobustResult",
    "apgd",
    "attacks",
    "autoattack",
    "deepfool",
    "eot",
    "fab",
    "iterative",
    "make_eval_set",
    "make_evaluator",
    "make_robust_sweep",
    "make_sweep",
    "noise",
    "norms",
    "restore",
    "square",
    "worst_case",
]
