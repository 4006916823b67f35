"""`python -m benchmarks` (`make bench`): every benchmark in turn; each prints its table and writes JSON under
runs/bench/. Pass --quick for a smoke run on tiny models."""

import subprocess
import sys
import time

SCRIPTS = ("subspace", "overhead", "refresh", "refusal_margin", "memory", "merge")


def main() -> int:
    extra = sys.argv[1:]
    for script in SCRIPTS:
        start = time.perf_counter()
        print(f"\n## benchmarks.{script}\n", flush=True)
        completed = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *extra], check=False)
        print(f"({script}: {time.perf_counter() - start:.0f} s)", flush=True)
        if completed.returncode != 0:
            return completed.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
