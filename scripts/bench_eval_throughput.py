"""Evaluation throughput of the lm-eval model class: requests/s with and without the KV cache.

Generation requests (synthetic record prompts, no stop string, so each one produces exactly
--max-gen-toks tokens unless the model ends with EOS) are run through `generate_until` with the
KV cache and without it (every new token recomputes the whole sequence); both give the same
tokens, which the script checks. Loglikelihood requests (4-way fact questions) are timed for
reference. Each figure is the median of --repeats runs, the modes measured in alternation.

    DS_ACCELERATOR=cpu python scripts/bench_eval_throughput.py --checkpoint runs/quickstart
    python scripts/bench_eval_throughput.py --checkpoint CKPT --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


class Request:
    def __init__(self, *args) -> None:
        self.args = args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    from ds_upcycle.evaluation.lm_model import UpcycleLM
    from ds_upcycle.evaluation.synthetic import SyntheticSpec, multiple_choice_rows, record_rows, spec_from_source
    from ds_upcycle.checkpoint import find_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a ds-upcycle checkpoint (save or tag directory)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--requests", type=int, default=64, help="generation requests per run")
    p.add_argument("--max-gen-toks", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()

    source = (find_checkpoint(args.checkpoint).run_record.data_source or "")
    spec = spec_from_source(source) if source.startswith("synthetic") else SyntheticSpec()
    prompts = [row["prompt"] for row in record_rows(spec)][:args.requests]
    generation = [Request(prompt, {"until": [], "max_gen_toks": args.max_gen_toks}) for prompt in prompts]
    questions = multiple_choice_rows(spec)[:args.requests]
    scoring = [Request(q["prompt"], " " + choice) for q in questions for choice in q["choices"]]

    print(f"checkpoint {args.checkpoint}, device {args.device}, dtype {args.dtype}, "
          f"{torch.get_num_threads()} threads; {len(generation)} generation requests of {args.max_gen_toks} "
          f"tokens, {len(scoring)} loglikelihood requests; median of {args.repeats}")
    rows = []
    print(f"{'request type':<16}{'batch':>6}{'KV cache':>10}{'requests/s':>12}{'tokens/s':>10}{'speedup':>9}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        lm = UpcycleLM(args.checkpoint, device=args.device, dtype=args.dtype, batch_size=batch)
        device = lm.device
        outputs, times = {}, {True: [], False: []}

        def generate(lm=lm, outputs=outputs):
            outputs[lm.kv_cache] = lm.generate_until(generation, disable_tqdm=True)

        for _ in range(args.repeats):
            for kv_cache in (True, False):
                lm.kv_cache = kv_cache
                times[kv_cache].append(timed(generate, device))
        if outputs[True] != outputs[False]:
            raise SystemExit("KV cache changed the generated text")
        tokens = sum(len(lm.tok_encode(text)) for text in outputs[True])
        base = statistics.median(times[False])
        for kv_cache in (False, True):
            t = statistics.median(times[kv_cache])
            print(f"{'generate_until':<16}{batch:>6}{'on' if kv_cache else 'off':>10}{len(generation) / t:>12.2f}"
                  f"{tokens / t:>10.0f}{base / t:>9.2f}")
            rows.append({"request": "generate_until", "batch": batch, "kv_cache": kv_cache,
                         "requests_per_s": len(generation) / t, "tokens_per_s": tokens / t, "speedup": base / t})
        t = statistics.median(timed(lambda lm=lm: lm.loglikelihood(scoring, disable_tqdm=True), device)
                              for _ in range(args.repeats))
        print(f"{'loglikelihood':<16}{batch:>6}{'-':>10}{len(scoring) / t:>12.1f}{'':>10}{'':>9}")
        rows.append({"request": "loglikelihood", "batch": batch, "requests_per_s": len(scoring) / t})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype,
                       "max_gen_toks": args.max_gen_toks, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
