"""Greedy accuracy of a diffusion FWM under InstructPix2Pix's dual guidance, over scales and DDIM step counts.

For each ``(guidance_scale, image_guidance_scale)`` and number of inference steps: ``fwm_state_acc`` (the greedy
next image parses to the true next state) and PSNR on the first ``--pairs`` test pairs of a sprite data folder, and
the seconds per pair. This is how ``configs/sprites_diffusion.yaml``'s scales were chosen.

    python benchmarks/guidance.py --fwm runs/.../pretrained/sft/fwm --data runs/.../data
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from harness import write_json

from datamodules import sprites
from datamodules.trajectory import SpriteDataModule
from swirl_vl.eval.metrics import image_metrics
from swirl_vl.models.diffusion_fwm import DiffusionFWM


def scale_pair(text: str) -> tuple[float, float]:
    text_scale, image_scale = (float(v) for v in text.split(","))
    return text_scale, image_scale


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fwm", required=True, help="a diffusers InstructPix2Pix-layout folder")
    p.add_argument("--data", default="data/sprites", help="a sprite data folder (its test split is scored)")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, nargs="+", default=[5])
    p.add_argument(
        "--scales", type=scale_pair, nargs="+", default=[(1.0, 1.0), (1.5, 1.0), (1.5, 1.5), (3.0, 1.5), (7.5, 1.5)]
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "guidance.json")
    a = p.parse_args()
    data = SpriteDataModule.from_folder(a.data)
    data.prepare_data()
    pairs = data.pairs("test")[: a.pairs]
    rows = []
    print("| steps | guidance_scale | image_guidance_scale | fwm_state_acc | fwm_psnr | s / pair |")
    print("|---|---|---|---|---|---|")
    for steps in a.steps:
        for text_scale, image_scale in a.scales:
            fwm = DiffusionFWM(
                a.fwm, num_inference_steps=steps, guidance_scale=text_scale, image_guidance_scale=image_scale
            ).eval()
            hits, psnr, started = [], [], time.perf_counter()
            for start in range(0, len(pairs), a.batch):
                chunk = pairs[start : start + a.batch]
                x, y = torch.stack([c["x"] for c in chunk]), torch.stack([c["y"] for c in chunk])
                y_hat = fwm.sample(x, [c["action"] for c in chunk], greedy=True).images
                truth = [sprites.SpriteState.from_json(c["y_state"]) for c in chunk]
                hits += [sprites.parse(img) == t for img, t in zip(y_hat, truth)]
                psnr += image_metrics(y_hat, y)["fwm_psnr"].tolist()
            row = {
                "steps": steps,
                "guidance_scale": text_scale,
                "image_guidance_scale": image_scale,
                "fwm_state_acc": sum(hits) / len(hits),
                "fwm_psnr": sum(psnr) / len(psnr),
                "seconds_per_pair": (time.perf_counter() - started) / len(pairs),
            }
            rows.append(row)
            print(
                f"| {steps} | {text_scale} | {image_scale} | {row['fwm_state_acc']:.3f} | {row['fwm_psnr']:.2f} | "
                f"{row['seconds_per_pair']:.4f} |",
                flush=True,
            )
    write_json(a.out, {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows})
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
