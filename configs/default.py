"""Shared defaults. Each experiment config starts from `get_config()` here.

Every field can be overridden on the command line, e.g.
`--config.train.epochs=2 --config.eval.eps=0.2 --config.model.init=lecun_normal`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0  # model init, shuffling, dropout and noise all derive from it
    config.num_seeds = 1  # K > 1 trains seeds seed..seed+K-1 at once (vmapped); reports mean and std

    config.data = ml_collections.ConfigDict()
    config.data.source = "auto"  # auto | idx | download | tfds (see advjax/data.py)
    config.data.dir = ""  # IDX directory; '' -> $ADVJAX_DATA_DIR; both empty -> download cache
    config.data.cache_dir = ""  # '' -> $XDG_CACHE_HOME/advjax/mnist or ~/.cache/advjax/mnist
    config.data.tfds_data_dir = ""  # '' -> TFDS default
    config.data.num_validation = 10_000  # the paper's 50k/10k split of the 60k training images
    config.data.split_seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "bp"  # bp | cnn
    # TensorFlow's default, which the paper's code used; 'lecun_normal' is Flax's.
    config.model.init = "glorot_uniform"
    config.model.hidden = (256, 256)  # BP only
    config.model.dropout = 0.4  # CNN only; active in training alone

    config.train = ml_collections.ConfigDict()
    config.train.mode = "ordinary"  # ordinary | fgsm | gaussian
    config.train.epochs = 5
    config.train.batch_size = 128
    config.train.max_examples = 0  # 0: all 50k training images; fewer for quick runs
    config.train.learning_rate = 2e-3  # Adam peak rate
    config.train.schedule = "cosine"  # constant | cosine (decay to 0 over the run)
    config.train.eps = 0.1  # FGSM adversarial training (L-inf, pixels in [0, 1])
    config.train.alpha = 0.5  # weight of the clean loss: alpha*J(x) + (1-alpha)*J(x_adv)
    config.train.sigma = 0.3  # Gaussian-noise training, std before clipping
    config.train.loop = "auto"  # auto | scan | chunked (advjax/loops.py); auto: chunked on CPU
    config.train.chunk_size = 8  # steps per compiled chunk in the chunked form

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
    config.eval.chunk_size = 4
    return config


# The paper's Table 5 reports Gaussian robustness at std 0.3 for BP and 0.8 for the CNN.
PAPER_EVAL_SIGMA = {"bp": 0.3, "cnn": 0.8}


def experiment(model: str, mode: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The defaults for one of the paper's six (model, training mode) pairs."""
    config = get_config(arg)
    config.model.name = model
    config.train.mode = mode
    config.eval.sigma = PAPER_EVAL_SIGMA[model]
    return config
