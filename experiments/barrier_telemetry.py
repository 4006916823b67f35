"""What the look-alike barrier did in trained runs: its per-step telemetry and the measured look-alike margins.

For each run given as `LABEL=RUN_DIR:LOG` (RUN_DIR the method's directory holding metrics.jsonl, LOG the training
command's log), it reads the `ogpsa/barrier_*` rows of metrics.jsonl (means over the steps: active constraints,
constraints d₀ itself broke, share of d₀ removed, share of the safety loss's first-order fall kept, seconds per
refresh) and, from the log's `look-alike barrier refresh at step N: R rows, margin min/mean X/Y` lines, the
margins *measured* at every refresh. Between refreshes the barrier tracks the margins to first order with cached
gradients; how far the measured minimum falls below the floor at the next refresh is what staleness costs.

    python -m experiments.barrier_telemetry --floor -3 --split dev \
        --run r4-s0=runs/barrier-dev-barrier-t-3/seed-0/barrier-t-3:runs/barrier-dev-barrier-t-3-s0.log \
        --summary experiments/results/barrier_settings_telemetry_dev.json
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
from pathlib import Path

from lora_ogpsa.utils.files import read_jsonl, write_json

REFRESH = re.compile(r"look-alike barrier refresh at step (\d+): (\d+) rows, margin min/mean (-?[\d.]+)/(-?[\d.]+)")
MEANS = ("active", "violated", "removed_share", "loss_progress_kept")


def refreshes(log_text: str) -> list[dict]:
    """The measured margins at each refresh, in log order (a resumed run's repeated steps kept as logged)."""
    return [{"step": int(step), "rows": int(rows), "margin_min": float(low), "margin_mean": float(mean)}
            for step, rows, low, mean in REFRESH.findall(log_text)]


def run_summary(metrics: list[dict], log_text: str, floor: float) -> dict:
    """Step means of the barrier's telemetry and the refresh margins, with the worst fall below the floor."""
    rows = [row for row in metrics if "ogpsa/barrier_active" in row]
    if not rows:
        raise ValueError("no ogpsa/barrier_* rows: not a run with --lookalike_barrier")
    measured = refreshes(log_text)
    seconds = [row["ogpsa/barrier_refresh_seconds"] for row in metrics if "ogpsa/barrier_refresh_seconds" in row]
    return {"steps": len(rows), "mean_refresh_seconds": statistics.fmean(seconds) if seconds else None,
            **{f"mean_{name}": statistics.fmean(row[f"ogpsa/barrier_{name}"] for row in rows) for name in MEANS},
            "refreshes": measured,
            # the first refresh (step 0) precedes any update: every later one measures what first order missed
            "worst_below_floor": max((floor - item["margin_min"] for item in measured[1:]), default=None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR:LOG")
    parser.add_argument("--floor", type=float, required=True, help="τ the runs trained with")
    parser.add_argument("--split", required=True, help="the evaluation split the runs belong to (named in the file)")
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        label, _, paths = item.partition("=")
        run_dir, _, log = paths.partition(":")
        runs[label] = {"source": paths, **run_summary(read_jsonl(Path(run_dir) / "metrics.jsonl"),
                                                      Path(log).read_text(errors="replace"), args.floor)}
    write_json(args.summary, {"command": "python -m experiments.barrier_telemetry " + shlex.join(sys.argv[1:]),
                              "split": args.split, "floor": args.floor, "runs": runs})
    for label, run in runs.items():
        print(f"{label}: active {run['mean_active']:.1f}, removed {run['mean_removed_share']:.3f}, kept "
              f"{run['mean_loss_progress_kept']:.3f}, worst measured margin below the floor "
              f"{run['worst_below_floor']:.2f} nats over {len(run['refreshes'])} refreshes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
