"""Dual classifier-free guidance of InstructPix2Pix (Brooks et al. 2023, eq. 3).

As diffusers' ``StableDiffusionInstructPix2PixPipeline.__call__`` combines its three UNet branches (text + image,
image only, neither)::

    ẽ = e(∅, ∅) + s_I · (e(x, ∅) − e(∅, ∅)) + s_T · (e(x, z) − e(x, ∅))

Pure math: the combination is linear in the network's outputs, so it serves ε-, x₀- and v-prediction alike.
"""

from __future__ import annotations

from torch import Tensor


def guidance_on(text_scale: float, image_scale: float) -> bool:
    """Whether sampling guides at all: the pipeline's ``do_classifier_free_guidance`` (text > 1 and image ≥ 1),
    kept for parity; otherwise the conditional prediction is used alone."""
    return text_scale > 1.0 and image_scale >= 1.0


def dual_guidance(text: Tensor, image: Tensor, uncond: Tensor, text_scale: float, image_scale: float) -> Tensor:
    """Guided prediction from the three branches, each ``(B, C, h, w)``.

    Args:
        text: conditioned on the source image and the instruction, ``e(x, z)``.
        image: on the source image with the empty instruction, ``e(x, ∅)``.
        uncond: on neither (zero image, empty instruction), ``e(∅, ∅)``.
        text_scale: ``s_T`` (diffusers' ``guidance_scale``); 1 with ``image_scale`` 1 gives ``text``.
        image_scale: ``s_I`` (diffusers' ``image_guidance_scale``).
    """
    return uncond + text_scale * (text - image) + image_scale * (image - uncond)
