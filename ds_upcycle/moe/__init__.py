"""MoE feed-forward: router (our loss-free gate), experts, and the DeepSpeed dispatch that joins them.

Shape suffixes used in this package: S tokens, E experts, K chosen experts per token, D hidden
size, F feed-forward width, C expert capacity (tokens per expert buffer).
"""

from .layer import MoEFeedForward
from .router import LossFreeRouter

__all__ = ["LossFreeRouter", "MoEFeedForward"]
