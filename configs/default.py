"""Every config field, its default and what it means: the one place each is written.

Each experiment config starts from `get_config()` here; advjax/validation.py
checks every field. Any field can be overridden on the command line, e.g.
`--config.train.epochs=2 --config.eval.eps=0.2 --config.model.init=lecun_normal`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # model init, shuffling, dropout and noise all derive from it
    # Devices of the data-parallel mesh: 0 = all (of every host); 1 = one device, no mesh.
    config.num_devices = 0
    config.num_seeds = 1  # K > 1 trains seeds seed..seed+K-1 at once (vmapped); reports mean and std

    config.data = ml_collections.ConfigDict()
    # mnist | fashion_mnist | cifar10 | tfds:<name>, any image-classification dataset prepared for TFDS
    config.data.name = "mnist"
    # auto | idx | download | tfds (see advjax/data.py). auto: tfds for a tfds: name, else idx if a directory is set,
    # else download. idx reads the dataset's files in data.dir, for cifar10 its binary version (archive or directory).
    config.data.source = "auto"
    config.data.dir = ""  # the dataset's files; '' -> $ADVJAX_DATA_DIR; both empty -> download cache
    config.data.cache_dir = ""  # '' -> $XDG_CACHE_HOME/advjax/<data.name> or ~/.cache/advjax/<data.name>
    config.data.tfds_data_dir = ""  # '' -> TFDS default
    # The paper's 50k/10k split of MNIST's 60k training images; every dataset's training set is split so.
    config.data.num_validation = 10_000
    config.data.split_seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "bp"  # bp | cnn | small_cnn | preact_resnet18 (advjax/models.py)
    # TensorFlow's default, which the paper's code used; 'lecun_normal' is Flax's.
    config.model.init = "glorot_uniform"
    config.model.hidden = (256, 256)  # BP only
    config.model.dropout = 0.4  # CNN only; active in training alone
    config.model.width = 64  # preact_resnet18 only: the first stage's channels (Wong et al.'s 64), doubled per stage
    # float32 | bfloat16: the dtype every layer computes in; params, logits and losses stay float32.
    config.model.dtype = "float32"

    config.train = ml_collections.ConfigDict()
    config.train.mode = "ordinary"  # ordinary | fgsm | gaussian | pgd | fast | trades | nfgsm | consistency
    config.train.epochs = 5
    config.train.batch_size = 128
    config.train.max_examples = 0  # 0: all 50k training images; fewer for quick runs
    config.train.learning_rate = 2e-3  # the optimizer's peak rate
    # constant | cosine (decay to 0 over the run) | cyclic (0 up to the rate at cyclic_peak of the run, back to 0)
    config.train.schedule = "cosine"
    config.train.cyclic_peak = 0.4  # where the cyclic rate peaks, as a share of the run: Wong et al.'s MNIST 2/5
    config.train.optimizer = "adam"  # adam | sgd (with train.momentum, as Wong et al.'s CIFAR-10 recipe)
    config.train.momentum = 0.9  # sgd only: heavy-ball momentum, PyTorch's SGD (0: none)
    # Any optimizer: weight_decay * params added to the gradient before the optimizer, as PyTorch's weight_decay.
    config.train.weight_decay = 0.0
    # Data augmentation of each training batch, on the device inside the compiled epoch: none | crop_flip (a random
    # crop of the image's size from it zero-padded by 4 pixels, then a random horizontal flip: Wong et al.'s CIFAR-10).
    config.train.augment = "none"
    config.train.eps = 0.1  # FGSM adversarial training (L-inf, pixels in [0, 1])
    config.train.alpha = 0.5  # weight of the clean loss: alpha*J(x) + (1-alpha)*J(x_adv)
    config.train.sigma = 0.3  # Gaussian-noise training, std before clipping
    # Gaussian and consistency training clip each noisy image to [0, 1], and so does the certified base
    # classifier (certify); False leaves x + delta unclipped in both, as Cohen et al. and Jeong & Shin do.
    config.train.noise_clip = True
    # Consistency regularization (mode consistency; Jeong & Shin 2020, advjax.losses.consistency_loss): m copies of
    # each image, each with its own train.sigma noise, so a step passes m x train.batch_size images forward.
    # Their code (github.com/jh-jeong/smoothing-consistency) instead splits each batch of 256 into m steps.
    config.train.consistency_copies = 2  # m: their MNIST runs' --num-noise-vec 2 (EXPERIMENTS.MD)
    config.train.consistency_lambda = 10.0  # the KL's weight: their --lbd default, MNIST's at sigma 0.25
    config.train.consistency_eta = 0.5  # the entropy's weight: their --eta default, used in all their MNIST runs
    # The defenses' inner attacks (modes pgd, trades; fast uses one step).
    config.train.attack_steps = 40  # Madry et al.'s MNIST PGD-40
    config.train.attack_step_size = 0.01  # per step, in pixels
    config.train.fast_step_size = 1.25  # fast mode's step, as a multiple of eps (Wong et al.)
    # Fast mode: clip the random start to [0, 1] before its gradient is taken. Wong et
    # al.'s MNIST code does not; their network overfits catastrophically if it does.
    config.train.fast_clip_start = False
    # N-FGSM (mode nfgsm): noise U(-n eps, n eps) and one step of s eps, not projected (de Jorge et al.'s n = 2, s = 1).
    config.train.nfgsm_noise = 2.0
    config.train.nfgsm_step_size = 1.0
    # Adversarial modes: the attack's eps grows linearly from 0 to train.eps over this
    # many epochs (fractions allowed), then stays; 0: the full eps from the first step.
    config.train.eps_warmup_epochs = 0.0
    config.train.trades_beta = 1.0  # weight of TRADES's KL term
    # GradAlign (Andriushchenko & Flammarion 2020), any mode: this weight times the mean
    # 1 - cos between input gradients at x and at a uniform draw from the train.eps ball
    # (0: off). Against catastrophic overfitting of one-step training, at the price of a double backward pass.
    config.train.grad_align = 0.0
    config.train.attack_unroll = "auto"  # auto | loop | unrolled: attack steps unrolled on CPU, a loop elsewhere
    # Adversarial modes: FGSM and a multi-step attack's accuracy at train.eps on this many held-out
    # validation images after every epoch, to catch catastrophic overfitting (0: off).
    config.train.overfitting_check_examples = 500
    # The multi-step attack: "pgd" (one random start, step 2.5 eps / steps) or "apgd_ce" (APGD-CE,
    # stronger at a similar cost per step; its step-size schedule wants a few dozen steps, e.g. 25-50).
    config.train.overfitting_check_attack = "pgd"
    config.train.overfitting_check_steps = 10  # that attack's steps
    # Adversarial modes: evaluate each seed's epoch of highest held-out accuracy under that
    # attack instead of the last (Wong et al.'s early stopping); its checkpoint is kept.
    config.train.keep_best = False
    # The training epoch's fold: auto | scan | chunked (advjax/loops.py). auto: one
    # fori_loop, except on CPU for models with convolutions, where it is chunked.
    config.train.loop = "auto"
    config.train.chunk_size = 8  # steps per compiled chunk in the chunked form
    # A checkpoint is written after every epoch; a relaunch on the same workdir
    # resumes from the newest. Older ones are kept in case the newest is damaged.
    config.train.checkpoints_to_keep = 2

    config.eval = ml_collections.ConfigDict()
    config.eval.eps = 0.1  # FGSM strength; the paper does not state its value
    config.eval.sigma = 0.3  # Gaussian noise std before clipping
    config.eval.use_predicted_labels = False  # attack the model's labels instead of the true ones
    # The paper's Tables 2-4 use 5000 training and 5000 validation images.
    config.eval.num_train = 5_000
    config.eval.num_validation = 5_000
    config.eval.num_test = 10_000
    # Accuracy-against-strength curves, each one compiled call (empty: skipped).
    config.eval.sigma_grid = ()
    config.eval.eps_grid = ()
    config.eval.sweep_split = "validation"
    config.eval.grid_chunk = 0  # grid points per vmapped pass; 0: all on accelerators, 1 on CPU (faster there)
    # Extra FGSM strengths evaluated on the train and validation subsets (the paper never states its eps).
    config.eval.table_eps = ()
    config.eval.batch_size = 500
    # Ticks per compiled chunk in the chunked (CPU) form. A chunk never spans two batches
    # (docs/design.md, "The fold forms, and why"), so an evaluation of one tick per batch runs one per chunk.
    config.eval.chunk_size = 1
    # The form of every evaluation fold (sweeps, attacks, the per-epoch checks); as train.loop.
    config.eval.loop = "auto"

    # Robustness evaluation (advjax/robustness.py): accuracy against eps for each
    # attack, the per-example worst case over them, and the label-leaking check.
    config.robust = ml_collections.ConfigDict()
    config.robust.enabled = False  # run it after training and put it in summary.json
    config.robust.split = "test"  # train | validation | test
    config.robust.num_examples = 1000  # first N of the split; the reports state the count
    config.robust.batch_size = 500
    config.robust.eps_grid = (
        0.1,
        0.2,
        0.3,
    )  # L-inf eps for fgsm, fgsm_random_start, bim, pgd and the label-leaking check
    config.robust.l2_eps_grid = (1.0, 2.0, 3.0)  # L2 eps for fgm_l2, pgd_l2 and deepfool (used only if one is listed)
    # Any of advjax.attack_registry.ATTACKS (apgd_ce: APGD-CE alone, L-inf), or "autoattack" (its standard
    # cascade at each L-inf eps, advjax/autoattack_report.py); all attack the true labels. A multi-step
    # attack belongs here always: FGSM alone hides gradient masking (docs/design.md, "Catastrophic overfitting").
    config.robust.attacks = ("fgsm", "pgd")
    config.robust.pgd_steps = 100  # steps per restart for bim, pgd, pgd_l2 and apgd_ce (MNIST challenge: PGD-100)
    config.robust.pgd_restarts = 10  # random restarts for pgd, pgd_l2 and apgd_ce; the worst per example is kept
    config.robust.pgd_step_size = (
        0.01  # L-inf step in pixels for bim and pgd; 0: 2.5 eps / steps (pgd_l2 always uses that)
    )
    # 'strict': per example, a restart that fools the model is kept, and every step is taken.
    # 'wong2020': the restart with the highest loss is kept and each example stops at its
    # first success, as in Wong et al.'s evaluation; weaker, for comparing with their figures.
    config.robust.pgd_protocol = "strict"
    config.robust.deepfool_max_iter = 50
    # AutoAttack's version, if listed: standard | plus (advjax.auto_attack.VERSION_ATTACKS)
    config.robust.autoattack_version = "standard"
    config.robust.autoattack_steps = 100  # AutoAttack: iterations of APGD-CE, and of APGD-T and FAB-T per target class
    config.robust.autoattack_queries = 5000  # AutoAttack: Square's queries (forward passes) per example
    config.robust.chunk_size = 4  # attack steps per compiled chunk in the chunked (CPU) loop form

    # Randomized smoothing (advjax/smoothing.py, advjax/certify_report.py): Cohen et al.'s CERTIFY of the
    # smoothed classifier, whose base classifier clips x + delta to [0, 1] as Gaussian training does.
    config.certify = ml_collections.ConfigDict()
    config.certify.enabled = False  # run it after training and put it in summary.json
    # Noise stds, each certified on its own (several are vmapped into one sampling pass); set it to the
    # training noise's train.sigma, which configs/cnn_smooth.py and bp_smooth.py do.
    config.certify.sigma = (0.25,)
    config.certify.n0 = 100  # selection samples per image (Cohen et al.)
    # Estimation samples per image: a budget a CPU certifies 500 images in. Cohen et al.'s 100,000 raise the
    # largest radius n can certify (at alpha 0.001) from 3.2 sigma to 3.8 sigma, for 10x the forward passes.
    config.certify.n = 10_000
    config.certify.alpha = 0.001  # the certificate fails with probability at most alpha per image
    config.certify.split = "test"  # train | validation | test
    config.certify.num_examples = 500  # first N of the split; the report states the count
    config.certify.batch = 50  # images per sampling pass
    config.certify.chunk_size = 50  # noisy samples per image per forward pass; divides n0 and n
    config.certify.radii = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5)  # L2 radii of the table
    return config


# The paper's Table 5 reports Gaussian robustness at std 0.3 for BP and 0.8 for the CNN.
PAPER_EVAL_SIGMA = {"bp": 0.3, "cnn": 0.8}
# The networks a defense config (configs/pgd.py, fast.py, trades.py) takes as its argument.
DEFENSE_MODELS = ("cnn", "bp")


def experiment(model: str, mode: str) -> ml_collections.ConfigDict:
    """The defaults for one of the paper's six (model, training mode) pairs, or another model's."""
    config = get_config()
    config.model.name = model
    config.train.mode = mode
    config.eval.sigma = PAPER_EVAL_SIGMA.get(model, config.eval.sigma)  # the paper has no other models
    return config


def defense(model: str, mode: str) -> ml_collections.ConfigDict:
    """A defense against eps = 0.3 (the MNIST challenge's budget), on Madry et al.'s
    network: the paper's CNN without dropout (BP has none)."""
    config = experiment(model, mode)
    config.model.dropout = 0.0
    config.train.eps = 0.3
    config.eval.eps = 0.3
    # FGSM numbers alone would flatter a defense: report PGD with restarts, the
    # worst case and the label-leaking check too (config.robust above).
    config.robust.enabled = True
    return config


def defense_model(arg: str | None, config_file: str) -> str:
    """The network a defense config's argument names (`--config=configs/pgd.py:bp`); the CNN by default."""
    model = arg or "cnn"
    if model not in DEFENSE_MODELS:
        raise ValueError(f"{config_file} takes one of {DEFENSE_MODELS} after the colon, got {arg!r}")
    return model


# Randomized smoothing's configs (configs/cnn_smooth.py, bp_smooth.py): Cohen et al.'s three noise levels.
SMOOTHING_SIGMAS = ("0.25", "0.5", "1.0")
# The training modes a smoothing config takes after the sigma (`configs/bp_smooth.py:1.0,consistency`).
SMOOTHING_MODES = ("gaussian", "consistency")
# Consistency regularization's KL weight per sigma in Jeong & Shin's MNIST runs (their EXPERIMENTS.MD, m = 2,
# eta = 0.5 throughout); another sigma keeps train.consistency_lambda's default.
CONSISTENCY_MNIST_LAMBDAS = {0.25: 10.0, 0.5: 5.0, 1.0: 5.0}


def smoothing(model: str, arg: str | None, config_file: str) -> ml_collections.ConfigDict:
    """Noise training at the sigma after the colon (0.25 by default, the certify section's default; Cohen et al.'s
    are 0.25, 0.5 and 1.0) for 5 epochs, and the smoothed classifier certified at that same sigma (train.sigma and
    certify.sigma). The mode follows the sigma after a comma ('0.5,consistency'), one of SMOOTHING_MODES: gaussian
    (Cohen et al.'s Gaussian training) by default, or Jeong & Shin's (2020) consistency regularization with their
    MNIST lambda for the sigma (CONSISTENCY_MNIST_LAMBDAS). Training and certification see the same inputs,
    x + delta unclipped as in Cohen et al.'s code (train.noise_clip False; True clips both to [0, 1], which costs
    certified accuracy: docs/results.md)."""
    sigma_text, comma, mode = (arg or "").partition(",")
    text = sigma_text or SMOOTHING_SIGMAS[0]
    try:
        sigma = float(text)
    except ValueError:
        sigma = 0.0
    if not 0 < sigma <= 10:
        raise ValueError(
            f"{config_file} takes the noise's sigma in (0, 10] after the colon, such as one of {SMOOTHING_SIGMAS}, "
            f"got {arg!r}"
        )
    if comma and mode not in SMOOTHING_MODES:
        raise ValueError(
            f"{config_file} takes a training mode after the sigma and a comma, one of {SMOOTHING_MODES} "
            f"(such as {config_file}:{text},consistency), got {mode!r} in {arg!r}"
        )
    config = experiment(model, mode or "gaussian")
    config.train.epochs = 5
    config.train.sigma = sigma
    if config.train.mode == "consistency":
        config.train.consistency_lambda = CONSISTENCY_MNIST_LAMBDAS.get(sigma, config.train.consistency_lambda)
    config.train.noise_clip = False  # Cohen et al.'s unclipped noise; clipping costs certified accuracy (results.md)
    if model == "cnn":  # the default rate left the CNN at chance on unclipped noise at sigma 1.0 (results.md)
        config.train.learning_rate = 1e-3
    config.certify.enabled = True
    config.certify.sigma = (sigma,)
    return config
