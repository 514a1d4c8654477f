"""GPT-2 attention through the fused op: transformers registration and the one-line patch.

``apply_prefix_attn_to_gpt2(model)`` registers two functions with transformers under the name
``"prefix_attn"`` and selects it:

- the attention function ``prefix_attn_forward`` (AttentionInterface): GPT2Attention hands it
  q, k, v as (B, H, L, D) views; it passes their (B, L, H, D) transposes (no copies) to
  ``prefix_attn_func`` with the layer's prefix, if one travels with the forward (see
  prefix_attn.integrations._routing), and returns (out (B, Lq, H, D), None);
- the mask function ``prefix_attn_mask`` (AttentionMaskInterface): it hands over the 2-D (B, Lk)
  padding mask, or None when nothing is padded, and leaves causality to the kernel (bottom-right
  aligned, so training, prefill and cached decoding alike). Without a registered mask function
  transformers silently builds no mask for a custom name, losing causality and padding.

Static (preallocated) caches, ``generate(..., cache_implementation="static")`` or a ``StaticCache``:
the layers hand the attention function keys and values of the whole buffer, max_cache_len slots of
which only the first past + Lq are filled, so bottom-right alignment over the buffer would be wrong.
The mask function then hands over a key mask in which the unfilled slots are masked:

- one query per sequence (a decode step): a (B, max_cache_len) mask, padding AND slot <= the
  query's cache position, built with tensor ops only (the fill level stays on the device). Shapes do
  not change from step to step and nothing synchronises with the host, so the step compiles with
  torch.compile(fullgraph=True), as CUDA-graph capture needs. With a single query, causal
  alignment is no constraint (it sees every unmasked key), so the key mask is the whole answer.
- several queries (prefill, speculative or chunked steps) need per-query causality, which a key mask
  cannot express: the mask covers only the filled slots, (B, past + Lq), and the attention function
  attends over that many leading slots of the buffer (a view), where bottom-right alignment is right.
  Its length is a host integer: the fill level is read from the device once per forward. That is
  fine eagerly (generate() runs the prefill uncompiled). Inside torch.compile it would be a
  data-dependent shape, so the mask function raises a ValueError while dynamo traces: with
  fullgraph=True compilation fails with it as the reported cause; without fullgraph dynamo breaks
  the graph there and runs that part eagerly.

Mask column j is cache slot j, as in transformers' own masks: generate's (B, past + Lq) mask, or
one over the whole cache. One case cannot be told apart from a plain call and keeps the plain
reading: the first forward into a fresh StaticCache with a single token and a mask over all
max_cache_len slots (its unfilled slots would count as keys unless that mask masks them).

The name holds no "flash" (transformers would try to load flash-attn) and no "/" (it would be taken
for a hub kernel).
"""
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel

from prefix_attn import prefix_attn_func
from prefix_attn.integrations._traced_masks import assert_plain_causal_on_device
from prefix_attn.integrations._versions import check_transformers_version

ATTN_IMPLEMENTATION = "prefix_attn"

# Attribute on a patched model remembering the implementation it had before, for revert.
_PREVIOUS_ATTR = "_prefix_attn_previous_implementation"
# GPT2PreTrainedModel.__init__ as it was before the default was switched (None: inherited).
_SAVED_INIT = "_prefix_attn_saved_init"


