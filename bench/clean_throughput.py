"""Data-cleaning throughput and peak memory on generated corpora of growing size.

The corpus is Tiny Shakespeare (or, without it, the standard library's pydoc topics) repeated with
perturbations: every copy changes some words and case, and about 30% of its lines are exact repeats of
earlier ones, so de-duplication has real work. Each size is cleaned in a fresh subprocess
(``record: line``, hash split, all rules on) and measured for wall time and peak RSS.

With ``--baseline REF`` the cleaning code of that git revision (its ``tasks/`` folder) runs too,
interleaved with the working tree's (baseline, current, baseline, current, ... in fresh processes on
the same corpus), and the table adds the throughput ratio of each interleaved pair.

    .venv/bin/python bench/clean_throughput.py                              # 50 MB and 500 MB
    .venv/bin/python bench/clean_throughput.py --sizes 50 200 --rounds 3    # other sizes (MB), 3 runs each
    .venv/bin/python bench/clean_throughput.py --baseline HEAD~1 --rounds 2 # against an earlier revision
    .venv/bin/python bench/clean_throughput.py --smoke                      # 2 MB, seconds (CI)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

CHILD = """
import json, resource, sys, threading, time
from pathlib import Path
anon = [0]  # peak RssAnon: ru_maxrss also counts the pages of memory-mapped Arrow files, which the kernel can drop
def watch():
    while True:
        with open("/proc/self/status") as status:
            kib = [int(line.split()[1]) for line in status if line.startswith("RssAnon:")]
        anon[0] = max(anon[0], *kib)
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
try:  # revisions from before tasks/ became forgeline.tasks (6272431: tasks/cleaning.py)
    from tasks.cleaning import clean_dataset
    from tasks.config import load_config
except ImportError:
    from forgeline.tasks.config import load_config
    from forgeline.tasks.data.cleaning import clean_dataset
overrides = ["data.record=line", "data.cleaning.min_chars=1", "data.cache_dir=" + sys.argv[2], *sys.argv[3:]]
cfg = load_config(None, overrides)
cfg.data.sources = [{"kind": "files", "paths": [sys.argv[1]]}]
usage = resource.getrusage(resource.RUSAGE_SELF)
t0, cpu0 = time.perf_counter(), usage.ru_utime + usage.ru_stime
result = clean_dataset(cfg.data, base_dir=Path(sys.argv[1]).parent)
usage, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime - cpu0 + kids.ru_utime + kids.ru_stime
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": cpu, "rows_in": result.rows_in,
                  "dropped": result.dropped, "rows": result.rows_per_split, "fingerprint": result.fingerprint,
                  "peak_rss_mib": peak, "peak_rss_worker_mib": kids.ru_maxrss / 1024,
                  "peak_anon_mib": anon[0] / 1024,
                  "worker_cpu_seconds": kids.ru_utime + kids.ru_stime}))
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


def convert(corpus: Path, fmt: str) -> Path:
    """The corpus as ``txt``, as a parquet ``text`` column, or as a labeled CSV (``text``, ``label``)."""
    if fmt == "txt":
        return corpus
    import pyarrow as pa

    lines = corpus.read_text(encoding="utf-8").splitlines()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": lines}), corpus.with_suffix(".parquet"), row_group_size=100_000)
        return corpus.with_suffix(".parquet")
    import pyarrow.csv as pcsv

    labels = [str(len(line) % 5) for line in lines]
    pcsv.write_csv(pa.table({"text": lines, "label": labels}), corpus.with_suffix(".csv"))
    return corpus.with_suffix(".csv")


