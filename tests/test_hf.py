"""Hugging Face interop, against transformers' own model classes (random models from small configs).

Import: our forward of the imported checkpoint equals the family's forward; exporting it again
gives back every tensor bit for bit. Export: every preset's model (shrunk, its structure kept) loads
in transformers with no missing or unexpected weight and computes our logits. The imported
checkpoint is what stock DeepSpeed saves for an engine without an optimizer (module weights only).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckpt_helpers import assert_deepspeed_saves_the_same, run_worker
from conftest import SMALL_DATA, check_ok, run_train, train_refusal, write_ds_config
from ds_upcycle.checkpoint import MODULE_ONLY_CONFIG, named_param_states, read_checkpoint, read_module_weights
from ds_upcycle.cli import main
from ds_upcycle.config import PRESETS, ModelConfig
from ds_upcycle.data.config import DataConfig
from ds_upcycle.data.prepare import prepare_data
from ds_upcycle.data.sources import resolve_source
from ds_upcycle.data.tokenizer import load_tokenizer, train_tokenizer
from ds_upcycle.errors import UserError
from ds_upcycle.hf.export import export_checkpoint, write_hf_model
from ds_upcycle.hf.files import read_weights, write_weights
from ds_upcycle.hf.importer import import_checkpoint
from ds_upcycle.hf.registry import FAMILIES, export_family
from ds_upcycle.hf.tokenizer import write_hf_tokenizer
from ds_upcycle.model import Transformer
from ds_upcycle.trained import RunData, load_model
from ds_upcycle.trained.scores import ExpertScores
from ds_upcycle.upcycle.calibration import calibrate
from ds_upcycle.upcycle.config import ExpandConfig
from ds_upcycle.upcycle.expand import expand_checkpoint
from ds_upcycle.upcycle.operator import allocate_copies

VOCAB = 384  # model vocabulary; the tokenizer has 320 ids (released models pad theirs too)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
FAMILY_CONFIGS = {
    "mixtral": dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    # wider heads than hidden / heads, MoE in every second layer, no renormalisation, tied embeddings
    "qwen3_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
                      decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=True),
    "olmoe": dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    # interleaved rotary pairs, MoE in layers 1 and 3, a selection bias
    "ernie4_5_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, moe_num_experts=4, moe_k=2,
                         moe_num_shared_experts=0, moe_layer_start_index=1, moe_layer_interval=2),
    # sigmoid scores with a selection bias, per-head q/k norm
    "glm4_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4,
                     num_experts_per_tok=2, n_shared_experts=0, first_k_dense_replace=0, n_group=1, topk_group=1,
                     use_qk_norm=True, rope_parameters={**ROPE, "partial_rotary_factor": 1.0}),
}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    docs = list(resolve_source(SMALL_DATA, "text").documents())[:300]
    return train_tokenizer(docs, 320, tmp_path_factory.mktemp("sp") / "tokenizer.model")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random (norm weights around 1, selection biases small), so no mapping error hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.numel() or not tensor.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if "norm" in name:
                tensor.copy_(1 + 0.2 * noise)
            elif "bias" in name:
                tensor.copy_(0.05 * noise.reshape(tensor.shape))
            else:
                tensor.copy_(0.1 * noise)


def hf_model_dir(model_type: str, root: Path, sp_model: Path, hf_tokenizer: bool = True,
                 dtype: torch.dtype = torch.float32):
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, max_position_embeddings=64,
                                               **{"rope_parameters": ROPE, **FAMILY_CONFIGS[model_type]})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model)
    out = root / model_type
    model.to(dtype).save_pretrained(str(out))
    if hf_tokenizer:
        write_hf_tokenizer(sp_model, out)
        (out / "tokenizer.model").unlink()  # a tokenizer.json alone, as most releases ship
    else:
        shutil.copyfile(sp_model, out / "tokenizer.model")
    return out, model


def copy_tokenizer_files(release: Path, out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (release / name).exists():
            shutil.copyfile(release / name, out / name)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_import_computes_the_family_forward_and_exports_back_bit_for_bit(model_type, layout, tmp_path, sp_model):
    """Either layout transformers writes: per expert (its default), or fused experts as transformers 5
    holds them and newer releases ship (`save_original_format=False`); export writes per expert."""
    hf_dir, hf_model = hf_model_dir(model_type, tmp_path, sp_model, hf_tokenizer=model_type != "mixtral")
    if layout == "fused":
        per_expert, hf_dir = hf_dir, tmp_path / "fused"
        hf_model.save_pretrained(str(hf_dir), save_original_format=False)
        copy_tokenizer_files(per_expert, hf_dir)
        assert any(name.endswith("experts.gate_up_proj") for name in read_weights(hf_dir))
    import_checkpoint(hf_dir, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], hf_model(ids).logits, atol=1e-5, rtol=1e-5)
    assert loaded.record.optimizer_state is False
    assert load_tokenizer(loaded.tokenizer).encode("Alice met Bob.") == load_tokenizer(sp_model).encode("Alice met Bob.")

    export_checkpoint(tmp_path / "ckpt", tmp_path / "again")
    original, again = read_weights(tmp_path / model_type), read_weights(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == model_type
    assert sorted(original) == sorted(again)
    # GLM-4 MoE's shared expert: the release's is empty (width 0), ours zero at the experts' width (servable)
    shared = {name for name in original if ".shared_experts." in name}
    assert all(original[n].numel() == 0 and again[n].numel() and not again[n].count_nonzero() for n in shared)
    assert all(torch.equal(original[name], again[name]) for name in set(original) - shared)
    if shared:  # and it computes the same, bit for bit
        served = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "again")).eval()
        with torch.no_grad():
            assert torch.equal(served(ids).logits, hf_model(ids).logits)


def shrunk(preset: ModelConfig) -> ModelConfig:
    """The preset's structure (layers, MoE pattern, experts, top-K, heads, router) at a tiny width."""
    return preset.replace(vocab_size=VOCAB, dim=8 * preset.n_heads, dense_ffn_dim=24, expert_ffn_dim=8, init_std=0.1)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_exports_to_a_class_that_computes_it(name, tmp_path, sp_model):
    model = Transformer(shrunk(PRESETS[name])).eval()
    randomize(model, seed=3)
    result = write_hf_model(model, sp_model, tmp_path / "hf", seq_len=64)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not any(info.values()), info
    ids = tokens(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The fourth entity holds value 17.\n\nNext:  two spaces"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == load_tokenizer(sp_model).encode(text)
    assert result.family.architecture == json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]


