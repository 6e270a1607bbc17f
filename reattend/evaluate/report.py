"""Turns the metrics dict into a summary table, PNG plots and a Markdown report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

MiB = 2**20


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(metrics: dict) -> list[list]:
    """[metric, teacher, student] rows: the headline numbers of each metric that ran."""
    rows = []
    for text, entry in metrics.get("perplexity", {}).items():
        for length, r in entry["lengths"].items():
            rows.append([f"perplexity {text} @{length}", r["teacher"], r["student"]])
    for text, r in metrics.get("kl_agreement", {}).items():
        if "kl" in r:
            rows.append([f"KL(teacher‖student) {text}", 0.0, r["kl"]])
            rows.append([f"top-1 agreement {text}", 1.0, r["top1_agreement"]])
    if "fidelity" in metrics:
        mse = metrics["fidelity"]["relative_mse"]
        rows.append(["attention rel. MSE, mean over layers", 0.0, sum(mse) / len(mse)])
        rows.append([f"attention rel. MSE, worst layer ({max(range(len(mse)), key=mse.__getitem__)})", 0.0, max(mse)])
    lm = metrics.get("lm_eval")
    if lm:
        for task, task_metrics in lm["teacher"].items():
            for name, value in task_metrics.items():
                if not name.endswith("_stderr") and name != "samples":
                    rows.append([f"lm-eval {task} {name}", value, lm["student"].get(task, {}).get(name)])
    for task, by_length in metrics.get("recall", {}).items():
        for length, r in by_length.items():
            rows.append([f"recall {task} @{length}", r["teacher"], r["student"]])
    eff = metrics.get("efficiency")
    if eff:
        longest = max(eff["teacher"])
        t, s = eff["teacher"][longest], eff["student"][longest]
        rows.append([f"prefill s @{longest}", t["prefill_s"], s["prefill_s"]])
        rows.append([f"decode tokens/s @{longest}", t["decode_tokens_per_s"], s["decode_tokens_per_s"]])
        rows.append([f"cache bytes/token @{longest}", t["cache_bytes_per_token"], s["cache_bytes_per_token"]])
    return rows


def format_summary(metrics: dict) -> str:
    rows = summary_rows(metrics)
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'metric':<{width}}  {'teacher':>12}  {'student':>12}"]
    lines += [f"{r[0]:<{width}}  {_fmt(r[1]):>12}  {_fmt(r[2]):>12}" for r in rows]
    return "\n".join(lines)


def _pair_lines(ax, lengths, teacher, student, label: str, color):
    ax.plot(lengths, teacher, linestyle="--", marker="o", color=color, label=f"{label} teacher")
    ax.plot(lengths, student, linestyle="-", marker="s", color=color, label=f"{label} student")


def _length_axis(ax, lengths) -> None:
    """Log-2 context-length axis labelled with exactly the measured lengths."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_perplexity(results: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (text, entry) in enumerate(results.items()):
        lengths = sorted(entry["lengths"])
        _pair_lines(ax, lengths, [entry["lengths"][n]["teacher"] for n in lengths],
                    [entry["lengths"][n]["student"] for n in lengths], text, f"C{i}")
    _length_axis(ax, sorted({n for entry in results.values() for n in entry["lengths"]}))
    ax.set(yscale="log", ylabel="perplexity", title="Perplexity vs context length")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fidelity(results: dict, path: Path) -> str:
    mse = results["relative_mse"]
    fig, ax = plt.subplots(figsize=(max(6, len(mse) * 0.25), 4))
    ax.bar(range(len(mse)), mse, color="C3")
    if all(v > 0 for v in mse):
        ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="‖student − teacher‖² / ‖teacher‖²", title="Per-layer attention output error")
    return _save(fig, path)


