"""CNN, ordinary training."""

from configs import default


def get_config(arg=None):
    return default.experiment("cnn", "ordinary", arg)
