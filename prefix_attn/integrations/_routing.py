"""How a prefix reaches a decoder's attention: keyword arguments, positions and generation.

The prefix never enters the HF cache. It travels as two extra keyword arguments of the model's
forward, which transformers hands unchanged through the model (GPT2Model, LlamaModel, ...) and every
layer to the attention function (prefix_attn.integrations.hf_attention.prefix_attn_forward):

- ``prefix_kv``: tuple over layers of (k, v), each (P, kv_heads, head_dim) shared by the batch or a
  bank (T, P, kv_heads, head_dim);
- ``prefix_idx``: (batch,) integer, each sequence's task in the bank (banks only).

Under gradient checkpointing with use_reentrant=False the checkpoint captures these keyword
arguments, so gradients still reach the prefix. ``generate`` refuses unknown keyword arguments, so
for generation they are added by a wrapped ``prepare_inputs_for_generation`` (see
``add_prefix_to_model_inputs``): only ``prefix_idx`` is a generate keyword, which generate repeats
for beams and num_return_sequences like any per-sequence tensor; the prefix itself is never
repeated.

Positions follow PEFT: with the prefix in its cache, PEFT's sequences start at position P. Here the
cache holds only the sequence, so the positions the model would compute (or those the caller
gives) are passed explicitly, shifted by P: GPT-2 looks up position embeddings P + i, rotary models
(Llama, Mistral, Qwen2) rotate new queries and keys by P + i while the prefix keys stay unrotated,
exactly as under PEFT, whose cache holds the prefix as given. With a static cache (StaticCache, generate's
cache_implementation="static") nothing here reads the cache's fill level from the device unless
the cache could outgrow GPT-2's position table (see ``_check_positions_fit``).

Caches: DynamicCache and StaticCache (and the other single-stack caches transformers builds from a
config without sliding layers). An encoder-decoder cache or one with sliding-window layers is refused
(``check_supported_cache``).
"""
from typing import Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, EncoderDecoderCache