def test_export_import_export_is_bit_for_bit_and_shards(tmp_path, sp_model):
    model = Transformer(shrunk(PRESETS["tiny-il"]).replace(score_func="softmax")).eval()
    randomize(model, seed=5)
    first = write_hf_model(model, sp_model, tmp_path / "first", seq_len=64, max_shard_bytes=20_000)
    assert len(first.weight_files) > 1 and (tmp_path / "first" / "model.safetensors.index.json").is_file()
    import_checkpoint(tmp_path / "first", tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "second")
    a, b = read_weights(tmp_path / "first"), read_weights(tmp_path / "second")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((tmp_path / "first" / "config.json").read_text())
            == json.loads((tmp_path / "second" / "config.json").read_text()))


def test_bf16_export_and_bin_import(tmp_path, sp_model):
    hf_dir, hf_model = hf_model_dir("mixtral", tmp_path, sp_model)
    weights = load_file(str(hf_dir / "model.safetensors"))  # the same weights as one pytorch_model.bin
    torch.save(weights, hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
    import_checkpoint(hf_dir, tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "bf16", dtype="bfloat16")
    exported = read_weights(tmp_path / "bf16")
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], weights[k].bfloat16()) for k in weights)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_imported_checkpoint_is_what_deepspeed_saves(tmp_path, sp_model, dtype):
    """An import is the checkpoint stock DeepSpeed saves for an engine without an optimizer, holding
    the release's weights in the release's dtype: no masters, no ZeRO files, a quarter of the old disk."""
    hf_dir, _ = hf_model_dir("ernie4_5_moe", tmp_path, sp_model, dtype=getattr(torch, dtype))
    import_checkpoint(hf_dir, tmp_path / "ckpt")
    tag = tmp_path / "ckpt" / "imported"
    assert not list(tag.glob("zero_pp_rank_*")) and (tag / "expp_rank_0_mp_rank_00_optim_states.pt").is_file()
    (tmp_path / "ds.json").write_text(json.dumps(MODULE_ONLY_CONFIG))
    run_worker([{"ckpt": str(tmp_path / "ckpt"), "ds_config": str(tmp_path / "ds.json"), "dump": str(tmp_path / "dump"),
                 "resave": str(tmp_path / "resave"), "scheduler": False, "module_dtype": dtype}], 1,
               tmp_path / "jobs.json")
    assert_deepspeed_saves_the_same(tag, tmp_path / "resave" / "imported")
    stored = read_module_weights(tag)
    assert {t.dtype for k, t in stored.items() if "route_bias" not in k} == {getattr(torch, dtype)}
    # The release's weights once: the model file, one file per expert, and an empty optimizer file.
    experts = [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)]
    assert sorted(p.name for p in tag.glob("*.pt")) == sorted(
        ["mp_rank_00_model_states.pt", "expp_rank_0_mp_rank_00_optim_states.pt", *experts])
    dump = torch.load(f"{tmp_path / 'dump'}.rank0.pt", weights_only=False)
    ours = load_model(tmp_path / "ckpt").model
    names = ours.global_param_names()
    for name, param in ours.named_parameters():
        assert torch.equal(dump["params"][names[name]]["fp32"], param), name
    masters = named_param_states(read_checkpoint(tmp_path / "ckpt"))  # what expand reads: the weights in fp32
    assert all(torch.equal(masters[names[n]].fp32, p) and masters[names[n]].exp_avg is None
               for n, p in ours.named_parameters())