def measure(corpus: Path, cache: Path, code_root: Path, overrides: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(cache), *(overrides or [])],
        capture_output=True,
        text=True,
        cwd=code_root,
        env={"PYTHONPATH": str(code_root), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    wall = time.perf_counter() - t0
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_seconds"] = wall
    return report


def extract_revision(ref: str, dest: Path) -> Path:
    """The ``tasks/`` package of a git revision, unpacked under ``dest`` (a root for PYTHONPATH)."""
    archive = subprocess.run(["git", "archive", ref, "tasks"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for mb in sorted({r["size_mb"] for r in rows}):
        for variant in ("baseline", "current"):
            mine = [r for r in rows if r["size_mb"] == mb and r["variant"] == variant]
            if not mine:
                continue
            speeds = [r["mb_per_s"] for r in mine]
            table.append(
                {
                    "size_mb": mb,
                    "variant": variant,
                    "megabytes": mine[0]["megabytes"],
                    "rows_in": mine[0]["rows_in"],
                    "duplicates": mine[0]["dropped"].get("duplicate", 0),
                    "seconds_median": statistics.median(r["seconds"] for r in mine),
                    "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in mine),
                    "mb_per_s_median": statistics.median(speeds),
                    "mb_per_s_min": min(speeds),
                    "mb_per_s_max": max(speeds),
                    "n": len(mine),
                    "peak_rss_mib_max": max(r["peak_rss_mib"] for r in mine),
                    "peak_anon_mib_max": max(r.get("peak_anon_mib", 0) for r in mine),
                    "peak_rss_worker_mib_max": max(r.get("peak_rss_worker_mib", 0) for r in mine),
                }
            )
        pairs = [
            (b, c)
            for b, c in zip(
                [r for r in rows if r["size_mb"] == mb and r["variant"] == "baseline"],
                [r for r in rows if r["size_mb"] == mb and r["variant"] == "current"],
                strict=False,
            )
        ]
        if pairs:
            ratios = [c["mb_per_s"] / b["mb_per_s"] for b, c in pairs]
            cpu_ratios = [b["cpu_seconds"] / c["cpu_seconds"] for b, c in pairs]  # throughput per CPU second
            # The fingerprint scheme changed with the datasets rebuild: same output means the same counts.
            same = all(
                b["rows_in"] == c["rows_in"] and b["dropped"] == c["dropped"] and b["rows"] == c["rows"]
                for b, c in pairs
            )
            table.append(
                {
                    "size_mb": mb,
                    "variant": "ratio current/baseline",
                    "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "cpu_ratio_median": statistics.median(cpu_ratios),
                    "cpu_ratio_min": min(cpu_ratios),
                    "cpu_ratio_max": max(cpu_ratios),
                    "n": len(ratios),
                    "same_output": same,
                }
            )
    return table


def print_table(table: list[dict]) -> None:
    print(
        f"{'input MB':>9} {'variant':<24} {'records':>10} {'dup dropped':>12} {'clean s':>8} {'CPU s':>7} "
        f"{'MB/s median':>11} {'min-max':>11} {'n':>2} {'peak RSS MiB':>13} {'anon MiB':>9} {'worker RSS':>10}"
    )
    for t in table:
        if "ratio_median" in t:
            print(
                f"{t['size_mb']:9d} {t['variant']:<24} {'':>10} {'':>12} {'':>8} {'':>7} {t['ratio_median']:11.3f} "
                f"{t['ratio_min']:5.3f}-{t['ratio_max']:5.3f} {t['n']:2d}  same output: {t['same_output']}; "
                f"per CPU second {t['cpu_ratio_median']:.3f} ({t['cpu_ratio_min']:.3f}-{t['cpu_ratio_max']:.3f})"
            )
            continue
        print(
            f"{t['megabytes']:9.1f} {t['variant']:<24} {t['rows_in']:10d} {t['duplicates']:12d} "
            f"{t['seconds_median']:8.1f} {t['cpu_seconds_median']:7.1f} {t['mb_per_s_median']:11.2f} "
            f"{t['mb_per_s_min']:5.2f}-{t['mb_per_s_max']:5.2f} {t['n']:2d} {t['peak_rss_mib_max']:13.0f} "
            f"{t['peak_anon_mib_max']:9.0f} {t['peak_rss_worker_mib_max']:10.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500], help="corpus sizes in MB")
    parser.add_argument("--rounds", type=int, default=1, help="runs per size (and per variant)")
    parser.add_argument("--baseline", help="git revision whose tasks/ to run interleaved with the working tree's")
    parser.add_argument("--smoke", action="store_true", help="one 2 MB corpus: checks the benchmark works")
    parser.add_argument(
        "--format",
        choices=["txt", "parquet", "csv"],
        default="txt",
        help="the same text as plain lines, a parquet text column, or a labeled CSV (label kept by current code)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clean_throughput.json")
    args = parser.parse_args()
    sizes = [2] if args.smoke else sorted(args.sizes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forgeline-clean-bench-") as tmp_str:
        tmp = Path(tmp_str)
        roots = {"current": ROOT}
        if args.baseline:
            roots = {"baseline": extract_revision(args.baseline, tmp / "baseline"), **roots}
        for mb in sizes:
            text = tmp / f"corpus-{mb}mb.txt"
            size = generate(text, mb)
            corpus = convert(text, args.format)
            for i in range(1 if args.smoke else args.rounds):
                for variant, code_root in roots.items():
                    cache = tmp / f"cache-{mb}-{variant}-{i}"
                    labeled = args.format == "csv" and variant == "current"  # the baseline has no label_column
                    report = measure(corpus, cache, code_root, ["data.label_column=label"] if labeled else None)
                    report.update(
                        {
                            "size_mb": mb,
                            "format": args.format,
                            "variant": variant,
                            "round": i,
                            "megabytes": size / 1e6,
                            "mb_per_s": size / 1e6 / report["seconds"],
                        }
                    )
                    rows.append(report)
                    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
                    subprocess.run(["rm", "-rf", str(cache)], check=True)
            corpus.unlink()
            text.unlink(missing_ok=True)
    table = summarize(rows)
    print_table(table)
    load = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "baseline": args.baseline,
        "load_avg_1_5_15": load,
        "rows": rows,
        "table": table,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
