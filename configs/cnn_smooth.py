"""Randomized smoothing on the paper's CNN: noise training, then certificates at the same sigma.

python launch.py --config=configs/cnn_smooth.py:0.5 --workdir=runs/cnn_smooth_0.5

The sigma after the colon (0.25, 0.5 or 1.0, Cohen et al.'s; 0.25 when none is given) is both the training
noise's std (train.sigma) and the certified one (certify.sigma), for 5 epochs. Training and certification see the
same inputs, x + delta unclipped as in Cohen et al.'s code (train.noise_clip False; True clips both to [0, 1],
which advjax measured to cost certified accuracy: docs/results.md).

A training mode may follow the sigma after a comma: gaussian (the default) or consistency, Jeong & Shin's (2020)
consistency regularization on the same noise, with their MNIST lambda for the sigma
(default.CONSISTENCY_MNIST_LAMBDAS):

python launch.py --config=configs/cnn_smooth.py:1.0,consistency --workdir=runs/cnn_smooth_1.0_consistency
"""

from configs import default


def get_config(arg: str | None = None):
    return default.smoothing("cnn", arg, "configs/cnn_smooth.py")
