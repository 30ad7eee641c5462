"""The CNN, fast adversarial training (Wong et al. 2020): FGSM from a random start at eps = 0.3.

Wong et al.'s MNIST schedule: 10 epochs of batch 100, a cyclic learning rate
peaking at 5e-3. On this CNN (measured on CPU, PGD-50 x 10 at eps 0.3 on 1000
test images) a start clipped to [0, 1] and a step of 1.0 eps gave 0.805, and a
step of 1.25 eps 0.763. Wong et al.'s unclipped start, which their small
network needs (configs/small_cnn_fast.py), overfit catastrophically here: PGD-10
accuracy on held-out images fell from 0.70 to 0.12-0.40 once the learning rate
peaked, with steps of 1.0 and 1.25 eps; at a peak rate of 2e-3 over 15 epochs
it reached 0.77 by epoch 6 and fell to 0.61 by epoch 12 (stopped there). So
this config clips the start. With PyTorch's init (model.init=torch_default,
which Wong et al.'s own network needs) the unclipped start at 1.25 eps did not
collapse but ended at 0.714, and the clipped start at 1.0 eps masked its
gradient for 8 epochs: Glorot init stays.
About 2.5x the cost of ordinary training.
"""

from configs import default


def get_config(arg=None):
    config = default.defense("cnn", "fast", arg)
    config.train.epochs = 10
    config.train.batch_size = 100
    config.train.learning_rate = 5e-3
    config.train.schedule = "cyclic"
    config.train.fast_step_size = 1.0
    config.train.fast_clip_start = True
    return config
