"""The bench table: its rows from the results, as markdown, and in the README between its markers."""


from __future__ import annotations

import platform
from pathlib import Path

from bench import host_memory, lora, preference, trl_packed
from bench import precision as mixed_precision  # as bench.run names it
from bench.plan import Plan
from bench.runner import LEAN_ENV, cores
from bench.timing import charged_pairs_per_s

REPO = Path(__file__).resolve().parent.parent
README_START, README_END = "<!-- bench:results -->", "<!-- /bench:results -->"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {cores()} cores{memory}"


def row(metric: str, ours: str, peer: str, ratio: str, target: str, met: bool | None) -> dict:
    """One line of the table: metric, ours, peer, ratio, target, met (None: no target)."""
    return {"metric": metric, "ours": ours, "peer": peer, "ratio": ratio, "target": target, "met": met}


def sft_rows(r: dict, plan: Plan) -> list[dict]:
    sft_ratio = r["ours_sft"]["tokens_per_s"] / r["trl_sft"]["tokens_per_s"]
    loss_ours, loss_trl = r["ours_sft"]["eval_loss"], r["trl_sft"]["eval_loss"]
    return [
        row("SFT tokens/s (non-pad input)", f"{r['ours_sft']['tokens_per_s']:.0f}",
            f"{r['trl_sft']['tokens_per_s']:.0f}", f"{sft_ratio:.2f}x", ">= 2x", sft_ratio >= 2),
        row("SFT MFU (6N x tokens/s / matmul peak)", f"{100 * r['mfu_ours']:.1f}%", f"{100 * r['mfu_trl']:.1f}%",
            "", ">= 30%", r["mfu_ours"] >= 0.30),
        row(f"held-out assistant-token loss after {plan.sft_steps} SFT steps", f"{loss_ours:.4f}",
            f"{loss_trl:.4f}", f"{loss_ours - loss_trl:+.4f}", "<= TRL + 0.02", loss_ours <= loss_trl + 0.02),
    ]


def dpo_rows(r: dict, plan: Plan) -> list[dict]:
    live_ratio = r["ours_dpo"]["pairs_per_s"] / r["trl_dpo"]["pairs_per_s"]
    ours_pre, trl_pre = charged_pairs_per_s(r["ours_dpo_pre"], plan), charged_pairs_per_s(r["trl_dpo_pre"], plan)
    acc_ours, acc_trl = r["ours_dpo"]["eval_reward_accuracy"], r["trl_dpo"]["eval_reward_accuracy"]
    one_pair = 1 / plan.dpo_held_out
    return [
        row("DPO pairs/s, TRL default reference", f"{r['ours_dpo']['pairs_per_s']:.2f}",
            f"{r['trl_dpo']['pairs_per_s']:.2f}", f"{live_ratio:.2f}x", ">= 2x", live_ratio >= 2),
        row("DPO pairs/s, precomputed reference (incl. precompute)", f"{ours_pre:.2f}", f"{trl_pre:.2f}",
            f"{ours_pre / trl_pre:.2f}x", ">= 1.5x", ours_pre / trl_pre >= 1.5),
        row(f"held-out reward accuracy after {plan.dpo_steps} DPO steps", f"{acc_ours:.3f}", f"{acc_trl:.3f}",
            f"{acc_ours - acc_trl:+.3f}", ">= TRL - 1 pair", acc_ours >= acc_trl - one_pair - 1e-9),
    ]


def memory_rows(r: dict, plan: Plan) -> list[dict]:
    zero0, zero3 = r["memory_zero0"], r["memory_zero3"]
    memory_ratio = zero3["model_state_bytes"] / zero0["model_state_bytes"]
    peak_ratio = zero3["peak_bytes"] / zero0["peak_bytes"]
    lean0, lean3 = r["memory_zero0_lean"], r["memory_zero3_lean"]
    lean_ratio = lean3["peak_bytes"] / lean0["peak_bytes"]
    return [
        row("model-state memory per rank (live tensors at the update): ZeRO-0 x1 -> ZeRO-3 x2",
            f"{zero0['model_state_bytes'] / 2**20:.0f} MiB -> {zero3['model_state_bytes'] / 2**20:.0f} MiB", "",
            f"{memory_ratio:.2f}x", "<= 0.6x", memory_ratio <= 0.6),
        row("peak memory per rank (peak RSS, activations included): ZeRO-0 x1 -> ZeRO-3 x2",
            f"{zero0['peak_bytes'] / 2**20:.0f} MiB -> {zero3['peak_bytes'] / 2**20:.0f} MiB", "",
            f"{peak_ratio:.2f}x", "<= 0.6x", peak_ratio <= 0.6),
        row("peak memory per rank, memory settings (`--gradient-checkpointing`, "
            f"`MALLOC_MMAP_THRESHOLD_={LEAN_ENV['MALLOC_MMAP_THRESHOLD_']}`): ZeRO-0 x1 -> ZeRO-3 x2",
            f"{lean0['peak_bytes'] / 2**20:.0f} MiB -> {lean3['peak_bytes'] / 2**20:.0f} MiB", "",
            f"{lean_ratio:.2f}x", "<= 0.6x", lean_ratio <= 0.6),
    ]


