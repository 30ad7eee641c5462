"""`configs/pgd.py:bp` under its older name."""

from configs import pgd


def get_config():
    return pgd.get_config("bp")