def prefix_attn_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                        scaling: Optional[float] = None, prefix_kv=None, prefix_idx: Optional[torch.Tensor] = None,
                        **kwargs):
    """Attention function for transformers' AttentionInterface (GPT-2 self-attention).

    Args:
        module: the GPT2Attention calling (its ``layer_idx`` picks the layer's prefix).
        query: (B, H, Lq, D); key, value: (B, H, Lk, D), the cache's keys included, Lq <= Lk (with a
            static cache, Lk = max_cache_len, the whole buffer).
        attention_mask: None or the 2-D bool key mask from ``prefix_attn_mask``: (B, Lk), or (B, n) with
            n < Lk for a static cache with several queries, meaning that only the first n slots of
            key/value are filled; they are attended (a view, no copy) and the rest ignored.
        dropout: attention dropout probability (GPT-2 gives attn_pdrop in training, 0 in eval).
        scaling: softmax scale, GPT2Attention.scaling (includes scale_attn_by_inverse_layer_idx).
        prefix_kv: None, or a tuple over layers of (k, v), each (P, H, D) or a bank (T, P, H, D).
        prefix_idx: (B,) integer task of each sequence, with a bank.
        kwargs: the rest of what transformers passes (position_ids, use_cache, ...), unused.
    Returns:
        (out (B, Lq, H, D), None): no attention weights are materialised.
    """
    if getattr(module, "is_cross_attention", False):
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} supports GPT-2 self-attention only, "
                         "not cross-attention (config.add_cross_attention=True)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} takes the 2-D (batch, seqlen) padding mask, got an "
            f"attention_mask of shape {tuple(attention_mask.shape)}: custom 4-D masks are not supported")
    if attention_mask is not None and attention_mask.shape[-1] < key.shape[2]:
        key, value = filled_slots(key, value, attention_mask.shape[-1])
    prefix_k = prefix_v = None
    if prefix_kv is not None:
        n_layer = module.config.num_hidden_layers
        if len(prefix_kv) != n_layer:
            raise ValueError(f"prefix_kv must hold (k, v) for each of the model's {n_layer} layers, got "
                             f"{len(prefix_kv)}")
        prefix_k, prefix_v = prefix_kv[module.layer_idx]
        # Under autocast q is in the autocast dtype while a stored prefix may be float32: compute in
        # q's dtype, as autocast would for the [prefix; keys] matmul (a no-op without autocast).
        prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
    elif prefix_idx is not None:
        raise ValueError("prefix_idx was given without prefix_kv")
    out = prefix_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), prefix_k, prefix_v,
        prefix_idx=prefix_idx, attention_mask=attention_mask, causal=True, softmax_scale=scaling,
        dropout_p=dropout, backend="auto")
    return out, None


def filled_slots(key: torch.Tensor, value: torch.Tensor, n_filled: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_filled`` slots of a static cache's (B, H, max_cache_len, D) key and value buffers (views)."""
    return key[:, :, :n_filled], value[:, :, :n_filled]


def is_static_cache_call(q_length: int, kv_length: int, q_offset, kv_offset: int,
                         attention_mask: Optional[torch.Tensor]) -> bool:
    """Whether create_causal_mask describes a forward over a preallocated cache (transformers' StaticCache).

    Args: as ``prefix_attn_mask`` receives them.

    A StaticCache that holds keys reports its fill level q_offset as a 0-d tensor, and kv_length =
    max_cache_len. Before its first update it reports the int 0 while kv_length = max_cache_len still
    exceeds q_offset + q_length; without a cache or with a DynamicCache the two are equal (except
    without a cache when the 2-D mask is longer than the input: kv_length is then the mask's length).
    With an int q_offset the static reading (mask column j is cache slot j) is taken when the mask is
    absent, covers no more than the filled positions (generate's (B, past + Lq)), or covers all
    kv_length slots for several queries (for which the plain reading would misplace the queries). A
    single query with a mask over all kv_length keys keeps the plain reading, as before; a mask that
    ends between the filled positions and kv_length is refused by the plain path.
    """
    if isinstance(q_offset, torch.Tensor):
        return True
    n_filled = q_offset + q_length
    if n_filled >= kv_length + kv_offset:
        return False
    if attention_mask is None or attention_mask.shape[-1] <= n_filled:
        return True
    return attention_mask.shape[-1] == kv_length and q_length > 1


def static_cache_mask(batch_size: int, q_length: int, kv_length: int, q_offset,
                      attention_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """Key mask for a forward over a static cache (see the module docstring).

    Args:
        batch_size: B.
        q_length: Lq, the queries of this forward.
        kv_length: max_cache_len, the slots of the buffer the attention function receives.
        q_offset: slots filled before this forward: a 0-d integer tensor, or an int (a fresh cache).
        attention_mask: None or the (B, n) bool padding mask; column j is cache slot j (n may be
            past + Lq, as generate passes it, up to max_cache_len; missing columns count as padding).
        device: where to build the mask when attention_mask is None.
    Returns:
        Lq == 1: (B, kv_length) bool, padding AND slot <= q_offset (no host synchronisation);
        Lq > 1: (B, q_offset + Lq) bool, the padding of the filled slots (q_offset is read on the host).
    Raises:
        ValueError for a mask longer than the cache, and for Lq > 1 while torch.compile traces (the fill
        level would be a data-dependent shape).
    """
    if attention_mask is not None:
        if attention_mask.shape[-1] > kv_length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but the static cache holds "
                             f"only max_cache_len={kv_length}")
        attention_mask = attention_mask.bool()  # a no-op for the bool masks create_causal_mask passes
    if q_length == 1:
        offset = q_offset if isinstance(q_offset, torch.Tensor) else torch.tensor(q_offset)
        offset = offset.to(attention_mask.device if attention_mask is not None else device)
        filled = torch.arange(kv_length, device=offset.device) <= offset  # (kv_length,)
        if attention_mask is None:
            return filled.expand(batch_size, kv_length)
        padded = torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]))
        return padded & filled
    if isinstance(q_offset, torch.Tensor):
        if torch.compiler.is_compiling():
            raise ValueError(
                f"attn_implementation={ATTN_IMPLEMENTATION!r}: a forward of {q_length} tokens per sequence over a "
                "static cache (prefill, chunked prefill or speculative steps) needs the cache's fill level as a "
                "host integer and cannot be compiled; run it eagerly (generate() does so for the prefill) and "
                "compile only the one-token decode steps")
        q_offset = int(q_offset)
    n_filled = q_offset + q_length
    if attention_mask is None:
        return torch.ones(batch_size, n_filled, dtype=torch.bool, device=device)
    if attention_mask.shape[-1] < n_filled:
        return torch.nn.functional.pad(attention_mask, (0, n_filled - attention_mask.shape[-1]))
    return attention_mask[:, :n_filled]


