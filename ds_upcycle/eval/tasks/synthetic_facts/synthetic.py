"""Hooks the synthetic_facts task YAML files name with `!function`; the code lives in the package."""

from ds_upcycle.evaluation.synthetic import facts_gen_dataset, facts_mc_dataset, score_record

__all__ = ["facts_gen_dataset", "facts_mc_dataset", "score_record"]
