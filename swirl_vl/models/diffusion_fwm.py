"""``DiffusionFWM``: an InstructPix2Pix-style diffusion editor as the forward world model ``P_θ(y | x, z)``.

A diffusers ``UNet2DConditionModel`` denoises the next state with the source image concatenated on the channel
axis and the action text (``CLIPTextModel``) as cross-attention context; sampling is DDIM. Pixel space when the
folder has no ``vae/`` (the tiny default), latent space through ``AutoencoderKL`` when it has one (real
``timbrooks/instruct-pix2pix`` folders).

Sampling uses InstructPix2Pix's dual classifier-free guidance (``guidance_scale`` on the instruction,
``image_guidance_scale`` on the source image; ``swirl_vl.rl.guidance``), and SFT drops the conditionings as its
training did, so that the unconditional branches exist. As a policy (Phase I, GRPO) each denoising step
``x_t → x_{t_prev}`` of a stochastic DDIM sampler (η > 0) plays the role of a token: its log-prob is the Gaussian
density of the *guided* transition (``swirl_vl.rl.ddim``), and its KL to the reference is the closed form between two
such Gaussians. For the forward-process objective (``swirl_vl.training.objectives.ForwardProcess``) it re-noises
and denoises its own samples. As a likelihood (Phase II reward) it gives an ELBO-style estimate: minus the mean
denoising error of the conditional (unguided) model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from swirl_vl.models.base import (
    ForwardWorldModel,
    PolicyScores,
    Rollout,
    enable_gradient_checkpointing,
    missing_checkpoint_error,
)
from swirl_vl.models.tiny_diffusion import SHIPPED_SPRITE_VAE, build_tiny_instruct_pix2pix, write_model_index
from swirl_vl.rl.ddim import (
    ddim_alphas,
    ddim_step_mean_std,
    ddim_step_with_logprob,
    default_prev_timestep,
    gaussian_kl_same_std,
    gaussian_logprob,
    predicted_x0_eps,
)
from swirl_vl.rl.guidance import dual_guidance, guidance_on


@dataclass
class ConditioningDropout:
    """Share of SFT examples trained without their conditionings (InstructPix2Pix: 5% each), so that guidance has
    unconditional branches to contrast with. The three cases are disjoint."""

    text: float = 0.05
    """Instruction replaced by the empty prompt, source image kept."""
    image: float = 0.05
    """Source image replaced by zeros, instruction kept."""
    both: float = 0.05
    """Both dropped."""

    def __post_init__(self) -> None:
        shares = (self.text, self.image, self.both)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(f"conditioning_dropout shares must be ≥ 0 and sum to ≤ 1; got {shares}")

    def masks(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(B,)`` bools ``(drop_text, drop_image)`` drawn for one batch."""
        u = torch.rand(batch, generator=generator)
        text_only, both = u < self.text, (u >= self.text) & (u < self.text + self.both)
        image_only = (u >= self.text + self.both) & (u < self.text + self.both + self.image)
        return text_only | both, image_only | both