def prefix_attn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                     mask_function=causal_mask_function, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """Mask function for transformers' AttentionMaskInterface (called by create_causal_mask).

    Args:
        batch_size, q_length: B and Lq of the forward.
        kv_length, kv_offset: the keys the attention function will receive (kv_length = max_cache_len
            for a static cache).
        q_offset: positions cached before this forward (a 0-d tensor for a StaticCache that holds keys).
        mask_function: must be transformers' plain causal_mask_function.
        attention_mask: None or the 2-D (B, n) bool padding mask.
        kwargs: the rest transformers passes (device, dtype, config, ...); ``device`` is used.
    Returns:
        Without a static cache, the (B, kv_length) bool padding mask (None when transformers gives
        none; a mask that pads nothing is handed over as it is, without reading it, so no host
        sync); causality is applied by the kernel. With a static cache, the mask of ``static_cache_mask``.
    Raises:
        ValueError for masks it cannot express as causal + padding (packed sequences, added mask
        functions), for a mask shorter than the keys of a cache that is not a StaticCache, and see
        ``static_cache_mask``.
    """
    if mask_function is not causal_mask_function and attention_mask is None and torch.compiler.is_compiling():
        # Traced without a mask: transformers could not rule packed sequences out (see _traced_masks).
        assert_plain_causal_on_device(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                                      kwargs.get("device", "cpu"))
        mask_function = causal_mask_function
    if mask_function is not causal_mask_function:
        # create_causal_mask wraps causal_mask_function for packed sequences (position_ids that restart
        # within a row) or extra or/and mask functions: the kernel would silently ignore them.
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} supports causal attention with a padding mask only; "
            "transformers asked for another mask pattern (packed sequences, i.e. position_ids that restart "
            "within a row, or an added mask function)")
    if is_static_cache_call(q_length, kv_length, q_offset, kv_offset, attention_mask):
        return static_cache_mask(batch_size, q_length, kv_length, q_offset, attention_mask,
                                 kwargs.get("device", "cpu"))
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[-1] != kv_length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the keys have {kv_length}: "
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs a mask over every cached key, or, with transformers' "
            "StaticCache, one over the positions filled so far as generate() passes it (in static caches mask column "
            "j is cache slot j); other static caches are not supported")
    # Handed over as it is, also when nothing is padded: finding that out (attention_mask.all()) would
    # read the device once per forward, a host sync; the kernels read the mask at little cost.
    return attention_mask


def register_prefix_attn() -> str:
    """Register the attention and mask functions with transformers (repeatable); return their name."""
    check_transformers_version()
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attn_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_attn_mask)
    return ATTN_IMPLEMENTATION


def check_gpt2_model(model, caller: str) -> None:
    """TypeError unless ``model`` is a transformers GPT-2 model; ValueError for cross-attention GPT-2."""
    if not isinstance(model, GPT2PreTrainedModel):
        raise TypeError(f"{caller} supports transformers GPT-2 models (GPT2PreTrainedModel subclasses such as "
                        f"GPT2LMHeadModel), got {type(model).__name__}")
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError(f"{caller}: GPT-2 with cross-attention (config.add_cross_attention=True) is not supported")


