"""`ds-upcycle compare`: put evaluation results side by side and measure the gap closed.

Each run is a results file written by `ds-upcycle eval` (or a checkpoint holding one). Rows are the
tasks' headline scores, their average over the tasks every run has, and the validation loss. Given
exactly three runs, in the order Fixed-E, Upcycled, Fixed-mE, a last column gives the upcycling
efficiency of each row: (upcycled - fixed_E) / (fixed_mE - fixed_E), which is the paper's
(L_E - L_up) / (L_E - L_mE) for a loss and the share of the score gap closed for a score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..checkpoint import find_checkpoint
from ..errors import UserError
from . import RESULTS_FILE


@dataclass(frozen=True)
class Row:
    name: str
    values: tuple[float | None, ...]
    kind: str                      # "score" (a fraction, higher is better) or "loss"

    def gap_closure(self) -> float | None:
        """(upcycled - Fixed-E) / (Fixed-mE - Fixed-E), whatever the gap's sign (reproduce reports it per
        seed beside the gap itself); None when there is no third run or no difference."""
        if len(self.values) != 3 or None in self.values:
            return None
        fixed_e, upcycled, fixed_me = self.values
        return None if fixed_me == fixed_e else (upcycled - fixed_e) / (fixed_me - fixed_e)

    def shown_gap_closure(self) -> float | None:
        """The gap closed as `compare` shows it: only where Fixed-mE is ahead of Fixed-E (a lower loss,
        a higher score); otherwise the ratio divides by noise or by a gap of the wrong sign."""
        closure = self.gap_closure()
        if closure is None:
            return None
        fixed_e, _, fixed_me = self.values
        ahead = fixed_me < fixed_e if self.kind == "loss" else fixed_me > fixed_e
        return closure if ahead else None


@dataclass(frozen=True)
class Comparison:
    labels: tuple[str, ...]
    rows: tuple[Row, ...]

    @property
    def has_gap(self) -> bool:
        return len(self.labels) == 3


def load_results(path: str | Path) -> dict:
    """The `ds_upcycle` summary of a results file, or of the one in a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path).path / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"no evaluation results at {path}; run `ds-upcycle eval` first")
    try:
        summary = json.loads(path.read_text())["ds_upcycle"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a results file written by `ds-upcycle eval`") from None
    return summary


def _where(summary: dict, path: str) -> str:
    checkpoint = Path(summary.get("checkpoint") or path)
    return f"{checkpoint.parent.name}/{checkpoint.name}" if summary.get("checkpoint") else Path(path).stem


def _role(summary: dict) -> str | None:
    """The paper's name of a run, from its checkpoint's run record: "Upcycled 4->8" for a model
    grown by `ds-upcycle expand`, "Fixed-8" for one trained at its expert count; None when the
    checkpoint is gone or holds no MoE layer."""
    try:
        record = find_checkpoint(summary["checkpoint"]).run_record
    except (KeyError, TypeError, UserError):
        return None
    experts = record.model.num_experts
    if not experts:
        return None
    if record.copy_of:
        sources = max(len(set(layer)) for layer in record.copy_of)
        return f"Upcycled {sources}->{experts}"
    return f"Fixed-{experts}"


def _labels(summaries: list[dict], paths: list[str]) -> tuple[str, ...]:
    """Each run by its role; where two share a role (or a run has none), by where it is too."""
    roles = [_role(s) for s in summaries]
    return tuple(role if role and roles.count(role) == 1 else
                 f"{role} ({_where(s, p)})" if role else _where(s, p)
                 for role, s, p in zip(roles, summaries, paths))


def compare(paths: list[str], labels: list[str] | None = None) -> Comparison:
    if not paths:
        raise UserError("give at least one results file or checkpoint")
    if labels and len(labels) != len(paths):
        raise UserError(f"{len(labels)} labels for {len(paths)} runs")
    summaries = [load_results(p) for p in paths]
    labels = tuple(labels) if labels else _labels(summaries, paths)
    tasks = list(dict.fromkeys(t for s in summaries for t in s["tasks"]))
    rows = [Row(t, tuple((s["tasks"].get(t) or {}).get("value") for s in summaries), "score") for t in tasks]
    common = [row for row in rows if None not in row.values]
    if common:
        rows.append(Row(f"average ({len(common)} tasks)",
                        tuple(sum(row.values[i] for row in common) / len(common) for i in range(len(paths))), "score"))
    losses = tuple(s.get("val_loss") for s in summaries)
    if any(v is not None for v in losses):
        rows.append(Row("validation loss", losses, "loss"))
    return Comparison(labels, tuple(rows))


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if kind == "loss" else f"{100 * value:.1f}"


def table_rows(comparison: Comparison) -> list[list[str]]:
    header = ["task", *comparison.labels] + (["gap closed"] if comparison.has_gap else [])
    lines = [header]
    for row in comparison.rows:
        cells = [row.name, *(_cell(v, row.kind) for v in row.values)]
        if comparison.has_gap:
            closure = row.shown_gap_closure()
            cells.append("-" if closure is None else f"{100 * closure:.1f}%")
        lines.append(cells)
    return lines


def to_markdown(comparison: Comparison) -> str:
    header, *body = table_rows(comparison)
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    note = "Scores in %, validation loss as is."
    if comparison.has_gap:
        note += (" Gap closed: (upcycled - fixed E) / (fixed mE - fixed E), columns in that order; - where"
                 " fixed mE is not ahead of fixed E.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def to_json(comparison: Comparison, ledger=None) -> dict:
    rows = [{"name": row.name, "kind": row.kind, "values": dict(zip(comparison.labels, row.values)),
             "gap_closed": row.shown_gap_closure() if comparison.has_gap else None} for row in comparison.rows]
    return {"labels": list(comparison.labels), "rows": rows, "ledger": ledger.to_dict() if ledger else None}


def write_outputs(directory: str | Path, markdown: str, summary: dict) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "compare.md", directory / "compare.json"]
    for path, text in zip(paths, (markdown, json.dumps(summary, indent=2) + "\n")):
        write_text_atomic(path, text)
    return paths


def to_csv(comparison: Comparison) -> str:
    import csv
    import io

    out = io.StringIO()
    csv.writer(out).writerows(table_rows(comparison))
    return out.getvalue()


def plot(comparison: Comparison, path: str | Path) -> Path:
    """Grouped bars, one colour per run: every score row, and the validation loss in a panel of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(rows, unit) for rows, unit in (([r for r in comparison.rows if r.kind == "score"], "score (%)"),
                                              ([r for r in comparison.rows if r.kind == "loss"], "loss"))
              if rows]
    if not panels:
        raise UserError("nothing to plot: the runs have no task scores and no validation loss")
    scores = len(panels[0][0]) if panels[0][1] == "score (%)" else 0
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 1.2 * scores + 3.0 * (len(panels) - 1)), 4.0),
                             gridspec_kw={"width_ratios": [max(len(rows), 1) for rows, _ in panels]}, squeeze=False)
    width = 0.8 / len(comparison.labels)
    for ax, (rows, unit) in zip(axes[0], panels):
        scale = 100 if unit == "score (%)" else 1
        for i, label in enumerate(comparison.labels):
            ax.bar([x + i * width for x in range(len(rows))], [scale * (row.values[i] or 0.0) for row in rows],
                   width, label=label)
        ax.set_xticks([x + width * (len(comparison.labels) - 1) / 2 for x in range(len(rows))])
        ax.set_xticklabels([row.name for row in rows], rotation=30, ha="right")
        ax.set_ylabel(unit)
        if unit == "loss":  # differences of a few thousandths: bars from zero would hide them
            values = [v for row in rows for v in row.values if v is not None]
            spread = max(values) - min(values) or abs(max(values)) * 0.01 or 1.0
            ax.set_ylim(min(values) - spread, max(values) + spread)
    axes[0][0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
