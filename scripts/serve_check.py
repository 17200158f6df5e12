"""Does vLLM serve an export exactly? Greedy tokens and log-probs of vLLM against transformers.

Run in vLLM's own environment (vLLM pins its torch and transformers; ds-upcycle is not needed):

    python scripts/serve_check.py EXPORT_DIR [EXPORT_DIR ...] [--markdown]

For each `ds-upcycle export` directory: random prompts (token ids, seeded), greedy generation by
vLLM (`LLM.generate`, temperature 0, the chosen token's log-prob) and by transformers' own class
(`AutoModelForCausalLM`, one full forward per step); then transformers' log-probs of vLLM's tokens
(teacher-forced), so that one early difference does not hide how far the rest agree.

Printed per export: the class, greedy tokens equal to transformers' (count, and the first
prompt/step where they part), and the largest and mean |log-prob difference| over vLLM's tokens.
"Exact" means every token equal and every log-prob within --atol (float32 kernels sum in other
orders; a router that picks other experts gives differences of 1e-2 and more).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # ids from 3 up: 0-2 are pad/bos/eos in the exports' tokenizers
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()


def vllm_greedy(model_dir: Path, ids: list[list[int]], new_tokens: int, dtype: str):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=dtype, skip_tokenizer_init=True, enforce_eager=True, seed=0,
              max_model_len=max(map(len, ids)) + new_tokens + 8)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, logprobs=0, detokenize=False,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    tokens, logprobs = [], []
    for out in outputs:
        sample = out.outputs[0]
        tokens.append(list(sample.token_ids))
        logprobs.append([step[tok].logprob for tok, step in zip(sample.token_ids, sample.logprobs)])
    del llm
    return tokens, logprobs


def hf_model(model_dir: Path, dtype: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(new_tokens):
        logits = model(torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], continuation: list[int]) -> list[float]:
    seq = torch.tensor([prompt + continuation])
    logp = torch.log_softmax(model(seq).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(continuation))
    return logp[positions, torch.tensor(continuation)].tolist()


def check(model_dir: Path, args) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    ids = prompts(config["vocab_size"], args.prompts, args.prompt_len, args.seed)
    started = time.time()
    try:
        v_tokens, v_logprobs = vllm_greedy(model_dir, ids, args.new_tokens, args.dtype)
    except Exception as error:  # what vLLM says is the finding
        return {"export": str(model_dir), "class": config["architectures"][0], "error": f"{type(error).__name__}: {error}"}
    model = hf_model(model_dir, args.dtype)
    equal, first_diff, diffs = 0, None, []
    for p, (prompt, toks, lps) in enumerate(zip(ids, v_tokens, v_logprobs)):
        mine = hf_greedy(model, prompt, args.new_tokens)
        agree = next((i for i, (a, b) in enumerate(zip(toks, mine)) if a != b), len(toks))
        equal += sum(a == b for a, b in zip(toks, mine))
        if agree < len(toks) and first_diff is None:
            first_diff = f"prompt {p}, step {agree}"
        diffs += [abs(a - b) for a, b in zip(lps, hf_logprobs(model, prompt, toks))]
    total = args.prompts * args.new_tokens
    max_diff = max(diffs)
    return {"export": str(model_dir), "class": config["architectures"][0], "tokens_equal": equal, "tokens": total,
            "first_difference": first_diff, "max_logprob_diff": max_diff, "mean_logprob_diff": sum(diffs) / len(diffs),
            "exact": equal == total and max_diff <= args.atol, "seconds": round(time.time() - started, 1)}


def check_in_child(model_dir: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        options = ["--prompts", args.prompts, "--prompt-len", args.prompt_len, "--new-tokens", args.new_tokens,
                   "--dtype", args.dtype, "--atol", args.atol, "--seed", args.seed, "--json", result]
        proc = subprocess.run([sys.executable, __file__, model_dir, *map(str, options)], stderr=subprocess.PIPE,
                              text=True)
        if result.exists():
            return json.loads(result.read_text())[0]
    config = json.loads((model_dir / "config.json").read_text())
    died = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or [""]
    row = {"export": str(model_dir), "class": config["architectures"][0],
           "error": f"the process died ({died}): {last[0].strip()[-200:]}"}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| export | class | greedy tokens equal | max abs log-prob diff | mean | exact |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        name = Path(r["export"]).parent.name
        if "error" in r:
            lines.append(f"| {name} | {r['class']} | vLLM failed: {r['error'][:120]} | | | no |")
            continue
        lines.append(f"| {name} | {r['class']} | {r['tokens_equal']}/{r['tokens']} | {r['max_logprob_diff']:.2e} | "
                     f"{r['mean_logprob_diff']:.2e} | {'yes' if r['exact'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--atol", type=float, default=1e-3, help="largest log-prob difference called exact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args()
    missing = [str(d) for d in args.exports if not (d / "config.json").is_file()]
    if missing:
        sys.exit(f"serve_check: not an export directory (no config.json): {', '.join(missing)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if len(args.exports) == 1:
        rows = [check(args.exports[0], args)]
        print(json.dumps(rows[0]), flush=True)
    else:  # one process per export: a crash in vLLM's kernels is a finding, not the end of the table
        rows = [check_in_child(model_dir, args) for model_dir in args.exports]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
