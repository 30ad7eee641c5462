"""CNN, training on Gaussian-noised images."""

from configs import default


def get_config(arg=None):
    return default.experiment("cnn", "gaussian", arg)
