"""The experiment's two figures, drawn from metrics.jsonl files and expansion manifests.

loss.png     validation loss of Fixed-E, Upcycled and Fixed-mE against tokens, the transition marked
routing.png  share of routed tokens of every replica over CPT, coloured by the expert it copies
cpt_budget.png  gap closed against the CPT share of the budget (with `cpt_sweep`), one dot per seed
copies.png   how far the copies move apart over CPT (sibling against cross distance) and how often a
             token takes two copies of one source, every upcycled arm (trained/copies.py)
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..checkpoint import read_metrics
from .plan import FIXED_E, FIXED_ME, Plan, UpcycledArm


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _val_curve(records: list[dict]) -> tuple[list[int], list[float]]:
    points = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    return [t for t, _ in points], [v for _, v in points]


def _upcycled_curve(out: Path, arm: UpcycledArm, manifest: dict) -> tuple[list[int], list[float], int]:
    """Source run, the loss right after expansion, then CPT; and the tokens at the transition."""
    source = read_metrics(out / arm.source / "metrics.jsonl")
    cpt = read_metrics(out / arm.cpt / "metrics.jsonl")
    tokens, losses = _val_curve(source)
    transition = source[-1]["tokens"]
    if manifest.get("warm_start"):
        tokens.append(transition)
        losses.append(manifest["warm_start"]["expanded_loss"])
    more_tokens, more_losses = _val_curve(cpt)
    return tokens + more_tokens, losses + more_losses, transition


def plot_loss(out: Path, plan: Plan, manifests: dict[str, dict], path: Path, e: int, me: int) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    curves = []
    for name, label, color in ((FIXED_E, f"Fixed-E ({e} experts)", "tab:blue"),
                               (FIXED_ME, f"Fixed-mE ({me} experts)", "tab:green")):
        curves.append(_val_curve(read_metrics(out / name / "metrics.jsonl")))
        ax.plot(*curves[-1], color=color, label=label, marker=".")
    others = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive"])
    for arm in plan.upcycled:
        main = arm == plan.main
        color = "tab:red" if main else next(others, "tab:gray")
        tokens, losses, transition = _upcycled_curve(out, arm, manifests[arm.expanded])
        curves.append((tokens, losses))
        ax.plot(tokens, losses, color=color, marker=".", label=f"{arm.label} ({e} -> {me})",
                linewidth=2 if main else 1, alpha=1 if main else 0.6)
        ax.axvline(transition, color=color, linestyle=":", alpha=0.8 if main else 0.4)
    if plan.control:  # the same two stages without expansion
        tokens, losses = _val_curve(read_metrics(out / plan.control / "metrics.jsonl"))
        curves.append((tokens, losses))
        ax.plot(tokens, losses, color="tab:gray", linestyle="--", marker=".",
                label=f"control: {e} experts continued, no expansion")
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss at the same token budget (dotted: transition to CPT)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_ylim(*_zoom([(x, y) for line in curves for x, y in zip(*line)]))
    return _save(fig, path, plt)


def _zoom(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Loss range past the first 15% of tokens: the early evaluations would hide the differences."""
    last = max(x for x, _ in points)
    late = [y for x, y in points if x >= 0.15 * last] or [y for _, y in points]
    low, high = min(late), max(late)
    margin = 0.1 * (high - low) or 0.05
    return low - margin, high + margin


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_routing(out: Path, arm: UpcycledArm, manifest: dict, path: Path, max_layers: int = 4) -> Path:
    """One panel per MoE layer (at most max_layers, evenly spread): every expert's share over CPT."""
    plt = _pyplot()
    records = read_metrics(out / arm.cpt / "metrics.jsonl")
    layers = manifest["layers"]
    shown = min(max_layers, len(layers))
    picked = sorted({round(i * (len(layers) - 1) / max(1, shown - 1)) for i in range(shown)})
    window = max(1, len(records) // 20)
    steps = [r["step"] for r in records]
    cmap = plt.get_cmap("tab10" if layers[0]["num_source"] <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(picked), figsize=(max(8.0, 4.2 * len(picked)), 3.8), squeeze=False, sharey=True)
    for ax, position in zip(axes[0], picked):
        layer = layers[position]
        sources = layer["sources"]
        shares = [r["load"][position]["shares"] for r in records]
        for source in range(layer["num_source"]):
            copies = [j for j, s in enumerate(sources) if s == source]
            for n, expert in enumerate(copies):
                ax.plot(steps, _smooth([s[expert] for s in shares], window), color=cmap(source % cmap.N),
                        linestyle="-" if n == 0 else "--", linewidth=1.2,
                        label=f"expert {source} ({len(copies)} cop{'y' if len(copies) == 1 else 'ies'})" if n == 0
                        else None)
        ax.axhline(1 / layer["num_target"], color="black", linewidth=0.8, alpha=0.5)
        ax.set_title(f"MoE layer {layer['index']}")
        ax.legend(fontsize=7, loc="upper right")  # per panel: copy counts differ between layers
        ax.set_xlabel("step (CPT)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"share of routed tokens (mean of {window} steps)")
    fig.suptitle(f"{arm.label}: each copy of a source expert (same colour; black line = even share)", fontsize=10)
    return _save(fig, path, plt)


def copy_curves(records: list[dict]) -> dict[str, list]:
    """Steps and the means over MoE layers of each copy measure, at the evaluations that have them."""
    evals = [r for r in records if r.get("copies")]
    curves: dict[str, list] = {"step": [r["step"] for r in evals]}
    for key in ("sibling_distance", "cross_distance", "co_selected"):
        curves[key] = [statistics.fmean(v) if (v := [x[key] for x in r["copies"] if x[key] is not None]) else None
                       for r in evals]
    return curves


def _copy_runs(out: Path, plan: Plan) -> list[tuple[str, list[dict]]]:
    """(label, metrics records) of every upcycled arm that has run, the staged arm's stages joined."""
    runs = [(arm.label, [arm.cpt]) for arm in plan.upcycled]
    if plan.staged:
        runs.append((plan.staged.label, list(plan.staged.trained)))
    found = []
    for label, arms in runs:
        files = [out / arm / "metrics.jsonl" for arm in arms]
        if all(f.is_file() for f in files):
            found.append((label, [r for f in files for r in read_metrics(f)]))
    return found


def plot_copies(out: Path, plan: Plan, path: Path) -> Path | None:
    """Left: sibling (solid) and cross (dashed) relative weight distance; right: co-selection share;
    one colour per upcycled arm, means over MoE layers. None when no arm recorded them."""
    arms = [(label, copy_curves(records)) for label, records in _copy_runs(out, plan)]
    arms = [(label, c) for label, c in arms if c["step"]]
    if not arms:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("tab10")
    for n, (label, c) in enumerate(arms):
        color = cmap(n % cmap.N)
        left.plot(c["step"], c["sibling_distance"], color=color, marker=".", label=f"{label}: siblings")
        left.plot(c["step"], c["cross_distance"], color=color, linestyle="--", alpha=0.7, label="other sources")
        right.plot(c["step"], c["co_selected"], color=color, marker=".", label=label)
    left.set_ylabel("relative weight distance")
    left.set_title("copies of one expert (solid) vs experts of different sources (dashed)", fontsize=9)
    right.set_ylabel("share of tokens taking two copies of one expert")
    right.set_title("co-selection of siblings", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, plt)


def budget_rows(arms: list[dict], select: str) -> list[tuple[float, list[float]]]:
    """(CPT share, gap closed of each seed) of the arms with rule `select`, by share; from a summary's
    `upcycled` list (a value per arm) or a seed report's (a spread with the per-seed values)."""
    rows = []
    for arm in arms:
        if arm["select"] != select:
            continue
        gap = arm["gap_closed"]
        values = list(gap["values"].values()) if isinstance(gap, dict) else [gap]
        values = [v for v in values if v is not None]
        if values:
            rows.append((arm["cpt_fraction"], values))
    return sorted(rows)


def plot_cpt_budget(arms: list[dict], select: str, path: Path, total_steps: int) -> Path | None:
    """Gap closed against the CPT share (= 1 - T0 / T) of the arms with rule `select`: each seed,
    and the mean with its std. Drawn only with three shares or more (a `cpt_sweep`)."""
    rows = budget_rows(arms, select)
    if len(rows) < 3:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    means = []
    for fraction, values in rows:
        x, mean = 100 * fraction, 100 * statistics.fmean(values)
        std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
        ax.scatter([x] * len(values), [100 * v for v in values], color="tab:gray", s=16, zorder=2)
        ax.errorbar([x], [mean], yerr=[std], fmt="o", color="tab:red", capsize=4, zorder=3)
        means.append((x, mean))
    ax.plot([x for x, _ in means], [y for _, y in means], color="tab:red", alpha=0.5)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(100, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"CPT share of the budget, % (transition at T0 = (1 - share) x {total_steps} steps)")
    ax.set_ylabel("gap closed, %")
    ax.set_title(f"Gap closed against the CPT budget ({select}; gray: each seed, red: mean ± std)", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
