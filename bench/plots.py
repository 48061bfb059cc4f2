"""PNG plots of benchmark rows (``bench.report.load``) against the token count M (matplotlib, Agg backend).

``DIR/<family>-<K>x<N>.png``, one per benchmark family with an M (qlora_forward, qlora_backward, qlora_fwd+bwd) and
shape: left, speedup over peft+bnb (higher is better); right, time × dense (lower is better); one line per
provider, log-log. ``DIR/headline.png``: forward and fwd+bwd speedup over peft+bnb for the Llama-3-8B headline
shapes (or, without them, the first three shapes in the results), the modes present; a panel without peft+bnb
shows × dense.
"""
import os
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullLocator  # noqa: E402

from bench import shapes  # noqa: E402

BASELINE = "peft+bnb"
COLORS = {"lowrank_kernels": "C0", "lowrank_kernels[fused]": "C1", "unfused": "C2", "peft+bnb": "C3",
          "python_ref": "C4", "dense": "k"}


def series(rows, reference, invert):
    """``{provider: ([M], [value])}``: ``reference``'s time / provider's (``invert``) or the reverse, per M."""
    ref = {r["M"]: r["median"] for r in rows if r["provider"] == reference}
    out = defaultdict(lambda: ([], []))
    for r in sorted(rows, key=lambda r: r["M"]):
        if r["M"] in ref and r["provider"] != reference:
            ratio = ref[r["M"]] / r["median"] if invert else r["median"] / ref[r["M"]]
            out[r["provider"]][0].append(r["M"])
            out[r["provider"]][1].append(ratio)
    return out


def panel(ax, rows, title, reference=None, legend=True):
    """Speedup over peft+bnb (higher is better) or time × dense (lower is better), per ``reference``; ``None``
    picks peft+bnb where the rows have it, else dense."""
    providers = {r["provider"] for r in rows}
    if reference is None:
        reference = BASELINE if BASELINE in providers else "dense"
    ax.set_title(title)
    if reference not in providers:
        ax.text(0.5, 0.5, f"no {reference} results" if rows else "no results", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    lines = series(rows, reference, invert=reference == BASELINE)
    ylabel = f"speedup vs {BASELINE} (higher is better)" if reference == BASELINE else \
        "time × dense (lower is better)"
    for provider, (ms, values) in sorted(lines.items()):
        ax.plot(ms, values, marker="o", label=provider, color=COLORS.get(provider))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ms = sorted({r["M"] for r in rows})
    ax.set_xscale("log")
    ax.set_yscale("log")  # ratios: 2× and 0.5× equally far from 1
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_ylim()
    if high / low < 30:  # a narrow range: label the 2, 3, 5 minor ticks too
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    ax.set_xticks(ms, [str(m) if m < 1024 else f"{m // 1024}k" for m in ms])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("tokens M")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def shape_txt(shape):
    return "x".join(map(str, shape))


def family_figure(rows, path, title):
    """Two panels for one family and shape: vs peft+bnb where present, and × dense where present."""
    providers = {r["provider"] for r in rows}
    views = [v for v, present in ((BASELINE, BASELINE in providers), ("dense", "dense" in providers)) if present]
    if not views:
        return False
    fig, axes = plt.subplots(1, len(views), figsize=(6.5 * len(views), 4.5), squeeze=False)
    for ax, view in zip(axes[0], views):
        panel(ax, rows, f"vs {view}", reference=view)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def headline(rows, path, title):
    """forward and fwd+bwd, those present (rows) × the three headline shapes (columns)."""
    modes = [m for m in ("forward", "fwd+bwd") if any(r["mode"] == m and r["M"] is not None for r in rows)]
    present = list(dict.fromkeys(r["shape"] for r in rows if r["mode"] in modes and r["M"] is not None))
    wanted = [shapes.shape(model, layer) for model, layer in shapes.HEADLINE]
    cols = [s for s in wanted if s in present] or present[:3]
    if not cols:
        return False
    fig, axes = plt.subplots(len(modes), len(cols), figsize=(5 * len(cols), 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, shape in enumerate(cols):
            sel = [r for r in rows if r["mode"] == mode and r["shape"] == shape and r["M"] is not None]
            panel(axes[i][j], sel, f"{mode} {shape[0]}→{shape[1]}", legend=False)
    labels = {}  # one legend for the figure: every provider of every panel, once
    for ax in axes.flat:
        labels.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels())})
    if labels:
        fig.legend(labels.values(), labels.keys(), loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(rows, outdir, title=""):
    """Writes every plot the rows support under ``outdir``; returns the paths written."""
    os.makedirs(outdir, exist_ok=True)
    by_key = defaultdict(list)
    for r in rows:
        if r["M"] is not None and r["shape"]:
            by_key[(r["family"], r["shape"])].append(r)
    written = []
    for (family, shape), rs in by_key.items():
        path = os.path.join(outdir, re.sub(r"[^\w+.-]", "_", f"{family}-{shape_txt(shape)}") + ".png")
        if family_figure(rs, path, f"{family} {shape[0]}→{shape[1]} {rs[0]['dtype']} · {title}"):
            written.append(path)
    path = os.path.join(outdir, "headline.png")
    if headline(rows, path, f"QLoRA layer, r=16 · {title}"):
        written.append(path)
    return written
