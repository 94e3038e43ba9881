"""What the token backends share around ``generate``: group sampling that prefills each prompt once, and the
sampler's own log-probs, recorded as it samples (no second forward pass).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from transformers import GenerationMixin, JanusForConditionalGeneration, LogitsProcessor


class RecordLogprobs(LogitsProcessor):
    """Records the log-prob of every generated token under ``log_softmax(scores / temperature)``.

    Placed in ``generate``'s ``logits_processor`` list, it runs after transformers' built-in processors and the ones
    listed before it (e.g. a restriction to image tokens), and before the sampling warpers (temperature, top-k,
    top-p): so it sees the scores the policy is defined by, and the token chosen at step ``t`` is read from
    ``input_ids`` at step ``t + 1`` (the last one by ``finish``). Only one step's ``(N, V)`` log-softmax is held.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature
        self._steps: list[Tensor] = []
        self._pending: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._pending is not None:
            self._steps.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._pending = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, sequences: Tensor) -> Tensor:
        """``(N, L)`` log-probs of the ``L`` generated tokens, the last ``L`` columns of ``sequences``."""
        if self._pending is not None:
            self._steps.append(self._pending.gather(-1, sequences[:, -1:]).squeeze(-1))
            self._pending = None
        steps, self._steps = self._steps, []
        return torch.stack(steps, 1)


class _RowHead(nn.Module):
    """An output head that computes the logits of vocabulary ``rows`` only, with the full head's own weight."""

    def __init__(self, head: nn.Linear, rows: Tensor) -> None:
        super().__init__()
        self.head, self.rows = head, rows

    def forward(self, hidden: Tensor) -> Tensor:
        bias = None if self.head.bias is None else self.head.bias[self.rows]
        return F.linear(hidden, self.head.weight[self.rows], bias)


@contextmanager
def head_rows(model: nn.Module, rows: Tensor) -> Iterator[None]:
    """Within the block, ``model``'s forward returns logits over vocabulary ``rows`` only: ``(…, K)`` instead of
    ``(…, V)``. Scoring 1,024 image positions of a 264k-word model then holds 8,192 logits per position, not 264k
    (what follows the head, such as a logit soft-cap, is elementwise and unchanged). Gradients reach the kept rows
    of the head's weight. Not for ``generate``, whose sampled ids index the whole vocabulary."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(_RowHead(head, rows))
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def left_pad_positions(attention_mask: Tensor) -> Tensor:
    """Position ids that count real tokens only, as ``generate`` computes them for left-padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill_once(model: nn.Module, prompt: Mapping[str, Tensor], positions: Tensor, group_size: int) -> Any:
    """Run each of the ``B`` prompts once and repeat its KV cache ``group_size`` times in place (``B * G`` rows,
    group-major); returns the model's output, whose ``logits`` are the prompts' last positions'."""
    head = model(**prompt, position_ids=positions, use_cache=True, logits_to_keep=1)
    head.cache.batch_repeat_interleave(group_size)
    return head


class LogitGuidance(LogitsProcessor):
    """Classifier-free guidance on the logits, as Liquid samples: ``u + scale · (c − u)``, ``c`` the scores of the
    conditional prompts, ``u`` the next-token logits of the unconditional ones.

    The ``B`` unconditional prompts (left-padded) are prefilled once and their KV cache repeated ``group_size``
    times (the ``B * G`` rows of ``generate_groups``); each step then feeds them the token just sampled, so both
    branches see the same image so far. List it first in ``logits_processor``, before any restriction.
    """

    def __init__(self, model: nn.Module, unconditional: Mapping[str, Tensor], scale: float, group_size: int = 1):
        self.model, self.scale = model, scale
        mask = unconditional["attention_mask"]
        head = prefill_once(model, unconditional, left_pad_positions(mask), group_size)
        self.mask = mask.repeat_interleave(group_size, 0)
        self.cache, self._next = head.cache, head.logits[:, -1].repeat_interleave(group_size, 0)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._next is None:  # after the first step: run the token sampled at the last one
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
            out = self.model(
                input_ids=input_ids[:, -1:],
                attention_mask=self.mask,
                position_ids=self.mask.sum(-1, keepdim=True) - 1,
                cache=self.cache,
                use_cache=True,
            )
            self.cache, self._next = out.cache, out.logits[:, -1]
        unconditional, self._next = self._next.to(scores.dtype), None
        return unconditional + self.scale * (scores - unconditional)


