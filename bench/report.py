"""Turn a pytest-benchmark JSON file into markdown tables, and optionally PNG plots.

    python -m bench.report RESULTS.json [MORE.json ...] [--out REPORT.md] [--plots DIR]

Sections by mode (forward, backward, fwd+bwd, fwd+bwd-graph of the QLoRA layer), then the other benchmark families
(dequant, training step). One table per benchmark group (M included) and shape: median time per call, and the
columns the results hold data for: speedup over bitsandbytes / peft+bnb / peft, time × dense bf16, time × the plain LoRA
(``lora_r*``, the AdaLoRA layer's target), TFLOP/s (``flops``), tokens/s (``tokens``), GB/s and % of the
device-copy bandwidth measured in the same run (``bytes``), peak MiB allocated beyond the inputs and weights
(``peak_extra_bytes``), peak MiB in all (``peak_bytes``), base weight MiB (``weight_bytes``). Missing providers or
fields leave a cell "–" or drop the column. ``--plots``: see bench/plots.py.
"""
import argparse
import json
import re
import sys
from collections import defaultdict

BASELINES = ("bitsandbytes", "peft+bnb", "peft")
MODES = ("forward", "backward", "fwd+bwd", "fwd+bwd-graph")  # the layer modes of bench/conftest.py
MIB = 2**20


def load(path):
    """``(data, rows)``: the JSON, and one dict per benchmark with the fields the report and the plots read."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        group = b["group"] or b["name"]
        family = re.sub(r" M=\d+", "", group)  # the group without its token count
        mode = info.get("mode")
        if mode not in MODES:  # older results recorded the timing method under "mode"
            mode = next((m for m in MODES if family == f"qlora_{m}"), None)
        rows.append(dict(group=group, family=family, mode=mode, provider=info.get("provider", b["name"]),
                         shape=tuple(info.get("shape", ())), dtype=info.get("dtype", ""), M=info.get("M"),
                         median=b["stats"]["median"],
                         **{k: info.get(k) for k in ("bytes", "flops", "tokens", "peak_extra_bytes", "peak_bytes",
                                                     "weight_bytes")}))
    return data, rows


def fmt_time(t):
    return f"{t * 1e6:.1f} µs" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def num(x):
    """3 significant digits, no exponent for the values that matter (>= 100 as integers)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def mib(n):
    return None if n is None else f"{n / MIB:.1f}"


def columns(rs, copy_bw):
    """``[(header, cell(row) -> str | None)]`` for a table of rows ``rs``: only columns some row fills."""
    base = next((r for r in rs if r["provider"] in BASELINES), None)
    dense = next((r["median"] for r in rs if r["provider"] == "dense"), None)
    lora = next((r for r in rs if r["provider"].startswith("lora_r")), None)
    gbs = lambda r: r["bytes"] / r["median"] / 1e9 if r["bytes"] else None  # noqa: E731
    candidates = [
        ("median", lambda r: fmt_time(r["median"])),
        (f"speedup vs {base['provider']}" if base else "", lambda r: base and f"{base['median'] / r['median']:.2f}×"),
        ("× dense", lambda r: dense and f"{r['median'] / dense:.2f}"),
        (f"× {lora['provider']}" if lora else "", lambda r: lora and f"{r['median'] / lora['median']:.2f}"),
        ("TFLOP/s", lambda r: r["flops"] and num(r["flops"] / r["median"] / 1e12)),
        ("tokens/s", lambda r: r["tokens"] and f"{r['tokens'] / r['median']:,.0f}"),
        ("GB/s", lambda r: gbs(r) and num(gbs(r))),
        ("% of copy", lambda r: gbs(r) and copy_bw and f"{100 * gbs(r) * 1e9 / copy_bw:.0f}%"),
        ("peak extra MiB", lambda r: mib(r["peak_extra_bytes"])),
        ("peak MiB", lambda r: mib(r["peak_bytes"])),
        ("weights MiB", lambda r: mib(r["weight_bytes"])),
    ]
    return [(h, cell) for h, cell in candidates if any(cell(r) for r in rs)]


def table(rs, copy_bw):
    cols = columns(rs, copy_bw)
    lines = ["| provider | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in sorted(rs, key=lambda r: r["median"]):
        lines.append(f"| {r['provider']} | " + " | ".join(cell(r) or "–" for _, cell in cols) + " |")
    return lines


def render(data, rows) -> str:
    mi = data.get("machine_info", {})
    pk = mi.get("packages", {})
    lines = [f"GPU: {mi.get('gpu') or 'none (CPU)'} · " + " · ".join(f"{k} {v}" for k, v in pk.items() if v)
             + f" · {data.get('datetime', '')[:10]}", ""]
    copy_bw = next((r["bytes"] / r["median"] for r in rows if r["group"] == "device_copy"), None)
    if copy_bw:
        lines += [f"Device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s", ""]
    shape_order = {s: i for i, s in enumerate(dict.fromkeys(r["shape"] for r in rows))}
    tables = defaultdict(list)
    for r in rows:
        if r["group"] != "device_copy":
            tables[(r["mode"] or r["family"], r["group"], r["shape"], r["dtype"])].append(r)
    sections = list(MODES) + sorted({key[0] for key in tables} - set(MODES))
    order = lambda key: (sections.index(key[0]), tables[key][0]["M"] or 0, shape_order[key[2]])  # noqa: E731
    section = None
    for key in sorted(tables, key=order):
        if key[0] != section:
            section = key[0]
            lines += [f"## {section}", ""]
        _, group, shape, dtype = key
        shape_txt = "→".join(map(str, shape))  # in_features→out_features
        heading = " ".join(part for part in (group, shape_txt, dtype) if part)
        lines += [f"### {heading}", ""] + table(tables[key], copy_bw) + [""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="pytest-benchmark JSON files (pytest bench --benchmark-json=FILE) of "
                    "one GPU session; several are merged (machine info from the first)")
    ap.add_argument("--out", help="write the markdown here instead of printing it")
    ap.add_argument("--plots", metavar="DIR", help="write PNG plots here (needs matplotlib)")
    args = ap.parse_args(argv)
    data, rows = load(args.results[0])
    for path in args.results[1:]:
        rows += load(path)[1]
    text = render(data, rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.plots:
        from bench import plots

        # the headline plot is the QLoRA layer's: other layer families (adalora_*) get their own figures only
        rows = [r if r["family"].startswith("qlora_") else dict(r, mode=None) for r in rows]
        for path in plots.write_all(rows, args.plots, title=data.get("machine_info", {}).get("gpu") or "CPU"):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
