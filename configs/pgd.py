"""PGD adversarial training (Madry et al. 2018) at eps = 0.3, on the CNN (default) or BP: `configs/pgd.py:bp`.

Madry et al.'s attack: PGD-40 with step 0.01 from a random start. Their run
is 100,000 steps of batch 50 at Adam 1e-4; this one is 15 epochs of batch 128
at Adam 1e-3 with cosine decay, eps ramped up over the first epoch. What it
reaches is in docs/results.md, "PGD training on a GPU".

Madry et al.'s own schedule: `--config.train.epochs=100
--config.train.batch_size=50 --config.train.learning_rate=1e-4
--config.train.schedule=constant --config.train.eps_warmup_epochs=0`.
On a CPU, shorten it, e.g. `--config.train.epochs=2 --config.train.attack_steps=7
--config.train.attack_step_size=0.1 --config.train.schedule=cyclic --config.train.learning_rate=5e-3`.
"""

from configs import default


def get_config(arg=None):
    config = default.defense(default.defense_model(arg, "configs/pgd.py"), "pgd")
    config.train.epochs = 15
    config.train.batch_size = 128
    config.train.learning_rate = 1e-3
    config.train.schedule = "cosine"
    config.train.eps_warmup_epochs = 1.0
    config.train.attack_steps = 40
    config.train.attack_step_size = 0.01
    return config
