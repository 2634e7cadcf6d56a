"""Render bench/perf.py's results.json as BENCHMARKS.md tables and the scaling plot (PNG)."""

from __future__ import annotations

from pathlib import Path


def markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    # Results written before the benchmark compared both precisions hold one, at the top level.
    by_precision = results.get("by_precision") or {s["precision"]: {"train": results["train"], "flops": results["flops"]}}
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}. "
        f"Settings: `{s['model']}` at {s['image_size']} px, batch {s['batch']}, {s['steps']} steps per run "
        f"(first {s['warmup_steps_dropped']} dropped), {s['workers']} loader workers, {s['threads']} torch threads, "
        f"{s['alternations']} alternations" + (", each running both trainers in every precision (order reversed every other time)."
                                               if s.get("interleaved") else " per precision."),
        "",
        "| precision | trainer | samples/s (median) | runs | peak RSS, MB (process tree) | MFU (this precision's matmul rate) |",
        "|---|---|---:|---|---:|---:|",
    ]
    for precision, row in by_precision.items():
        t, f = row["train"], row["flops"]
        for name in ("clipx", "open_clip"):
            runs = ", ".join(f"{r['samples_per_second']:.1f}" for r in t["runs"] if r["trainer"] == name)
            lines.append(f"| {precision} | {name} | {t[f'{name}_samples_per_second']:.1f} | {runs} | "
                         f"{t[f'{name}_peak_rss_mb']:.0f} | {f[f'{name}_mfu']:.1%} |")
    lines.append("")
    for precision, row in by_precision.items():
        lines.append(f"- **{precision}: clipx / open_clip = {row['train']['ratio']:.3f}**")
    if "clipx_bf16_over_fp32" in results:
        lines.append(f"- **clipx bf16 / clipx fp32 = {results['clipx_bf16_over_fp32']:.3f}** (end to end, loader included; "
                     "eager, as the default train.compile=false leaves every run)")
    if "clipx_bf16_long_run_over_fp32" in results:
        lines.append(f"- **clipx bf16 compiled / clipx fp32 = {results['clipx_bf16_long_run_over_fp32']:.3f}** "
                     "(end to end; bf16 with train.compile=true against fp32 eager; steady state, compile time in "
                     "the variants table)")
    f = next(iter(by_precision.values()))["flops"]
    rates = ", ".join(f"{p} {row['flops']['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s" for p, row in by_precision.items())
    per_sample = f"{f['model_flops_per_sample'] / 1e9:.3f} GFLOP"
    if "clipx_model_flops_per_sample" in f:  # results written before clipx trimmed its token batches have one figure
        per_sample = (f"{per_sample} at the full context (open_clip_train); "
                      f"{f['clipx_model_flops_per_sample'] / 1e9:.3f} GFLOP for clipx, whose token batches end after "
                      f"the longest caption ({f['clipx_text_length']} tokens here): each trainer's MFU counts its own")
    lines += ["", f"Model FLOPs per sample (forward + backward, both towers): {per_sample}. "
              f"Dense 2048² matmul on this machine ({s['threads']} threads): {rates}.", ""]
    breakdowns = {p: row["breakdown"] for p, row in by_precision.items() if "breakdown" in row}
    if breakdowns:
        lines += ["Where a clipx step's time goes, per precision: compute phases timed alone on random inputs "
                  "(`bench/profile_step.py`'s step), the rest of the end-to-end step (loader wait, logging, "
                  "update guard) as the difference:", "",
                  "| precision | attention kernel | forward + loss, ms | backward, ms | optimizer, ms | "
                  "data wait and other, ms | end-to-end step, ms |", "|---|---|---:|---:|---:|---:|---:|"]
        for precision, b in breakdowns.items():
            phases = b["phases"]
            compute = sum(phases.values())
            lines.append(f"| {precision} | {b['attention_kernel']} | {1e3 * phases['forward + loss']:.0f} | "
                         f"{1e3 * phases['backward']:.0f} | {1e3 * (phases['optimizer step'] + phases['zero_grad']):.0f} | "
                         f"{1e3 * max(b['end_to_end_step_seconds'] - compute, 0.0):.0f} | "
                         f"{1e3 * b['end_to_end_step_seconds']:.0f} |")
        lines.append("")
        fused = {p: b["step_seconds_median"] for p, b in breakdowns.items() if "step_seconds_median" in b}
        if fused:
            lines += ["The compute-only step with clipx's `FusedSelfAttention` against open_clip's "
                      "`nn.MultiheadAttention` (the same weights; the two alternating, medians):", "",
                      "| precision | nn.MultiheadAttention, ms | FusedSelfAttention, ms | speed-up |", "|---|---:|---:|---:|"]
            lines += [f"| {p} | {1e3 * t['mha']:.0f} | {1e3 * t['fused']:.0f} | {t['mha'] / t['fused']:.2f}x |"
                      for p, t in fused.items()]
            lines.append("")
    lines += [
        "| clipx loader alone (decode, augment, tokenize) | samples/s | per worker |", "|---|---:|---:|"]
    lines += [f"| {row['workers']} worker(s) | {row['samples_per_second']:.0f} | {row['per_worker']:.0f} |"
              for row in results["loader"]]
    if results.get("ablations"):
        a = results["ablations"]
        lines += ["", "| clipx variant | precision | samples/s (median) | first step s |", "|---|---|---:|---:|"]
        lines += [f"| {name} | {row.get('precision', s['precision'])} | {row['samples_per_second']:.1f} | "
                  + (f"{row['first_step_seconds']:.1f} |" if "first_step_seconds" in row else " |")
                  for name, row in a["clipx"].items()]
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
        lines += ["", "| metric | clipx | CLIP_benchmark | clipx --precision bf16 |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {v['clipx']:.6f} | {v['clip_benchmark']:.6f} | "
                  f"{v['clipx_bf16']:.6f} |" if "clipx_bf16" in v else
                  f"| {name} | {v['clipx']:.6f} | {v['clip_benchmark']:.6f} | |"
                  for r in e["tasks"].values() for name, v in r["metrics"].items()]
        bf16 = {task: r for task, r in e["tasks"].items() if "clipx_bf16_images_per_second" in r}
        if bf16:
            lines += ["", "| task | clipx bf16 images/s | clipx fp32 images/s | bf16 / fp32 speed | "
                      "largest metric difference bf16 vs fp32 |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {task} | {r['clipx_bf16_images_per_second']:.0f} | {r['clipx_images_per_second']:.0f} | "
                      f"{r['clipx_bf16_images_per_second'] / r['clipx_images_per_second']:.2f} | "
                      f"{r['bf16_max_abs_difference']:.1e} |" for task, r in bf16.items()]
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
    figure.suptitle(f"Step time, clipx vs open_clip_train ({m['cores']} CPU cores, {results['settings']['precision']})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
