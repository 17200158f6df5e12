"""Evaluation of checkpoints with lm-evaluation-harness, and comparison of the results.

- weights: a checkpoint's weights in one single-process model, for any training layout;
- lm_model: the lm-eval model class (registered as "ds-upcycle");
- suites, tasks, synthetic: what to run, offline data, the built-in synthetic benchmark;
- run: `run_eval(EvalConfig)`, the library behind `ds-upcycle eval`;
- compare: `ds-upcycle compare`, tables, gap closure and plots;
- cli: the two click commands.

Importing this package does not import lm-eval; its modules do.
"""
