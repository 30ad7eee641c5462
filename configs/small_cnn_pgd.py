"""PGD training of Wong et al.'s small CNN: configs/small_cnn_fast.py's schedule with PGD-k in place of FGSM.

python launch.py --config=configs/small_cnn_pgd.py --workdir=runs/small_cnn_pgd
python launch.py --config=configs/small_cnn_pgd.py:2 --workdir=runs/small_cnn_pgd2

The number after the colon is k, the inner attack's steps (10 by default): from a
uniform random start, k steps of 2.5 eps / k (the step rule of the per-epoch
PGD check). Everything else is small_cnn_fast's: 59,000 training images, 10
epochs of batch 100, Adam with a cyclic rate peaking at 5e-3, eps ramped over
the first epoch, PyTorch's init, the epoch of best held-out PGD accuracy kept.
Each training step costs k + 1 gradient passes against fast training's 2. What
it holds under AutoAttack, against fast training, is in docs/results.md ("Fast
training on the small CNN").
"""

from advjax import attacks
from configs import small_cnn_fast


def get_config(arg: str | None = None):
    text = arg or "10"
    steps = int(text) if text.isdigit() else 0
    if steps < 1:
        raise ValueError(
            f"configs/small_cnn_pgd.py takes the PGD steps, a positive integer, after the colon, got {arg!r}"
        )
    config = small_cnn_fast.get_config()
    config.train.mode = "pgd"
    config.train.attack_steps = steps
    config.train.attack_step_size = attacks.default_step_size(config.train.eps, steps)
    return config