class DiffusionFWM(ForwardWorldModel):
    """InstructPix2Pix-style forward world model (diffusers folder layout of ``timbrooks/instruct-pix2pix``).

    Args:
        path: local diffusers folder (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
            ``scheduler/``, optional ``vae/``). Nothing is downloaded.
        build_tiny: when ``path`` does not exist, build a tiny random pixel-space model there first.
        tiny_vae: with ``build_tiny``, build a latent-space model instead, on this trained ``AutoencoderKL`` folder;
            ``"sprites"``: the autoencoder shipped for the sprite world (``swirl_vl/assets/sprite_vae``).
        seed: seed of the tiny build and of the fixed start noise of greedy sampling.
        num_inference_steps: DDIM steps per sample (= "tokens" per rollout).
        eta: DDIM η of stochastic sampling (Phase I rollouts); must be > 0 for the steps to have a density.
        train_timestep_fraction: share of the non-final denoising steps of each rollout that GRPO trains on,
            drawn at random per rollout row.
        elbo_draws: ``(t, ε)`` draws per pair in ``log_likelihood`` (stratified over ``t``).
        image_size: side of the square images the model works on (pixels); the tiny build's ``sample_size``.
        guidance_scale: text guidance ``s_T`` of sampling (greedy and rollouts; diffusers' default 7.5). As in
            diffusers' pipeline, guidance is on only when it is > 1 and ``image_guidance_scale`` ≥ 1; off, each step
            is one UNet pass instead of three.
        image_guidance_scale: image guidance ``s_I`` of sampling (diffusers' default 1.5).
        conditioning_dropout: shares of SFT examples without instruction, without source image, without both.
        gradient_checkpointing: recompute the UNet's activations in backward (less memory, more compute).
    """

    def __init__(
        self,
        path: str,
        build_tiny: bool = False,
        tiny_vae: str | None = None,
        seed: int = 0,
        num_inference_steps: int = 10,
        eta: float = 1.0,
        train_timestep_fraction: float = 1.0,
        elbo_draws: int = 4,
        image_size: int = 32,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        conditioning_dropout: ConditioningDropout | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_inference_steps < 2:
            raise ValueError(f"num_inference_steps={num_inference_steps}: need ≥ 2 (the last step is never trained)")
        if eta < 0:
            raise ValueError(f"eta={eta} must be ≥ 0")
        if not 0 < train_timestep_fraction <= 1:
            raise ValueError(f"train_timestep_fraction={train_timestep_fraction} must be in (0, 1]")
        if elbo_draws < 1:
            raise ValueError(f"elbo_draws={elbo_draws} must be ≥ 1")
        self.path = Path(path)
        self.seed = seed
        self.num_inference_steps = num_inference_steps
        self.eta = eta
        self.train_timestep_fraction = train_timestep_fraction
        self.elbo_draws = elbo_draws
        self.image_size = image_size
        self.guidance_scale, self.image_guidance_scale = guidance_scale, image_guidance_scale
        self.conditioning_dropout = conditioning_dropout if conditioning_dropout is not None else ConditioningDropout()

        if not self.path.exists() and build_tiny:
            try:
                vae = SHIPPED_SPRITE_VAE if tiny_vae == "sprites" else tiny_vae
                build_tiny_instruct_pix2pix(self.path, seed=seed, image_size=image_size, vae=vae)
            except FileExistsError:
                pass  # another process (a DDP rank) built it between our check and our build
        if (error := _missing_folder(self.path, build_tiny=False)) is not None:
            raise error
        self.unet = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet")
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.unet)
        self.text_encoder = CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(self.path, subfolder="tokenizer")
        self.scheduler = _ddim_scheduler(self.path / "scheduler")
        self.vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae") if (self.path / "vae").is_dir() else None
        if self.vae is not None:
            # InstructPix2Pix never trains its autoencoder.
            self.vae.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DiffusionFWM:
        return cls(str(path))

    @classmethod
    def preflight(cls, init_args: Mapping[str, Any], stage: str) -> list[str]:
        """What ``cls(**init_args)`` would find missing, checked without loading anything (the CLI asks first)."""
        error = _missing_folder(Path(init_args["path"]), bool(init_args.get("build_tiny")))
        return [] if error is None else [str(error)]

    def save_pretrained(self, path: str | Path) -> None:
        """Write the diffusers folder in the layout loaded (a latent-space folder's ``model_index.json`` names the
        InstructPix2Pix pipeline, which loads it; a pixel-space one names no pipeline)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
        write_model_index(path, has_vae=self.vae is not None)

    def train(self, mode: bool = True) -> DiffusionFWM:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen: keep it deterministic whatever Lightning toggles
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # --- conditioning and model space -------------------------------------------------------------------------

    def _tokenize(self, z: list[str]) -> Tensor:
        """``(B, L)`` ids, always padded to the tokenizer's full length: the UNet attends to every position,
        so the conditioning of a prompt must not depend on the other prompts in its batch."""
        ids = self.tokenizer(
            z, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def _encode_text(self, input_ids: Tensor) -> Tensor:
        """``(B, L)`` → ``(B, L, D)`` cross-attention context (CLIP's last hidden state, as Stable Diffusion)."""
        return self.text_encoder(input_ids)[0]

    def _encode_source(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` → ``(B, C, h, w)``: the conditioning image, unscaled (as InstructPix2Pix)."""
        pixels = (2 * x - 1).to(self.device, self.unet.dtype)
        if self.vae is None:
            return pixels
        with torch.no_grad():
            return self.vae.encode(pixels).latent_dist.mode()

    def _encode_target(self, y: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` → ``(B, C, h, w)`` diffusion space (latents × ``scaling_factor``)."""
        if self.vae is None:
            return self._encode_source(y)
        # The posterior mean, not a sample: the ELBO reward must be deterministic given its (t, ε) draws.
        return self._encode_source(y) * self.vae.config.scaling_factor

    def _decode(self, latents: Tensor) -> Tensor:
        """``(B, C, h, w)`` diffusion space → ``(B, 3, H, W)`` images in ``[0, 1]``."""
        if self.vae is not None:
            latents = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def _predict(self, latents: Tensor, source: Tensor, text: Tensor, t: Tensor) -> Tensor:
        """UNet output ``(B, C, h, w)`` for noisy ``latents`` ‖ ``source`` at timestep(s) ``t`` (scalar or ``(B,)``)."""
        return self.unet(torch.cat([latents, source], dim=1), t, encoder_hidden_states=text).sample

    def _null_text(self) -> Tensor:
        """``(1, L, D)`` context of the empty instruction (guidance's unconditional branch, SFT's dropped text)."""
        return self._encode_text(self._tokenize([""]))

    def _guided_predict(
        self, latents: Tensor, source: Tensor, text: Tensor, t: Tensor, scales: tuple[float, float], null: Tensor | None
    ) -> Tensor:
        """Dual-guided UNet output ``(B, C, h, w)``: the three branches in one UNet batch, as the diffusers pipeline.

        ``scales = (text, image)``. As the pipeline's ``do_classifier_free_guidance``, guidance is on only when
        ``text > 1`` and ``image ≥ 1``; otherwise the conditional output alone (one branch, a third of the cost).
        ``null``: ``_null_text()``, encoded once by the caller rather than at every denoising step (unused when off).
        """
        text_scale, image_scale = scales
        if not guidance_on(text_scale, image_scale):
            return self._predict(latents, source, text, t)
        assert null is not None, "guided prediction needs the empty instruction's context"
        null = null.expand_as(text)
        t3 = t.repeat(3) if torch.is_tensor(t) and t.ndim == 1 else t
        out = self._predict(
            torch.cat([latents] * 3),
            torch.cat([source, source, torch.zeros_like(source)]),
            torch.cat([text, null, null]),
            t3,
        )
        cond, image_only, uncond = out.chunk(3)
        return dual_guidance(cond, image_only, uncond, text_scale, image_scale)

    def _denoising_error(self, source: Tensor, target: Tensor, text: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``(B,)`` mean squared error of the UNet's prediction of what the scheduler's ``prediction_type`` names."""
        noisy = self.scheduler.add_noise(target, noise, t)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            expected = noise
        elif prediction_type == "v_prediction":
            expected = self.scheduler.get_velocity(target, noise, t)
        else:
            expected = target
        error = (self._predict(noisy, source, text, t).float() - expected.float()) ** 2
        return error.mean(dim=(1, 2, 3))

    # --- ForwardWorldModel ---------------------------------------------------------------------------------------

    def sft_loss(self, x: Tensor, z: list[str], y: Tensor) -> Tensor:
        """Denoising MSE at uniformly random ``t`` (scalar); ``x``, ``y``: ``(B, 3, H, W)`` in ``[0, 1]``.

        The regression target is what the scheduler's ``prediction_type`` names: ε (InstructPix2Pix), x_0 (the
        tiny pixel model) or v. In train mode, ``conditioning_dropout`` drops instructions and source images.
        """
        source, target = self._encode_source(x), self._encode_target(y)
        if self.training:
            drop_text, drop_image = self.conditioning_dropout.masks(len(z))
            z = ["" if drop else action for action, drop in zip(z, drop_text.tolist())]
            source = source.masked_fill(drop_image.to(self.device)[:, None, None, None], 0.0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (target.shape[0],), device=self.device)
        noise = torch.randn_like(target)
        return self._denoising_error(source, target, self._encode_text(self._tokenize(z)), t, noise).mean()

    def _timesteps(self, num_inference_steps: int) -> tuple[Tensor, Tensor]:
        """``(S,)`` timesteps of the DDIM schedule and ``(S,)`` the step each lands on (negative: clean)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps.long()
        return timesteps, default_prev_timestep(self.scheduler, timesteps)

    def _train_step_mask(self, n: int, s: int, eta: float, generator: torch.Generator | None) -> Tensor:
        """``(N, S)`` bool: the steps GRPO trains on. Never the last (σ → 0, degenerate density), none
        when η = 0 (deterministic, no density), else a random ``train_timestep_fraction`` of the rest per row."""
        mask = torch.zeros(n, s, dtype=torch.bool)
        if eta > 0:
            keep = max(1, round(self.train_timestep_fraction * (s - 1)))
            order = torch.rand(n, s - 1, generator=generator, device="cpu" if generator is None else generator.device)
            chosen = order.argsort(dim=1)[:, :keep].cpu()
            mask[:, : s - 1].scatter_(1, chosen, True)
        return mask.to(self.device)

    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        z: list[str],
        num_samples: int = 1,
        greedy: bool = False,
        eta: float | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
    ) -> Rollout:
        """``G = num_samples`` next states per ``(x, z)`` by guided DDIM, recording every step (row ``b * G + g``).

        ``greedy``: deterministic DDIM (η = 0) from a fixed start noise (``seed``), ``G = 1``; such a rollout has
        no density, so its mask is all False. Returns a ``Rollout`` with ``old_logprobs``/``mask`` ``(N, S)``,
        ``images`` ``(N, 3, H, W)`` in ``[0, 1]`` and ``context``: ``latents`` ``(N, S+1, C, h, w)``, ``timesteps``
        and ``prev_timesteps`` ``(S,)``, ``source`` ``(N, C, h, w)``, ``input_ids`` ``(N, L)``, ``eta`` ``()``,
        ``guidance`` ``(2,)``: the scales, so that re-scoring recomputes the same guided transition.
        """
        if greedy and num_samples != 1:
            raise ValueError(f"greedy sampling is deterministic: num_samples must be 1, got {num_samples}")
        eta = 0.0 if greedy else (self.eta if eta is None else eta)
        scales = (
            self.guidance_scale if guidance_scale is None else guidance_scale,
            self.image_guidance_scale if image_guidance_scale is None else image_guidance_scale,
        )
        timesteps, prev_timesteps = self._timesteps(num_inference_steps or self.num_inference_steps)

        input_ids = self._tokenize(z).repeat_interleave(num_samples, 0)  # (N, L)
        text = self._encode_text(input_ids)  # (N, L, D)
        source = self._encode_source(x).repeat_interleave(num_samples, 0)  # (N, C, h, w)
        if greedy:
            # One noise image for every row, so a pair's greedy sample never depends on its batch.
            start_gen = torch.Generator().manual_seed(self.seed)
            noise = torch.randn((1, *source.shape[1:]), generator=start_gen).expand_as(source)
        else:
            noise_device = "cpu" if generator is None else generator.device
            noise = torch.randn(source.shape, generator=generator, device=noise_device)
        latents = [noise.to(source) * self.scheduler.init_noise_sigma]
        logprobs = []
        null = self._null_text() if guidance_on(*scales) else None
        for t, t_prev in zip(timesteps, prev_timesteps):
            model_output = self._guided_predict(latents[-1], source, text, t, scales, null)
            prev_sample, logprob = ddim_step_with_logprob(
                self.scheduler, model_output, t, latents[-1], eta, generator=generator, prev_timestep=t_prev
            )
            latents.append(prev_sample)
            logprobs.append(logprob)

        n, s = source.shape[0], len(timesteps)
        mask = self._train_step_mask(n, s, eta, generator)
        # Masked-out steps are stored as 0 (the last step's density is huge): old and new log-probs then agree
        # everywhere, and nothing outside the mask can leak an inf into a ratio.
        old_logprobs = torch.stack(logprobs, dim=1).float().masked_fill(~mask, 0.0)  # (N, S)
        latents_all = torch.stack(latents, dim=1)  # (N, S+1, C, h, w)
        return Rollout(
            group_size=num_samples,
            old_logprobs=old_logprobs,
            mask=mask,
            images=self._decode(latents_all[:, -1]),
            context={
                "latents": latents_all,
                "timesteps": timesteps,
                "prev_timesteps": prev_timesteps,
                "source": source,
                "input_ids": input_ids,
                "eta": torch.tensor(eta),
                "guidance": torch.tensor(scales),
            },
        )

    def transition_means(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        """The guided DDIM transitions of the rollout's masked-in steps under the current weights (with grad).

        Returns ``mean`` ``(M, C, h, w)``, σ_t ``(M, 1, 1, 1)`` and the recorded ``x_{t_prev}`` ``(M, C, h, w)``, for
        the ``M`` masked-in steps in row-major order (as ``masked_scatter`` fills), all in one UNet batch (per-row
        timesteps). σ_t depends on the schedule only, so the reference's σ_t is the same.
        """
        ctx, mask = rollout.context, rollout.mask
        rows, steps = mask.nonzero(as_tuple=True)  # (M,), (M,)
        latents = ctx["latents"]
        sample, prev_sample = latents[rows, steps], latents[rows, steps + 1]  # (M, C, h, w)
        t, t_prev = ctx["timesteps"][steps], ctx["prev_timesteps"][steps]  # (M,)
        text = self._encode_text(ctx["input_ids"])[rows]  # (M, L, D), with grad into the text encoder
        scales = tuple(float(v) for v in ctx["guidance"]) if "guidance" in ctx else (1.0, 1.0)
        null = self._null_text() if guidance_on(*scales) else None
        model_output = self._guided_predict(sample, ctx["source"][rows], text, t, scales, null)
        mean, std = ddim_step_mean_std(self.scheduler, model_output, t, sample, float(ctx["eta"]), t_prev)
        return mean, std, prev_sample

    def rollout_logprobs(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """``(N, S)`` log-probs of the recorded transitions under the current weights (with grad), and the mask.

        Only masked-in steps are evaluated; the rest are 0.
        """
        return self.policy_scores(rollout).logp, rollout.mask

    def policy_scores(self, rollout: Rollout, reference: ForwardWorldModel | None = None) -> PolicyScores:
        """Log-probs ``(N, S)`` and, with a ``reference``, the closed-form per-step KL ``(N, S)`` to it (with grad).

        The KL of two Gaussian transitions with the same σ_t, averaged over dimensions as the log-prob is
        (``gaussian_kl_same_std``): the k3 estimator on dimension-averaged log-probs would be ~``D`` times weaker.
        """
        mask = rollout.mask
        zeros = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32)
        if not mask.any():  # greedy (η = 0) rollouts: nothing has a density, nothing to train
            return PolicyScores(zeros, mask, None if reference is None else zeros)
        ref_mean = None
        if reference is not None:
            with torch.no_grad():  # first: its activations are freed before the policy's graph is built
                ref_mean, _, _ = reference.transition_means(rollout)
        mean, std, prev_sample = self.transition_means(rollout)
        logp = zeros.masked_scatter(mask, gaussian_logprob(prev_sample, mean, std).float())
        kl = None
        if ref_mean is not None:
            kl = zeros.masked_scatter(mask, gaussian_kl_same_std(mean, ref_mean, std).float())
        return PolicyScores(logp, mask, kl)

    def renoise_rollouts(self, rollout: Rollout, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Each rollout's clean sample noised again at a uniform random ``t`` (forward-process objectives).

        Returns ``x0`` ``(N, C, h, w)`` (the rollouts' final samples in diffusion space, the regression target),
        ``xt`` and ``t`` ``(N,)``, to be denoised by ``denoised_x0`` under the policy and its reference alike.
        """
        x0 = rollout.context["latents"][:, -1]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = t.to(x0.device)
        return {"x0": x0, "xt": self.scheduler.add_noise(x0, noise, t), "t": t}

    def denoised_x0(self, rollout: Rollout, noised: dict[str, Tensor]) -> Tensor:
        """``(N, C, h, w)`` the network's x_0 prediction at ``noised``'s ``(x_t, t)``, conditioned on the rollout's
        source and instruction (no guidance: the conditional model is what trains); with grad."""
        ctx, t = rollout.context, noised["t"]
        output = self._predict(noised["xt"], ctx["source"], self._encode_text(ctx["input_ids"]), t)
        alpha_t, _ = ddim_alphas(self.scheduler, t, t)
        x0_pred, _ = predicted_x0_eps(self.scheduler, output, alpha_t.view(-1, 1, 1, 1), noised["xt"])
        return x0_pred

    @torch.no_grad()
    def log_likelihood(
        self, x: Tensor, z: list[str], y: Tensor, group_size: int = 1, seed: int | None = None
    ) -> Tensor:
        """``(B,)`` ELBO-style estimate of ``log P(y | x, z)``: minus the mean denoising error over ``elbo_draws``.

        Unweighted over ``t`` (as the SFT loss; the ELBO proper weights each ``t``), so it ranks actions ``z`` for
        the same ``(x, y)``, which is all a group-relative reward needs, but is no calibrated log-density.

        Rows in consecutive blocks of ``group_size`` share the same ``(t, ε)`` draws, so that in a group's
        relative advantages the estimator's noise cancels and only ``z`` differs. ``seed`` makes it deterministic
        (the global RNG is used when ``None``). ``t`` is stratified: draw ``k`` lies in the ``k``-th of
        ``elbo_draws`` equal slices of ``[0, T)``, which lowers the variance of a few-draw estimate.
        """
        b = x.shape[0]
        if b % group_size:
            raise ValueError(f"batch of {b} is not a whole number of groups of {group_size}")
        source, target = self._encode_source(x), self._encode_target(y)
        text = self._encode_text(self._tokenize(z))
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        k, n_groups, num_t = self.elbo_draws, b // group_size, self.scheduler.config.num_train_timesteps
        u = torch.rand(n_groups, k, generator=gen)
        t = ((torch.arange(k) + u) * num_t / k).long().clamp(max=num_t - 1)  # (n_groups, K)
        noise = torch.randn((n_groups, k, *target.shape[1:]), generator=gen)  # (n_groups, K, C, h, w)
        errors = [
            self._denoising_error(
                source,
                target,
                text,
                t[:, i].repeat_interleave(group_size).to(self.device),
                noise[:, i].repeat_interleave(group_size, 0).to(target),
            )
            for i in range(k)
        ]
        return -torch.stack(errors, dim=1).mean(dim=1)  # (B,)


def _ddim_scheduler(folder: Path) -> DDIMScheduler:
    """DDIM on the folder's noise schedule. Real folders ship another class (Euler ancestral), whose config lacks
    DDIM's own keys: DDIM's defaults would then clip x̂_0 to ±1 and end at ᾱ = 1, which is wrong for latents, so a
    converted config sets them as Stable Diffusion's DDIM config does. ``timestep_spacing`` is kept."""
    config = DDIMScheduler.load_config(folder)
    if config.get("_class_name") == "DDIMScheduler":
        return DDIMScheduler.from_config(config)
    return DDIMScheduler.from_config(
        config, clip_sample=config.get("clip_sample", False), set_alpha_to_one=config.get("set_alpha_to_one", False)
    )


def _missing_folder(path: Path, build_tiny: bool) -> FileNotFoundError | None:
    """The error for a folder that is not a diffusers InstructPix2Pix checkpoint, or None when loading can go on."""
    if (path / "model_index.json").is_file() or (build_tiny and not path.exists()):
        return None
    return missing_checkpoint_error(
        path,
        "DiffusionFWM: InstructPix2Pix diffusers folder (model_index.json)",
        f"Download one: `hf download timbrooks/instruct-pix2pix --local-dir {path}` (McGill-NLP/AURORA has the "
        "same layout), or set build_tiny: true to build a tiny random model there (only where the path does not "
        "exist yet).",
    )
