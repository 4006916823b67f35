"""Peak memory and throughput of `merge_adapter` (streaming, shard by shard) vs PEFT's `merge_and_unload` on the
whole model loaded in memory.

A synthetic random Llama (hidden 1024, 8 layers: 75 M parameters, float32) is saved in 4 safetensors shards of
~75 MB, with an r = 16 all-linear adapter. Each run happens in a fresh subprocess so the peaks are separate;
the child measures its resident set size (RSS) after its imports (the baseline), resets the kernel's peak
counter (`/proc/self/clear_refs`), does the work, and reads the peak (`VmHWM`). "Added" = peak − baseline:
the memory the merge itself needs, without the ~0.5 GB the Python + torch + transformers imports take.

Target (issue 4): ours without audit adds < 1.5 × (largest shard + adapter). The audit loads the reference
model and then the merged one (one at a time), so with audit the peak is about one full float32 model.

    python -m benchmarks.merge            # full size (< 2 min on 2 CPU cores)
    python -m benchmarks.merge --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parser, reset_peak_rss, rss_mb, table, write_json

FULL = {"hidden": 1024, "layers": 8, "max_shard_size": "80MB", "rank": 16}
QUICK = {"hidden": 128, "layers": 4, "max_shard_size": "300KB", "rank": 4}
RUNS = [("ours", False), ("ours", True), ("merge_and_unload", False)]


def build_inputs(root: Path, size: dict) -> tuple[Path, Path]:
    """A sharded random Llama and a LoRA adapter with non-zero lora_B under `root`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_ogpsa.models.loading import load_base_model
    from lora_ogpsa.testing.tiny import save_tiny_model

    base = save_tiny_model(root / "base", hidden=size["hidden"], layers=size["layers"],
                           max_shard_size=size["max_shard_size"])
    model = get_peft_model(load_base_model(base, quantize=False, device="cpu"),
                           LoraConfig(r=size["rank"], lora_alpha=2 * size["rank"], target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.01)
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def run_child(kind: str, audit: bool, base: Path, adapter: Path, output: Path) -> dict:
    """One measurement in a fresh interpreter; returns what the child printed (JSON)."""
    command = [sys.executable, "-m", "benchmarks.merge", "--child", kind, "--base-dir", str(base),
               "--adapter-dir", str(adapter), "--out", str(output)] + (["--audit"] if audit else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child(kind: str, audit: bool, base: Path, adapter: Path, output: Path) -> None:
    """Runs in the subprocess: import everything, reset the peak, do the work, print the measurements."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ogpsa.export.merge import merge_adapter

    baseline = rss_mb("VmRSS")
    peak_reset = reset_peak_rss()
    start = time.perf_counter()
    extra = {}
    if kind == "ours":
        report = merge_adapter(base, adapter, output, audit=audit, progress=False)
        extra = {"max_logit_diff": report.max_logit_diff, "tolerance": report.tolerance,
                 "audit_seconds": report.audit_seconds}
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        model.merge_and_unload().save_pretrained(output)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline_mb": baseline, "peak_mb": rss_mb("VmHWM"), "seconds": seconds,
                      "peak_reset": peak_reset, **extra}))


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--child", choices=["ours", "merge_and_unload"], help=argparse.SUPPRESS)
    for name in ("--base-dir", "--adapter-dir", "--out"):
        arguments.add_argument(name, type=Path, help=argparse.SUPPRESS)
    arguments.add_argument("--audit", action="store_true", help=argparse.SUPPRESS)
    args = arguments.parse_args()
    if args.child:
        child(args.child, args.audit, args.base_dir, args.adapter_dir, args.out)
        return
    size = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as root:
        base, adapter = build_inputs(Path(root), size)
        shard_mb = max(p.stat().st_size for p in base.glob("model*.safetensors")) / 2**20
        model_mb = sum(p.stat().st_size for p in base.glob("model*.safetensors")) / 2**20
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
        shards = len(list(base.glob("model*.safetensors")))
        results = [{"method": kind, "audit": audit,
                    **run_child(kind, audit, base, adapter, Path(root) / f"out-{kind}-{audit}")}
                   for kind, audit in RUNS]
    budget = shard_mb + adapter_mb
    rows = []
    for result in results:
        result["added_mb"] = result["peak_mb"] - result["baseline_mb"]
        result["added_over_shard_plus_adapter"] = result["added_mb"] / budget
        merge_seconds = result["seconds"] - result.get("audit_seconds", 0.0)
        result["throughput_mb_s"] = model_mb / merge_seconds
        rows.append([result["method"], result["audit"], result["seconds"], result["throughput_mb_s"],
                     result["peak_mb"], result["added_mb"], result["added_over_shard_plus_adapter"],
                     result.get("max_logit_diff") if result["audit"] else "-"])
    print(f"model {model_mb:.0f} MB in {shards} shards; largest "
          f"shard {shard_mb:.1f} MB, adapter {adapter_mb:.1f} MB; budget 1.5 × {budget:.1f} = {1.5 * budget:.1f} MB")
    print(table(["method", "audit", "seconds", "MB/s (merge)", "peak RSS MB", "added MB", "added / (shard+adapter)",
                 "max logit diff"], rows))
    ours = results[0]
    passed = None if args.quick else bool(ours["added_over_shard_plus_adapter"] < 1.5)
    verdict = {None: "not judged (--quick: fixed costs dominate at this size)", True: "PASS", False: "FAIL"}[passed]
    print(f"target: ours (no audit) adds {ours['added_mb']:.0f} MB = {ours['added_over_shard_plus_adapter']:.2f} × "
          f"(largest shard + adapter), must be < 1.5: {verdict}")
    path = write_json("merge_quick" if args.quick else "merge", {
        "size": size, "shards": shards, "model_mb": model_mb, "largest_shard_mb": shard_mb, "adapter_mb": adapter_mb,
        "target_ratio": 1.5, "passed": passed, "results": results}, args.output_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
