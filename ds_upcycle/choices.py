"""The names users choose from on the command line, kept apart from the code behind them.

The modules that act on a choice import its names from here, and the `ds-upcycle` command builds
its options from here without importing torch: `ds-upcycle --help` answers at once.
"""

# Data splits of a prepared source (data/prepare.py).
SPLITS = ("pretrain", "cpt", "val")

# Floating-point types a model is loaded and evaluated in (dtypes.py), and what `export` writes:
# the precisions a checkpoint trains in.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
EXPORT_DTYPES = ("float32", "bfloat16")

# Utility scores of experts (trained/scores.py); the first two need no gradient estimate.
SELECTION_RULES = ("uniform", "grad_sq", "saliency", "weight_norm", "fisher")
GRADIENT_FREE_RULES = ("uniform", "weight_norm")

# How scores become copy counts, and what the replicas' Adam moments start from (upcycle/operator.py).
ALLOCATIONS = ("proportional", "rank")
OPTIMIZER_STATE_MODES = ("copy", "reset", "scale", "fresh")
