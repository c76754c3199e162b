"""bench/results.png: the benchmark table as four panels (throughput ratios, MFU, memory, learning)."""

from __future__ import annotations

from pathlib import Path


def plot_results(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.plan import Plan
    from bench.timing import charged_pairs_per_s

    r, head = result["results"], result["header"]
    plan = Plan(**result["plan"])
    if not {"ours_sft", "ours_dpo", "memory_zero0"} <= set(r):  # a bench of some groups only: no picture
        return path
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    ax = axes[0][0]
    names = ["SFT tokens/s", "DPO pairs/s\n(live ref)", "DPO pairs/s\n(precomputed)"]
    ratios = [r["ours_sft"]["tokens_per_s"] / r["trl_sft"]["tokens_per_s"],
              r["ours_dpo"]["pairs_per_s"] / r["trl_dpo"]["pairs_per_s"],
              charged_pairs_per_s(r["ours_dpo_pre"], plan) / charged_pairs_per_s(r["trl_dpo_pre"], plan)]
    targets = [2.0, 2.0, 1.5]
    bars = ax.bar(names, ratios, color="tab:blue")
    for bar, target in zip(bars, targets, strict=True):
        ax.hlines(target, bar.get_x(), bar.get_x() + bar.get_width(), colors="tab:red", linestyles="--")
        ax.annotate(f"{bar.get_height():.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_title("throughput, dialogtrain / TRL (red: target)")

    ax = axes[0][1]
    values = [100 * r["mfu_ours"], 100 * r["mfu_trl"]]
    bars = ax.bar(["dialogtrain SFT", "TRL SFT"], values, color=["tab:blue", "tab:orange"])
    ax.axhline(30, color="tab:red", linestyle="--")
    for bar in bars:
        ax.annotate(f"{bar.get_height():.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.set_title(f"MFU (peak {head['peak_flops'] / 1e9:.0f} GFLOP/s {head['precision']}; red: 30% target)")

    ax = axes[1][0]
    panels = ((-0.27, "", "model_state_bytes", "model states", "tab:green"),
              (0.0, "", "peak_bytes", "peak RSS", "tab:gray"),
              (0.27, "_lean", "peak_bytes", "peak RSS, memory settings", "tab:olive"))
    for offset, runs, key, label, color in panels:
        if f"memory_zero0{runs}" not in r:
            continue
        mib = [r[f"memory_zero0{runs}"][key] / 2**20, r[f"memory_zero3{runs}"][key] / 2**20]
        bars = ax.bar([offset, 1 + offset], mib, width=0.27, label=label, color=color)
        ax.plot([offset - 0.13, 1 + offset + 0.13], [0.6 * mib[0]] * 2, color="tab:red", linestyle="--")
        for bar in bars:
            ax.annotate(f"{bar.get_height():.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom")
    ax.set_xticks([0, 1], ["ZeRO-0, 1 process", "ZeRO-3, 2 processes"])
    ax.legend()
    ax.set_title("memory per rank, MiB (red: 0.6 x ZeRO-0)")

    ax = axes[1][1]
    labels = ["held-out SFT loss", "held-out DPO\nreward accuracy"]
    ours = [r["ours_sft"]["eval_loss"], r["ours_dpo"]["eval_reward_accuracy"]]
    peer = [r["trl_sft"]["eval_loss"], r["trl_dpo"]["eval_reward_accuracy"]]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="dialogtrain", color="tab:blue")
    ax.bar([i + 0.2 for i in x], peer, width=0.4, label="TRL", color="tab:orange")
    ax.set_xticks(list(x), labels)
    ax.legend()
    ax.set_title(f"learning after the same steps (SFT {plan.sft_steps}, DPO {plan.dpo_steps})")

    fig.suptitle(f"dialogtrain vs TRL, {head['mode']} run {head['date']}: {head['model']}, {head['precision']}, "
                 f"{head['machine']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
