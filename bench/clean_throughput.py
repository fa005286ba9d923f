"""Data-cleaning throughput and peak memory on generated corpora of growing size.

The corpus is Tiny Shakespeare (or, without it, the standard library's pydoc topics) repeated with
perturbations: every copy changes some words and case, and about 30% of its lines are exact repeats of
earlier ones, so de-duplication has real work. Each size is cleaned in a fresh subprocess
(``record: line``, hash split, all rules on) and measured for wall time and peak RSS.

    .venv/bin/python bench/clean_throughput.py                  # 50 MB and 500 MB
    .venv/bin/python bench/clean_throughput.py --sizes 50 200   # other sizes (MB)
    .venv/bin/python bench/clean_throughput.py --smoke          # 2 MB, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

CHILD = """
import json, resource, sys, time
from pathlib import Path
from tasks.config import load_config
from tasks.cleaning import clean_dataset
cfg = load_config(None, ["data.record=line", "data.cleaning.min_chars=1", "data.cache_dir=" + sys.argv[2]])
cfg.data.sources = [{"kind": "files", "paths": [sys.argv[1]]}]
t0 = time.perf_counter()
result = clean_dataset(cfg.data, base_dir=Path(sys.argv[1]).parent)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "rows_in": result.rows_in, "dropped": result.dropped,
                  "rows": result.rows_per_split, "peak_rss_mib": peak}))
"""


def base_lines() -> list[str]:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text(encoding="utf-8").splitlines()
    import pydoc_data.topics

    return "\n".join(pydoc_data.topics.topics.values()).splitlines()


def generate(path: Path, megabytes: int, seed: int = 0) -> int:
    """Write about ``megabytes`` MB of perturbed, partly duplicated text; returns bytes written."""
    rng = random.Random(seed)
    lines = [ln for ln in base_lines() if ln.strip()]
    target = megabytes * 1_000_000
    written = 0
    recent: list[str] = []
    copy = 0
    with path.open("w", encoding="utf-8") as fh:
        while written < target:
            copy += 1
            out = []
            for line in lines:
                if recent and rng.random() < 0.3:
                    text = rng.choice(recent)  # an exact duplicate of an earlier line
                else:
                    words = line.split()
                    if words:
                        i = rng.randrange(len(words))
                        words[i] = words[i].upper() if rng.random() < 0.5 else f"{words[i]}{copy}"
                    text = " ".join(words)
                    if len(recent) < 50_000:
                        recent.append(text)
                    else:
                        recent[rng.randrange(len(recent))] = text
                out.append(text)
            chunk = "\n".join(out) + "\n"
            fh.write(chunk)
            written += len(chunk.encode())
    return written


def measure(corpus: Path, cache: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(cache)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    wall = time.perf_counter() - t0
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_seconds"] = wall
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500], help="corpus sizes in MB")
    parser.add_argument("--smoke", action="store_true", help="one 2 MB corpus: checks the benchmark works")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clean_throughput.json")
    args = parser.parse_args()
    sizes = [2] if args.smoke else sorted(args.sizes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forgeline-clean-bench-") as tmp_str:
        tmp = Path(tmp_str)
        for mb in sizes:
            corpus = tmp / f"corpus-{mb}mb.txt"
            size = generate(corpus, mb)
            report = measure(corpus, tmp / f"cache-{mb}")
            report.update({"megabytes": size / 1e6, "mb_per_s": size / 1e6 / report["seconds"]})
            rows.append(report)
            corpus.unlink()
    print(f"{'input MB':>9} {'records':>10} {'dup dropped':>12} {'clean s':>8} {'MB/s':>6} {'peak RSS MiB':>13}")
    for r in rows:
        print(
            f"{r['megabytes']:9.1f} {r['rows_in']:10d} {r['dropped'].get('duplicate', 0):12d} {r['seconds']:8.1f} "
            f"{r['mb_per_s']:6.2f} {r['peak_rss_mib']:13.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
