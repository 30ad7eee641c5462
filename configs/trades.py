"""TRADES (Zhang et al. 2019) at eps = 0.3, on the CNN (default) or BP: `configs/trades.py:bp`.

TRADES's MNIST attack: 40 steps of 0.01 on KL(f(x) || f(x')) from x + 0.001 N(0, 1),
beta = 1. This project's Adam with cosine decay (TRADES used SGD), for 50 epochs:
40 attack steps per training step, so run it on an accelerator, or shorten it.
"""

from configs import default


def get_config(arg=None):
    config = default.defense(default.defense_model(arg, "configs/trades.py"), "trades")
    config.train.epochs = 50
    config.train.learning_rate = 1e-3
    config.train.attack_steps = 40
    config.train.attack_step_size = 0.01
    config.train.trades_beta = 1.0
    return config
