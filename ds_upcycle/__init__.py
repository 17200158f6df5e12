"""ds-upcycle: grow DeepSpeed Mixture-of-Experts models mid-training by expert upcycling."""

__version__ = "0.1.0"
