"""Evaluation of checkpoints with lm-evaluation-harness, and comparison of the results.

- lm_model: the lm-eval model class (registered as "ds-upcycle");
- suites, tasks, synthetic: what to run, offline data, the built-in synthetic benchmark;
- run: `run_eval(EvalConfig)`, the library behind `ds-upcycle eval`;
- compare: `ds-upcycle compare`, tables, gap closure and plots (reads results files only);
- ledger: the compute ledger from training metrics;
- cli: the two click commands.

Importing this package does not import lm-eval; run, lm_model and tasks do.
"""

RESULTS_FILE = "eval_results.json"  # written into the checkpoint's tag directory by default
