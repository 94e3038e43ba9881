"""SWIRL variants from one SFT checkpoint over RL seeds: how much of a gain is the variant and how much the draw.

Every run starts from the same SFT folders and data stream (``--data.seed`` stays that of the SFT run); only the
RL seed (``--seed_everything``: rollouts, label draws) and the variant's overrides change. Prints each run's test
``fwm_state_acc`` / ``idm_action_acc`` after every iteration and its seconds per Phase I / Phase II step, then per
variant the median and range over RL seeds of the final metrics, the relative gain over the SFT row, and the
median Phase I step time relative to the first variant's (runs side by side, one thread each). Writes JSON.

    python benchmarks/rl_variants.py --sft runs/sft/version_0 --rl-seeds 0 1 2 \\
        --variant g8 --variant g4 --model.init_args.fwm_group_size 4
"""

from __future__ import annotations

import argparse
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import REPO, Arm, _read, finished_run, fit, write_results


def parse_variants(tokens: list[str]) -> dict[str, list[str]]:
    """``--variant NAME overrides… --variant NAME …`` → ``{NAME: overrides}`` (a variant may have none)."""
    variants: dict[str, list[str]] = {}
    current = None
    for token in tokens:
        if token == "--variant":
            current = None
        elif current is None:
            if token in variants:
                raise SystemExit(f"variant {token!r} is named twice")
            current = token
            variants[current] = []
        else:
            variants[current].append(token)
    if not variants:
        raise SystemExit("name at least one variant: --variant NAME [CLI overrides]")
    return variants


def main() -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--config", default="configs/sprites.yaml")
    p.add_argument("--sft", type=Path, required=True, help="a finished SFT run folder (holds pretrained/sft/{fwm,idm})")
    p.add_argument("--data", type=Path, default=REPO / "data" / "sprites", help="the data root the SFT run used")
    p.add_argument("--data-seed", type=int, default=0, help="the SFT run's --data.seed (the stream's order)")
    p.add_argument("--rl-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "rl_variants")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--reuse", action="store_true", help="keep the runs under --work that finished; run the rest")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rl_variants.json")
    a, rest = p.parse_known_args()
    variants = parse_variants(rest)
    sft_table = _read(a.sft / "swirl_metrics.json")
    sft = a.sft.resolve() / "pretrained" / "sft"
    if not sft_table or not (sft / "fwm").is_dir() or not (sft / "idm").is_dir():
        raise SystemExit(f"{a.sft} is not a finished SFT run (swirl_metrics.json, pretrained/sft/fwm and idm)")
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"  # the harness reads data from work/data: point it at the SFT run's data, never regenerate
    if not data.exists():
        data.symlink_to(a.data.resolve(), target_is_directory=True)
    elif data.resolve() != a.data.resolve():
        raise SystemExit(f"{data} is {data.resolve()}, not --data {a.data}: use another --work")
    threads = 1 if a.jobs > 1 else os.cpu_count() or 1
    runs = [
        (v, s, Arm(f"{v}_s{s}", [*o, "--schedule.sft_steps", "0", "--seed_everything", str(s)]))
        for v, o in variants.items()
        for s in a.rl_seeds
    ]
    done = {arm.name: finished_run(work, arm.name) if a.reuse else None for _, _, arm in runs}
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {
            arm.name: pool.submit(
                fit, a.config, work, arm, a.data_seed, str(sft / "fwm"), str(sft / "idm"), False, [], threads
            )
            for _, _, arm in runs
            if done[arm.name] is None
        }
        for name, future in futures.items():
            done[name] = future.result()[0]
    rows = []
    for variant, seed, arm in runs:
        table = _read(done[arm.name] / "swirl_metrics.json")
        phases = _read(done[arm.name] / "swirl_phases.json")
        step = {
            st: statistics.median(r["seconds_per_step"] for r in phases if r["stage"] == st)
            for st in ("phase1", "phase2")
        }
        rows.append({"variant": variant, "rl_seed": seed, "run": str(done[arm.name]), "table": table, "step_s": step})
        accs = " → ".join(f"{r['fwm_state_acc']:.3f}" for r in sft_table[-1:] + table)
        print(
            f"{arm.name:16s} fwm_state_acc {accs}  idm {table[-1]['idm_action_acc']:.3f}  "
            f"s/step phase1 {step['phase1']:.3f} phase2 {step['phase2']:.3f}"
        )
    summary = {}
    first = None
    sft_acc = sft_table[-1]["fwm_state_acc"]  # the SFT run's test row: where every run starts
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        final = [r["table"][-1]["fwm_state_acc"] for r in mine]
        idm = [r["table"][-1]["idm_action_acc"] for r in mine]
        p1 = statistics.median(r["step_s"]["phase1"] for r in mine)
        first = first or p1
        summary[variant] = {
            "overrides": variants[variant],
            "sft_fwm_state_acc": sft_acc,
            "fwm_state_acc": {"median": statistics.median(final), "min": min(final), "max": max(final)},
            "idm_action_acc": {"median": statistics.median(idm), "min": min(idm), "max": max(idm)},
            "gain_median": statistics.median(final) / sft_acc - 1 if sft_acc else float("nan"),
            "phase1_step_s": p1,
            "phase1_step_ratio": p1 / first,
        }
        s = summary[variant]
        print(
            f"| {variant} | {sft_acc:.3f} → {s['fwm_state_acc']['median']:.3f} ({min(final):.3f}–{max(final):.3f}) "
            f"| {s['gain_median']:+.1%} | idm {s['idm_action_acc']['median']:.3f} | phase1 step {p1:.3f} s "
            f"({s['phase1_step_ratio']:.2f}×) |"
        )
    return write_results(a.out, a, {"variants": variants, "runs": rows, "summary": summary})


if __name__ == "__main__":
    main()
