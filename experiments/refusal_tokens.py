"""How many new tokens does the refusal evaluation need? The detector's verdicts on responses cut to N tokens.

Greedy decoding is prefix-consistent: the first N tokens of a longer greedy response are the N-token response.
So cutting saved responses shows, without generating anything, what a shorter `eval_max_new_tokens` would have
measured: on the labelled set (`tests/data/refusal_labels.jsonl`: precision and recall against the labels) and
on the per-prompt responses of demo reports (HarmBench and benign refusal rates; utility is generated
separately, with `utility_max_new_tokens`).

    python -m experiments.refusal_tokens runs/demo/report.json [more reports] [--tokens 12 16 24]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lora_ogpsa.demo.assets import ensure_default_model
from lora_ogpsa.models.loading import load_tokenizer
from lora_ogpsa.refusal import is_refusal

LABELS = Path(__file__).resolve().parents[1] / "tests" / "data" / "refusal_labels.jsonl"


def dev_report(path: Path) -> dict:
    """A demo report evaluated on the dev split: the detector's cut is a choice, so it never reads test."""
    report = json.loads(path.read_text())
    split = report.get("settings", {}).get("split")
    if split != "dev":
        raise SystemExit(f"refusal_tokens: error: {path} was evaluated on the {split or 'unsplit (pre-protocol)'} "
                         "prompts; choose the detector's cut on a --split dev report (python -m "
                         "experiments.alignment_tax --split dev ...)")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="*", type=Path, help="demo report.json files")
    parser.add_argument("--tokens", nargs="+", type=int, default=[12, 16, 24])
    args = parser.parse_args()
    tokenizer = load_tokenizer(ensure_default_model())

    def cut(text: str, tokens: int) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens])

    rows = [json.loads(line) for line in LABELS.read_text().splitlines() if line]
    print(f"labelled set ({len(rows)} responses): N tokens | precision | recall | verdicts changed by the cut")
    for tokens in args.tokens:
        flags = [(is_refusal(cut(row["response"], tokens)), row["refused"], is_refusal(row["response"]))
                 for row in rows]
        true = sum(p and y for p, y, _ in flags)
        precision = true / max(1, sum(p for p, _, _ in flags))
        recall = true / max(1, sum(y for _, y, _ in flags))
        print(f"  {tokens} | {precision:.3f} | {recall:.3f} | {sum(p != full for p, _, full in flags)}")
    for path in args.reports:
        report = dev_report(path)
        print(f"{path}: model | N tokens | HarmBench refused | benign refused")
        for name, responses in report["responses"].items():
            for tokens in args.tokens:
                rates = [sum(is_refusal(cut(r["response"], tokens)) for r in responses[suite]) / len(responses[suite])
                         for suite in ("harmful", "benign")]
                print(f"  {name} | {tokens} | {rates[0]:.3f} | {rates[1]:.3f}")


if __name__ == "__main__":
    main()
