"""What the image tokenizer's code cache and the repeated-rollout savings buy a token FWM, measured side by side.

    python benchmarks/vq_cache.py --out benchmarks/results/vq_cache.json
    python benchmarks/vq_cache.py --models runs/sprites/version_0/pretrained/sft   # Phase I with trained models

SFT: the token FWM's SFT step (batch 32, AdamW) on a fixed pool of labelled sprite pairs (the demo's 1,400 by
default) drawn in shuffled epochs, with the code cache off (its ``capacity`` 0: every image VQ-encoded, as before)
and on. The cache fills during the first epoch; steps are timed after it. The two settings alternate in blocks of
``--steps`` steps, ``--repeats`` times, one thread, CPU time; the medians and the ratio within each pair of blocks
are printed.

Phase I (``--models``, a fit's ``pretrained/sft`` folder with ``fwm/`` and ``idm/``): ``rl_batch_size`` prompts
× G rollouts sampled by the trained FWM and rewarded by the trained IDM, every row scored (before) against each
group's distinct rollouts scored once (``scored_once``), with the share of distinct rollouts. Untrained models
would draw no repeats, so this part needs trained ones.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from harness import write_json  # noqa: E402
from step_time import spread, sprite_pairs  # noqa: E402


def cpu_seconds(fn, *args):
    """``fn(*args)``'s CPU seconds and its result."""
    start = time.process_time()
    result = fn(*args)
    return time.process_time() - start, result


def sft_costs(args: argparse.Namespace) -> dict:
    import torch

    from swirl_vl.models.token_fwm import TokenFWM

    fwm = TokenFWM(str(args.work / "token_fwm"), build_tiny=True)
    x, y = sprite_pairs(args.pool, seed=0)
    z = ["move the red circle left"] * args.pool
    optimizer = torch.optim.AdamW(fwm.parameters(), lr=1e-4)
    rng = random.Random(0)
    order: list[int] = []

    def batch() -> list[int]:
        while len(order) < args.batch_size:
            epoch = list(range(args.pool))
            rng.shuffle(epoch)
            order.extend(epoch)
        picked, order[:] = order[: args.batch_size], order[args.batch_size :]
        return picked

    def step() -> None:
        rows = batch()
        loss = fwm.sft_loss(x[rows], [z[i] for i in rows], y[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    capacity = fwm.vq.cache.capacity
    for _ in range(-(-args.pool // args.batch_size)):  # one epoch fills the cache
        step()
    blocks: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for setting in ("off", "on"):
            fwm.vq.cache.capacity = 0 if setting == "off" else capacity
            blocks[setting].append(statistics.median(cpu_seconds(step)[0] for _ in range(args.steps)))
    ratios = [on / off for on, off in zip(blocks["on"], blocks["off"])]
    return {
        "cpu_s_per_step_cache_off": spread(blocks["off"]),
        "cpu_s_per_step_cache_on": spread(blocks["on"]),
        "ratio_on_over_off": spread(ratios),
        "cache_hits": fwm.vq.cache.hits,
        "cache_misses": fwm.vq.cache.misses,
    }


def phase1_costs(args: argparse.Namespace) -> dict:
    import torch

    from swirl_vl.models.idm import VLMIDM
    from swirl_vl.models.token_fwm import TokenFWM
    from swirl_vl.training.swirl import rollout_keys, scored_once

    fwm = TokenFWM.from_pretrained(args.models / "fwm").eval()
    idm = VLMIDM.from_pretrained(args.models / "idm").eval()
    g, n = args.group_size, args.rl_batch_size
    pool_x, _ = sprite_pairs(n * args.repeats, seed=1)
    actions = ["move the red circle left", "add a blue square at the top", "remove the green triangle"]
    times: dict[str, list[float]] = {"sample": [], "reward_every_row": [], "reward_once": []}
    distinct = total = 0
    with torch.no_grad():
        for r in range(args.repeats):
            x = pool_x[r * n : (r + 1) * n]
            z = [actions[i % len(actions)] for i in range(n)]
            seconds, rollout = cpu_seconds(fwm.sample, x, z, g)
            times["sample"].append(seconds)
            x_rep, z_rep = x.repeat_interleave(g, 0), [a for a in z for _ in range(g)]
            keys = rollout_keys(rollout.images, g)
            distinct, total = distinct + len(set(keys)), total + len(keys)
            times["reward_every_row"].append(cpu_seconds(idm.log_likelihood, x_rep, rollout.images, z_rep)[0])
            once = cpu_seconds(scored_once, idm.log_likelihood, keys, x_rep, rollout.images, z_rep)[0]
            times["reward_once"].append(once)
    return {
        **{f"cpu_s_{name}": spread(values) for name, values in times.items()},
        "distinct_rollouts": distinct,
        "rollouts": total,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=1400, help="labelled pairs the SFT steps draw from")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block (their median is the block's)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved (off, on) blocks; Phase I: batches")
    parser.add_argument("--models", type=Path, default=None, help="a fit's pretrained/sft folder: adds Phase I")
    parser.add_argument("--rl-batch-size", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "vq_cache", help="where the tiny FWM lives")
    parser.add_argument("--out", type=Path, default=None, help="JSON with every figure")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    result: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "sft": sft_costs(args)}
    sft = result["sft"]
    print(
        f"token FWM SFT step (batch {args.batch_size}, one thread, CPU s): cache off "
        f"{sft['cpu_s_per_step_cache_off']['median']:.3f}, on {sft['cpu_s_per_step_cache_on']['median']:.3f}; "
        f"on/off {sft['ratio_on_over_off']['median']:.2f} (range {sft['ratio_on_over_off']['min']:.2f}–"
        f"{sft['ratio_on_over_off']['max']:.2f})"
    )
    if args.models is not None:
        result["phase1"] = p1 = phase1_costs(args)
        print(
            f"Phase I ({args.rl_batch_size} × G {args.group_size}, CPU s): sampling {p1['cpu_s_sample']['median']:.3f}; "
            f"IDM reward on every row {p1['cpu_s_reward_every_row']['median']:.3f}, each distinct rollout once "
            f"{p1['cpu_s_reward_once']['median']:.3f}; distinct rollouts {p1['distinct_rollouts']}/{p1['rollouts']}"
        )
    if args.out is not None:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
