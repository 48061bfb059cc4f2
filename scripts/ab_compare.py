"""Compare layer-benchmark runs of two code versions, run alternately on one GPU (``scripts/gpu_ab.sh``).

    python scripts/ab_compare.py A1.json B1.json A2.json B2.json ... [--labels base,head]

Each JSON is a ``pytest bench --benchmark-json`` result. For every case (mode, shape, M) it prints the median
time of the ``lowrank_kernels`` provider as a ratio to ``dense`` of the same run (the ratio cancels the clock
drift between runs), per run, then head / base of the mean ratios and the spread of each version's ratios
across its runs (max / min): a head / base beyond that spread is a change, within it noise.
"""
import argparse
import json
import statistics
from collections import defaultdict


def load(path):
    """``{(mode, shape, M): {provider: median seconds}}`` of one run."""
    data = json.load(open(path))
    out = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        params = b.get("params", {})
        mode = info.get("mode") or params.get("mode")
        key = (mode, tuple(info.get("shape", ())), info.get("M", params.get("M")))
        out[key][info.get("provider") or params.get("provider")] = b["stats"]["median"]
    return out, data.get("machine_info", {}).get("gpu")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="JSON results, alternating versions: A1 B1 A2 B2 ...")
    parser.add_argument("--labels", default="base,head")
    args = parser.parse_args()
    labels = args.labels.split(",")
    runs = [load(p) for p in args.runs]
    gpu = {g for _, g in runs}
    by_version = {label: [r for i, (r, _) in enumerate(runs) if i % len(labels) == k] for k, label in
                  enumerate(labels)}
    keys = sorted({k for r, _ in runs for k in r}, key=lambda k: (str(k[0]), k[1], k[2] or 0))
    print(f"GPU: {', '.join(sorted(map(str, gpu)))}; runs per version: "
          + ", ".join(f"{v} {len(rs)}" for v, rs in by_version.items()))
    print(f"{'mode':<14} {'shape':<12} {'M':>5}  " + "  ".join(f"{v + ' x dense':>22}" for v in labels)
          + f"  {labels[-1]}/{labels[0]}  spread")
    worst = []
    for key in keys:
        ratios = {}
        for v, rs in by_version.items():
            rs = [r[key] for r in rs if key in r and "lowrank_kernels" in r[key] and "dense" in r[key]]
            ratios[v] = [r["lowrank_kernels"] / r["dense"] for r in rs]
        if not all(ratios.values()):
            continue
        means = {v: statistics.mean(x) for v, x in ratios.items()}
        spread = max(max(x) / min(x) for x in ratios.values())
        change = means[labels[-1]] / means[labels[0]]
        worst.append((change, spread, key))
        cells = "  ".join(f"{' '.join(f'{x:.3f}' for x in ratios[v]):>22}" for v in labels)
        print(f"{str(key[0]):<14} {'x'.join(map(str, key[1])):<12} {key[2]:>5}  {cells}  {change:>9.3f}  "
              f"{spread:.3f}")
    beyond = [(c, s, k) for c, s, k in worst if c > s]
    print(f"{len(worst)} cases; {labels[-1]} slower than {labels[0]} beyond the spread in {len(beyond)}"
          + (": " + ", ".join(f"{k[0]} {'x'.join(map(str, k[1]))} M={k[2]} ({c:.3f} > {s:.3f})"
                              for c, s, k in beyond) if beyond else ""))


if __name__ == "__main__":
    main()
