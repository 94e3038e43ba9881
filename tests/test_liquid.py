"""Liquid as a token FWM: the published layout, the paper's prompt and sampling, and parity with its own loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaForCausalLM

from swirl_vl.models.liquid import LIQUID_BOI, LIQUID_EOI, LiquidFWM, LiquidIDM, build_tiny_liquid
from tests.sprite_oracles import sprite_pairs

ACTIONS = ["move the red square left", "remove the blue circle"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_liquid(tmp_path_factory.mktemp("liquid") / "liquid", seed=0)


@pytest.fixture(scope="module")
def fwm(folder: Path) -> LiquidFWM:
    return LiquidFWM(str(folder), image_size=32).eval()


def paper_prompt(tokenizer, codes: torch.Tensor, instruction: str, action: str) -> list[int]:
    """The paper's ``tokenizer_image_token``: tokenize around ``<image>``, keep the first BOS, codes + offset."""
    chunks = [tokenizer(c).input_ids for c in f"<boi><image><eoi>\n{instruction} {action}<boi>".split("<image>")]
    offset = int(chunks[0][0] == tokenizer.bos_token_id)
    image = (codes + len(tokenizer)).tolist()
    return chunks[0] + image + chunks[1][offset:]


def paper_generate(lm, prompt: list[int], text_vocab: int, length: int) -> list[int]:
    """The paper's image loop, greedy: full logits each step (no cache), text tokens set to ``-inf``, argmax."""
    ids = torch.tensor([prompt])
    for _ in range(length):
        logits = lm(input_ids=ids).logits[:, -1, :].float()
        logits[:, :text_vocab] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt) :].tolist()


def test_the_folder_is_liquids_published_layout(folder: Path, fwm: LiquidFWM) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder), GemmaForCausalLM)
    assert (folder / "vq" / "config.json").is_file()
    # Codes sit right after the text vocabulary; <boi>/<eoi> are text tokens.
    assert fwm.code_token_ids.tolist() == list(range(len(tokenizer), len(tokenizer) + fwm.vq.num_codes))
    assert fwm.lm.config.vocab_size == len(tokenizer) + fwm.vq.num_codes
    assert tokenizer.convert_ids_to_tokens([fwm.boi_id, fwm.eoi_id]) == [LIQUID_BOI, LIQUID_EOI]
    assert not any(p.requires_grad for p in fwm.vq.parameters())


def test_prompts_are_the_papers(fwm: LiquidFWM) -> None:
    x, _, _ = sprite_pairs(2)
    ids, mask = fwm.prompt_ids(x, ACTIONS)
    codes = fwm.encode_images(x)
    for row, row_mask, code, action in zip(ids, mask, codes, ACTIONS):
        assert row[row_mask.bool()].tolist() == paper_prompt(fwm.tokenizer, code, fwm.instruction, action)


def test_greedy_image_tokens_equal_the_papers_generation_loop(fwm: LiquidFWM) -> None:
    """Token for token, each prompt alone and uncached in the reference, left-padded and cached in ours."""
    x, _, _ = sprite_pairs(2)
    L = fwm.num_image_tokens
    ours = fwm.sample(x, ACTIONS, greedy=True).context["input_ids"][:, -L:].tolist()
    for row, code, action in zip(ours, fwm.encode_images(x), ACTIONS):
        prompt = paper_prompt(fwm.tokenizer, code, fwm.instruction, action)
        assert row == paper_generate(fwm.lm, prompt, len(fwm.tokenizer), L)


def test_sampled_image_tokens_equal_the_papers_sampler_under_one_seed(fwm: LiquidFWM) -> None:
    """The paper's filtering order (temperature, text masked, top-k, top-p) draws the same tokens from one seed."""
    sample = {"temperature": 0.75, "top_k": 12, "top_p": 0.96}
    x, _, _ = sprite_pairs(2)
    L = fwm.num_image_tokens
    torch.manual_seed(7)
    ours = fwm.sample(x, ACTIONS, **sample).context["input_ids"][:, -L:].tolist()
    torch.manual_seed(7)
    assert ours == _paper_generate_batch(fwm, fwm.encode_images(x), sample, L)


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def _next_logits(lm, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :].float()