def generate_groups(
    model: nn.Module, inputs: Mapping[str, Tensor], group_size: int, share_prefill: bool = True, **generate_kwargs: Any
) -> Tensor:
    """``model.generate`` with every prompt of ``inputs`` (left-padded, ``B`` rows) repeated ``group_size`` times,
    group-major; returns the ``(B * group_size, T + L)`` sequences.

    ``share_prefill``: run the prompts through the model once (``B`` rows, not ``B * G``) and repeat their KV cache
    ``G`` times before decoding, instead of ``num_return_sequences``, which prefills ``G`` identical copies (vision
    tower included). Only for models whose positions follow the attention mask (not multimodal RoPE).
    """
    if is_sharded(model):
        # Every process must run as many forward passes: all decode until the last has finished. And transformers'
        # generate calls parts of the model (its image features) outside its forward, so the model's outer weights
        # are gathered for the whole call (its blocks still gather their own in their forward).
        generate_kwargs.setdefault("synced_gpus", True)
        with outer_weights_gathered(model):
            return _generate_groups(model, inputs, group_size, share_prefill, **generate_kwargs)
    return _generate_groups(model, inputs, group_size, share_prefill, **generate_kwargs)


def _generate_groups(
    model: nn.Module, inputs: Mapping[str, Tensor], group_size: int, share_prefill: bool, **generate_kwargs: Any
) -> Tensor:
    generate = text_generate(model)
    if group_size == 1:
        return generate(**inputs, **generate_kwargs)
    if not share_prefill:
        config = generate_kwargs.pop("generation_config", None)
        if config is None:
            return generate(**inputs, num_return_sequences=group_size, **generate_kwargs)
        config = copy.deepcopy(config)  # transformers takes a config or loose settings, not both
        config.num_return_sequences = group_size
        return generate(**inputs, generation_config=config, **generate_kwargs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    # Everything but the last prompt token: generate() runs that one itself and samples from its logits.
    prompt = {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], **extra}
    cache = prefill_once(model, prompt, left_pad_positions(mask)[:, :-1], group_size).cache
    return generate(
        input_ids=ids.repeat_interleave(group_size, 0),
        attention_mask=mask.repeat_interleave(group_size, 0),
        cache=cache,
        **generate_kwargs,
    )


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded modules: each of their forward passes is then a collective."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def outer_weights_gathered(model: nn.Module) -> Iterator[None]:
    """Within: the weights of ``model``'s outermost FSDP2 units are gathered (not those of the blocks inside)."""
    outer: list[tuple[str, FSDPModule]] = []
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule) and not any(name.startswith(f"{o}.") or not o for o, _ in outer):
            outer.append((name, module))
    for _, module in outer:
        module.unshard()
    try:
        yield
    finally:
        for _, module in outer:
            module.reshard()


def text_generate(model: nn.Module) -> Callable[..., Tensor]:
    """The model's text ``generate``. Janus overrides ``generate`` and, in its text mode, drops ``logits_processor``
    (transformers 5.24) before handing on to ``GenerationMixin.generate`` with no guidance: that is called directly
    for it, so the processors that record and restrict sampling are kept."""
    if isinstance(model, JanusForConditionalGeneration):
        return functools.partial(GenerationMixin.generate, model, guidance_scale=None)
    return model.generate


