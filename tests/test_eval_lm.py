"""The lm-eval model class against direct forward passes of the same tokens."""

import pytest
import sentencepiece as spm
import torch

from ds_upcycle.evaluation.lm_model import UpcycleLM
from eval_helpers import SEQ_LEN, TWIN_STEPS, Request, trained_checkpoint

CONTEXTS = ["from the gikaki records: gole:", "as for", "from the", "records: a", "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    return trained_checkpoint(tmp_path_factory, data_cache)


@pytest.fixture(scope="module")
def lm(checkpoint):
    return UpcycleLM(str(checkpoint), batch_size=3)


def ll_requests():
    long_context = " ".join(["from the records: a b c, d e"] * 12)  # longer than the 32-token window
    pairs = [(c, cont) for c in CONTEXTS for cont in (" roka lolu", " a", ", leku")]
    # " " becomes an empty context and " from" once lm-eval moves the trailing space over.
    extra = [("", "from the records"), (" ", "from"), ("from the gikaki records", ":"), (long_context, " roka")]
    return [Request(*pair) for pair in pairs + extra]


@torch.no_grad()
def direct_loglikelihood(lm, context: str, continuation: str) -> tuple[float, bool]:
    """One unbatched forward pass over the last max_length + 1 tokens of context + continuation."""
    sp = spm.SentencePieceProcessor(model_file=str(lm.tok.path))  # the tokenizer itself, not our wrapper
    if context.strip():
        context_ids = sp.encode(context)
        cont_ids = sp.encode(context + continuation)[len(context_ids):]
    else:  # an empty (or whitespace) context is the start of a text: EOS, then the whole string
        context_ids, cont_ids = [sp.eos_id()], sp.encode(context + continuation)
    tokens = (context_ids + cont_ids)[-(SEQ_LEN + 1):]
    logits, _ = lm.model(torch.tensor([tokens[:-1]]))
    logprobs = logits[0, -len(cont_ids):].log_softmax(-1)
    target = torch.tensor(cont_ids)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_max_length_defaults_to_training_sequence_length(lm):
    assert lm.max_length == SEQ_LEN and lm.eot_token_id == 2


def test_loglikelihood_equals_direct_computation(lm):
    requests = ll_requests()
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for request, (logprob, greedy) in zip(requests, results):
        expected, expected_greedy = direct_loglikelihood(lm, *request.args)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5), request.args
        assert greedy == expected_greedy
    assert any(greedy for _, greedy in results) and not all(greedy for _, greedy in results)


def test_results_do_not_depend_on_batch_size(checkpoint, lm):
    requests = ll_requests()
    batched = lm.loglikelihood(requests, disable_tqdm=True)
    single = UpcycleLM(str(checkpoint), batch_size=1).loglikelihood(requests, disable_tqdm=True)
    wide = UpcycleLM(str(checkpoint), batch_size=64).loglikelihood(requests, disable_tqdm=True)
    for a, b, c in zip(batched, single, wide):
        assert a[0] == pytest.approx(b[0], abs=1e-4) == pytest.approx(c[0], abs=1e-4)
        assert a[1] == b[1] == c[1]


@torch.no_grad()
def test_rolling_loglikelihood_of_a_short_document(lm):
    text = "from the gikaki records: gole: roka lolu."
    tokens = lm.tok.encode(text)
    assert len(tokens) < SEQ_LEN
    logits, _ = lm.model(torch.tensor([[lm.eot_token_id] + tokens[:-1]]))
    expected = logits[0].log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).sum().item()
    long_text = " ".join([text] * 8)
    (short, long_score) = lm.loglikelihood_rolling([Request(text), Request(long_text)], disable_tqdm=True)
    assert short == pytest.approx(expected, rel=1e-5)
    assert long_score < 7 * short  # every token of the long document is scored once


@torch.no_grad()
def greedy_oracle(lm, prompt: list[int], steps: int) -> list[int]:
    """Plain greedy decoding: full forward pass per token, no cache, no batch."""
    tokens = list(prompt)
    for _ in range(steps):
        logits, _ = lm.model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] == lm.eot_token_id:
            return tokens[len(prompt):-1]
    return tokens[len(prompt):]


