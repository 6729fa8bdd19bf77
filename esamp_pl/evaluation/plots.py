"""The evaluation's PNG plots: pass@k per method, diversity vs perplexity per family, Distiller error."""

from __future__ import annotations

import math
from pathlib import Path

from esamp_pl.evaluation.stats import MethodSummary

__all__ = ["plot_all"]


def plot_all(out_dir: Path, summaries: list[MethodSummary], graded: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    if graded and summaries:
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in summaries:
            ks = sorted(s.pass_at_k)
            ax.plot(ks, [s.pass_at_k[k] for k in ks], marker="o", label=s.name,
                    linestyle="-" if "@" not in s.name else "--")
        ax.set_xscale("log", base=2)
        _label(ax, "k", "pass@k", "pass@k per method")
        paths.append(_save(fig, out_dir / "pass_at_k.png"))
    if any(math.isfinite(s.perplexity) for s in summaries):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        families: dict[str, list[MethodSummary]] = {}
        for s in summaries:
            families.setdefault(s.family, []).append(s)
        for ax, (attr, label) in zip(axes, (("vendi", "Vendi score ↑"), ("distinct_2", "distinct-2 ↑"))):
            for family, members in families.items():
                members = sorted(members, key=lambda s: s.perplexity)
                xs = [s.perplexity for s in members]
                ys = [getattr(s, attr) for s in members]
                line, = ax.plot(xs, ys, marker="o" if members[0].beta is None else "s", label=family,
                                linestyle="-" if len(members) > 1 else "none")
                for s in members:
                    if "@" in s.name or len(members) > 1:
                        tag = f"T{s.temperature:g}" if s.beta is None else f"β{s.beta:g}"
                        if s.beta is not None and s.temperature != 1.0:
                            tag += f",T{s.temperature:g}"
                        ax.annotate(tag, (s.perplexity, getattr(s, attr)), fontsize=6, color=line.get_color(),
                                    xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("perplexity under the scorer (geo. mean) ↓")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("diversity vs perplexity per method family (up-left is better)")
        paths.append(_save(fig, out_dir / "diversity_vs_perplexity.png"))
    learners = [s for s in summaries if s.relative_error_curve]
    if learners:
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in learners:
            ax.plot(range(1, len(s.relative_error_curve) + 1), s.relative_error_curve, label=s.name)
        _label(ax, "decode step", "Distiller relative error ||h - f(s)||² / ||h||²",
               "Distiller error during generation (mean over batches)")
        paths.append(_save(fig, out_dir / "distiller_error.png"))
    return paths


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
