"""Render bench/perf.py's results.json as BENCHMARKS.md tables and the scaling plot (PNG)."""

from __future__ import annotations

from pathlib import Path


def markdown(results: dict) -> str:
    m, s, t, f = results["machine"], results["settings"], results["train"], results["flops"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}. "
        f"Settings: `{s['model']}` at {s['image_size']} px, batch {s['batch']}, {s['steps']} steps per run "
        f"(first {s['warmup_steps_dropped']} dropped), {s['workers']} loader workers, {s['threads']} torch threads, "
        f"{s['precision']}, {s['alternations']} alternations.",
        "",
        "| trainer | samples/s (median) | runs | peak RSS, MB (process tree) | MFU |",
        "|---|---:|---|---:|---:|",
    ]
    for name in ("clipx", "open_clip"):
        runs = ", ".join(f"{r['samples_per_second']:.1f}" for r in t["runs"] if r["trainer"] == name)
        lines.append(f"| {name} | {t[f'{name}_samples_per_second']:.1f} | {runs} | {t[f'{name}_peak_rss_mb']:.0f} | "
                     f"{f[f'{name}_mfu']:.1%} |")
    lines += ["", f"**Ratio clipx / open_clip: {t['ratio']:.3f}**", "",
              f"Model FLOPs per sample (forward + backward, both towers): {f['model_flops_per_sample'] / 1e9:.3f} GFLOP. "
              f"Dense fp32 matmul on this machine ({s['threads']} threads): "
              f"{f['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s.", "",
              "| clipx loader alone (decode, augment, tokenize) | samples/s | per worker |", "|---|---:|---:|"]
    lines += [f"| {row['workers']} worker(s) | {row['samples_per_second']:.0f} | {row['per_worker']:.0f} |"
              for row in results["loader"]]
    if results.get("ablations"):
        a = results["ablations"]
        lines += ["", "| clipx variant | samples/s (median) | first step s |", "|---|---:|---:|"]
        lines += [f"| {name} | {row['samples_per_second']:.1f} | "
                  f"{row['first_step_seconds']:.1f} |" if "first_step_seconds" in row else
                  f"| {name} | {row['samples_per_second']:.1f} | |" for name, row in a["clipx"].items()]
        lines += ["", "| AdamW implementation | ms per step (benchmark model) |", "|---|---:|"]
        lines += [f"| {name} | {ms:.1f} |" for name, ms in a["adamw_step_ms"].items()]
    if results.get("eval"):
        e = results["eval"]
        lines += ["", f"Evaluators on {e['images']} images (batch {e['batch']}, {e['workers']} workers, {e['threads']} threads, "
                  f"median of {e['repeats']} alternating runs each, whole processes):", "",
                  "| task | clipx images/s | CLIP_benchmark images/s | speed ratio | largest metric difference |",
                  "|---|---:|---:|---:|---:|"]
        for task, r in e["tasks"].items():
            lines.append(f"| {task} | {r['clipx_images_per_second']:.0f} | {r['clip_benchmark_images_per_second']:.0f} | "
                         f"{r['clipx_images_per_second'] / r['clip_benchmark_images_per_second']:.2f} | "
                         f"{r['max_abs_difference']:.1e} |")
        lines += ["", "| metric | clipx | CLIP_benchmark |", "|---|---:|---:|"]
        lines += [f"| {name} | {v['clipx']:.6f} | {v['clip_benchmark']:.6f} |"
                  for r in e["tasks"].values() for name, v in r["metrics"].items()]
    if results.get("scaling"):
        lines += ["", "| axis | value | clipx s/step | open_clip s/step | clipx / open_clip speed |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['axis']} | {r['value']} | {r['clipx_step_seconds']:.3f} | {r['open_clip_step_seconds']:.3f} | "
                  f"{r['open_clip_step_seconds'] / r['clipx_step_seconds']:.2f} |" for r in results["scaling"]]
    return "\n".join(lines)


def plot_scaling(results: dict, path: Path) -> None:
    """Two panels: step time against batch size, and against image size, one line per trainer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, label in ((axes[0], "batch", "batch size (64 px)"), (axes[1], "image_size", "image size, px (batch 64)")):
        rows = [r for r in results["scaling"] if r["axis"] == axis]
        for trainer, marker in (("clipx", "o"), ("open_clip", "s")):
            ax.plot([r["value"] for r in rows], [r[f"{trainer}_step_seconds"] for r in rows], marker=marker,
                    label=trainer)
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per step")
        ax.grid(alpha=0.3)
        ax.legend()
    m = results["machine"]
    figure.suptitle(f"Step time, clipx vs open_clip_train ({m['cores']} CPU cores, fp32)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
