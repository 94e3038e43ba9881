"""SWIRL against SFT-only with the same step budget, from the same SFT checkpoint and data, over seeds.

Per seed: SFT once (``--schedule.iterations 0``); from its ``save_pretrained`` folders, SFT-only continues for
``iterations × (phase1_steps + phase2_steps)`` more labelled batches, and SWIRL runs its iterations on the
state-only split. Prints and writes JSON: test ``fwm_state_acc`` / ``idm_action_acc`` per seed, mean ± std,
the relative change, wall time per run, and step time and peak RSS per phase. Two arms of ``ablations.py``.

    python benchmarks/swirl_vs_sft.py --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

from ablations import main

if __name__ == "__main__":
    main(select=["sft_only", "swirl"], doc=__doc__, out="swirl_vs_sft.json")
