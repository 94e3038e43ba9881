"""How well each phase's reward separates right from wrong rollouts, on sprite pairs with ground truth.

Phase I: for unlabelled pairs, the FWM samples ``G`` next states under the IDM's greedy label; a sample is right
when it parses to the true next state. Phase II: the IDM samples ``G`` actions; an action is right when, applied to
the parsed ``x``, it gives the parsed ``y``. Per group with both right and wrong members, the AUC of the reward
(share of right/wrong member pairs that the reward orders correctly, ties ½); also the share of groups with any
right member (what GRPO can learn from at all), the greedy accuracy, and the accuracy of the best-rewarded member
(best of group): GRPO only helps where AUC is well above ½, and it can only lift a model past its greedy accuracy
where the best of group beats it. ``--fwm`` is a token FWM folder or a diffusers one (diffusion FWM).

    python benchmarks/reward_signal.py --fwm runs/.../pretrained/sft/fwm --idm runs/.../pretrained/sft/idm
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from harness import write_json

from datamodules import sprites
from datamodules.trajectory import SpriteDataModule
from swirl_vl.models.diffusion_fwm import DiffusionFWM
from swirl_vl.models.idm import VLMIDM
from swirl_vl.models.token_fwm import TokenFWM


def group_auc(rewards: list[float], right: list[bool]) -> float | None:
    """AUC of ``rewards`` for ``right`` against wrong members of one group; None without both kinds."""
    pos = [r for r, ok in zip(rewards, right) if ok]
    neg = [r for r, ok in zip(rewards, right) if not ok]
    if not pos or not neg:
        return None
    return statistics.fmean(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)


def load_fwm(path: str, **diffusion: float) -> TokenFWM | DiffusionFWM:
    """The FWM saved at ``path``: a diffusers folder (``model_index.json``, built with ``diffusion``'s sampling
    settings, which the folder does not record) or a transformers one."""
    return DiffusionFWM(path, **diffusion) if (Path(path) / "model_index.json").exists() else TokenFWM(path)


def summarise(name: str, aucs: list[float | None], any_right: list[bool], greedy: list[bool], best: list[bool]) -> dict:
    mixed = [a for a in aucs if a is not None]
    out = {
        "groups": len(aucs),
        "mixed_groups": len(mixed),
        "auc": statistics.fmean(mixed) if mixed else float("nan"),
        "groups_with_a_right_sample": statistics.fmean(any_right),
        "greedy_acc": statistics.fmean(greedy),
        "best_of_group_acc": statistics.fmean(best),
    }
    print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fwm", required=True)
    p.add_argument("--idm", required=True)
    p.add_argument("--data", default="data/sprites")
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fwm-temperature", type=float, default=0.75, help="Phase I sampling temperature (token FWM)")
    p.add_argument("--idm-temperature", type=float, default=0.7, help="Phase II sampling temperature")
    p.add_argument("--diffusion-steps", type=int, default=5, help="DDIM steps (diffusion FWM)")
    p.add_argument("--guidance", type=float, nargs=2, default=[1.0, 1.0], help="text and image guidance (diffusion)")
    p.add_argument("--elbo-draws", type=int, default=2, help="(t, ε) draws of the Phase II reward (diffusion FWM)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reward_signal.json")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    diffusion = {
        "num_inference_steps": a.diffusion_steps,
        "guidance_scale": a.guidance[0],
        "image_guidance_scale": a.guidance[1],
        "elbo_draws": a.elbo_draws,
    }
    fwm, idm = load_fwm(a.fwm, **diffusion).eval(), VLMIDM(a.idm).eval()
    # The token FWM samples at a temperature; the diffusion one with the DDIM η its folder was built with.
    sampling = {"temperature": a.fwm_temperature} if isinstance(fwm, TokenFWM) else {}
    data = SpriteDataModule.from_folder(a.data)
    data.prepare_data()
    pairs = data.pairs("val")[: a.pairs]  # ground-truth states; never trained on
    g = a.group_size
    p1_auc, p1_any, p1_greedy, p1_best, p2_auc, p2_any, p2_greedy, p2_best = ([] for _ in range(8))
    for start in range(0, len(pairs), a.batch):
        chunk = pairs[start : start + a.batch]
        x = torch.stack([c["x"] for c in chunk])
        y = torch.stack([c["y"] for c in chunk])
        xs = [sprites.SpriteState.from_json(c["x_state"]) for c in chunk]
        ys = [sprites.SpriteState.from_json(c["y_state"]) for c in chunk]
        # Phase I: IDM label → G FWM samples → IDM reward.
        label = idm.sample(x, y, num_samples=1, greedy=True)
        z = label.texts
        rollout = fwm.sample(x, z, num_samples=g, **sampling)
        rewards = idm.log_likelihood(x.repeat_interleave(g, 0), rollout.images, [t for t in z for _ in range(g)])
        right = [sprites.parse(img) == ys[i // g] for i, img in enumerate(rollout.images)]
        greedy = fwm.sample(x, z, num_samples=1, greedy=True).images
        for b in range(len(chunk)):
            group = slice(b * g, (b + 1) * g)
            p1_auc.append(group_auc(rewards[group].tolist(), right[group]))
            p1_any.append(any(right[group]))
            p1_greedy.append(sprites.parse(greedy[b]) == ys[b])
            p1_best.append(right[group][int(rewards[group].argmax())])
        # Phase II: G IDM actions → FWM reward.
        actions = idm.sample(x, y, num_samples=g, temperature=a.idm_temperature)
        # group_size: a diffusion FWM scores a group's actions with the same (t, ε) draws, as Phase II does.
        rewards = fwm.log_likelihood(x.repeat_interleave(g, 0), actions.texts, y.repeat_interleave(g, 0), group_size=g)
        right = [sprites.apply(xs[i // g], t) == ys[i // g] for i, t in enumerate(actions.texts)]
        for b in range(len(chunk)):
            group = slice(b * g, (b + 1) * g)
            p2_auc.append(group_auc(rewards[group].tolist(), right[group]))
            p2_any.append(any(right[group]))
            p2_greedy.append(sprites.apply(xs[b], z[b]) == ys[b])
            p2_best.append(right[group][int(rewards[group].argmax())])
    payload = {
        "args": {k: str(v) for k, v in vars(a).items()},
        "phase1": summarise("phase1 (FWM samples, IDM reward)", p1_auc, p1_any, p1_greedy, p1_best),
        "phase2": summarise("phase2 (IDM samples, FWM reward)", p2_auc, p2_any, p2_greedy, p2_best),
    }
    write_json(a.out, payload)
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
