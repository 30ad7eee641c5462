"""BP, ordinary training."""

from configs import default


def get_config(arg=None):
    return default.experiment("bp", "ordinary", arg)
