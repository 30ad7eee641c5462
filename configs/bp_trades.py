"""BP, TRADES at eps = 0.3 (the CNN's settings in configs/cnn_trades.py)."""

from configs import cnn_trades


def get_config(arg=None):
    config = cnn_trades.get_config(arg)
    config.model.name = "bp"
    config.eval.sigma = 0.3
    return config
