"""`configs/fast.py:bp` under its older name."""

from configs import fast


def get_config():
    return fast.get_config("bp")
