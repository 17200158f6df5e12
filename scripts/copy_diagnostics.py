"""How far the copies of an expansion have moved apart, read from finished checkpoints.

    python scripts/copy_diagnostics.py OUT/seed-0/upcycled-cpt50-grad_sq [...] [--samples 128]

For each checkpoint (an arm's save directory or a tag directory) prints, per MoE layer and as the
mean over layers, the sibling and cross relative weight distances and the co-selection share over
the first --samples validation sequences (trained/copies.py; the records train.py writes at its
evaluations). The sources of the experts come from the checkpoint's run record, or, for a run
saved before records carried them, from the manifest of the expansion beside it in a reproduce
directory (expanded-* for upcycled-*, or --manifest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ds_upcycle.checkpoint import find_checkpoint
from ds_upcycle.errors import UserError
from ds_upcycle.trained.copies import checkpoint_copy_diagnostics


def lineage(arm: Path, manifest: str | None) -> list[list[int]] | None:
    """The experts' sources from a manifest: the one given, or the expansion the arm continued."""
    if manifest is None:
        sibling = arm.parent / arm.name.replace("upcycled-", "expanded-", 1)
        if arm.name.startswith("upcycled-") and sibling.is_dir():
            manifest = str(find_checkpoint(sibling).path / "upcycle_manifest.json")
    if manifest is None:
        return None
    return [layer["sources"] for layer in json.loads(Path(manifest).read_text())["layers"]]


def mean(records: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in records if r[key] is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--manifest", default=None, help="upcycle_manifest.json naming every expert's source")
    parser.add_argument("--data-cache", default=None)
    args = parser.parse_args()
    print("| checkpoint | sibling distance | cross distance | sibling / cross | co-selected |")
    print("| --- | ---: | ---: | ---: | ---: |")
    try:
        for path in args.checkpoints:
            records = checkpoint_copy_diagnostics(path, lineage(Path(path), args.manifest), args.samples,
                                                  args.data_cache)
            sib, cross, co = (mean(records, k) for k in ("sibling_distance", "cross_distance", "co_selected"))
            print(f"| {path} | {sib:.4f} | {cross:.4f} | {sib / cross:.2f} | {co:.3f} |")
    except UserError as err:
        sys.exit(f"copy_diagnostics: {err}")


if __name__ == "__main__":
    main()