def check_prefix_attn_selected(model, caller: str) -> None:
    """RuntimeError unless ``model`` runs attn_implementation="prefix_attn".

    Any other attention function would ignore the prefix keyword arguments, silently: the routes that
    hand over a prefix check this on every call (a string comparison).
    """
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(
            f"{caller}: the GPT-2 model runs attn_implementation={model.config._attn_implementation!r}, which would "
            f"ignore the prefix; it needs {ATTN_IMPLEMENTATION!r} (was revert_prefix_attn_to_gpt2 or "
            "set_attn_implementation called?): apply the patch again")


def _init_with_prefix_attn_default(self, config, *args, **kwargs):
    # Models built after apply_prefix_attn_to_gpt2() with no attn_implementation requested get ours;
    # an explicit request (attn_implementation="eager", say) is kept.
    if getattr(config, "_attn_implementation_internal", None) is None and not getattr(
            config, "add_cross_attention", False):
        config._attn_implementation_internal = ATTN_IMPLEMENTATION
    saved = getattr(GPT2PreTrainedModel, _SAVED_INIT)
    if saved is not None:
        saved(self, config, *args, **kwargs)
    else:
        super(GPT2PreTrainedModel, self).__init__(config, *args, **kwargs)


def apply_prefix_attn_to_gpt2(model: Optional[GPT2PreTrainedModel] = None) -> Optional[GPT2PreTrainedModel]:
    """Use the fused prefix attention for a GPT-2 model, or by default for GPT-2 models built afterwards.

    Args:
        model: a GPT-2 model (GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2ForSequenceClassification, ...)
            to switch now; None makes "prefix_attn" the attention of every GPT-2 model created later
            without an explicit attn_implementation (models built from a config that already carries
            an implementation, e.g. one a previous model was built from, keep it).
    Returns:
        ``model`` (None when model is None).

    Without a prefix the model computes plain causal attention through the fused op (padding,
    attention dropout in training, scale_attn_by_inverse_layer_idx honoured; reorder_and_upcast_attn
    needs nothing: the op accumulates in fp32). Repeatable; ``revert_prefix_attn_to_gpt2`` undoes it.
    Raises RuntimeError for an unsupported transformers, TypeError for a non-GPT-2 model, ValueError for
    GPT-2 with cross-attention; the model is unchanged then.
    """
    if model is not None:
        check_gpt2_model(model, "apply_prefix_attn_to_gpt2")
    register_prefix_attn()
    if model is None:
        if _SAVED_INIT not in GPT2PreTrainedModel.__dict__:
            setattr(GPT2PreTrainedModel, _SAVED_INIT, GPT2PreTrainedModel.__dict__.get("__init__"))
            GPT2PreTrainedModel.__init__ = _init_with_prefix_attn_default
        return None
    current = model.config._attn_implementation
    if current != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"transformers did not switch {type(model).__name__} to "
                               f"attn_implementation={ATTN_IMPLEMENTATION!r}")
        setattr(model, _PREVIOUS_ATTR, current)
    return model


def revert_prefix_attn_to_gpt2(model: Optional[GPT2PreTrainedModel] = None) -> Optional[GPT2PreTrainedModel]:
    """Undo ``apply_prefix_attn_to_gpt2``.

    With a model: back to the implementation it had before (sdpa when it was built with the patch as
    default); a model not using "prefix_attn" is left as is. With None: GPT-2 models created from now
    on get transformers' default again (models already built keep theirs). Repeatable.
    """
    if model is None:
        if _SAVED_INIT in GPT2PreTrainedModel.__dict__:
            saved = GPT2PreTrainedModel.__dict__[_SAVED_INIT]
            delattr(GPT2PreTrainedModel, _SAVED_INIT)
            if saved is None:
                del GPT2PreTrainedModel.__init__
            else:
                GPT2PreTrainedModel.__init__ = saved
        return None
    check_gpt2_model(model, "revert_prefix_attn_to_gpt2")
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        previous = getattr(model, _PREVIOUS_ATTR, None) or "sdpa"
        model.set_attn_implementation(previous)
    if hasattr(model, _PREVIOUS_ATTR):
        delattr(model, _PREVIOUS_ATTR)
    return model
