"""BP, PGD adversarial training at eps = 0.3 (the CNN's schedule in configs/cnn_pgd.py)."""

from configs import cnn_pgd


def get_config(arg=None):
    config = cnn_pgd.get_config(arg)
    config.model.name = "bp"
    config.eval.sigma = 0.3
    return config
