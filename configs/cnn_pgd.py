"""`configs/pgd.py:cnn` under its older name."""

from configs import pgd


def get_config():
    return pgd.get_config("cnn")
