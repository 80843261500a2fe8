"""Reports of ``exitrl eval``: a markdown table, PNG plots (accuracy against tokens across runs,
length histograms), and ``exitrl eval compare`` over saved report JSONs."""

from __future__ import annotations

import json
from pathlib import Path

from rl.evaluation.scoring import load_report

COLUMNS = [
    ("accuracy", "acc", "{:.3f}"),
    ("think_tokens_mean", "think mean", "{:.1f}"),
    ("think_tokens_median", "think med", "{:.0f}"),
    ("total_tokens_mean", "total tok", "{:.1f}"),
    ("sequential_tokens_mean", "seq tok", "{:.1f}"),
    ("flops_per_problem", "GFLOPs/problem", "{:.3g}"),
    ("unclosed_thinking_share", "unclosed", "{:.3f}"),
    ("aes_vs_baseline", "AES", "{:+.3f}"),
]


def _fmt(v, f):
    return "-" if v is None else f.format(v)


def _shown(m: dict, key: str):
    v = m.get(key)
    return v / 1e9 if key == "flops_per_problem" and v is not None else v


def markdown_table(reports: dict[str, dict]) -> str:
    """One row per (run, benchmark)."""
    head = "| run | benchmark | metric | " + " | ".join(c[1] for c in COLUMNS) + " | 95% CI |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for run, rep in reports.items():
        for b, m in rep["benchmarks"].items():
            ci = m.get("accuracy_ci95") or [None, None]
            lines.append(
                f"| {run} | {b} | {m['metric']} | "
                + " | ".join(_fmt(_shown(m, k), f) for k, _, f in COLUMNS)
                + f" | [{_fmt(ci[0], '{:.3f}')}, {_fmt(ci[1], '{:.3f}')}] |"
            )
    return "\n".join(lines)


def plot_accuracy_vs_tokens(reports: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, rep in reports.items():
        for b, m in rep["benchmarks"].items():
            x = m.get("sequential_tokens_mean") or m.get("completion_tokens_mean")
            if x is None:
                continue
            ax.scatter([x], [m["accuracy"]], label=f"{run}:{b}")
    ax.set(xlabel="tokens per answer (sequential)", ylabel="accuracy", title="accuracy vs tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_length_histograms(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({r.get("benchmark", "?") for r in records})
    fig, axes = plt.subplots(1, max(1, len(benches)), figsize=(4 * max(1, len(benches)), 3), squeeze=False)
    for ax, b in zip(axes[0], benches):
        vals = [
            r["completion_tokens"]
            for r in records
            if r.get("benchmark", "?") == b and r.get("completion_tokens") is not None
        ]
        ax.hist(vals, bins=30)
        ax.set(title=b, xlabel="completion tokens", ylabel="responses")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy_vs_layers(curve: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against layers executed, one curve per benchmark (the router skip-bias sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for b, points in curve.items():
        pts = sorted(points, key=lambda p: p["layers_executed_mean"] or 0)
        ax.plot([p["layers_executed_mean"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=b)
        for p in pts:
            tag = "full" if p["skip_bias"] is None else f"bias {p['skip_bias']:g}"
            ax.annotate(tag, (p["layers_executed_mean"], p["accuracy"]), fontsize=6)
    ax.set(xlabel="layers executed per sequence (mean)", ylabel="accuracy", title="accuracy vs layers (routers)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_answer_depth(report: dict, path: Path) -> bool:
    """Share of answer tokens that are the exit head's top-1 at each layer (dashed) and that have
    settled by it (solid), one colour per benchmark; False when no benchmark has a depth report."""
    depths = {b: m["depth"] for b, m in report.get("benchmarks", {}).items() if m.get("depth", {}).get("answer_tokens")}
    if not depths:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for b, d in depths.items():
        layers = list(range(1, d["num_layers"] + 1))
        (line,) = ax.plot(layers, d["settled_share_by_layer"], marker="o", label=f"{b}: settled")
        ax.plot(layers, d["top1_share_by_layer"], ls="--", color=line.get_color(), label=f"{b}: top-1")
    ax.set(xlabel="layer", ylabel="share of answer tokens", title="depth the answers need (exit-head read-outs)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_reports(report: dict, out_dir: str | Path, name: str = "run") -> dict[str, str]:
    from rl.evaluation.run import read_records

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_table({name: report}) + "\n")
    plot_accuracy_vs_tokens({name: report}, out / "accuracy_vs_tokens.png")
    files = {
        "json": str(out / "report.json"),
        "markdown": str(out / "report.md"),
        "plot": str(out / "accuracy_vs_tokens.png"),
    }
    if report.get("budget_front"):
        from rl.evaluation.budget_front import plot_budget_front

        plot_budget_front(report["budget_front"], out / "budget_front.png")
        files["budget_plot"] = str(out / "budget_front.png")
    if report.get("router_curve"):
        plot_accuracy_vs_layers(report["router_curve"], out / "accuracy_vs_layers.png")
        files["layers_plot"] = str(out / "accuracy_vs_layers.png")
    if plot_answer_depth(report, out / "answer_depth.png"):
        files["depth_plot"] = str(out / "answer_depth.png")
    if report.get("responses") and Path(report["responses"]).exists():
        plot_length_histograms(read_records(Path(report["responses"])), out / "lengths.png")
        files["lengths"] = str(out / "lengths.png")
    return files


def compare(paths: list[str], plot: str | None = None) -> str:
    reports = {}
    for p in paths:
        f = Path(p)
        f = f / "report.json" if f.is_dir() else f
        if not f.exists():
            raise FileNotFoundError(f"no report at {f} (give report.json files or the --out folders of exitrl eval)")
        reports[f.parent.name if f.name == "report.json" else f.stem] = load_report(f)
    if plot:
        plot_accuracy_vs_tokens(reports, Path(plot))
    return markdown_table(reports)