def _paper_generate_batch(
    fwm: LiquidFWM, codes: torch.Tensor, sample: dict, length: int, cfg_scale: float = 1.0
) -> list[list[int]]:
    """The paper's sampler on a left-padded batch (uncached): with ``cfg_scale > 1`` the logits are
    ``uncond + (cond - uncond) * cfg_scale`` against ``<boi> x <eoi>\\n<unconditional><boi>``, both branches fed
    the sampled token; then logits / temperature, text masked, top-k, top-p on the descending cumulative sum, one
    multinomial draw per row per step."""
    pad = fwm.tokenizer.pad_token_id
    ids, mask = _left_padded([paper_prompt(fwm.tokenizer, c, fwm.instruction, a) for c, a in zip(codes, ACTIONS)], pad)
    chunks = [fwm.tokenizer(c).input_ids for c in "<boi><image><eoi>\n<unconditional><boi>".split("<image>")]
    u_rows = [chunks[0] + (c + len(fwm.tokenizer)).tolist() + chunks[1][1:] for c in codes]
    u_ids, u_mask = _left_padded(u_rows, pad)
    width, text_vocab = ids.shape[1], len(fwm.tokenizer)
    for _ in range(length):
        logits = _next_logits(fwm.lm, ids, mask)
        if cfg_scale > 1:
            uncond = _next_logits(fwm.lm, u_ids, u_mask)
            logits = uncond + (logits - uncond) * cfg_scale
        logits = logits / sample["temperature"]
        logits[:, :text_vocab] = float("-inf")
        kth = torch.topk(logits, sample["top_k"])[0][..., -1, None]
        logits[logits < kth] = float("-inf")
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > sample["top_p"]
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits.scatter_(1, order, sorted_logits.masked_fill(remove, float("-inf")))
        token = torch.multinomial(logits.softmax(-1), 1)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        u_ids, u_mask = torch.cat([u_ids, token], 1), torch.cat([u_mask, torch.ones_like(token)], 1)
    return ids[:, width:].tolist()


def test_guided_sampling_equals_the_papers_cfg_loop_and_scores_as_sampled(folder: Path) -> None:
    guided = LiquidFWM(str(folder), image_size=32, guidance_scale=3.0).eval()
    sample = {"temperature": 0.75, "top_k": 12, "top_p": 0.96}
    x, _, _ = sprite_pairs(2)
    L = guided.num_image_tokens
    torch.manual_seed(3)
    rollout = guided.sample(x, ACTIONS, **sample)
    torch.manual_seed(3)
    assert rollout.context["input_ids"][:, -L:].tolist() == _paper_generate_batch(
        guided, guided.encode_images(x), sample, L, 3.0
    )
    # GRPO scores the guided policy it sampled, in groups (one prompt pass per group and branch).
    rollout = guided.sample(x, ACTIONS, num_samples=3)
    logp, _ = guided.rollout_logprobs(rollout)
    torch.testing.assert_close(logp, rollout.old_logprobs, atol=1e-5, rtol=1e-5)
    unguided = LiquidFWM(str(folder), image_size=32).eval()
    assert not torch.allclose(unguided.rollout_logprobs(rollout)[0], logp, atol=1e-3)


def test_log_likelihood_is_a_direct_forwards_mean_code_logprob(fwm: LiquidFWM) -> None:
    x, y, z = sprite_pairs(2)
    ids, mask = fwm.pair_ids(x, z, y)
    L = fwm.num_image_tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = fwm.lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -L - 1 : -1].float()
    logp = logits[..., fwm.code_token_ids].log_softmax(-1)
    direct = logp.gather(-1, (ids[:, -L:] - len(fwm.tokenizer)).unsqueeze(-1)).squeeze(-1).mean(-1)
    torch.testing.assert_close(fwm.log_likelihood(x, z, y), direct, atol=1e-5, rtol=1e-5)


def test_rollouts_score_as_sampled_and_save_round_trips(fwm: LiquidFWM, tmp_path: Path) -> None:
    x, y, z = sprite_pairs(2)
    rollout = fwm.sample(x, z, num_samples=3)
    logp, mask = fwm.rollout_logprobs(rollout)
    torch.testing.assert_close(logp, rollout.old_logprobs, atol=1e-5, rtol=1e-5)
    fwm.save_pretrained(tmp_path / "saved")
    loaded = LiquidFWM.from_pretrained(tmp_path / "saved").eval()  # the image size and instruction come along
    assert (loaded.image_size, loaded.instruction) == (32, fwm.instruction)
    torch.testing.assert_close(loaded.log_likelihood(x, z, y), fwm.log_likelihood(x, z, y), atol=0, rtol=0)
    idm = LiquidIDM(str(tmp_path / "saved"), image_size=32, instruction="Which action?")
    idm.save_pretrained(tmp_path / "idm")
    reloaded = LiquidIDM(str(tmp_path / "idm"))
    assert (reloaded.image_size, reloaded.instruction) == (32, "Which action?")


def test_a_missing_folder_names_the_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="Junfeng5/Liquid_V1_7B.*chameleon_vqgan"):
        LiquidFWM(str(tmp_path / "nothing"))
    # The paper's config stops before loading anything, naming each missing input once (FWM and IDM share a folder).
    from swirl_vl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/aurorabench_liquid.yaml"])
    message = str(stop.value.code)
    assert message.count("Liquid checkpoint not found at 'checkpoints/Liquid_V1_7B'") == 1, message
    assert message.count("vq_path 'checkpoints/chameleon_vq'") == 1 and "split 'test'" in message


