"""The paper's ablations (Tables 1 and 7) in miniature on the sprite world, over seeds.

Per seed, SFT once; then from the same SFT folders, data and seed, arms with the same number of updates:
  sft_only        SFT continued on the labelled split for ``iterations × (phase1_steps + phase2_steps)`` steps
  bootstrap       Phase I replaced by SFT of the FWM on the IDM's filtered pseudo-labels (real next states)
  swirl_phase1    SWIRL IDM→FWM: Phase I only (``iterations × phase1_steps`` FWM updates, the IDM stays SFT)
  swirl           SWIRL iterative: ``iterations`` rounds of Phase I then Phase II
  swirl_nft       the same with DiffusionNFT's forward-process Phase I objective (diffusion FWMs only)
  swirl_shared_lora  SWIRL iterative with one shared base model (a token LM serving as FWM and IDM) and two LoRA
                  adapters (``configs/sprites_shared_lora.yaml``): its own SFT of the shared base, then the iterations
Prints a Markdown table of test metrics (mean ± std over seeds) and writes JSON with every seed's tables.

    python benchmarks/ablations.py --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import METRICS, REPO, Arm, print_table, run_seed, summarise, write_results

FORWARD_PROCESS = "swirl_vl.training.objectives.ForwardProcess"


def arms(iterations: int, p1: int, p2: int, sft_steps: int, sft_only_steps: int | None = None) -> list[Arm]:
    """The arms; SFT-only continues for ``sft_only_steps`` labelled batches (default: SWIRL's number of updates)."""

    def schedule(iters: int, phase1_steps: int, phase2_steps: int, sft: int = 0) -> list[str]:
        return ["--schedule.sft_steps", str(sft), "--schedule.iterations", str(iters)] + [
            "--schedule.phase1_steps",
            str(phase1_steps),
            "--schedule.phase2_steps",
            str(phase2_steps),
        ]

    bootstrap = ["--model.init_args.phase1", "bootstrap", "--model.init_args.fwm_rl_lr", "null"]
    return [
        Arm(
            "sft_only",
            ["--schedule.sft_steps", str(sft_only_steps or iterations * (p1 + p2)), "--schedule.iterations", "0"],
        ),
        Arm("bootstrap", [*schedule(iterations, p1 + p2, 0), *bootstrap]),
        Arm("swirl_phase1", schedule(1, iterations * p1, 0)),
        Arm("swirl", schedule(iterations, p1, p2)),
        # SWIRL with DiffusionNFT's forward-process Phase I objective (diffusion FWMs only).
        Arm("swirl_nft", [*schedule(iterations, p1, p2), "--model.init_args.fwm_objective", FORWARD_PROCESS]),
        Arm(
            "swirl_shared_lora",
            schedule(iterations, p1, p2, sft=sft_steps),
            config="configs/sprites_shared_lora.yaml",
        ),
    ]


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sprites.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=REPO / "runs" / Path(out).stem)
    for key in ("sft_steps", "iterations", "phase1_steps", "phase2_steps"):
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, type=int, default=None, help=f"default: the config's schedule.{key}")
    p.add_argument(
        "--sft-only-steps",
        type=int,
        default=None,
        help="labelled batches of the SFT-only arm (default: SWIRL's updates, iterations × (phase1 + phase2)); more "
        "than SWIRL's checks that SFT is saturated, i.e. that SWIRL is compared in the regime it is for",
    )
    p.add_argument("--jobs", type=int, default=2, help="arms run side by side, one thread each")
    p.add_argument("--sft-threads", type=int, default=None, help="threads of the SFT run (default: every core)")
    p.add_argument("--arms", nargs="+", default=None, help="run only these arms (default: all)")
    p.add_argument(
        "--reuse", action="store_true", help="keep the runs under --work that finished (SFT, arms); run the rest"
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / out)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further CLI overrides for every run, after --")
    return p


def main(select: list[str] | None = None, doc: str = __doc__, out: str = "ablations.json") -> dict:
    a = parser(doc, out).parse_args()
    a.work = a.work.resolve()  # the runs' working directory is the repository root
    extra = [x for x in a.extra if x != "--"]
    schedule = _config_schedule(a.config)
    for key in schedule:
        if getattr(a, key) is None:
            setattr(a, key, schedule[key])
    every = arms(a.iterations, a.phase1_steps, a.phase2_steps, a.sft_steps, a.sft_only_steps)
    select = select or a.arms
    chosen = [arm for arm in every if select is None or arm.name in select]
    names = ["sft", *(n for arm in chosen for n in ([f"{arm.name}@sft"] if arm.config else []) + [arm.name])]
    results = []
    for seed in a.seeds:
        print(f"seed {seed}", flush=True)
        r = run_seed(a.config, seed, a.work / f"seed{seed}", a.sft_steps, chosen, extra, a.jobs, a.reuse, a.sft_threads)
        results.append(r)
        for metric in ("fwm_state_acc", "idm_action_acc"):
            print(f"  {metric}: " + "  ".join(f"{n} {r[n][metric]:.3f}" for n in names), flush=True)
    summary = summarise(results, names)
    print_table(summary, names)
    base = summary.get("sft_only")  # the other arms' relative change needs the SFT-only arm among them
    gains = {n: {m: _relative(summary[n][m][0], base[m][0]) for m in METRICS} for n in names} if base else {}
    for n, g in gains.items():
        print(
            f"{n:17s} relative to sft_only: fwm_state_acc {g['fwm_state_acc']:+.1%}, "
            f"idm_action_acc {g['idm_action_acc']:+.1%}"
        )
    return write_results(a.out, a, {"seeds": results, "summary": summary, "gains": gains})


def _relative(value: float, base: float) -> float:
    return (value - base) / base if base else float("nan")


def _config_schedule(config: str) -> dict[str, int]:
    import yaml

    schedule = yaml.safe_load((REPO / config).read_text())["schedule"]
    return {k: int(schedule[k]) for k in ("sft_steps", "iterations", "phase1_steps", "phase2_steps")}


if __name__ == "__main__":
    main()
