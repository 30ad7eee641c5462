"""Randomized smoothing on the paper's CNN: noise training, then certificates at the same sigma.

python launch.py --config=configs/cnn_smooth.py:0.5 --workdir=runs/cnn_smooth_0.5
python launch.py --config=configs/cnn_smooth.py:1.0,consistency --workdir=runs/cnn_smooth_1.0_consistency

The argument after the colon (sigma, and optionally a training mode after a comma) is read by
default.smoothing, whose docstring says what each part sets.
"""

from configs import default


def get_config(arg: str | None = None):
    return default.smoothing("cnn", arg, "configs/cnn_smooth.py")