def plot_efficiency(results: dict, path: Path) -> str:
    lengths = sorted(results["teacher"])
    panels = [
        ("prefill_s", "prefill time (s)", 1.0),
        ("decode_tokens_per_s", "decode tokens/s", 1.0),
        ("peak_memory_bytes", "peak memory (MiB)", MiB),
        ("cache_bytes", "cache after generate (MiB)", MiB),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, label, scale) in zip(axes, panels):
        _pair_lines(ax, lengths, *([results[who][n][key] / scale for n in lengths] for who in ("teacher", "student")), "", "C0")
        cross = results["crossover"].get(key)
        if cross is not None:
            ax.axvline(cross, color="C2", linestyle=":", label=f"crossover ≈ {cross:.0f}")
        _length_axis(ax, lengths)
        ax.set_title(label)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_recall(results: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (task, by_length) in enumerate(results.items()):
        lengths = sorted(by_length)
        _pair_lines(ax, lengths, [by_length[n]["teacher"] for n in lengths],
                    [by_length[n]["student"] for n in lengths], task, f"C{i}")
    _length_axis(ax, sorted({n for by_length in results.values() for n in by_length}))
    ax.set(ylim=(-0.05, 1.05), ylabel="accuracy", title="Long-context recall")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(metrics: dict, out_dir: Path) -> Path:
    """Write the PNG plots and ``report.md`` into ``out_dir``; return the report's path."""
    parts = ["# Evaluation: student vs teacher", ""]
    parts += [f"- {who}: `{source}`" for who, source in metrics.get("models", {}).items()]
    parts += ["", _table(["metric", "teacher", "student"], summary_rows(metrics)), ""]
    if "perplexity" in metrics:
        parts += ["## Perplexity", "", "Non-overlapping blocks of each length from each held-out text.", ""]
        rows = [[text, n, r["tokens"], r["teacher"], r["student"], r["student"] / r["teacher"]]
                for text, entry in metrics["perplexity"].items() for n, r in entry["lengths"].items()]
        parts += [_table(["text", "length", "tokens", "teacher", "student", "ratio"], rows), ""]
        for text, entry in metrics["perplexity"].items():
            if entry["skipped"]:
                parts += [f"Skipped for {text} (text shorter than one block): lengths {entry['skipped']}.", ""]
        parts += [f"![perplexity]({plot_perplexity(metrics['perplexity'], out_dir / 'perplexity.png')})", ""]
    if "kl_agreement" in metrics:
        parts += ["## Logit agreement", "",
                  "Mean over predicted tokens of KL(teacher‖student) in nats, and how often the two models' "
                  "most likely next token is the same.", ""]
        rows = [[text, r.get("tokens"), r.get("kl"), r.get("top1_agreement")] for text, r in metrics["kl_agreement"].items()]
        parts += [_table(["text", "tokens", "KL", "top-1 agreement"], rows), ""]
    if "fidelity" in metrics:
        mse = metrics["fidelity"]["relative_mse"]
        parts += ["## Per-layer attention fidelity", "",
                  "Each student attention module run on exactly the inputs the teacher's module received; "
                  "relative squared error of its output.", "",
                  _table(["layer", "relative MSE"], [[i, v] for i, v in enumerate(mse)]), "",
                  f"![fidelity]({plot_fidelity(metrics['fidelity'], out_dir / 'fidelity.png')})", ""]
    if "lm_eval" in metrics:
        lm = metrics["lm_eval"]
        parts += ["## lm-evaluation-harness", ""]
        if lm["tasks_dir"]:
            parts += [f"Local task files: `{lm['tasks_dir']}`.", ""]
        rows = [[task, name, value, lm["student"].get(task, {}).get(name)]
                for task, task_metrics in lm["teacher"].items() for name, value in task_metrics.items()]
        parts += [_table(["task", "metric", "teacher", "student"], rows), ""]
    if "recall" in metrics:
        parts += ["## Long-context recall", "",
                  "An answer counts when greedy decoding reproduces every one of its tokens.", ""]
        rows = [[task, n, r["tokens"], r["queries"], r["teacher"], r["student"]]
                for task, by_length in metrics["recall"].items() for n, r in by_length.items()]
        parts += [_table(["task", "length", "mean tokens", "queries", "teacher", "student"], rows), "",
                  f"![recall]({plot_recall(metrics['recall'], out_dir / 'recall.png')})", ""]
    if "efficiency" in metrics:
        eff = metrics["efficiency"]
        parts += ["## Efficiency", "", f"Device: {eff['device']}. Peak memory: {eff['memory_note']}", ""]
        rows = [[n, who, r["prefill_s"], r["decode_tokens_per_s"], r["peak_memory_bytes"] / MiB,
                 r["cache_bytes"] / MiB, r["cache_bytes_per_token"]]
                for n in sorted(eff["teacher"]) for who in ("teacher", "student") for r in [eff[who][n]]]
        parts += [_table(["length", "model", "prefill s", "decode tok/s", "peak MiB", "cache MiB", "cache B/token"], rows), ""]
        parts += ["Where the student becomes cheaper than the teacher (faster, for decode) and stays so:", ""]
        parts += [f"- {key}: {_crossing_text(eff, key)}" for key in eff["crossover"]]
        parts += ["",
                  f"![efficiency]({plot_efficiency(eff, out_dir / 'efficiency.png')})", ""]
    if "generations" in metrics:
        parts += ["## Generations (greedy)", ""]
        for g in metrics["generations"]:
            parts += [f"**Prompt:** `{g['prompt']!r}`", "", "| teacher | student |", "|---|---|",
                      f"| {_cell(g['teacher'])} | {_cell(g['student'])} |", ""]
    parts += ["## Time per metric", "", _table(["metric", "seconds"], list(metrics["timing_s"].items())), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def _crossing_text(eff: dict, key: str) -> str:
    if eff["crossover"][key] is not None:
        return f"from ≈ {eff['crossover'][key]:.0f} tokens"
    sign = -1 if key == "decode_tokens_per_s" else 1
    if all(sign * eff["student"][n][key] < sign * eff["teacher"][n][key] for n in eff["teacher"]):
        return "at every measured length"
    return "not within the measured lengths"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")
