"""The CNN, PGD adversarial training (Madry et al. 2018) at eps = 0.3.

Madry et al.'s MNIST schedule: PGD-40 with step 0.01 from a random start,
100,000 steps of batch 50 (100 epochs of our 50k split), Adam at 1e-4.
It costs about 40x ordinary training: run it on an accelerator, or shorten it,
e.g. `--config.train.epochs=2 --config.train.attack_steps=10 --config.train.attack_step_size=0.075`.
"""

from configs import default


def get_config(arg=None):
    config = default.defense("cnn", "pgd", arg)
    config.train.epochs = 100
    config.train.batch_size = 50
    config.train.learning_rate = 1e-4
    config.train.schedule = "constant"
    config.train.attack_steps = 40
    config.train.attack_step_size = 0.01
    return config