def startup_rows(r: dict, plan: Plan) -> list[dict]:
    return [row("`dialogtrain --help` wall time", f"{r['startup']['help_s']:.2f} s", "", "", "< 0.5 s",
                r["startup"]["help_s"] < 0.5),
            row("`dialogtrain sft --dry-run` wall time", f"{r['startup']['dry_run_s']:.2f} s", "", "", "", None)]


def chat_rows(r: dict, plan: Plan) -> list[dict]:
    """Per precision measured (fp32, and bf16 where the CPU computes it natively): the chat against bare
    model.generate, within 5% on both (>= 0.95x tokens/s, <= 1.05x first-token time)."""
    out = []
    for dtype, chat in (r.get("chat") or {}).items():
        out += [row(f"chat tokens/s vs model.generate ({dtype})", f"{chat['chat_tokens_per_s']:.1f}",
                    f"{chat['generate_tokens_per_s']:.1f}", f"{chat['tokens_per_s_ratio']:.2f}x", ">= 0.95x",
                    chat["tokens_per_s_ratio"] >= 0.95),
                row(f"chat first-token ms vs model.generate ({dtype})", f"{chat['chat_first_token_ms']:.0f}",
                    f"{chat['generate_first_token_ms']:.0f}", f"{chat['first_token_ratio']:.2f}x", "<= 1.05x",
                    chat["first_token_ratio"] <= 1.05)]
    return out


# The table's rows by group of measurements (bench.run.GROUPS), in table order.
ROWS = {"sft": sft_rows, "dpo": dpo_rows, "memory": memory_rows, "startup": startup_rows, "chat": chat_rows,
        "preference": preference.rows, "lora": lora.rows, "precision": mixed_precision.rows,
        "trl_packed": trl_packed.rows, "host_memory": host_memory.rows}


def build_rows(r: dict, plan: Plan) -> list[dict]:
    """The table, each group's rows once it has been measured (in this run or an earlier --only run)."""
    measured = r.get("measured", {})
    return [line for group, rows in ROWS.items() if group in measured for line in rows(r, plan)]


def markdown(result: dict) -> str:
    head, measured = result["header"], result["results"].get("measured", {})
    earlier = [f"{group} ({when['date']} on {when['machine']}, {when['precision']})" for group, when in measured.items()
               if group not in head.get("groups", measured)]
    lines = [f"{head['mode']} run of {head['date']} on {head['machine']}; {head['model']}, chatterbot English, "
             f"{head['precision']} ({head['precision_why']}), max_length {head['max_length']}, micro-batch "
             f"{head['micro_batch']}, {head['threads']} threads; SFT {head['sft_steps']} / DPO {head['dpo_steps']} "
             f"steps on each side, the first {head['warmup']} untimed; matmul peak "
             f"{head['peak_flops'] / 1e9:.0f} GFLOP/s; {head['versions']}."
             + (f" Measured in earlier runs: {', '.join(earlier)}." if earlier else ""), "",
             "| metric | dialogtrain | TRL / peer | ratio | target | met |", "| --- | --- | --- | --- | --- | --- |"]
    for line in result["rows"]:
        met = {True: "yes", False: "**no**", None: ""}[line["met"]]
        lines.append(f"| {line['metric']} | {line['ours']} | {line['peer']} | {line['ratio']} | {line['target']} "
                     f"| {met} |")
    return "\n".join(lines)


def update_readme(table: str, png: Path) -> bool:
    """Replace the README's results block (between its markers) with `table` and the plot; False without markers."""
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    image = f"\n\n![benchmark plot]({png.relative_to(REPO).as_posix()})" if png.is_relative_to(REPO) else ""
    readme.write_text(text[:start] + "\n" + table + image + "\n" + text[end:])
    return True

