"""The paper's central experiment: Fixed-E, Upcycled and Fixed-mE at the same token budget."""

from .config import NAMED_CONFIGS, ReproduceConfig, load_config
from .pipeline import run_reproduce

__all__ = ["NAMED_CONFIGS", "ReproduceConfig", "load_config", "run_reproduce"]
