"""`configs/trades.py:cnn` under its older name."""

from configs import trades


def get_config():
    return trades.get_config("cnn")
