"""Decoder attention through the fused op: transformers registration and the generic patch.

``apply_prefix_attn(model)`` registers two functions with transformers under the name
``"prefix_attn"`` and selects it for ``model`` (``apply_prefix_attn()`` only registers them, after
which ``attn_implementation="prefix_attn"`` works in from_pretrained / from_config, as for any
registered implementation: transformers accepts every name of AttentionInterface.valid_keys()):

- the attention function ``prefix_attn_forward`` (AttentionInterface): the attention layers of
  GPT-2, Llama, Mistral, Qwen2 (every decoder whose layers call
  ``ALL_ATTENTION_FUNCTIONS.get_interface``) hand it q (B, H, L, D) and k, v (B, Hkv, L, D), the
  keys already rotated (RoPE) and concatenated with the cache; it passes them (no copies, no
  repeat_kv: grouped heads go to the op as they are) to ``prefix_attn_func`` as their (B, L, H, D)
  transposes (prefix_attn.api.causal_attention_heads_first: a call that builds no autograd node on
  CPU skips the transposes) with the layer's prefix (P, Hkv, D), if one travels with the forward (see
  prefix_attn.integrations._routing), and returns (out (B, Lq, H, D), None). Prefix keys are used
  as given, never rotated, as PEFT's prefix in the cache is;
- the mask function ``prefix_attn_mask`` (AttentionMaskInterface): it hands over the 2-D (B, Lk)
  padding mask (None when there is none, or when a CPU mask pads nothing; a mask on a device is
  handed over unread, as reading it would be a host sync), and leaves causality to the kernel
  (bottom-right aligned, so training, prefill and cached decoding alike). Without a registered mask
  function transformers silently builds no mask for a custom name, losing causality and padding.

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

Refused with a ValueError naming the cause, because the kernel would silently compute something else:
sliding-window attention (Mistral with config.sliding_window set, Qwen2 with use_sliding_window),
cross-attention, non-causal layers, logit soft-capping, attention sinks, 4-D custom masks, packed
sequences and added mask functions.

The name holds no "flash" (transformers would try to load flash-attn) and no "/" (it would be taken
for a hub kernel).
"""
import weakref
from typing import Optional

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from prefix_attn.api import causal_attention_heads_first
from prefix_attn.integrations._traced_masks import assert_plain_causal_on_device
from prefix_attn.integrations._versions import check_transformers_version
from prefix_attn.key_masks import lets_every_key_through

ATTN_IMPLEMENTATION = "prefix_attn"

# Attribute on a patched model remembering the implementation it had before, for revert.
_PREVIOUS_ATTR = "_prefix_attn_previous_implementation"


def _refuse_unsupported_call(module: torch.nn.Module, layer_is_causal: bool, kwargs: dict) -> None:
    """ValueError for what an attention call asks for that the fused op does not compute (the layer's own
    attributes: ``_layer_facts``)."""
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} does not support sliding-window attention (layer "
            f"{getattr(module, 'layer_idx', '?')} asks for a window of {kwargs['sliding_window']}): build the model "
            "with config.sliding_window=None (Mistral) or use_sliding_window=False (Qwen2)")
    is_causal = kwargs.get("is_causal")
    if not (layer_is_causal if is_causal is None else is_causal):
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} supports causal (decoder) attention only; "
                         f"{type(module).__name__} asks for non-causal attention")
    for name, what in (("softcap", "logit soft-capping"), ("s_aux", "attention sinks"), ("sinks", "attention sinks")):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} does not support {what} ({name}=...)")


# id(attention layer) -> (weak reference to it, (its model's number of layers or None, its is_causal)), read
# once per layer module: the attributes of a transformers module and config cost microseconds each (a missing
# one raises inside nn.Module.__getattr__), and this runs on every layer call. Keyed by id with the weak
# reference checked, not a WeakKeyDictionary, whose lookups build a weak reference each time (about 3 K
# instructions per layer call).
_LAYER_FACTS: dict = {}


