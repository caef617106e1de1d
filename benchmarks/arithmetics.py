"""How far the test suite's learning figures move with a machine's arithmetic and with the seed: the measurement
behind every learning threshold in tests/ (a margin over a baseline, counted in images where the figure counts
images).

    uv run benchmarks/arithmetics.py [seeds=default,1,2] [arithmetics=native,default,avx2,one-thread]
                                     [marker="learning and not slow"] [out=DIR] [-- PYTEST ARGS]
    uv run benchmarks/arithmetics.py table=OUT/arithmetics.json     # the table of a saved measurement

For each arithmetic and seed it runs `pytest -m MARKER` (the tests marked `learning`) with FINETUNE_TEST_SEED set
(every training test's seed; `default`: the config's own) and FINETUNE_SPREAD naming a file where each learning
assertion (support.recipes: assert_above_chance, assert_above, assert_below) records its figure, its baseline and
what it needs. It prints, per test and figure, what was needed and the lowest, median and highest figure seen, and
how many runs fell short; OUT/arithmetics.json holds every figure.

The arithmetics, on one machine: `native` (whatever torch picks here); `default` (ATEN_CPU_CAPABILITY=default: no
vector kernels); `avx2` (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2: a CPU without AVX-512); `one-thread`
(OMP_NUM_THREADS=1: reductions summed in another order, as on a machine with another core count).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARITHMETICS = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    options = dict(a.split("=", 1) for a in (argv[:argv.index("--")] if "--" in argv else argv))
    unknown = set(options) - {"seeds", "arithmetics", "marker", "out", "table"}
    if unknown:
        print(f"unknown option(s): {', '.join(sorted(unknown))}; known: seeds, arithmetics, marker, out, table")
        return 2
    if "table" in options:  # the table of a saved measurement, without running anything
        saved = json.loads(Path(options["table"]).read_text())
        print_table(saved["figures"], f"{len(saved['arithmetics'])} arithmetics x {len(saved['seeds'])} seeds "
                                      f"({options['table']})")
        return 0
    seeds = options.get("seeds", "default,1,2").split(",")
    names = options.get("arithmetics", ",".join(ARITHMETICS)).split(",")
    if any(n not in ARITHMETICS for n in names):
        print(f"arithmetics are among {', '.join(ARITHMETICS)}")
        return 2
    marker = options.get("marker", "learning and not slow")
    out = Path(options.get("out", ROOT / "outputs" / "benchmarks"))
    out.mkdir(parents=True, exist_ok=True)

    figures, failed_runs = [], []
    for name in names:
        for seed in seeds:
            with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as spread:
                env = {k: v for k, v in os.environ.items() if k not in ("FINETUNE_TEST_SEED", *_all_keys())}
                env.update(ARITHMETICS[name], FINETUNE_SPREAD=spread.name)
                if seed != "default":
                    env["FINETUNE_TEST_SEED"] = seed
                started = time.time()
                done = subprocess.run([sys.executable, "-m", "pytest", "-m", marker, "-q", "-p", "no:cacheprovider",
                                       *extra], cwd=ROOT, env=env, capture_output=True,
                                      text=True)
                rows = [json.loads(line) for line in open(spread.name) if line.strip()]
            for row in rows:
                row.update(arithmetic=name, seed=seed)
            figures += rows
            summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
            print(f"{name:>10} seed {seed:>7}: {len(rows)} figures, {time.time() - started:.0f} s; {summary}",
                  flush=True)
            if done.returncode not in (0, 1):
                failed_runs.append((name, seed, done.stdout[-2000:] + done.stderr[-2000:]))

    print_table(figures, f"{len(names)} arithmetics x {len(seeds)} seeds on {platform.machine()} "
                         f"({platform.processor() or 'cpu'}, {os.cpu_count()} cores)")
    (out / "arithmetics.json").write_text(json.dumps({"figures": figures, "seeds": seeds, "arithmetics": names,
                                                      "marker": marker}, indent=1))
    for name, seed, output in failed_runs:
        print(f"\npytest could not run under {name}, seed {seed}:\n{output}")
    return 1 if failed_runs else 0


def print_table(figures: list[dict], heading: str) -> None:
    """Per test and figure: what it needs over its baseline (+: a margin; x: for an error, a share of the baseline;
    <=: a difference at most this), and the lowest, median and highest seen, each over its own run's baseline (a
    seed's split has its own)."""
    table = {}
    for row in figures:
        table.setdefault((row["test"], row["what"]), []).append(row)
    print(f"\n{heading}\n")
    print("| test | figure | needs | lowest | median | highest | short of it | worst at |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for (test, what), rows in sorted(table.items()):
        limit = rows[0]["baseline"] is None  # a difference: at most `needed`
        share = not limit and rows[0]["needed"] < rows[0]["baseline"]  # an error: at most a share of the baseline's
        lower = limit or share  # lower is better
        over = [r["value"] if limit else r["value"] / r["baseline"] if share else r["value"] - r["baseline"]
                for r in rows]
        first = rows[0]
        needs = first["needed"] if limit else first["needed"] / first["baseline"] if share else \
            first["needed"] - first["baseline"]
        short = sum((r["value"] > r["needed"]) if lower else (r["value"] < r["needed"]) for r in rows)
        worst = max(range(len(rows)), key=lambda i: over[i]) if lower else min(range(len(rows)), key=lambda i: over[i])
        form = "{:.4g}" if limit else "x{:.4g}" if share else "{:+.4g}"
        shown = form.format
        print(f"| {test.split('::', 1)[-1]} | {what} | {'<= ' if limit else ''}{shown(needs)} | {shown(min(over))} | "
              f"{shown(statistics.median(over))} | {shown(max(over))} | {short} of {len(rows)} | "
              f"{rows[worst]['arithmetic']}, seed {rows[worst]['seed']} |")


def _all_keys() -> set[str]:
    return {k for env in ARITHMETICS.values() for k in env}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
