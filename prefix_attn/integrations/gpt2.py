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

The name holds no "flash" (transformers would try to load flash-attn) and no "/" (it would be taken
for a hub kernel).
"""
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel

from prefix_attn import prefix_attn_func
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
        query: (B, H, Lq, D); key, value: (B, H, Lk, D), the cache's keys included, Lq <= Lk.
        attention_mask: None or the (B, Lk) bool padding mask from ``prefix_attn_mask``.
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


def prefix_attn_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function=causal_mask_function, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """Mask function for transformers' AttentionMaskInterface (called by create_causal_mask).

    Returns the (B, kv_length) bool padding mask, or None when nothing is padded; causality is
    applied by the kernel. Raises ValueError for masks it cannot express as causal + padding
    (packed sequences, added mask functions) and for a mask shorter than the keys (static caches).
    """
    if mask_function is not causal_mask_function:
        # create_causal_mask wraps causal_mask_function for packed sequences (position_ids that restart
        # within a row) or extra or/and mask functions: the kernel would silently ignore them.
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} supports causal attention with a padding mask only; "
            "transformers asked for another mask pattern (packed sequences, i.e. position_ids that restart "
            "within a row, or an added mask function)")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[-1] != kv_length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the keys have {kv_length}: "
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs a mask over every cached key (static caches are "
            "not supported)")
    # As transformers' flash-attention mask does: no mask at all when nothing is padded.
    return None if bool(attention_mask.all()) else attention_mask


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
