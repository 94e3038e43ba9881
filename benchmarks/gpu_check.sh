#!/usr/bin/env bash
# The GPU check: configs/aurorabench_tiny.yaml at 256 px through DDP and FSDP2, a few steps of every stage (SFT,
# Phase I, Phase II), printing each phase's step time and peak GPU memory; writes
# benchmarks/results/gpu_check_<accelerator>.json (and into $OUT when it is set). Sized for one GPU in a few minutes, install included.
#
#   bash benchmarks/gpu_wheels.sh   # once, on a machine with registry access: what a GPU image may lack, into .whl/
#   bash benchmarks/gpu_check.sh    # on the GPU machine, in the repository root (.whl/ and data/aurora_256 beside)
#
# The data: `python -m datamodules.convert aurora --root <aurora-bench-sample> --json test.json
# --out data/aurora_256 --image-size 256` (done here when the sample sits at ../shared/aurora-bench-sample).
# DeepSpeed is not run: SwirlModule has one optimiser per model, which Lightning's DeepSpeedStrategy refuses.
# Settings by environment: ACCELERATOR (gpu), DEVICES (1), IMAGE_SIZE (256), STRATEGIES (DDP and fsdp2),
# SFT_STEPS (20), PHASE_STEPS (5), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ACCELERATOR=${ACCELERATOR:-gpu}
DEVICES=${DEVICES:-1}
IMAGE_SIZE=${IMAGE_SIZE:-256}
STRATEGIES=${STRATEGIES:-"ddp_find_unused_parameters_true fsdp2"}
SFT_STEPS=${SFT_STEPS:-20}
PHASE_STEPS=${PHASE_STEPS:-5}
PYTHON=${PYTHON:-python3}
WORK=runs/gpu_check
DATA=data/aurora_${IMAGE_SIZE}
started=$(date +%s)

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  # Only what the image lacks travels; --no-deps: the image's own torch, numpy, ... stay.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/swirl_site .whl/*.whl
  export PYTHONPATH="/tmp/swirl_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
"$PYTHON" - <<EOF
import torch, lightning, transformers, diffusers
print(f"torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, "
      f"diffusers {diffusers.__version__}; CUDA: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
if "$ACCELERATOR" == "gpu" and not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device (set ACCELERATOR=cpu for a CPU run of the same check)")
EOF
if [ ! -d "$DATA" ]; then
  "$PYTHON" -m datamodules.convert aurora --root ../shared/aurora-bench-sample --json test.json --out "$DATA" \
    --image-size "$IMAGE_SIZE"
fi
echo "[gpu_check] install and data: $(( $(date +%s) - started )) s"

for strategy in $STRATEGIES; do
  t0=$(date +%s)
  "$PYTHON" -m swirl_vl fit --config configs/aurorabench_tiny.yaml \
    --trainer.accelerator "$ACCELERATOR" --trainer.devices "$DEVICES" --trainer.strategy "$strategy" \
    --trainer.enable_progress_bar false \
    --trainer.logger.init_args.save_dir "$WORK" --trainer.logger.init_args.name "$strategy" \
    --data.root "$DATA" \
    --model.init_args.fwm.init_args.model.init_args.path "$WORK/models_$IMAGE_SIZE/fwm" \
    --model.init_args.fwm.init_args.model.init_args.image_size "$IMAGE_SIZE" \
    --model.init_args.idm.init_args.model.init_args.path "$WORK/models_$IMAGE_SIZE/idm" \
    --model.init_args.idm.init_args.model.init_args.image_size "$IMAGE_SIZE" \
    --data.init_args.image_size "$IMAGE_SIZE" \
    --schedule.sft_steps "$SFT_STEPS" --schedule.phase1_steps "$PHASE_STEPS" --schedule.phase2_steps "$PHASE_STEPS" \
    > "$WORK.$strategy.log" 2>&1 || { tail -40 "$WORK.$strategy.log"; echo "[gpu_check] $strategy failed"; exit 1; }
  echo "[gpu_check] $strategy: $(( $(date +%s) - t0 )) s"
done

"$PYTHON" - "$WORK" "$STRATEGIES" "$ACCELERATOR" "$DEVICES" "$IMAGE_SIZE" <<'EOF'
import json, os, sys
from pathlib import Path
work, strategies, accelerator, devices, size = Path(sys.argv[1]), sys.argv[2].split(), *sys.argv[3:]
report = {"accelerator": accelerator, "devices": int(devices), "image_size": int(size), "runs": {}}
print(f"| strategy | stage | steps | s/step | peak GPU MiB | peak RSS MiB |\n|---|---|---|---|---|---|")
for strategy in strategies:
    run = sorted((work / strategy).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    phases = json.loads((run / "swirl_phases.json").read_text())
    report["runs"][strategy] = phases
    for p in phases:
        cuda = p.get("peak_cuda_mib")
        print(f"| {strategy} | {p['stage']} {p['iteration']} | {p['steps']} | {p['seconds_per_step']:.3f} | "
              f"{'–' if cuda is None else f'{cuda:.0f}'} | {p['peak_rss_mib']:.0f} |")
text = json.dumps(report, indent=2)
Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
name = f"gpu_check_{accelerator}.json"  # a CPU run of the same check is kept apart from a GPU's
Path("benchmarks/results", name).write_text(text)
if os.environ.get("OUT"):
    Path(os.environ["OUT"], name).write_text(text)
EOF
echo "[gpu_check] done in $(( $(date +%s) - started )) s"
