"""Checkpoint weights in one process: the model evaluates as the DeepSpeed engine that saved it."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_DATA
from ds_upcycle.data.config import DataConfig
from ds_upcycle.data.loader import PackedSequences, validation_batches
from ds_upcycle.data.prepare import prepare_data
from ds_upcycle.errors import UserError
from ds_upcycle.trained import load_model
from ds_upcycle.checkpoint import read_metrics
from eval_helpers import SEQ_LEN, TWIN_STEPS, trained_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache):
    return trained_checkpoint(tmp_path_factory, data_cache)


@torch.no_grad()
def validation_loss(model, tokenizer, data_cache) -> float:
    """train.py's validation: the first 16 windows of the val split, mean next-token cross-entropy."""
    prepared = prepare_data(DataConfig(source=SMALL_DATA, vocab_size=512, seq_len=SEQ_LEN,
                                       cache_dir=str(data_cache)), tokenizer)
    data = PackedSequences(prepared.tokens("val"), SEQ_LEN, "val")
    total, count = 0.0, 0
    for inputs, targets in validation_batches(data, 16, 8, 1, 0):
        logits, _ = model(inputs)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total / count


def recorded_val_loss(save_dir) -> float:
    return [r["val_loss"] for r in read_metrics(save_dir / "metrics.jsonl") if "val_loss" in r][-1]


def test_loaded_model_reproduces_the_validation_loss_of_training(checkpoint, data_cache):
    loaded = load_model(checkpoint)
    assert loaded.seq_len == SEQ_LEN and loaded.ref.tag == "global_step200"
    assert not loaded.model.training
    # Expert weights come from their own files: a swap of two experts would change the loss.
    assert validation_loss(loaded.model, loaded.tokenizer, data_cache) == pytest.approx(
        recorded_val_loss(checkpoint), rel=1e-5)


def test_bfloat16_load_keeps_the_routing_bias_in_fp32(checkpoint):
    loaded = load_model(checkpoint, dtype=torch.bfloat16)
    assert loaded.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert all(router.route_bias.dtype == torch.float32 for router in loaded.model.routers)
    assert any(router.route_bias.abs().max() > 0 for router in loaded.model.routers)


def test_missing_expert_file_is_named(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint / "global_step200", broken)
    (broken / "layer_2_expert_3_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserError, match="lacks expert file layer_2_expert_3_mp_rank_00_model_states.pt"):
        load_model(broken)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a DeepSpeed checkpoint"):
        load_model(tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_checkpoint_loads_as_its_single_process_twin(tmp_path_factory, data_cache):
    one = trained_checkpoint(tmp_path_factory, data_cache, ep_size=1, steps=TWIN_STEPS)
    two = trained_checkpoint(tmp_path_factory, data_cache, ep_size=2, steps=TWIN_STEPS)
    loaded = load_model(two)
    # Its own engine's figure: every expert was found under its global id, whichever rank saved it.
    own = validation_loss(loaded.model, loaded.tokenizer, data_cache)
    assert own == pytest.approx(recorded_val_loss(two), rel=1e-5)
    single = dict(load_model(one).model.named_parameters())
    for name, param in loaded.model.named_parameters():
        torch.testing.assert_close(param, single[name], rtol=1e-4, atol=1e-5)