def test_generation_matches_greedy_oracle_with_and_without_cache_at_any_batch_size(lm):
    prompts = [lm.tok.encode(c) for c in CONTEXTS]
    expected = [greedy_oracle(lm, p, 12) for p in prompts]
    try:
        for kv_cache in (True, False):
            lm.kv_cache = kv_cache
            assert lm.generate_tokens(prompts, 12) == expected
            assert [lm.generate_tokens([p], 12)[0] for p in prompts] == expected
    finally:
        lm.kv_cache = True


def test_generation_stops_at_max_gen_toks_and_at_stop_strings(lm):
    context = CONTEXTS[0]
    prompt = lm.tok.encode(context)
    oracle = greedy_oracle(lm, prompt, 20)
    assert len(oracle) == 20  # no EOS early on: the limit is what stops it
    kwargs = {"until": [], "max_gen_toks": 7, "do_sample": False}
    (seven,) = lm.generate_until([Request(context, kwargs)], disable_tqdm=True)
    assert seven == lm.decode_continuation(prompt, oracle[:7])

    full_text = lm.decode_continuation(prompt, oracle)
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 2]
    expected = full_text.split(stop)[0]
    assert len(expected) < len(full_text) // 2 + 1
    (cut,) = lm.generate_until([Request(context, {"until": [stop], "max_gen_toks": 20})], disable_tqdm=True)
    assert cut == expected
    (tokens,) = lm.generate_tokens([prompt], 20, [stop])
    assert tokens == oracle[:len(tokens)] and len(tokens) < 20
    assert stop in lm.decode_continuation(prompt, tokens)            # it stopped at the token that
    assert stop not in lm.decode_continuation(prompt, tokens[:-1])   # completed the stop string


def test_generation_keeps_the_leading_space(lm):
    (text,) = lm.generate_until([Request("from the gikaki records: gole:", {"until": ["."], "max_gen_toks": 4})],
                                disable_tqdm=True)
    assert text.startswith(" ") and not text.startswith("  ")


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_twin_scores_the_same(tmp_path_factory, data_cache):
    one = UpcycleLM(str(trained_checkpoint(tmp_path_factory, data_cache, ep_size=1, steps=TWIN_STEPS)))
    two = UpcycleLM(str(trained_checkpoint(tmp_path_factory, data_cache, ep_size=2, steps=TWIN_STEPS)))
    requests = ll_requests()
    for a, b in zip(one.loglikelihood(requests, disable_tqdm=True), two.loglikelihood(requests, disable_tqdm=True)):
        assert a[0] == pytest.approx(b[0], rel=1e-4, abs=1e-4)


@torch.no_grad()
def test_continuation_longer_than_the_window_is_scored_in_pieces(lm, caplog):
    # A checkpoint trained on 32-token sequences asked about a 110-token continuation (HellaSwag's
    # endings against a seq_len-128 model): every continuation token is scored, each piece of 32
    # conditioned on the 32 tokens before it, and one warning counts the requests that were cut.
    context, continuation = "from the gikaki records:", " roka lolu, leku gole" * 16
    context_ids = lm.tok.encode(context)
    cont_ids = lm.tok.encode(context + continuation)[len(context_ids):]
    assert len(cont_ids) > 3 * SEQ_LEN
    expected, expected_greedy = 0.0, True
    for start in range(0, len(cont_ids), SEQ_LEN):
        piece = cont_ids[start:start + SEQ_LEN]
        window = (context_ids + cont_ids[:start + len(piece)])[-(SEQ_LEN + 1):]
        logits, _ = lm.model(torch.tensor([window[:-1]]))
        logprobs = logits[0, -len(piece):].log_softmax(-1)
        expected += logprobs.gather(1, torch.tensor(piece)[:, None]).sum().item()
        expected_greedy &= bool((logprobs.argmax(-1) == torch.tensor(piece)).all())
    with caplog.at_level("WARNING"):
        (logprob, greedy), short = lm.loglikelihood([Request(context, continuation), Request("as for", " a")],
                                                    disable_tqdm=True)
    assert logprob == pytest.approx(expected, rel=1e-5) and greedy == expected_greedy
    assert short[0] == pytest.approx(direct_loglikelihood(lm, "as for", " a")[0], rel=1e-5)
    warnings = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert warnings == [f"1 of 2 loglikelihood requests exceed max_length {SEQ_LEN}: their contexts were "
                        f"truncated from the left; 1 continuations longer than the window were scored in pieces"]
