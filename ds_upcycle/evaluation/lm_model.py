"""lm-eval's model interface for ds-upcycle checkpoints (`--model ds-upcycle`).

lm-eval owns the task logic; this class answers its three request types with the single-process
model: loglikelihood (one forward pass over context + continuation, right-padded batches),
loglikelihood_rolling (lm-eval's disjoint rolling windows) and generate_until (greedy or sampled
decoding of left-padded batches, with a KV cache unless told not to). Batching and request
reordering use lm-eval's own Collator, as its Hugging Face backend does.

Token conventions follow training: documents were encoded without BOS and each was followed by
EOS, so EOS is the "start of text" token that conditions an empty context.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..data.tokenizer import HFTokenizer, load_tokenizer, tokenizer_digest
from ..dtypes import parse_dtype
from ..errors import UserError
from ..model import KVCache, Transformer
from ..trained import load_model

log = logging.getLogger(__name__)


def _usable_device(name: str | None) -> torch.device:
    """The device asked for; a CUDA device on a machine without one gives the CPU, as lm-eval's
    Hugging Face model does (lm-eval's command line asks for cuda:0 unless told otherwise)."""
    device = torch.device(name or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning(f"device {name} is not available here; running on cpu")
        return torch.device("cpu")
    return device


def _positive_int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return number


@register_model("ds-upcycle")
class UpcycleLM(TemplateLM):
    """A ds-upcycle checkpoint as an lm-eval model.

    Args:
        checkpoint: save directory (with `latest`) or tag directory.
        device, dtype: where and in which precision to run ("float32", "bfloat16", "float16").
        batch_size: requests per forward pass.
        max_length: context window in tokens; inputs are truncated from the left to it.
            Default: the sequence length the checkpoint was trained with.
        max_gen_toks: tokens to generate when a task does not say.
        kv_cache: reuse keys and values while generating (off: recompute the whole sequence
            for every new token; same results, slower).
        model, tokenizer: an already built Transformer and its tokenizer file,
            instead of `checkpoint` (then max_length is required).
    """

    def __init__(self, checkpoint: str | None = None, device: str | None = None, dtype: str = "float32",
                 batch_size: int | str | None = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 kv_cache: bool = True, model: Transformer | None = None, tokenizer: str | Path | None = None,
                 **_ignored) -> None:
        super().__init__()
        device = _usable_device(device)
        if model is None:
            if checkpoint is None:
                raise UserError("the ds-upcycle model needs checkpoint=PATH")
            loaded = load_model(checkpoint, device, parse_dtype(dtype), progress=True)
            model, tokenizer = loaded.model, loaded.tokenizer
            max_length = max_length or loaded.seq_len
            self.checkpoint = str(loaded.ref.path)
        else:
            model = model.to(device).eval()
            self.checkpoint = None
        if tokenizer is None:
            raise UserError("a model given directly needs its tokenizer (a SentencePiece model or tokenizer.json)")
        if max_length is None:
            raise UserError("max_length is unknown: the checkpoint records no data.seq_len; pass max_length")
        self.model = model
        self.tok = load_tokenizer(tokenizer)
        self._device = device
        self._max_length = _positive_int("max_length", max_length)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if str(batch_size) == "auto":
            raise UserError("batch_size 'auto' is not supported; give a number")
        self._batch_size = _positive_int("batch_size", batch_size or 8)
        self.kv_cache = kv_cache if isinstance(kv_cache, bool) else str(kv_cache).lower() in ("1", "true", "yes")
        self._generator = torch.Generator(device=device).manual_seed(0)

    # ------------------------------------------------------------------ what lm-eval asks about
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        kind = "hf-tokenizer" if isinstance(self.tok, HFTokenizer) else "sentencepiece"
        return f"{kind}-{tokenizer_digest(self.tok.path)[:16]}"

    def get_model_info(self) -> dict:
        return {"checkpoint": self.checkpoint, "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "max_length": self.max_length,
                "kv_cache": self.kv_cache}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(list(tokens))

    def decode_continuation(self, context: list[int], continuation: list[int]) -> str:
        """Text of `continuation` as it reads after `context`.

        SentencePiece drops the leading space of a decoded sequence, so a continuation decoded
        alone would lose the space between it and the context; decode it after the context's
        last token and keep what that token did not contribute.
        """
        if not context:
            return self.tok.decode(continuation)
        head = self.tok.decode(context[-1:])
        full = self.tok.decode(context[-1:] + continuation)
        return full[len(head):] if full.startswith(head) else self.tok.decode(continuation)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-softmax over the vocabulary at every position of right-padded rows: [B, T, V]."""
        width = max(len(row) for row in rows)
        tokens_BT = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens_BT[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        # Right padding is invisible to earlier positions under causal attention, and dropless
        # routing never lets a padding token displace a real one from an expert.
        logits_BTV, _ = self.model(tokens_BT.to(self.device))
        return F.log_softmax(logits_BTV.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score every continuation given its context, as lm-eval's Hugging Face backend does.

        A request longer than the window keeps the end of its context (truncated from the left);
        a continuation longer than the window is scored in consecutive pieces of max_length
        tokens, each conditioned on the window before it, so that every one of its tokens counts.
        A warning says how many requests were cut.
        """
        pieces, owners = [], []
        for index, (_, context, continuation) in enumerate(requests):
            # A context of whitespace only encodes to nothing once lm-eval has moved its trailing
            # space into the continuation: condition it like an empty context, on the prefix token.
            context = context or [self.prefix_token_id]
            for start in range(0, len(continuation), self.max_length):
                pieces.append((None, context + continuation[:start], continuation[start:start + self.max_length]))
                owners.append(index)
        scores = self._score_pieces(pieces, disable_tqdm)
        totals = [[0.0, True] for _ in requests]
        for owner, (logprob, greedy) in zip(owners, scores):
            totals[owner][0] += logprob
            totals[owner][1] &= greedy
        self._warn_truncated(requests)
        results = [(logprob, greedy) for logprob, greedy in totals]
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def _warn_truncated(self, requests) -> None:
        cut = sum(len(context) + len(continuation) > self.max_length + 1 for _, context, continuation in requests)
        long = sum(len(continuation) > self.max_length for _, _, continuation in requests)
        if cut:
            log.warning(f"{cut} of {len(requests)} loglikelihood requests exceed max_length "
                        f"{self.max_length}: their contexts were truncated from the left"
                        + (f"; {long} continuations longer than the window were scored in pieces"
                                   if long else ""))

    def _score_pieces(self, pieces, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (_, context, continuation <= max_length tokens)."""
        def sort_key(request):
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        # Requests sharing context + continuation[:-1] share one forward pass (e.g. answer letters).
        order = Collator(pieces, sort_fn=sort_key, group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results = []
        bar = tqdm(total=len(pieces), disable=disable_tqdm, desc="loglikelihood requests")
        for chunk in order.get_batched(n=self.batch_size):
            rows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
            logprobs_BTV = self._logprobs(rows)
            for (request, context, continuation), row, logprobs_TV in zip(chunk, rows, logprobs_BTV):
                scored_TV = logprobs_TV[len(row) - len(continuation):len(row)].unsqueeze(0)
                for _, cont, logprobs_1CV in order.get_cache(
                        req_str=request, cxt_toks=context, cont_toks=continuation, logits=scored_TV):
                    logprobs_CV = logprobs_1CV[0, -len(cont):]
                    target_C = torch.tensor(cont, device=logprobs_CV.device)
                    results.append((logprobs_CV.gather(1, target_C[:, None]).sum().item(),
                                    bool((logprobs_CV.argmax(-1) == target_C).all())))
                    bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._score_pieces(windows, disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def context_budget(self, max_gen_toks: int) -> int:
        """Context tokens kept for a generation of up to max_gen_toks tokens.

        Room is reserved for the generation inside the window, but never more than half of it:
        tasks ask for hundreds of tokens while small models have short windows, and RoPE lets
        the generation run past the window rather than starve the prompt.
        """
        return self.max_length - min(max_gen_toks, self.max_length // 2)

    def _next_tokens(self, logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
        if temperature <= 0:
            return logits_BV.argmax(-1)
        probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
        return torch.multinomial(probs_BV, 1, generator=self._generator).squeeze(-1)

    @torch.no_grad()
    def generate_tokens(self, prompts: list[list[int]], max_new_tokens: int, stop: list[str] = (),
                        temperature: float = 0.0) -> list[list[int]]:
        """Continue each prompt until EOS, a stop string in its text, or max_new_tokens.

        Prompts are left-padded into one batch; a row leaves the batch when it finishes.
        """
        model, device = self.model, self.device
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max())
        pad_B = width - lengths
        prompt_BP = torch.full((len(prompts), width), self.eot_token_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            prompt_BP[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        prompt_BP = prompt_BP.to(device)
        dtype = next(model.parameters()).dtype

        def forward_all(tokens_BT: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # Without reuse: a fresh cache only carries the padding of the rows still running.
            cache = KVCache(model.cfg, len(rows), tokens_BT.shape[1], device, dtype, pad_B[rows])
            return model(tokens_BT, cache, 0)[0][:, -1]

        rows = torch.arange(len(prompts))          # request index of each batch row
        generated = [[] for _ in prompts]
        if self.kv_cache:
            cache = KVCache(model.cfg, len(prompts), width + max_new_tokens, device, dtype, pad_B)
            logits_BV = model(prompt_BP, cache, 0)[0][:, -1]
        else:
            logits_BV = forward_all(prompt_BP, rows)
        for step in range(max_new_tokens):
            next_B = self._next_tokens(logits_BV, temperature).cpu()
            running = []
            for b, (row, token) in enumerate(zip(rows.tolist(), next_B.tolist())):
                if token == self.eot_token_id:
                    continue
                generated[row].append(token)
                text = self.decode_continuation(prompts[row], generated[row]) if stop else ""
                if not any(s in text for s in stop):
                    running.append(b)
            if not running or step + 1 == max_new_tokens:
                break
            keep = torch.tensor(running)
            rows, next_B = rows[keep], next_B[keep]
            if self.kv_cache:
                cache.select(keep.to(device))
                logits_BV = model(next_B[:, None].to(device), cache, width + step)[0][:, -1]
            else:
                so_far_BT = torch.tensor([generated[row] for row in rows.tolist()], dtype=torch.long)
                logits_BV = forward_all(torch.cat([prompt_BP[rows.to(device)], so_far_BT.to(device)], 1), rows)
        return generated

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            # EOS is caught by its id; its decoded text is empty and would match everywhere.
            stop = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
            max_new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            budget = self.context_budget(max_new)
            prompts = [self.tok_encode(context)[-budget:] or [self.prefix_token_id] for context in contexts]
            for context, prompt, tokens in zip(contexts, prompts, self.generate_tokens(prompts, max_new, stop,
                                                                                       temperature)):
                text = postprocess_generated_text(self.decode_continuation(prompt, tokens), stop, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)
