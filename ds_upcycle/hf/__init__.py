"""Hugging Face interop: checkpoints to transformers model directories (`export`) and back (`import`).

One Family per transformers class (family.py: the name table both directions walk; one module per
family: its config.json both ways and what it cannot express), chosen in registry.py. Needs
transformers (the `hf` extra); the rest of ds-upcycle does not import this package.
"""
