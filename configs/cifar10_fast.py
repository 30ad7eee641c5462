"""Wong et al.'s (2020) fast adversarial training on CIFAR-10: their CIFAR10/train_fgsm.py recipe.

Their PreAct ResNet-18 (models.PreActResNet18, with their input normalisation
inside, so images and eps stay in pixels), trained by FGSM from a uniform
random start clipped to the images (their --delta-init random) at eps 8/255
with a step of 10/255 (train.fast_step_size = 1.25 eps), 15 epochs of batch
128, SGD with momentum 0.9 and weight decay 5e-4, a cyclic learning rate
0 -> 0.2 -> 0, and their augmentation: a random crop of the image padded by 4
and a random horizontal flip. Their PyTorch layers' initialization is part of
the recipe (model.init = "torch_default"). Evaluated as they evaluate: PGD-50
with 10 restarts of step 2/255 at eps 8/255 (robust.pgd_protocol "wong2020":
the restart of highest loss, each image stopping once fooled), here on the
first 1000 test images. Their README reports 86.06% clean and 46.06% PGD
accuracy at eps 8/255 for this recipe.

Differences from their code, each by the house's rules:
- the attack is crafted in eval mode, on BatchNorm's running statistics, which
  only the training pass updates (docs/design.md, "Attacks in eval mode");
  theirs runs in train mode and updates them too;
- 45,000 training images: data.num_validation = 5000 are held out for the
  per-epoch checks and the validation tables; they train on all 50,000;
- float32 throughout, not apex's mixed precision (O2).
"""

from configs import default


def get_config():
    config = default.experiment("preact_resnet18", "fast")
    config.data.name = "cifar10"
    config.data.num_validation = 5000
    config.model.init = "torch_default"
    config.model.width = 64
    config.train.epochs = 15
    config.train.batch_size = 128
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.2
    config.train.schedule = "cyclic"
    config.train.cyclic_peak = 0.5  # their CIFAR-10 CyclicLR: half the steps up, half down
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.augment = "crop_flip"
    config.train.eps = 8 / 255
    config.train.fast_step_size = 1.25  # 10/255
    config.train.fast_clip_start = True  # their start is clamped so that x + delta is in [0, 1]
    config.eval.eps = 8 / 255
    config.eval.num_train = 5000
    config.eval.num_validation = 5000
    config.robust.enabled = True
    config.robust.split = "test"
    config.robust.num_examples = 1000
    config.robust.eps_grid = (8 / 255,)
    config.robust.pgd_steps = 50
    config.robust.pgd_restarts = 10
    config.robust.pgd_step_size = 2 / 255
    config.robust.pgd_protocol = "wong2020"
    return config
