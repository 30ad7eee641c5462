"""Wong et al.'s (2020) fast adversarial training on their own MNIST network (models.SmallCNN).

Their schedule as published: FGSM from a uniform random start, eps = 0.3,
step 1.25 eps = 0.375, 10 epochs of batch 100, Adam with a cyclic learning rate
peaking at 5e-3. They report 88.8% against PGD-50 x 10 at eps = 0.3.

Their code was PyTorch, and its layers' default initialization is part of the
recipe (model.init = "torch_default"). Three changes, each measured
(docs/results.md, "Fast training on the small CNN"):
- 59,000 training images, near their 60,000 (data.num_validation = 1000, of
  which the held-out check uses 500), not the paper's 50,000;
- eps ramped from 0 over the first epoch: at the full eps from the first step
  a network can die (constant output) in epoch 1;
- early stopping on the held-out PGD check (train.keep_best), which Wong et al.
  advise: each seed is evaluated at its best epoch.
"""

from configs import default


def get_config():
    config = default.defense("small_cnn", "fast")
    config.data.num_validation = 1000
    config.eval.num_validation = 1000
    config.train.epochs = 10
    config.train.batch_size = 100
    config.train.learning_rate = 5e-3
    config.train.schedule = "cyclic"
    config.train.fast_step_size = 1.25
    config.train.eps_warmup_epochs = 1.0
    config.train.keep_best = True
    config.model.init = "torch_default"
    return config
