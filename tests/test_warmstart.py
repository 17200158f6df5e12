"""`ds-upcycle expand --check-data`: the warm-start jump, measured on the source's validation data.

The source is conftest's trained_source (4 experts, top-2, trained a few steps on 2 processes);
everything else runs in this process or one `ds-upcycle` subprocess.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import expand_cli

from ds_upcycle.data.config import DataConfig
from ds_upcycle.data.prepare import prepare_data
from ds_upcycle.errors import UserError
from ds_upcycle.trained import BATCH_SIZE, RunData, load_model, validation_loss
from ds_upcycle.upcycle.config import ExpandConfig
from ds_upcycle.upcycle.expand import expand_checkpoint
from ds_upcycle.upcycle.warmstart import warm_start

pytestmark = pytest.mark.slow
SAMPLES = 24


@pytest.fixture(scope="module")
def source(tmp_path_factory, trained_source):
    return {**trained_source, "root": tmp_path_factory.mktemp("warmstart")}


def test_check_data_cli_uniform_copy_is_close_to_source(source):
    dst = source["root"] / "e8"
    proc = expand_cli(str(source["src"]), str(dst), "--multiplier", "2", "--select", "uniform", "--router-noise", "0",
                      "--check-data", "--check-samples", str(SAMPLES), "--data-cache", source["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    tag_dir = dst / (dst / "latest").read_text().strip()
    manifest = json.loads((tag_dir / "upcycle_manifest.json").read_text())
    ws = manifest["warm_start"]
    assert ws["samples"] == SAMPLES and manifest["options"]["check_data"] is True
    line = (f"validation loss {ws['source_loss']:.3f} -> {ws['expanded_loss']:.3f} "
            f"({ws['expanded_loss'] - ws['source_loss']:+.3f}) on {SAMPLES} sequences")
    assert line in proc.stdout
    assert not [p for p in tag_dir.iterdir() if p.name.endswith(".tmp")]
    # Why the two losses are not equal: every expert and its copy have identical weights, router
    # rows and (noise 0) routing bias, so the copy ties with its source in top-K. A token whose
    # top-2 was {a, b} now gets {a, a'}: the renormalised weights are 1/2 each and the output is
    # f_a alone, i.e. the source run with top-1 (weight 1). Masking the replicas in the router gives
    # back the source exactly. How far the jump goes depends on how much the trained model relies
    # on its second expert (little after a few steps; about +1.3 nats after 30 steps on this data).
    data = RunData(source["src"], source["cache"]).split("val")
    expanded = load_model(dst).model
    for router, layer in zip(expanded.routers, manifest["layers"]):
        sources = layer["sources"]
        router.route_bias.data[[j for j, s in enumerate(sources) if sources.index(s) != j]] -= 1e4
    assert validation_loss(expanded, data, SAMPLES, BATCH_SIZE) == pytest.approx(ws["source_loss"], rel=1e-6)
    top1 = load_model(source["src"]).model
    for router in top1.routers:
        router.k = 1
    assert ws["expanded_loss"] == pytest.approx(validation_loss(top1, data, SAMPLES, BATCH_SIZE), rel=1e-5)
    assert ws["source_loss"] == pytest.approx(ws["expanded_loss"], abs=0.5)
    # a second measurement with the library function gives the same numbers
    again = warm_start(RunData(source["src"], source["cache"]), dst, SAMPLES)
    assert again.source_loss == ws["source_loss"] and again.expanded_loss == ws["expanded_loss"]


def test_source_loss_equals_direct_computation(source):
    measured = warm_start(RunData(source["src"], source["cache"]), source["src"], 10)
    assert measured.source_loss == measured.expanded_loss and measured.samples == 10
    # Independently: the run's data settings, the checkpoint's tokenizer, the first 10 windows of
    # seq_len + 1 tokens of the val split, one batch, mean cross-entropy.
    info = json.loads((source["tag"] / "ds_upcycle.json").read_text())
    data = info["data"]
    prepared = prepare_data(DataConfig(source=data["source"], seq_len=data["seq_len"],
                                       vocab_size=data["vocab_size"], val_fraction=data["val_fraction"],
                                       cpt_fraction=data["cpt_fraction"], cache_dir=source["cache"]),
                            source["tag"] / "tokenizer.model")
    val = np.fromfile(prepared.path / "val.bin", dtype=prepared.meta["dtype"]).astype(np.int64)
    T = data["seq_len"]
    rows = torch.from_numpy(np.stack([val[i * T:i * T + T + 1] for i in range(10)]))
    model = load_model(source["src"]).model
    with torch.no_grad():
        logits, _ = model(rows[:, :-1])
    direct = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()
    assert measured.source_loss == pytest.approx(direct, rel=1e-5)


def test_check_data_refuses_plain_deepspeed_checkpoint_before_writing(source):
    plain = source["root"] / "plain" / source["tag"].name
    shutil.copytree(source["tag"], plain)
    (plain / "ds_upcycle.json").unlink()
    dst = source["root"] / "never-written"
    cfg = ExpandConfig(source=str(plain), destination=str(dst), multiplier=2, select="uniform",
                       check_data=True, data_cache=source["cache"])
    with pytest.raises(UserError, match="--check-data: .* its training data settings are unknown") as err:
        expand_checkpoint(cfg, progress=False)
    assert "\n" not in str(err.value)
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}*"))


def test_check_samples_validated():
    with pytest.raises(UserError, match="--check-samples"):
        ExpandConfig(source="a", destination="b", multiplier=2, check_data=True, check_samples=0)


def test_distinct_copies_compute_exactly_what_the_source_computed(source):
    """--distinct-copies: a token takes at most one copy of an expert, so there is no tie and no jump."""
    dst = source["root"] / "e8-distinct"
    # Noise 0: within a group the copies tie and the lowest id, the source expert, takes the token.
    # On one rank new ids 0..3 are the source experts in their order, so the softmax sums its terms
    # in the source's order too (placed over two ranks, a permuted sum flips a few near-ties: 2e-5).
    result = expand_checkpoint(ExpandConfig(str(source["src"]), str(dst), multiplier=2, select="uniform",
                                            world_size=1, ep_size=1, distinct_copies=True, router_noise=0.0,
                                            check_data=True,
                                            check_samples=SAMPLES, data_cache=source["cache"]), progress=False)
    ws = result.manifest["warm_start"]
    assert ws["expanded_loss"] == pytest.approx(ws["source_loss"], rel=1e-6)
    tag_dir = dst / (dst / "latest").read_text().strip()
    groups = json.loads((tag_dir / "ds_upcycle.json").read_text())["model"]["route_groups"]
    assert groups == [layer["sources"] for layer in result.manifest["layers"]]
    # expanding again keeps the copies of one original expert in one group
    twice = expand_checkpoint(ExpandConfig(str(dst), str(source["root"] / "e12-distinct"), num_experts=12,
                                           select="uniform", distinct_copies=True), progress=False)
    tag_dir = source["root"] / "e12-distinct" / tag_dir.name
    regrouped = json.loads((tag_dir / "ds_upcycle.json").read_text())["model"]["route_groups"]
    assert regrouped == [[groups[i][s] for s in layer["sources"]] for i, layer in enumerate(twice.manifest["layers"])]
    # a grouped source grows only with its groups (or after they are lifted), refused before any work
    never = source["root"] / "e16-plain"
    with pytest.raises(UserError, match="routes its experts in groups.*--distinct-copies"):
        expand_checkpoint(ExpandConfig(str(dst), str(never), multiplier=2, select="uniform"), progress=False)
    assert not never.exists()
    resharded = expand_checkpoint(ExpandConfig(str(dst), str(source["root"] / "e8-reshard"), multiplier=1),
                                  progress=False)  # keeping the expert counts keeps the groups
    assert resharded.plans[0].sources == tuple(range(8))
