"""The GPT-2 names of the transformers patch: ``apply_prefix_attn_to_gpt2`` / ``revert_prefix_attn_to_gpt2``.

They are ``apply_prefix_attn`` / ``revert_prefix_attn`` (prefix_attn.integrations.hf_attention, where
the attention and mask functions live and are documented) restricted to GPT-2 models, kept for code
written against them. The attention function, the mask function and the static-cache helpers are
re-exported here under their old names.
"""
from typing import Optional

from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel

from prefix_attn.integrations.hf_attention import (  # noqa: F401  (re-exported)
    ATTN_IMPLEMENTATION, apply_prefix_attn, check_prefix_attn_selected, check_supported_model, filled_slots, is_static_cache_call,
    prefix_attn_forward, prefix_attn_mask, register_prefix_attn, revert_prefix_attn, static_cache_mask,
    switch_back, switch_to_prefix_attn)


def check_gpt2_model(model, caller: str) -> None:
    """TypeError unless ``model`` is a transformers GPT-2 model; ValueError for cross-attention GPT-2."""
    if not isinstance(model, GPT2PreTrainedModel):
        raise TypeError(f"{caller} supports transformers GPT-2 models (GPT2PreTrainedModel subclasses such as "
                        f"GPT2LMHeadModel), got {type(model).__name__}; apply_prefix_attn takes other decoders")
    check_supported_model(model, caller)


def apply_prefix_attn_to_gpt2(model: Optional[GPT2PreTrainedModel] = None) -> Optional[GPT2PreTrainedModel]:
    """Use the fused prefix attention for a GPT-2 model, or make it selectable by name.

    Args:
        model: a GPT-2 model (GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2ForSequenceClassification, ...)
            to switch now; None registers "prefix_attn" with transformers, after which
            ``GPT2LMHeadModel.from_pretrained(..., attn_implementation="prefix_attn")`` (or from_config)
            selects it. Models built without an attn_implementation keep transformers' default (no
            model class is modified).
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
    return apply_prefix_attn(model)


def revert_prefix_attn_to_gpt2(model: Optional[GPT2PreTrainedModel] = None) -> Optional[GPT2PreTrainedModel]:
    """Undo ``apply_prefix_attn_to_gpt2``.

    With a model: back to the implementation it had before (sdpa when it was built with "prefix_attn");
    a model not using "prefix_attn" is left as is. With None: as ``revert_prefix_attn()``, the
    registration is removed. Repeatable.
    """
    if model is None:
        return revert_prefix_attn(None)
    check_gpt2_model(model, "revert_prefix_attn_to_gpt2")
    switch_back(model)
    return model
