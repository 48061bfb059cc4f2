"""Turn a pytest-benchmark JSON file into a markdown table.

    python -m bench.report RESULTS.json [--out REPORT.md]

Per benchmark group and shape: median time per call, achieved GB/s (where the benchmark recorded ``bytes``),
that as a fraction of the device-copy bandwidth measured in the same run, and the speedup over bitsandbytes (or peft+bnb), time relative to dense bf16.
"""
import argparse
import json
from collections import defaultdict

BASELINES = ("bitsandbytes", "peft+bnb")


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        rows.append(dict(group=b["group"] or b["name"], provider=info.get("provider", b["name"]),
                         shape=tuple(info.get("shape", ())), dtype=info.get("dtype", ""),
                         median=b["stats"]["median"], bytes=info.get("bytes"), flops=info.get("flops")))
    return data, rows


def render(data, rows) -> str:
    mi = data.get("machine_info", {})
    pk = mi.get("packages", {})
    lines = [f"GPU: {mi.get('gpu') or 'none (CPU)'} · " + " · ".join(f"{k} {v}" for k, v in pk.items() if v)
             + f" · {data.get('datetime', '')[:10]}", ""]
    copy_bw = next((r["bytes"] / r["median"] for r in rows if r["group"] == "device_copy"), None)
    if copy_bw:
        lines += [f"Device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s", ""]
    groups = defaultdict(list)
    for r in rows:
        if r["group"] != "device_copy":
            groups[(r["group"], r["shape"], r["dtype"])].append(r)
    for (group, shape, dtype), rs in groups.items():
        base = next((r["median"] for r in rs if r["provider"] in BASELINES), None)
        dense = next((r["median"] for r in rs if r["provider"] == "dense"), None)
        shape_txt = "→".join(map(str, shape))  # in_features→out_features
        lines += [f"### {group} {shape_txt} {dtype}", "",
                  "| provider | median µs | GB/s | % of copy | TFLOP/s | × dense | speedup vs bitsandbytes |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: r["median"]):
            gbs = r["bytes"] / r["median"] / 1e9 if r["bytes"] else None
            lines.append("| {} | {:.1f} | {} | {} | {} | {} | {} |".format(
                r["provider"], r["median"] * 1e6,
                f"{gbs:.0f}" if gbs else "–",
                f"{100 * gbs * 1e9 / copy_bw:.0f}%" if gbs and copy_bw else "–",
                f"{r['flops'] / r['median'] / 1e12:.0f}" if r["flops"] else "–",
                f"{r['median'] / dense:.2f}" if dense else "–",
                f"{base / r['median']:.2f}×" if base else "–"))
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="pytest-benchmark JSON (pytest bench --benchmark-json=FILE)")
    ap.add_argument("--out", help="write the markdown here instead of printing it")
    args = ap.parse_args(argv)
    text = render(*load(args.results))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