def _layer_facts(module: torch.nn.Module) -> tuple:
    """(n_layer or None without a config, is_causal) of an attention layer; ValueError for a cross-attention layer."""
    compiling = torch.compiler.is_compiling()  # traced once; dynamo need not follow the mapping
    entry = None if compiling else _LAYER_FACTS.get(id(module))
    if entry is not None and entry[0]() is module:
        return entry[1]
    if getattr(module, "is_cross_attention", False):
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} supports decoder self-attention only, not "
                         "cross-attention (config.add_cross_attention=True)")
    config = getattr(module, "config", None)
    facts = (getattr(config, "num_hidden_layers", None), getattr(module, "is_causal", True))
    if not compiling:
        key = id(module)
        _LAYER_FACTS[key] = (weakref.ref(module, lambda _ref, key=key: _LAYER_FACTS.pop(key, None)), facts)
    return facts


def prefix_attn_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                        scaling: Optional[float] = None, prefix_kv=None, prefix_idx: Optional[torch.Tensor] = None,
                        **kwargs):
    """Attention function for transformers' AttentionInterface (decoder self-attention).

    Args:
        module: the attention layer calling (its ``layer_idx`` picks the layer's prefix).
        query: (B, H, Lq, D); key, value: (B, Hkv, Lk, D), H % Hkv == 0, the cache's keys included,
            Lq <= Lk (with a static cache, Lk = max_cache_len, the whole buffer).
        attention_mask: None or the 2-D bool key mask from ``prefix_attn_mask``: (B, Lk), or (B, n) with
            n < Lk for a static cache with several queries, meaning that only the first n slots of
            key/value are filled; they are attended (a view, no copy) and the rest ignored.
        dropout: attention dropout probability (the layer's, in training; 0 in eval).
        scaling: softmax scale as the layer gives it (GPT-2's includes scale_attn_by_inverse_layer_idx;
            Llama's is head_dim ** -0.5).
        prefix_kv: None, or a tuple over layers of (k, v), each (P, Hkv, D) or a bank (T, P, Hkv, D).
        prefix_idx: (B,) integer task of each sequence, with a bank.
        kwargs: the rest of what transformers passes (position_ids, use_cache, sliding_window, ...):
            unused, except that what the op cannot compute is refused (see the module docstring).
    Returns:
        (out (B, Lq, H, D), None): no attention weights are materialised.
    """
    n_layer, layer_is_causal = _layer_facts(module)
    _refuse_unsupported_call(module, layer_is_causal, kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} takes the 2-D (batch, seqlen) padding mask, got an "
            f"attention_mask of shape {tuple(attention_mask.shape)}: custom 4-D masks are not supported")
    if attention_mask is not None and attention_mask.shape[-1] < key.shape[2]:
        key, value = filled_slots(key, value, attention_mask.shape[-1])
    prefix_k = prefix_v = None
    if prefix_kv is not None:
        if len(prefix_kv) != n_layer:
            raise ValueError(f"prefix_kv must hold (k, v) for each of the model's {n_layer} layers, got "
                             f"{len(prefix_kv)}")
        prefix_k, prefix_v = prefix_kv[module.layer_idx]
        # Under autocast q is in the autocast dtype while a stored prefix may be float32: compute in
        # q's dtype, as autocast would for the [prefix; keys] matmul (skipped when the dtypes agree: a
        # no-op .to() still costs a dispatch per layer call).
        if prefix_k.dtype != query.dtype or prefix_v.dtype != query.dtype:
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
    elif prefix_idx is not None:
        raise ValueError("prefix_idx was given without prefix_kv")
    out = causal_attention_heads_first(query, key, value, prefix_k, prefix_v, prefix_idx, attention_mask, scaling,
                                       dropout)
    return out, None


