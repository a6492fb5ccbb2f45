"""Figures (and reST tables) of docs/utility.rst from the JSON of the utility benchmarks.

Run: ``python benchmarks/plot_utility.py`` (reads ``benchmarks/results/utility_digits_sweep.json``
from ``benchmarks/utility_sweep.py`` and ``benchmarks/results/utility_text.json`` from
``benchmarks/utility_text.py``; writes ``docs/_static/utility_mechanisms_digits.png`` and
``docs/_static/utility_text.png``); ``--rst`` also prints the tables of the page.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def lines(ax, rows: Dict[str, Dict[str, Any]]) -> None:
    styles = ["o-", "s-", "^-", "v--", "D--", "P-", "*-", "x-", "h-"]
    for i, (name, cells) in enumerate(rows.items()):
        eps = sorted(cells, key=float)
        ax.errorbar([float(e) for e in eps], [cells[e]["mean"] for e in eps], yerr=[cells[e]["std"] for e in eps],
                    fmt=styles[i % len(styles)], capsize=3, label=name, lw=1.8 if "recipe" in name else 1.2)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.grid(alpha=0.3)


def plot_digits(sweep: Dict[str, Any], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines(ax, sweep["mechanisms"])
    eps = sorted({float(e) for cells in sweep["mechanisms"].values() for e in cells})
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_ylim(0.2, 1.0)
    seeds = sweep["seeds"]
    ax.set_title(f"digits, MLP 64-128-10, 30 epochs, B = 150 (seeds {seeds[0]}-{seeds[-1]})", fontsize=10)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_text(text: Dict[str, Any], path: str) -> None:
    rows = {name: cells for name, cells in text["rows"].items() if "inf" not in cells}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines(ax, rows)
    eps = [float(e) for e in text["epsilons"]]
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    for name, cells in text["rows"].items():
        if "inf" in cells:
            ax.axhline(cells["inf"]["mean"], color="grey", ls=":", lw=1)
            ax.text(eps[0], cells["inf"]["mean"] - 0.03, f"{name}: {cells['inf']['mean']:.3f}", fontsize=7,
                    color="grey")
    ax.set_ylim(0.45, 1.02)
    ax.set_title("generated sequences, 1-block transformer, 15 epochs, B = 200", fontsize=10)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rst_table(rows: Dict[str, Dict[str, Any]], epsilons) -> str:
    out = [".. list-table::", "   :header-rows: 1", "", "   * - recipe"]
    out += [f"     - ε = {float(e):g}" for e in epsilons]
    for name, cells in rows.items():
        out.append(f"   * - {chr(92) + name if name.startswith('+') else name}")
        for e in epsilons:
            c = cells.get(str(float(e))) if str(float(e)) in cells else cells.get(str(e))
            out.append(f"     - {c['mean']:.3f} ± {c['std']:.3f} ({c['epsilon']:.3f})" if c else "     - ")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", default=os.path.join(HERE, "results", "utility_digits_sweep.json"))
    parser.add_argument("--text", default=os.path.join(HERE, "results", "utility_text.json"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "_static"))
    parser.add_argument("--rst", action="store_true", help="print the tables as reST list-tables")
    args = parser.parse_args()
    if os.path.exists(args.digits):
        sweep = load(args.digits)
        plot_digits(sweep, os.path.join(args.out, "utility_mechanisms_digits.png"))
        if args.rst:
            eps = sorted({float(e) for cells in sweep["mechanisms"].values() for e in cells})
            print(rst_table(sweep["mechanisms"], eps), "\n")
    if os.path.exists(args.text):
        text = load(args.text)
        plot_text(text, os.path.join(args.out, "utility_text.png"))
        if args.rst:
            rows = {n: c for n, c in text["rows"].items() if "inf" not in c}
            print(rst_table(rows, text["epsilons"]), "\n")
            for name, cells in text["rows"].items():
                if "inf" in cells:
                    print(f"{name}: {cells['inf']['mean']:.3f} ± {cells['inf']['std']:.3f}")
            if "opacus_grid" in text:
                print("\ngrid (tune seeds):")
                for k, v in text["opacus_grid"].items():
                    print(f"  ε={k}: {v['mean']:.3f}")


if __name__ == "__main__":
    main()