def refusal(fn, *args) -> str:
    with pytest.raises(UserError) as err:
        fn(*args)
    return str(err.value)


def test_what_no_class_expresses_is_refused_in_one_line(tmp_path, sp_model):
    base = shrunk(PRESETS["tiny"])
    assert "route_groups=none" in refusal(export_family, base.replace(route_groups=((0, 0, 1, 1),) * 4), False)
    assert "same count" in refusal(export_family, base.replace(layer_experts=(4, 4, 8, 4)), False)
    assert "score_func=softmax" in refusal(export_family, shrunk(PRESETS["tiny-il"]).replace(score_func="sigmoid"),
                                           False)
    assert "no transformers class" in refusal(export_family, base.replace(score_func="softmax", route_norm=False), True)

    hf_dir, _ = hf_model_dir("glm4_moe", tmp_path, sp_model)
    config = json.loads((hf_dir / "config.json").read_text())
    for change, words in [({"model_type": "llama"}, "cannot be imported"),
                          ({"rope_parameters": {**ROPE, "partial_rotary_factor": 0.5}}, "partial rotary"),
                          ({"first_k_dense_replace": 1, "num_hidden_layers": 3}, "MoE in layers [1, 2]")]:
        (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
        assert words in refusal(import_checkpoint, hf_dir, tmp_path / "out")
    (hf_dir / "config.json").write_text(json.dumps(config))
    weights = load_file(str(hf_dir / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "experts.3.down_proj" not in k}, str(hf_dir / "model.safetensors"))
    assert "lacks weight model.layers.0.mlp.experts.3.down_proj.weight" in refusal(import_checkpoint, hf_dir,
                                                                                    tmp_path / "out")
    assert not (tmp_path / "out").exists()

    result = CliRunner().invoke(main, ["import", str(hf_dir), str(tmp_path / "out")])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output


def test_a_glm4_shared_expert_of_zeros_imports_and_a_working_one_is_refused(tmp_path, sp_model):
    """The GLM-4 MoE export carries a shared expert of zeros (vLLM cannot run the zero-width one);
    import reads it back as nothing, and refuses a release whose shared expert computes something."""
    hf_dir, _ = hf_model_dir("glm4_moe", tmp_path, sp_model)
    config = {**json.loads((hf_dir / "config.json").read_text()), "n_shared_experts": 1}
    hf_model = transformers.AutoModelForCausalLM.from_config(transformers.Glm4MoeConfig(**config)).eval()
    randomize(hf_model)
    for layer in hf_model.model.layers:
        for weight in layer.mlp.shared_experts.parameters():
            torch.nn.init.zeros_(weight)
    hf_model.save_pretrained(str(tmp_path / "zero"))
    copy_tokenizer_files(hf_dir, tmp_path / "zero")
    import_checkpoint(tmp_path / "zero", tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ckpt").model(tokens())[0], hf_model(tokens()).logits,
                                   atol=1e-5, rtol=1e-5)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["n_shared_experts"] == 1
    original, again = read_weights(tmp_path / "zero"), read_weights(tmp_path / "again")
    assert sorted(original) == sorted(again) and all(torch.equal(original[n], again[n]) for n in original)

    with torch.no_grad():
        hf_model.model.layers[1].mlp.shared_experts.up_proj.weight[3, 5] = 0.5
    hf_model.save_pretrained(str(tmp_path / "working"))
    copy_tokenizer_files(hf_dir, tmp_path / "working")
    message = refusal(import_checkpoint, tmp_path / "working", tmp_path / "out")
    assert "shared experts (model.layers.1.mlp.shared_experts.up_proj.weight is not zero)" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_train_continues_an_import_on_another_layout(tmp_path, sp_model, data_cache):
    """Two processes with ep_size 2 take the module weights of a one-process import: with LR 0 the
    checkpoint they save holds exactly the imported weights; the model's own HF tokenizer made the data."""
    hf_dir, _ = hf_model_dir("ernie4_5_moe", tmp_path, sp_model)
    import_checkpoint(hf_dir, tmp_path / "ckpt")
    ds_config = write_ds_config(tmp_path / "ds.json", micro_batch=2, lr=0.0)
    proc = run_train(["--deepspeed_config", str(ds_config), "--load", str(tmp_path / "ckpt"), "--steps", "1",
                      "--ep-size", "2", "--data", SMALL_DATA, "--seq-len", "32", "--data-cache", str(data_cache),
                      "--eval-samples", "4", "--save", str(tmp_path / "run")], num_procs=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = load_model(tmp_path / "ckpt").model.state_dict()
    after = load_model(tmp_path / "run").model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "route_bias" not in k)
    assert load_model(tmp_path / "run").tokenizer.name == "tokenizer.json"


def test_import_expand_export_loads_in_transformers(tmp_path, sp_model, data_cache):
    hf_dir, _ = hf_model_dir("mixtral", tmp_path, sp_model)
    import_checkpoint(hf_dir, tmp_path / "ckpt")
    # A release has no Adam state to score experts by: the error names the way out.
    assert "--calibration-data" in refusal(expand_checkpoint, ExpandConfig(str(tmp_path / "ckpt"), str(tmp_path / "x"),
                                                                            multiplier=2))
    assert "no training data of its own" in refusal(expand_checkpoint, ExpandConfig(
        str(tmp_path / "ckpt"), str(tmp_path / "x"), multiplier=2, calibration_data="source"))
    expand_checkpoint(ExpandConfig(str(tmp_path / "ckpt"), str(tmp_path / "e8"), multiplier=2,
                                   calibration_data=SMALL_DATA, calibration_batches=2, calibration_batch_size=2,
                                   data_cache=str(data_cache)), progress=False)
    result = export_checkpoint(tmp_path / "e8", tmp_path / "hf8")
    # Mixtral has no selection bias, so the import does not train one and expand put the replicas'
    # noise on their router rows: the bias stays zero and Mixtral's own class takes the model.
    assert result.family.model_type == "mixtral"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf8", dtype=torch.float32).eval()
    assert theirs.config.num_experts == 8
    ids = tokens(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "e8").model(ids)[0], theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_hf_tokenizer_prepares_the_same_tokens_as_its_sentencepiece_model(tmp_path, sp_model):
    write_hf_tokenizer(sp_model, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").unlink()
    cfg = DataConfig(source=SMALL_DATA, seq_len=32, cache_dir=str(tmp_path / "cache"))
    by_sp, by_hf = prepare_data(cfg, sp_model), prepare_data(cfg, tmp_path / "hf")
    assert by_hf.tokenizer_path.name == "tokenizer.json" and by_sp.path != by_hf.path
    for split in ("pretrain", "cpt", "val"):
        assert np.array_equal(by_sp.tokens(split), by_hf.tokens(split))
    hf = load_tokenizer(tmp_path / "hf")
    text = "Question: two lines\nAnswer:  spaced\n\nnext"
    assert hf.decode(hf.encode(text)) == text and hf.eos_id == load_tokenizer(sp_model).eos_id


def test_a_tied_head_stored_anyway_is_accepted_only_when_equal(tmp_path, sp_model):
    hf_dir, hf_model = hf_model_dir("qwen3_moe", tmp_path, sp_model)  # ties its embeddings
    weights = load_file(str(hf_dir / "model.safetensors"))
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()},
              str(hf_dir / "model.safetensors"))
    import_checkpoint(hf_dir, tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ckpt").model(tokens())[0], hf_model(tokens()).logits,
                                   atol=1e-5, rtol=1e-5)
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"] + 1},
              str(hf_dir / "model.safetensors"))
    assert "different lm_head.weight" in refusal(import_checkpoint, hf_dir, tmp_path / "other")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_every_family_upcycles_trains_and_exports_as_itself(model_type, tmp_path, sp_model, data_cache):
    """The path of docs/HF.md for each family that imports: import, expand -m 2 (default router noise),
    continue training with the balancing the import chose, export: the release's own class, computing
    what our model computes."""
    hf_dir, _ = hf_model_dir(model_type, tmp_path, sp_model)
    imported = import_checkpoint(hf_dir, tmp_path / "ckpt")
    has_bias = FAMILIES[model_type].bias_name is not None  # ERNIE 4.5 and GLM-4 MoE train theirs loss-free
    assert (imported.config.route_bias_update > 0, imported.config.aux_loss_coef > 0) == (has_bias, not has_bias)
    assert imported.balancing.startswith("balancing: loss-free" if has_bias else "balancing: auxiliary loss")
    expand_checkpoint(ExpandConfig(str(tmp_path / "ckpt"), str(tmp_path / "e2x"), multiplier=2, select="uniform"),
                      progress=False)
    ds_config = write_ds_config(tmp_path / "ds.json", micro_batch=2)
    check_ok(run_train(["--deepspeed_config", str(ds_config), "--load", str(tmp_path / "e2x"), "--steps", "3",
                        "--data", SMALL_DATA, "--seq-len", "32", "--data-cache", str(data_cache),
                        "--eval-samples", "4", "--save", str(tmp_path / "cpt")]))
    trained = load_model(tmp_path / "cpt").model
    assert trained.cfg.num_experts == 2 * imported.config.num_experts
    assert any(bool(router.route_bias.any()) for router in trained.routers) == has_bias
    result = export_checkpoint(tmp_path / "cpt", tmp_path / "hf")
    assert result.family.model_type == model_type
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = tokens(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(trained(ids)[0], theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_an_import_expands_in_its_own_dtype_and_trains_on_two_processes(tmp_path, sp_model, data_cache):
    """A bf16 release: the expansion stays module weights in bf16 (twice the experts' bytes, no
    masters), and two processes with ep_size 2 continue it from exactly those weights."""
    hf_dir, _ = hf_model_dir("qwen3_moe", tmp_path, sp_model, dtype=torch.bfloat16)
    import_checkpoint(hf_dir, tmp_path / "ckpt")
    expand_checkpoint(ExpandConfig(str(tmp_path / "ckpt"), str(tmp_path / "e12"), multiplier=2, select="uniform",
                                   world_size=2, ep_size=2), progress=False)
    tag = tmp_path / "e12" / "imported"
    assert sorted(p.name for p in tag.glob("expp_rank_*")) == [f"expp_rank_{p}_mp_rank_00_optim_states.pt"
                                                               for p in range(2)]
    assert not list(tag.glob("zero_pp_rank_*"))
    expanded = read_module_weights(tag)
    assert {t.dtype for k, t in expanded.items() if "route_bias" not in k} == {torch.bfloat16}
    imported = read_module_weights(tmp_path / "ckpt" / "imported")
    plan = json.loads((tag / "upcycle_manifest.json").read_text())["layers"][0]
    for new, source in enumerate(plan["sources"]):  # every new expert is its source's bytes
        key = "layers.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{}.w_up.weight"
        assert torch.equal(expanded[key.format(new)], imported[key.format(source)])
    ds_config = write_ds_config(tmp_path / "ds.json", micro_batch=2, lr=0.0)
    check_ok(run_train(["--deepspeed_config", str(ds_config), "--load", str(tmp_path / "e12"), "--steps", "1",
                        "--ep-size", "2", "--data", SMALL_DATA, "--seq-len", "32", "--data-cache", str(data_cache),
                        "--eval-samples", "4", "--save", str(tmp_path / "run")], num_procs=2))
    after = load_model(tmp_path / "run").model.state_dict()
    before = load_model(tmp_path / "e12", dtype=torch.float32).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "route_bias" not in k)


def test_weights_written_one_tensor_at_a_time_read_back_with_safetensors(tmp_path):
    """Our safetensors writer against the safetensors library's reader: dtypes, shapes, bytes, shards."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).bfloat16(),
               "empty": torch.zeros(0, 4), "c": torch.randn(2, 2, 3, generator=gen), "d": torch.randn(9, generator=gen)}
    cast = {"a": torch.float32, "b": torch.bfloat16, "empty": torch.bfloat16, "c": torch.bfloat16, "d": torch.float32}
    files = write_weights(tensors, tmp_path, max_shard_bytes=40, dtype_of=cast.__getitem__)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    back = read_weights(tmp_path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == cast[name] and torch.equal(back[name], tensor.to(cast[name])), name
    for file in files:  # the library's own reader takes each shard
        assert set(load_file(str(tmp_path / file))) <= set(tensors)


def test_a_release_is_scored_on_the_engine_and_expanded_from_the_scores(tmp_path, sp_model, data_cache, monkeypatch):
    """A release has no Adam state and no data of its own: the scoring pass takes named data, equals the
    one-process calibration on it, and expand plans from its file."""
    hf_dir, _ = hf_model_dir("olmoe", tmp_path, sp_model)
    ckpt, scores = tmp_path / "ckpt", tmp_path / "scores.json"
    import_checkpoint(hf_dir, ckpt)
    args = ["--deepspeed_config", str(write_ds_config(tmp_path / "ds.json", micro_batch=2)), "--load", str(ckpt),
            "--score-experts", str(scores), "--score-batches", "2", "--data-cache", str(data_cache)]
    refused = train_refusal(args, monkeypatch)
    assert refused.returncode == 2 and not scores.exists()
    assert "train.py: error: --score-data: " in refused.stderr and "name the data to use instead" in refused.stderr
    check_ok(run_train([*args, "--score-data", SMALL_DATA]))
    cpu = calibrate(read_checkpoint(ckpt), RunData(ckpt, str(data_cache)), SMALL_DATA, 2, 2)
    ours = ExpertScores.read(scores)
    for prefix in cpu.layers:
        assert ours.layers[prefix]["grad_sq"] == pytest.approx(cpu.layers[prefix]["grad_sq"], rel=1e-4)
    result = expand_checkpoint(ExpandConfig(str(ckpt), str(tmp_path / "e8"), multiplier=2, scores=str(scores)),
                               progress=False)
    assert result.manifest["scores"]["from"] == "scoring pass"
    rule = result.manifest["options"]["allocate"]
    assert [p.counts for p in result.plans.values()] == [
        allocate_copies(4, 8, ours.layers[f"layers.{i}.ffn.moe"]["grad_sq"], rule=rule) for i in range(2)]
