"""BP, training on Gaussian-noised images."""

from configs import default


def get_config():
    return default.experiment("bp", "gaussian")
