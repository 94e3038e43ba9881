"""SWIRL against SFT-only with the same step budget, from the same SFT checkpoint and data, over seeds.

Per seed:
  1. ``fit`` SFT only (``--schedule.iterations 0``): both models' ``save_pretrained`` folders after SFT.
  2. SFT-only continuation: ``fit`` from those folders for ``iterations × (phase1_steps + phase2_steps)``
     more SFT batches.
  3. SWIRL: ``fit`` from the same folders with ``--schedule.sft_steps 0`` and the SWIRL iterations.
All three read the same shards. Prints and writes JSON: test ``fwm_state_acc`` / ``idm_action_acc`` per seed,
mean ± std, the relative change, and step time and peak RSS per phase.

    python benchmarks/swirl_vs_sft.py --seeds 0 1 2 --out benchmarks/results/swirl_vs_sft.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("fwm_state_acc", "idm_action_acc", "fwm_psnr", "idm_exact")


def _fit(config: str, work: Path, name: str, seed: int, fwm: str, idm: str, build_tiny: bool, extra: list[str]) -> Path:
    args = [
        sys.executable,
        "-m",
        "swirl_vl",
        "fit",
        "--config",
        config,
        "--seed_everything",
        str(seed),
        "--trainer.logger.init_args.save_dir",
        str(work / "runs"),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.fwm.init_args.model.init_args.path",
        fwm,
        "--model.init_args.fwm.init_args.model.init_args.build_tiny",
        str(build_tiny).lower(),
        "--model.init_args.idm.init_args.model.init_args.path",
        idm,
        "--data.root",
        str(work / "data"),
        "--data.seed",
        str(seed),
        *extra,
    ]
    if build_tiny:
        args += ["--model.init_args.idm.init_args.model.init_args.build_tiny", "llava"]
    else:
        args += ["--model.init_args.idm.init_args.model.init_args.build_tiny", "null"]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    run = sorted((work / "runs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return run


def run_seed(config: str, seed: int, work: Path, sft_steps: int, iterations: int, p1: int, p2: int, extra: list[str]):
    work.mkdir(parents=True, exist_ok=True)
    sft = _fit(
        config,
        work,
        "sft",
        seed,
        str(work / "models" / "fwm"),
        str(work / "models" / "idm"),
        True,
        ["--schedule.sft_steps", str(sft_steps), "--schedule.iterations", "0", *extra],
    )
    fwm, idm = str(sft / "pretrained" / "sft" / "fwm"), str(sft / "pretrained" / "sft" / "idm")
    budget = iterations * (p1 + p2)
    sft_only = _fit(
        config,
        work,
        "sft_only",
        seed,
        fwm,
        idm,
        False,
        ["--schedule.sft_steps", str(budget), "--schedule.iterations", "0", *extra],
    )
    swirl = _fit(
        config,
        work,
        "swirl",
        seed,
        fwm,
        idm,
        False,
        [
            "--schedule.sft_steps",
            "0",
            "--schedule.iterations",
            str(iterations),
            "--schedule.phase1_steps",
            str(p1),
            "--schedule.phase2_steps",
            str(p2),
            *extra,
        ],
    )
    after_sft = json.loads((sft / "swirl_metrics.json").read_text())[-1]
    after_sft_only = json.loads((sft_only / "swirl_metrics.json").read_text())[-1]
    swirl_rows = json.loads((swirl / "swirl_metrics.json").read_text())
    return {
        "seed": seed,
        "sft": {m: after_sft.get(m) for m in METRICS},
        "sft_only": {m: after_sft_only.get(m) for m in METRICS},
        "swirl": {m: swirl_rows[-1].get(m) for m in METRICS},
        "swirl_by_iteration": swirl_rows,
        "phases": {
            "sft": json.loads((sft / "swirl_phases.json").read_text()),
            "swirl": json.loads((swirl / "swirl_phases.json").read_text()),
        },
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict]) -> dict:
    summary = {}
    for arm in ("sft", "sft_only", "swirl"):
        summary[arm] = {m: _mean_std([r[arm][m] for r in results if r[arm][m] is not None]) for m in METRICS}
    for m in ("fwm_state_acc", "idm_action_acc"):
        base = summary["sft_only"][m][0]
        summary[f"relative_gain_{m}"] = (summary["swirl"][m][0] - base) / base if base else float("nan")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sprites.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench_swirl_vs_sft")
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--phase1-steps", type=int, default=100)
    p.add_argument("--phase2-steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "swirl_vs_sft.json")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further CLI overrides, after --")
    a = p.parse_args()
    extra = [x for x in a.extra if x != "--"]
    results = []
    for seed in a.seeds:
        print(f"seed {seed}", flush=True)
        results.append(
            run_seed(
                a.config, seed, a.work / f"seed{seed}", a.sft_steps, a.iterations, a.phase1_steps, a.phase2_steps, extra
            )
        )
        r = results[-1]
        print(
            f"  test fwm_state_acc: sft {r['sft']['fwm_state_acc']:.3f}  sft_only {r['sft_only']['fwm_state_acc']:.3f}"
            f"  swirl {r['swirl']['fwm_state_acc']:.3f}",
            flush=True,
        )
        print(
            f"  test idm_action_acc: sft {r['sft']['idm_action_acc']:.3f}  sft_only "
            f"{r['sft_only']['idm_action_acc']:.3f}  swirl {r['swirl']['idm_action_acc']:.3f}",
            flush=True,
        )
    summary = summarise(results)
    for arm in ("sft", "sft_only", "swirl"):
        cells = "  ".join(f"{m} {mu:.3f}±{sd:.3f}" for m, (mu, sd) in summary[arm].items())
        print(f"{arm:9s} {cells}")
    print(
        f"relative gain over SFT-only: fwm_state_acc {summary['relative_gain_fwm_state_acc']:+.1%}, "
        f"idm_action_acc {summary['relative_gain_idm_action_acc']:+.1%}"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "seeds": results, "summary": summary}, indent=2)
    )
    tmp.replace(a.out)
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
