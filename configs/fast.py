"""Fast adversarial training (Wong et al. 2020) at eps = 0.3, on the CNN (default) or BP: `configs/fast.py:bp`.

FGSM from a random start, with Wong et al.'s MNIST schedule: 10 epochs of
batch 100, a cyclic learning rate peaking at 5e-3. On the paper's CNN a start
clipped to [0, 1] and a step of 1.0 eps trained best of the variants measured
(docs/results.md, "Where the random start begins matters"); Wong et al.'s own network
and recipe are configs/small_cnn_fast.py.
"""

from configs import default


def get_config(arg=None):
    config = default.defense(default.defense_model(arg, "configs/fast.py"), "fast")
    config.train.epochs = 10
    config.train.batch_size = 100
    config.train.learning_rate = 5e-3
    config.train.schedule = "cyclic"
    config.train.fast_step_size = 1.0
    config.train.fast_clip_start = True
    return config
