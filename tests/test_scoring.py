"""`train.py --score-experts` and `ds-upcycle expand --scores`: utility scores measured on the training
engine, on any layout, and an expansion planned from them.

Oracle: the one-process calibration (`expand --calibration-data`, itself checked against plain
autograd in test_calibration.py) on the same windows cut into the same batches. The two layouts
reach the mean gradient by different routes: with ep_size 2 the all-to-all's backward brings both
processes' tokens to each expert; with ep_size 1 and gradient accumulation each process averages its
micro-batches and the replicas are all-reduced.
"""

import json

import pytest

from conftest import check_ok, expand_cli, run_train, train_refusal, tree_digest, write_ds_config

from ds_upcycle.checkpoint import read_checkpoint
from ds_upcycle.errors import UserError
from ds_upcycle.trained import RunData
from ds_upcycle.trained.scores import GRADIENT_RULES, ExpertScores
from ds_upcycle.upcycle.calibration import calibrate
from ds_upcycle.upcycle.config import ExpandConfig
from ds_upcycle.upcycle.expand import expand_checkpoint
from ds_upcycle.upcycle.operator import allocate_copies

BATCHES = 3
# (name, processes, ep_size, micro-batch, gradient accumulation): a global batch of 4 sequences each
LAYOUTS = [("ep2", 2, 2, 2, 1), ("dp2-accum2", 2, 1, 1, 2)]


def score_args(cfg, src, out, cache, *extra):
    return ["--deepspeed_config", str(cfg), "--load", str(src), "--score-experts", str(out),
            "--score-batches", str(BATCHES), "--data-cache", str(cache), *extra]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, trained_source):
    root = tmp_path_factory.mktemp("scoring")
    files = {}
    for name, procs, ep, micro, accum in LAYOUTS:
        cfg = write_ds_config(root / f"{name}.json", stage=2, micro_batch=micro, grad_accum=accum)
        files[name] = root / f"{name}.scores.json"
        proc = check_ok(run_train(score_args(cfg, trained_source["src"], files[name], trained_source["cache"],
                                             "--ep-size", str(ep)), num_procs=procs))
        assert f"scores of 16 experts in 4 MoE layers written to {files[name]}" in proc.stdout
    cpu = calibrate(read_checkpoint(trained_source["src"]), RunData(trained_source["src"], trained_source["cache"]),
                    "source", BATCHES, 4)
    return {**trained_source, "root": root, "files": files, "cpu": cpu}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [layout[0] for layout in LAYOUTS])
def test_scoring_pass_equals_the_cpu_calibration(scored, layout):
    ours = ExpertScores.read(scored["files"][layout])
    cpu = scored["cpu"]
    assert ours.checkpoint == cpu.checkpoint == {"tag": scored["tag"].name, "global_step": 12}
    assert {k: ours.info[k] for k in ("batches", "batch_size", "sequences", "seq_len", "description")} == \
        {k: cpu.info[k] for k in ("batches", "batch_size", "sequences", "seq_len", "description")}
    assert ours.info["world_size"] == 2 and ours.info["precision"] == "float32"
    assert sorted(ours.layers) == sorted(cpu.layers) == [f"layers.{i}.ffn.moe" for i in range(4)]
    for prefix, rules in cpu.layers.items():
        assert sorted(ours.layers[prefix]) == sorted(GRADIENT_RULES)
        for rule in GRADIENT_RULES:
            assert ours.layers[prefix][rule] == pytest.approx(rules[rule], rel=1e-4), (prefix, rule)
        # the scores tell experts apart, so agreeing on them is not agreeing on a constant
        assert len(set(round(x, 6) for x in rules["grad_sq"])) == 4
    assert tree_digest(scored["src"]) == scored["digest"]


@pytest.mark.slow
def test_expand_from_a_scores_file_plans_as_the_scores_say(scored):
    file = scored["files"]["ep2"]
    dst = scored["root"] / "e8"
    proc = expand_cli(str(scored["src"]), str(dst), "-m", "2", "--select", "saliency", "--scores", str(file))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"scores from gradients on {BATCHES} batches (12 sequences of 32 tokens) of cpt split of the source's "
            f"training data") in proc.stdout and f"(train.py on 2 processes, {file})" in proc.stdout
    manifest = json.loads((dst / scored["tag"].name / "upcycle_manifest.json").read_text())
    assert manifest["scores"]["from"] == "scoring pass" and manifest["scores"]["file"] == str(file.resolve())
    scores = ExpertScores.read(file)
    for layer in manifest["layers"]:
        assert layer["scores"] == scores.layers[layer["prefix"]]["saliency"]
        assert layer["counts"] == allocate_copies(4, 8, layer["scores"], rule=manifest["options"]["allocate"])
    # The same plan as scoring here on the CPU with the same batches.
    here = expand_checkpoint(ExpandConfig(source=str(scored["src"]), destination=str(scored["root"] / "never"),
                                          multiplier=2, select="saliency", calibration_data="source",
                                          calibration_batches=BATCHES, calibration_batch_size=4,
                                          data_cache=scored["cache"]), dry_run=True, progress=False).manifest
    assert [layer["counts"] for layer in here["layers"]] == [layer["counts"] for layer in manifest["layers"]]
    assert tree_digest(scored["src"]) == scored["digest"]


def _edited(scored, name, change):
    data = json.loads(scored["files"]["ep2"].read_text())
    change(data)
    path = scored["root"] / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_scores_that_do_not_fit_the_source_are_refused_before_writing(scored):
    def step(d):
        d["checkpoint"]["global_step"] = 6

    def layer(d):
        del d["layers"]["layers.2.ffn.moe"]

    def experts(d):
        d["layers"]["layers.0.ffn.moe"]["grad_sq"].append(1.0)

    cases = [
        (_edited(scored, "stale.json", step), "the scores were measured on global_step12 (step 6), but"),
        (_edited(scored, "layer.json", layer), "the scores have no MoE layer layers.2.ffn.moe"),
        (_edited(scored, "experts.json", experts), "the scores have 5 experts in layers.0.ffn.moe, the checkpoint 4"),
        (scored["root"] / "missing.json", "scores file not found"),
        (scored["tag"] / "ds_upcycle.json", "is not a scores file (written by train.py --score-experts)"),
    ]
    for path, message in cases:
        dst = scored["root"] / "refused"
        proc = expand_cli(str(scored["src"]), str(dst), "-m", "2", "--scores", str(path))
        assert proc.returncode == 2, proc.stdout[-1000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ds-upcycle: error: --scores: ") and message in lines[0], lines
        assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}*"))
    assert tree_digest(scored["src"]) == scored["digest"]


@pytest.mark.parametrize("kwargs, message", [
    ({"select": "uniform", "scores": "s.json"}, "--select uniform uses no scores"),
    ({"scores": "s.json", "calibration_data": "source"}, "give one of --scores"),
])
def test_scores_option_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        ExpandConfig(source="a", destination="b", multiplier=2, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--score-experts", "s.json"], "--score-experts needs --load CHECKPOINT"),
    (["--score-experts", "s.json", "--load", "x", "--steps", "5"], "drop --steps"),
    (["--load", "x"], "required: --steps (or --score-experts FILE)"),
])
def test_train_py_score_options(args, message, tmp_path, monkeypatch):
    proc = train_refusal(["--deepspeed_config", str(write_ds_config(tmp_path / "c.json")), *args], monkeypatch)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]

