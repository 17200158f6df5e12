"""A trained checkpoint as a whole: its model in one process, the data it was trained on, its loss.

Above checkpoint/ (files) and the model, below everything that uses a checkpoint (training,
upcycling, evaluation, export): one loader (model.py), one description of a checkpoint's data
(data.py) and one validation loss (loss.py) for all of them.
"""

from .data import RunData
from .loss import BATCH_SIZE, checkpoint_loss, validation_loss
from .model import LoadedModel, load_master_model, load_model

__all__ = ["BATCH_SIZE", "LoadedModel", "RunData", "checkpoint_loss", "load_master_model", "load_model",
           "validation_loss"]
