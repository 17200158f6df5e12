"""lm-eval's own command line, with ds-upcycle checkpoints as `--model ds-upcycle`.

    python -m ds_upcycle.lm_eval --model ds-upcycle --model_args checkpoint=runs/e8 --tasks arc_easy

lm-eval 0.4.13 knows a model class only once its module is imported; this module imports ours,
then hands the command line to lm-eval unchanged. lm-eval releases that read the `lm_eval.models`
entry-point group (declared in setup.cfg) find the model with a plain `lm_eval --model ds-upcycle`.
"""

from lm_eval.__main__ import cli_evaluate

from .evaluation import lm_model  # noqa: F401  (registers "ds-upcycle" with lm-eval)
from .quick_exit import exit_process

if __name__ == "__main__":
    exit_process(cli_evaluate())