def filled_slots(key: torch.Tensor, value: torch.Tensor, n_filled: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_filled`` slots of a static cache's (B, Hkv, max_cache_len, D) key and value buffers (views)."""
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
        local_size (in kwargs): the window of a sliding-window mask: refused.
        attention_mask: None or the 2-D (B, n) bool padding mask.
        kwargs: the rest transformers passes (device, dtype, config, ...); ``device`` is used.
    Returns:
        Without a static cache, the (B, kv_length) bool padding mask, or None when transformers gives
        none or a CPU mask pads nothing (read on the host once per forward; a mask on a device is
        handed over as it is, unread: no host sync); causality is applied by the kernel. With a static
        cache, the mask of ``static_cache_mask``.
    Raises:
        ValueError for masks it cannot express as causal + padding (packed sequences, added mask
        functions), for a mask shorter than the keys of a cache that is not a StaticCache, and see
        ``static_cache_mask``.
    """
    if kwargs.get("local_size") is not None:
        # create_sliding_window_causal_mask (Mistral, Qwen2 with sliding layers) hands its window here.
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} does not support sliding-window attention (window "
            f"{kwargs['local_size']}): build the model with config.sliding_window=None (Mistral) or "
            "use_sliding_window=False (Qwen2)")
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
    # A CPU mask that pads nothing is read here once per forward and dropped, rather than by the op in every
    # layer. A mask on a device is handed over as it is, also when nothing is padded: finding that out
    # (attention_mask.all()) would be a host sync; the kernels read the mask at little cost.
    return None if lets_every_key_through(attention_mask) else attention_mask


def register_prefix_attn() -> str:
    """Register the attention and mask functions with transformers (repeatable); return their name.

    Afterwards ``attn_implementation="prefix_attn"`` is accepted wherever transformers takes an
    implementation: ``from_pretrained``, ``from_config``, ``model.set_attn_implementation``.
    """
    check_transformers_version()
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attn_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_attn_mask)
    return ATTN_IMPLEMENTATION


def unregister_prefix_attn() -> None:
    """Remove the registration (repeatable). A model still set to "prefix_attn" then fails loudly in
    transformers (a KeyError naming the implementation), never silently with other attention."""
    # register() writes the class-wide mapping that every interface instance reads.
    AttentionInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
    AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)


def model_config(model):
    """The text decoder's config of a transformers model (``get_text_config()`` where it exists)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sliding_window_of(config) -> Optional[int]:
    """The sliding window some layer of a model uses, or None when every layer attends to all keys.

    Models with per-layer types (Qwen2, ...) use it in their "sliding_attention" layers only; Mistral
    has no layer types and uses config.sliding_window in every layer when it is set.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        uses_window = any(kind != "full_attention" for kind in layer_types)
        return (window or -1) if uses_window else None
    return window


def check_supported_model(model, caller: str) -> None:
    """TypeError unless ``model`` is a transformers decoder whose attention layers go through
    AttentionInterface; ValueError for what such a model may need that is not supported
    (cross-attention, an encoder-decoder, sliding-window layers). Reads only the model's class and config."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{caller} supports transformers decoder models (PreTrainedModel subclasses such as "
                        f"GPT2LMHeadModel, LlamaForCausalLM), got {type(model).__name__}")
    if not type(model)._can_set_attn_implementation():
        raise TypeError(f"{caller}: {type(model).__name__}'s attention layers do not go through transformers' "
                        "AttentionInterface, so a registered attention implementation cannot be selected")
    config = model_config(model)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{caller}: encoder-decoder models ({config.model_type}) are not supported, decoders only")
    if getattr(config, "add_cross_attention", False):
        raise ValueError(f"{caller}: {config.model_type} with cross-attention (config.add_cross_attention=True) is "
                         "not supported")
    window = sliding_window_of(config)
    if window is not None:
        raise ValueError(
            f"{caller}: {config.model_type} uses sliding-window attention (sliding_window={window}), which "
            f"attn_implementation={ATTN_IMPLEMENTATION!r} does not compute: build it with config.sliding_window=None "
            "(Mistral) or use_sliding_window=False (Qwen2)")


