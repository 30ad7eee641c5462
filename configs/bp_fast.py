"""BP, fast adversarial training at eps = 0.3 (the CNN's settings in configs/cnn_fast.py)."""

from configs import cnn_fast


def get_config(arg=None):
    config = cnn_fast.get_config(arg)
    config.model.name = "bp"
    config.eval.sigma = 0.3
    return config
