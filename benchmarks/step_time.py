"""GRPO step time of swirl_vl against TRL's ``GRPOTrainer``, measured side by side.

    python benchmarks/step_time.py --repeats 5 --out benchmarks/results/step_time.json

Phase II (the IDM trains): both sides train the same tiny LLaVA folder on the same pairs of sprite images, with the
same group size, token budget, sampling settings (temperature, top-k), KL weight, learning rate and a cheap reward
computed from the action text alone, so that only the GRPO machinery is compared. Phase I (the FWM trains, rewarded
by the real IDM) has no TRL counterpart and is reported on its own.

Each measurement is a fresh subprocess with one thread: ``warmup`` steps, then ``steps`` timed ones (CPU time and
wall time per step, median). The sides alternate (swirl, TRL, swirl, TRL, ...) so that a noisy machine slows both;
the ratio is taken within each pair of runs and its median and range are printed. Peak RSS is each process's own.
TRL is in the ``bench`` extra (``pip install -e '.[bench]'``), never a runtime dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Which action turns the first image into the second?"


def cheap_reward(text: str) -> float:
    """A reward that needs no model: how close the action's length is to 20 characters."""
    return -abs(len(text) - 20) / 10


def sprite_pairs(num_pairs: int, seed: int):
    """``num_pairs`` (x, y) sprite images as ``(B, 3, 32, 32)`` float tensors, one valid action apart."""
    import numpy as np
    import torch

    from datamodules import sprites

    rng = random.Random(seed)
    xs, ys = [], []
    while len(xs) < num_pairs:
        states, _ = sprites.random_trajectory(rng, 2)
        for images, state in ((xs, states[0]), (ys, states[1])):
            images.append(torch.from_numpy(np.asarray(sprites.render(state), dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(xs), torch.stack(ys)


class StepTimer:
    """Per-step CPU and wall seconds, as a Lightning callback (swirl) or a transformers one (TRL)."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self._start = (0.0, 0.0)

    def begin(self) -> None:
        self._start = (time.process_time(), time.perf_counter())

    def end(self) -> None:
        self.cpu.append(time.process_time() - self._start[0])
        self.wall.append(time.perf_counter() - self._start[1])


# ------------------------------------------------------------------------------------------- swirl_vl side


def run_swirl(args: argparse.Namespace, phase: str) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader, IterableDataset

    from swirl_vl.models.idm import VLMIDM
    from swirl_vl.models.token_fwm import TokenFWM
    from swirl_vl.training import FWMModule, IDMModule, SwirlModule
    from swirl_vl.training.schedule import SwirlSchedule

    torch.manual_seed(0)
    x, y = sprite_pairs(args.pairs, seed=0)

    class SamePairs(IterableDataset):
        def __iter__(self):
            while True:
                yield {"x": x, "y": y}

    timer = StepTimer()

    class Timing(Callback):
        def on_train_batch_start(self, *_):
            timer.begin()

        def on_train_batch_end(self, *_):
            timer.end()

    def adamw(params):
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    fwm = FWMModule(TokenFWM(str(args.work / "token_fwm")), optimizer=adamw)
    idm = IDMModule(VLMIDM(str(args.work / "llava_idm"), max_new_tokens=args.max_new_tokens), optimizer=adamw)
    extra = json.loads(args.swirl_options)
    module = SwirlModule(
        fwm,
        idm,
        fwm_group_size=args.group_size,
        idm_group_size=args.group_size,
        idm_beta=args.beta,
        fwm_rl_lr=args.lr,
        idm_rl_lr=args.lr,
        idm_generation={"temperature": args.temperature, "top_k": args.top_k},
        log_rollouts_every_n_steps=0,
        rl_batch_size=args.pairs,
        **extra,
    )
    if phase == "phase2":  # the cheap reward replaces the frozen FWM's log-likelihood
        module.fwm.model.log_likelihood = lambda x, z, y, group_size=1: torch.tensor([cheap_reward(t) for t in z])
    else:
        module.hparams.min_label_logprob = -1e9  # every pair kept: the step's cost does not depend on the IDM's state
    steps = args.warmup + args.steps
    schedule = SwirlSchedule(
        sft_steps=0,
        iterations=1,
        phase1_steps=steps if phase == "phase1" else 0,
        phase2_steps=steps if phase == "phase2" else 0,
        eval_at_boundaries=False,
        export_pretrained=False,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        logger=False,
        default_root_dir=str(args.work),  # where the schedule writes swirl_phases.json
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[schedule, Timing()],
    )
    trainer.fit(module, DataLoader(SamePairs(), batch_size=None))
    times = {"cpu": timer.cpu[args.warmup :], "wall": timer.wall[args.warmup :]}
    plan = getattr(module, "memory_plan", None)  # absent in versions before the plan (a "before" measurement)
    if plan is not None:
        times["planned_peak_mib"] = plan.stages[phase] / 2**20
    return times


# ------------------------------------------------------------------------------------------- TRL side


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    x, y = sprite_pairs(args.pairs, seed=0)

    def pil(t):
        return Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))

    user = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]}]
    rows = [{"prompt": user, "images": [pil(a), pil(b)]} for a, b in zip(x, y)]
    dataset = Dataset.from_list(rows)

    def reward(completions, **_):
        return [cheap_reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    timer = StepTimer()

    class Timing(TrainerCallback):
        def on_step_begin(self, *_, **__):
            timer.begin()

        def on_step_end(self, *_, **__):
            timer.end()

    folder = args.work / "llava_idm"
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    config = GRPOConfig(
        output_dir=str(args.work / "trl_out"),
        per_device_train_batch_size=args.pairs * args.group_size,  # completions per step
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=1.0,
        beta=args.beta,
        epsilon=0.2,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_steps=args.warmup + args.steps,
        num_iterations=1,
        gradient_accumulation_steps=1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        logging_steps=10_000,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(folder),
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[Timing()],
    )
    trainer.train()
    return {"cpu": timer.cpu[args.warmup :], "wall": timer.wall[args.warmup :]}


# ------------------------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    times = run_trl(args) if args.child == "trl" else run_swirl(args, args.child.split("-")[1])
    times["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.child_out).write_text(json.dumps(times))


def measure(args: argparse.Namespace, side: str) -> dict:
    """One fresh one-thread subprocess of ``side`` (``swirl-phase1``, ``swirl-phase2`` or ``trl``)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--child", side, "--child-out", str(out), *args.passthrough]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    times = json.loads(out.read_text())
    out.unlink()
    figures = {
        "cpu_s": statistics.median(times["cpu"]),
        "wall_s": statistics.median(times["wall"]),
        "peak_rss_mib": times["peak_rss_mib"],
    }
    if "planned_peak_mib" in times:  # swirl_vl's memory plan for the phase, printed at the start of fit
        figures["planned_peak_mib"] = times["planned_peak_mib"]
    return figures


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def build_models(work: Path) -> None:
    from swirl_vl.models.tiny_vlm import build_tiny_llava
    from swirl_vl.models.token_fwm import build_tiny_token_fwm

    if not (work / "llava_idm").exists():
        build_tiny_llava(work / "llava_idm", seed=0)
    if not (work / "token_fwm").exists():
        build_tiny_token_fwm(work / "token_fwm", seed=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved (swirl, TRL) pairs of runs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (their median is the run's figure)")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--beta", type=float, default=0.1, help="KL weight on both sides (0: no reference)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--phases", default="phase2,phase1", help="which to run: phase2 (against TRL), phase1")
    parser.add_argument("--no-trl", action="store_true", help="swirl_vl only (TRL not installed)")
    parser.add_argument(
        "--swirl-options", default="{}", help="JSON of extra SwirlModule arguments, e.g. '{\"rl_micro_batch_size\": 4}'"
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "step_time", help="where the tiny models live")
    parser.add_argument("--out", type=Path, default=None, help="JSON with every figure")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    args.passthrough = [
        *("--warmup", str(args.warmup), "--steps", str(args.steps), "--pairs", str(args.pairs)),
        *("--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens)),
        *("--temperature", str(args.temperature), "--top-k", str(args.top_k), "--beta", str(args.beta)),
        *("--lr", str(args.lr), "--work", str(args.work), "--swirl-options", args.swirl_options),
    ]
    build_models(args.work)
    phases = args.phases.split(",")
    result: dict = {"settings": {k: v for k, v in vars(args).items() if k != "passthrough"}}
    result["settings"]["work"] = str(args.work)
    result["settings"]["out"] = str(args.out)
    if "phase2" in phases:
        runs: dict[str, list[dict]] = {"swirl": [], "trl": []}
        for r in range(args.repeats):
            runs["swirl"].append(measure(args, "swirl-phase2"))
            if not args.no_trl:
                runs["trl"].append(measure(args, "trl"))
            print(f"phase2 repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]}" for k, v in runs.items() if v))
        phase2 = {side: {key: spread([run[key] for run in rs]) for key in rs[0]} for side, rs in runs.items() if rs}
        if runs["trl"]:
            for key in ("cpu_s", "wall_s"):
                phase2[f"ratio_{key}"] = spread([s[key] / t[key] for s, t in zip(runs["swirl"], runs["trl"])])
        result["phase2"] = phase2
    if "phase1" in phases:
        runs1 = [measure(args, "swirl-phase1") for _ in range(args.repeats)]
        result["phase1"] = {"swirl": {key: spread([run[key] for run in runs1]) for key in runs1[0]}}

    print(f"\nstep time, one thread, {args.pairs} pairs x G {args.group_size}, medians over {args.repeats} runs:")
    print("| phase | side | CPU s/step | wall s/step | peak RSS MiB | planned peak MiB |\n|---|---|---|---|---|---|")
    for phase in ("phase2", "phase1"):
        for side, figures in result.get(phase, {}).items():
            if side.startswith("ratio"):
                continue
            row = [figures[k]["median"] for k in ("cpu_s", "wall_s", "peak_rss_mib")]
            planned = f"{figures['planned_peak_mib']['median']:.0f}" if "planned_peak_mib" in figures else "–"
            print(f"| {phase} | {side} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.0f} | {planned} |")
    if "ratio_cpu_s" in result.get("phase2", {}):
        for key in ("cpu_s", "wall_s"):
            r = result["phase2"][f"ratio_{key}"]
            print(f"phase2 swirl/TRL {key}: {r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