def decoder_dims(model) -> dict:
    """n_layer, n_head, n_kv_head, head_dim and hidden_size of a decoder (GPT-2's n_* names map onto
    these); a prefix holds (P, n_kv_head, head_dim) keys and values per layer."""
    config = model_config(model)
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    return {"n_layer": config.num_hidden_layers, "n_head": n_head, "n_kv_head": n_kv_head, "head_dim": head_dim,
            "hidden_size": config.hidden_size}


def absolute_position_limit(model) -> Optional[int]:
    """The number of learned absolute position embeddings (GPT-2's n_positions), which P + past + L
    must not exceed; None for rotary models (Llama, Mistral, Qwen2), which accept any position, as
    they do under PEFT."""
    config = model_config(model)
    return config.n_positions if config.model_type == "gpt2" else None


def check_prefix_attn_selected(model, caller: str) -> None:
    """RuntimeError unless ``model`` runs attn_implementation="prefix_attn".

    Any other attention function would ignore the prefix keyword arguments, silently: the routes that
    hand over a prefix check this on every call (a string comparison).
    """
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(
            f"{caller}: the {model.config.model_type} model runs attn_implementation="
            f"{model.config._attn_implementation!r}, which would ignore the prefix; it needs {ATTN_IMPLEMENTATION!r} "
            "(was revert_prefix_attn or set_attn_implementation called?): apply the patch again")


def switch_to_prefix_attn(model) -> None:
    """Register and select "prefix_attn" for a checked model, remembering its implementation for revert."""
    register_prefix_attn()
    current = model.config._attn_implementation
    if current != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"transformers did not switch {type(model).__name__} to "
                               f"attn_implementation={ATTN_IMPLEMENTATION!r}")
        setattr(model, _PREVIOUS_ATTR, current)


def switch_back(model) -> None:
    """Back to the implementation a model had before ``switch_to_prefix_attn`` (sdpa when it was built
    with "prefix_attn"); a model not running "prefix_attn" is left as is."""
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        previous = getattr(model, _PREVIOUS_ATTR, None) or "sdpa"
        model.set_attn_implementation(previous)
    if hasattr(model, _PREVIOUS_ATTR):
        delattr(model, _PREVIOUS_ATTR)


def apply_prefix_attn(model: Optional[PreTrainedModel] = None) -> Optional[PreTrainedModel]:
    """Use the fused prefix attention for a decoder model, or make it selectable by name.

    Args:
        model: a transformers decoder whose attention goes through AttentionInterface (GPT-2, Llama,
            Mistral without sliding window, Qwen2, ...) to switch now; None only registers
            "prefix_attn" with transformers, after which ``from_pretrained(..., attn_implementation=
            "prefix_attn")``, ``from_config(config, attn_implementation="prefix_attn")`` and
            ``set_attn_implementation("prefix_attn")`` select it (no model class is modified).
    Returns:
        ``model`` (None when model is None).

    Without a prefix the model computes plain causal attention through the fused op (padding, grouped
    KV heads, attention dropout in training and the layer's scaling honoured). Repeatable;
    ``revert_prefix_attn`` undoes it. Raises RuntimeError for an unsupported transformers, TypeError
    for a model that is not such a decoder, ValueError for sliding-window or cross-attention models;
    the model is unchanged then.
    """
    if model is not None:
        check_supported_model(model, "apply_prefix_attn")
    register_prefix_attn()
    if model is not None:
        switch_to_prefix_attn(model)
    return model


def revert_prefix_attn(model: Optional[PreTrainedModel] = None) -> Optional[PreTrainedModel]:
    """Undo ``apply_prefix_attn``.

    With a model: back to the implementation it had before (sdpa when it was built with "prefix_attn");
    a model not using "prefix_attn" is left as is. With None: the registration is removed, so that
    transformers refuses attn_implementation="prefix_attn" again (a model still set to it fails
    loudly on its next forward; revert it first). Repeatable.
    """
    if model is None:
        unregister_prefix_attn()
        return None
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"revert_prefix_attn takes a transformers PreTrainedModel, got {type(model).__name__}")
    switch_back(model)
    return model
