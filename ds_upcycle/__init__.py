"""ds-upcycle: grow DeepSpeed Mixture-of-Experts models mid-training by expert upcycling.

Layers, lowest first (a module imports only its own folder and lower layers; docs/ARCHITECTURE.md
says where a new checkpoint format, utility score, export format or eval suite goes):
errors, choices, trust, cache, accelerator -> config, comm, atomic, dtypes -> moe, data -> model
-> checkpoint (DeepSpeed's files) -> trained (whole-model loader, a checkpoint's data, the
validation loss) -> training, upcycle, evaluation -> reproduce -> cli.
"""

__version__ = "0.1.0"
