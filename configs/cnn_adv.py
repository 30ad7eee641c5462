"""CNN, FGSM adversarial training: alpha*J(x) + (1-alpha)*J(x + eps*sign(grad_x J))."""

from configs import default


def get_config():
    return default.experiment("cnn", "fgsm")