def shares_prompts(model: nn.Module) -> bool:
    """Whether ``grouped_tail_logits`` can run on ``model`` now: not while gradient checkpointing trains it (which
    turns the KV cache off)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers ≥ 5.2x; before: is_gradient_…
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return not (model.training and checkpointing)


def tail_logits(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    length: int,
    group_size: int = 1,
    per_token: tuple[str, ...] = (),
    mask_positions: bool = True,
) -> Tensor:
    """``(N, L, V)`` logits that predict the last ``L = length`` tokens of each row of ``inputs`` (left-padded).

    ``group_size > 1``: rows come in groups sharing their prompt, which then runs once per group
    (``grouped_tail_logits``), unless gradient checkpointing turns the cache off. Otherwise one forward pass over
    every row. ``mask_positions``: positions count real tokens only, as ``generate`` computes them for left padding
    (False for models that derive their own, e.g. multimodal RoPE).
    """
    if group_size > 1 and shares_prompts(model):
        return grouped_tail_logits(model, inputs, length, group_size, per_token)
    kwargs = dict(inputs)
    if mask_positions:
        kwargs["position_ids"] = left_pad_positions(inputs["attention_mask"])
    # Positions T-L-1 .. T-2 predict the L tail tokens; the last position predicts nothing.
    return model(**kwargs, logits_to_keep=length + 1, use_cache=False).logits[:, :-1]


def grouped_tail_logits(
    model: nn.Module, inputs: Mapping[str, Tensor], length: int, group_size: int, per_token: tuple[str, ...] = ()
) -> Tensor:
    """``(N, L, V)`` logits that predict the last ``L = length`` tokens of each row of ``inputs`` (left-padded), for
    rows that come in groups of ``group_size`` sharing everything before those tokens (a rollout group's prompt).

    The prompt runs once per group (``N / G`` rows, with grad) and its KV cache is repeated for the ``L`` tail
    tokens, instead of running ``G`` copies of it; a group's identical rows (the same sample drawn twice, common in
    a rollout group) run their tail once too. The same logits up to float error, and the gradient reaches the
    prompt's activations through the repeated cache and each row through its copy of the shared tail.
    ``per_token``: keys other than ``input_ids`` / ``attention_mask`` with one entry per token (split like them);
    every other key (images) is laid out per row in equal blocks and is given to the prompt pass only.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n, width = ids.shape
    p = width - length
    positions = left_pad_positions(mask)
    # A group's identical rows (the same sample drawn twice) share their tail: it runs for the kept rows only.
    kept, inverse = distinct_rows_in_groups([ids, mask, *(inputs[k] for k in per_token if k in inputs)], group_size)
    prompt = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask", *per_token):
            prompt[key] = value[::group_size, :p]
        else:  # per-row blocks (two images of a pair, say): the first row's block of each group
            blocks = value.reshape(n, value.shape[0] // n, *value.shape[1:])
            prompt[key] = blocks[::group_size].flatten(0, 1)
    head = model(**prompt, position_ids=positions[::group_size, :p], use_cache=True, logits_to_keep=1)
    groups = kept // group_size
    head.cache.batch_select_indices(groups)  # each kept row gets its group's prompt cache
    tail = model(
        input_ids=ids[kept, p:],
        attention_mask=mask[kept],
        position_ids=positions[kept, p:],
        cache=head.cache,
        use_cache=True,
        logits_to_keep=length,
        **{key: inputs[key][kept, p:] for key in per_token if key in inputs},
    ).logits
    # The prompt's last position predicts the first tail token; tail position j predicts tail token j + 1.
    logits = torch.cat([head.logits[groups, -1:], tail[:, :-1]], 1)
    return logits if kept.numel() == n else logits[inverse]


def per_distinct_row(fn: Callable[[Tensor], Tensor], rows: Tensor, multiple: int = 8) -> Tensor:
    """``fn(rows)`` for a row-wise ``fn``, run on each distinct row once: a rollout group that draws the same image
    codes twice decodes them once. The same output as ``fn(rows)`` up to float error.

    The distinct rows are padded (with copies of the first) to a multiple of ``multiple``: a convolution keeps
    buffers for every batch size it meets, and a size that changed with every call grew a CPU process by ~300 MiB
    over 40 calls; in multiples of 8 there are at most ``N / 8`` sizes."""
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    padded = -(-distinct.shape[0] // multiple) * multiple
    if padded >= rows.shape[0]:
        return fn(rows)
    filler = distinct[:1].expand(padded - distinct.shape[0], *distinct.shape[1:])
    return fn(torch.cat([distinct, filler]))[inverse]


def distinct_rows_in_groups(columns: list[Tensor], group_size: int) -> tuple[Tensor, Tensor]:
    """Rows of ``columns`` (tensors of ``N`` rows, compared together, exactly) that are distinct within their group
    of ``group_size`` consecutive rows: ``kept (R,)``, the first row of each distinct one, in row order, and
    ``inverse (N,)``, each row's position in ``kept``. Rows of different groups are never merged (their images may
    differ)."""
    n = columns[0].shape[0]
    group = torch.arange(n, device=columns[0].device) // group_size
    # float64 holds token ids and float32 pixels exactly: one table to compare
    flat = torch.cat([group[:, None].double(), *(c.reshape(n, -1).double() for c in columns)], 1)
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n, device=flat.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=flat.device), reduce="amin")
    order = first.argsort()  # distinct rows in the order they first appear: no repeats, kept is 0 … N-1
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return first[order], position[inverse]