PREFIX_KV_KWARG = "prefix_kv"
PREFIX_IDX_KWARG = "prefix_idx"
# The keyword under which a forward receives the HF cache: transformers 5.24 renamed past_key_values to
# cache (the old name is still accepted by the models until 5.40), and generate() passes cache from 5.24 on.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_argument(inputs: dict):
    """The HF cache a forward's keyword arguments carry (under ``cache`` or ``past_key_values``), or None.

    Raises ValueError when both names carry one: the model would take one and the routing could read
    the other.
    """
    given = [name for name in CACHE_KWARGS if inputs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("pass the cache as either cache= or past_key_values=, not both")
    return inputs[given[0]] if given else None


def check_supported_cache(cache) -> None:
    """ValueError for an HF cache the fused attention cannot be handed: an encoder-decoder cache, or one
    with sliding-window layers (which would keep only the last window of keys)."""
    if cache is None:
        return
    if isinstance(cache, EncoderDecoderCache):
        raise ValueError("an EncoderDecoderCache is not supported: prefix attention is for decoder-only models")
    if any(getattr(cache, "is_sliding", ())):
        raise ValueError(f"a {type(cache).__name__} with sliding-window layers is not supported: the fused prefix "
                         "attention needs every cached key (build the model without sliding-window attention)")


def past_length(past_key_values) -> Union[int, torch.Tensor]:
    """Number of sequence positions already in the HF cache.

    An int (0 for None or an empty cache); for a StaticCache that holds keys, the 0-d tensor it keeps
    on the device (reading it would synchronise with the device, which static-cache decoding avoids).
    """
    if past_key_values is None:
        return 0
    if isinstance(past_key_values, Cache):
        length = past_key_values.get_seq_length()
        return length if isinstance(length, torch.Tensor) else int(length)
    raise TypeError(f"past_key_values must be a transformers Cache or None, got {type(past_key_values).__name__}")


def _check_positions_fit(prefix_len: int, n_positions: Optional[int], seq_len: int, past_key_values) -> None:
    """ValueError when P + past + L exceeds n_positions (GPT-2's position embeddings end there); no
    check when n_positions is None (rotary models).

    For a static cache, past + L is bounded by its max_cache_len (get_mask_sizes reports it): the
    device-side fill level is read only when that bound does not already fit.
    """
    if n_positions is None:
        return
    past = past_length(past_key_values)
    if isinstance(past, torch.Tensor):
        capacity, _ = past_key_values.get_mask_sizes(seq_len, 0)
        if prefix_len + capacity <= n_positions:
            return
        past = int(past)
    if prefix_len + past + seq_len > n_positions:
        raise ValueError(
            f"input too long: a prefix of {prefix_len} virtual tokens puts this sequence (length {seq_len}"
            + (f", {past} positions already cached" if past else "")
            + f") at positions up to {prefix_len + past + seq_len - 1}, but GPT-2 has only "
            f"n_positions={n_positions} position embeddings: P + L must be <= {n_positions}")


def shifted_position_ids(prefix_len: int, n_positions: Optional[int], seq_len: int, past_key_values,
                         position_ids: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Position ids for a sequence behind a prefix of ``prefix_len`` virtual tokens.

    Args:
        prefix_len: P.
        n_positions: the model's number of absolute position embeddings (GPT-2's config.n_positions), or
            None for a rotary model (no limit).
        seq_len: L, the number of new tokens in this forward.
        past_key_values: None or the HF cache of this forward (its length is the positions already cached).
        position_ids: (batch, L) or (1, L) the caller's positions, or None for the positions GPT2Model
            would compute, arange(past, past + L) of shape (1, L) (GPT2Model and LlamaModel alike).
    Returns:
        P + position_ids, as PEFT's prefix tuning positions them.
    Raises:
        ValueError when P + past + L exceeds n_positions (GPT-2's position embeddings end there), and
        for an unsupported cache (``check_supported_cache``).
    """
    check_supported_cache(past_key_values)
    _check_positions_fit(prefix_len, n_positions, seq_len, past_key_values)
    if position_ids is None:
        past = past_length(past_key_values)
        if isinstance(past, torch.Tensor):  # a static cache: stay on the device
            position_ids = (torch.arange(seq_len, device=device) + past.to(device)).unsqueeze(0)
        else:
            position_ids = torch.arange(past, past + seq_len, device=device).unsqueeze(0)
    return position_ids + prefix_len


def input_length(input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor]) -> tuple[int, int]:
    """(batch, L) of a forward's input, from input_ids (B, L) or inputs_embeds (B, L, d)."""
    if input_ids is not None:
        return input_ids.shape[0], input_ids.shape[-1]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0], inputs_embeds.shape[1]
    raise ValueError("pass input_ids or inputs_embeds")


def add_prefix_to_model_inputs(model_inputs: dict, prefix_kv: Sequence, prefix_len: int, n_positions: Optional[int],
                               prefix_idx: Optional[torch.Tensor] = None) -> dict:
    """Complete the inputs ``prepare_inputs_for_generation`` built for one generation step.

    Shifts position_ids by P (those generate computed, or those the model would compute) and adds
    the prefix keyword arguments. ``prefix_idx`` is the (batch * beams,) tensor generate expanded.
    """
    input_ids, inputs_embeds = model_inputs.get("input_ids"), model_inputs.get("inputs_embeds")
    _, seq_len = input_length(input_ids, inputs_embeds)
    device = (input_ids if input_ids is not None else inputs_embeds).device
    model_inputs["position_ids"] = shifted_position_ids(
        prefix_len, n_positions, seq_len, cache_argument(model_inputs), model_inputs.get("position_ids"), device)
    model_inputs[PREFIX_KV_KWARG] = prefix_kv
    if prefix_idx is not None:
        model_inputs[PREFIX_IDX_KWARG] = prefix_idx
    return model_inputs
