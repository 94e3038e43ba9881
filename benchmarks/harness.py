"""Shared by the benchmarks: run ``python -m swirl_vl fit`` arms from one SFT checkpoint and collect their tables.

Every arm is a subprocess of the real CLI with the same config, data and seed; arms differ only in CLI
overrides. ``jobs > 1`` runs arms side by side with one thread each (on a small machine, several
multi-threaded torch processes spin against each other and run many times slower than one thread each).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("fwm_state_acc", "idm_action_acc", "fwm_psnr", "idm_exact")


@dataclass
class Arm:
    """One training run: its name and its CLI overrides (on top of the shared ones)."""

    name: str
    overrides: list[str] = field(default_factory=list)
    config: str | None = None
    """A config of its own, trained from scratch (its own SFT, then its schedule), not from the shared SFT folders."""


def fit(config: str, work: Path, arm: Arm, seed: int, fwm: str, idm: str, tiny: bool, extra: list[str], threads: int):
    """Run one arm to the end; returns ``(run_dir, seconds)``. Raises with the CLI's log tail on failure.

    ``tiny``: build the config's tiny models at ``fwm`` / ``idm`` (SFT from scratch); otherwise both must exist.
    """
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
        arm.name,
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.fwm.init_args.model.init_args.path",
        fwm,
        "--model.init_args.idm.init_args.model.init_args.path",
        idm,
        "--data.root",
        str(work / "data"),
        "--data.seed",
        str(seed),
        *extra,
        *arm.overrides,
    ]
    if not tiny:  # the config's build_tiny would otherwise silently replace a missing SFT folder
        missing = [path for path in (fwm, idm) if not Path(path).is_dir()]
        if missing:
            raise FileNotFoundError(f"{arm.name}: no model folder at {missing}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    log = work / f"{arm.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.run(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm.name} failed (exit {proc.returncode}); log: {log}\n{log.read_text()[-4000:]}")
    seconds = time.perf_counter() - started
    run = _versions(work, arm.name)[-1]
    print(f"  {arm.name}: {seconds:.0f} s", flush=True)
    return run, seconds


def run_seed(
    config: str,
    seed: int,
    work: Path,
    sft_steps: int,
    arms: list[Arm],
    extra: list[str],
    jobs: int,
    reuse: bool = False,
    sft_threads: int | None = None,
) -> dict:
    """SFT once, then every arm from the SFT folders; returns per-arm final metrics, tables and phase stats.

    ``reuse``: keep the runs (SFT and arms) that already finished under ``work`` and run only the others, so a
    benchmark stopped part-way picks up where it stopped. That they ran with the same settings is the caller's
    responsibility; their wall time is recorded as None. ``sft_threads``: threads of the SFT run (default: every
    core; on a machine that runs other work too, 1 keeps it from spinning against it).
    """
    cores = sft_threads or os.cpu_count() or 1
    threads = 1 if jobs > 1 else cores
    sft_arm = Arm("sft", ["--schedule.sft_steps", str(sft_steps), "--schedule.iterations", "0"])
    models = work / "models"
    finished = finished_run(work, "sft", pretrained=True) if reuse else None
    if finished is not None:
        sft, sft_seconds = finished, None
        print(f"  sft: reusing {sft}", flush=True)
    else:  # SFT runs alone: all cores.
        sft, sft_seconds = fit(
            config, work, sft_arm, seed, str(models / "fwm"), str(models / "idm"), True, extra, cores
        )
    fwm, idm = str(sft / "pretrained" / "sft" / "fwm"), str(sft / "pretrained" / "sft" / "idm")
    runs: dict[str, tuple[Path, float | None]] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {}
        for arm in arms:
            done = finished_run(work, arm.name) if reuse else None
            if done is not None:
                print(f"  {arm.name}: reusing {done}", flush=True)
                runs[arm.name] = (done, None)
            elif arm.config is None:
                futures[arm.name] = pool.submit(fit, config, work, arm, seed, fwm, idm, False, extra, threads)
            else:
                own = work / "models" / arm.name
                args = (arm.config, work, arm, seed, str(own / "fwm"), str(own / "idm"), True, extra, threads)
                futures[arm.name] = pool.submit(fit, *args)
        runs.update({name: future.result() for name, future in futures.items()})
    result = {"seed": seed, "sft": _final(sft), "seconds": {"sft": sft_seconds}, "tables": {}, "phases": {}}
    result["phases"]["sft"] = _read(sft / "swirl_phases.json")
    for name, (run, seconds) in runs.items():
        result[name] = _final(run)
        if any(arm.name == name and arm.config for arm in arms):  # its own SFT: its first row is its baseline
            result[f"{name}@sft"] = _final(run, row=0)
        result["seconds"][name] = seconds
        result["tables"][name] = _read(run / "swirl_metrics.json")
        result["phases"][name] = _read(run / "swirl_phases.json")
    return result


def finished_run(work: Path, name: str, pretrained: bool = False) -> Path | None:
    """The newest run of ``name`` under ``work`` that reached the end of fit (it wrote its metrics table), and with
    ``pretrained`` also its SFT model folders; None if there is none."""
    done = [
        r
        for r in _versions(work, name)
        if (r / "swirl_metrics.json").exists() and (not pretrained or (r / "pretrained" / "sft" / "fwm").is_dir())
    ]
    return done[-1] if done else None


def _versions(work: Path, name: str) -> list[Path]:
    """The TensorBoard run folders of ``name`` under ``work``, oldest first."""
    return sorted((work / "runs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def _final(run: Path, row: int = -1) -> dict:
    rows = _read(run / "swirl_metrics.json")
    return {m: rows[row].get(m) for m in METRICS} if rows else {}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict], arms: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean ± std over seeds of every metric, per arm."""
    return {
        arm: {m: mean_std([r[arm][m] for r in results if r[arm].get(m) is not None]) for m in METRICS} for arm in arms
    }


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def write_results(path: Path, args: object, results: dict) -> dict:
    """A benchmark's JSON: its parsed ``args`` (as strings) and ``results``, written atomically and announced."""
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, **results}
    write_json(path, payload)
    print(f"written {path}")
    return payload


def print_table(summary: dict, arms: list[str]) -> None:
    print("| arm | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for arm in arms:
        cells = " | ".join(f"{mu:.3f} ± {sd:.3f}" for mu, sd in (summary[arm][m] for m in METRICS))
        print(f"| {arm} | {cells} |")
