"""BP, ordinary training."""

from configs import default


def get_config():
    return default.experiment("bp", "ordinary")