def paper_idm_prompt(tokenizer, x_codes: torch.Tensor, y_codes: torch.Tensor, instruction: str) -> list[int]:
    """The paper's IDM prompt: Gemma's chat turn around ``<boi><image><eoi>`` × 2, split at ``<image>``."""
    text = (
        f"<start_of_turn>user\n<boi><image><eoi><boi><image><eoi>\n{instruction}<end_of_turn>\n<start_of_turn>model\n"
    )
    chunks = [tokenizer(c).input_ids for c in text.split("<image>")]
    offset = int(chunks[0][0] == tokenizer.bos_token_id)
    x, y = ((c + len(tokenizer)).tolist() for c in (x_codes, y_codes))
    return chunks[0] + x + chunks[1][offset:] + y + chunks[2][offset:]


@pytest.fixture(scope="module")
def idm(folder: Path) -> LiquidIDM:
    return LiquidIDM(str(folder), image_size=32).eval()


def test_idm_prompts_are_the_papers_and_actions_end_with_end_of_turn(idm: LiquidIDM) -> None:
    x, y, z = sprite_pairs(2)
    ids, _ = idm.prompt_ids(x, y)
    for row, xc, yc in zip(ids, idm.encode_images(x), idm.encode_images(y)):
        assert row.tolist() == paper_idm_prompt(idm.tokenizer, xc, yc, idm.instruction)
    assert idm.tokenizer.convert_ids_to_tokens(idm.eos_token_id) == "<end_of_turn>"
    assert idm.tokenizer.eos_token_id in idm.stop_token_ids.tolist()
    # log Q(z | x, y): the mean log-prob of z's tokens and <end_of_turn> under the text-only policy.
    answer = idm.tokenizer(z[0], add_special_tokens=False).input_ids + [idm.eos_token_id]
    full = torch.tensor([ids[0].tolist() + answer])
    logits = idm.lm(input_ids=full).logits[0, -len(answer) - 1 : -1].float()
    logits[:, idm.non_text] = float("-inf")
    direct = logits.log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).mean()
    torch.testing.assert_close(idm.log_likelihood(x[:1], y[:1], z[:1])[0], direct, atol=1e-5, rtol=1e-5)


def test_idm_rollouts_score_as_sampled_and_one_liquid_serves_both_roles(fwm: LiquidFWM, idm: LiquidIDM) -> None:
    x, y, _ = sprite_pairs(2)
    rollout = idm.sample(x, y, num_samples=3, max_new_tokens=6)
    logp, mask = idm.rollout_logprobs(rollout)
    torch.testing.assert_close(logp[mask], rollout.old_logprobs[mask], atol=1e-5, rtol=1e-5)
    shared = LiquidIDM.sharing(fwm, instruction="Which action?")
    assert shared.lm is fwm.lm and shared.vq is fwm.vq and shared.instruction == "Which action?"
    with pytest.raises(TypeError, match="LiquidFWM"):
        LiquidIDM.sharing(object())  # type: ignore[arg-type]


def test_the_all_liquid_config_runs_sft_and_both_phases(tmp_path: Path) -> None:
    """``configs/sprites_liquid.yaml`` through the CLI on a tiny schedule; the saved FWM loads as a Gemma LM."""
    from tests.test_cli import fit_tiny_schedule

    run = fit_tiny_schedule(tmp_path, "sprites_liquid.yaml", phase2_steps=2)
    saved = run / "pretrained"
    assert isinstance(AutoModelForCausalLM.from_pretrained(saved / "iteration_1_phase1" / "fwm"), GemmaForCausalLM)
    assert LiquidIDM(str(saved / "iteration_1_phase2" / "idm"), image_size=32).lm.config.model_type == "gemma"


def test_unconditional_dropout_trains_the_branch_guidance_subtracts(folder: Path) -> None:
    x, y, z = sprite_pairs(2)
    always = LiquidFWM(str(folder), image_size=32, unconditional_dropout=1.0)
    unconditional = -always.code_logprobs(*always.pair_ids(x, z, y, unconditional=[True, True])).mean()
    conditional = -always.code_logprobs(*always.pair_ids(x, z, y)).mean()
    always.train()
    torch.testing.assert_close(always.sft_loss(x, z, y), unconditional)
    always.eval()  # evaluation never drops: the loss is the conditional one
    torch.testing.assert_close(always.sft_loss(x, z, y), conditional)
    assert not torch.allclose(unconditional, conditional)
    with pytest.raises(ValueError, match="unconditional_dropout"):
        LiquidFWM(str(folder), image_size=32, unconditional_dropout=1.5)
