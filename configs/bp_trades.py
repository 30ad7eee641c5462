"""`configs/trades.py:bp` under its older name."""

from configs import trades


def get_config():
    return trades.get_config("bp")
