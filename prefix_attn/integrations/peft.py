"""PEFT prefix tuning through the fused op: ``apply_prefix_attn_to_peft(peft_model)``.

Base models: GPT-2, Llama, Mistral (without sliding window), Qwen2 and other decoders whose attention
goes through transformers' AttentionInterface (see prefix_attn.integrations.hf_attention). For grouped
KV heads PEFT's config holds num_attention_heads = num_key_value_heads and token_dim = Hkv * head_dim,
so its prefix has the KV heads, (P, Hkv, D) per layer, as the op takes it.

PEFT's own path expands the prefix over the batch (its prompt encoder, MLP included, runs B times),
copies it into a DynamicCache whose every layer then concatenates [prefix; keys] to (B, Hkv, P + L, D),
kept for backward, and copies the prefix for every beam in generation. This module keeps PEFT's
numerics but intercepts at the two points where the prefix is made:

- ``PeftModelForCausalLM.forward`` (prefix branch): the prompt encoder runs once on its P virtual
  tokens, the result is cast to the base model's dtype as PEFT does and viewed as per-layer
  (P, Hkv, D) keys and values, which travel to the attention function unexpanded; the HF cache holds
  only the sequence's keys and values, the attention mask is not extended, and positions are shifted
  by P explicitly (PEFT gets that shift from its cache length; for rotary models new tokens are
  rotated by P + i and the prefix keys are used as given, as in PEFT's cache).
- ``prepare_inputs_for_generation`` (PEFT installs it on the base model during generate): the same
  prefix, computed once per generate call, is added to every step's inputs with shifted positions.

peft is an optional dependency (pip install prefix-attn[peft]); it is imported when this is called.
"""
import types
import warnings

import torch

from prefix_attn.integrations._routing import (
    PREFIX_KV_KWARG, add_prefix_to_model_inputs, cache_argument, input_length, shifted_position_ids)
from prefix_attn.integrations.hf_attention import (
    absolute_position_limit, check_prefix_attn_selected, check_supported_model, decoder_dims, switch_back,
    switch_to_prefix_attn)

# Attribute of a patched PeftModel holding, for the generate call in progress, what every step adds to its inputs:
# (prefix, P, n_positions), found once per call (per step they cost about as much as the step's attention calls).
_GENERATION_PREFIX_ATTR = "_prefix_attn_generation_prefix"
_PATCHED_ATTR = "_prefix_attn_patched"
# The instance attributes the patch sets (PEFT's own methods are class attributes underneath).
_PATCHED_METHODS = ("forward", "prepare_inputs_for_generation", "generate")


def _import_peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("apply_prefix_attn_to_peft needs peft: pip install 'prefix-attn[peft]'") from err
    return peft


def _is_prefix_tuning(peft_config) -> bool:
    from peft.utils import PeftType

    return peft_config.peft_type == PeftType.PREFIX_TUNING


def peft_prefix_kv(peft_model) -> tuple:
    """The active adapter's prefix as the fused op takes it: tuple over layers of (k, v), each (P, Hkv, D).

    The prompt encoder runs once on its P virtual tokens (PEFT runs it on B * P), its MLP
    reparameterisation included when the adapter is trained with prefix_projection=True; gradients
    flow into it. A saved adapter loaded for inference (inference_mode=True) holds the projected
    prefix in ``embedding.weight``, which PEFT uses directly; so does this. The result is cast to the
    base model's dtype, as PEFT does. Layout: PEFT views the encoder output (B, P, 2 * n_layer, Hkv, D)
    and permutes/splits it so that layer l's keys are entry 2l and its values entry 2l + 1; the
    views returned here slice the same entries (strided views, no copy).
    """
    config = peft_model.active_peft_config
    adapter = peft_model.active_adapter
    encoder = peft_model.prompt_encoder[adapter]
    n_prefix = config.num_virtual_tokens
    if config.inference_mode:
        flat = encoder.embedding.weight
    else:
        tokens = peft_model.prompt_tokens[adapter][:n_prefix].to(encoder.embedding.weight.device)
        flat = encoder(tokens)  # (P, 2 * n_layer * d_model)
    dtype = peft_model.base_model_torch_dtype
    if dtype is not None:
        flat = flat.to(dtype)
    n_layer, heads = config.num_layers, config.num_attention_heads
    # One autograd node (an unbind) for all layers' views, not a select per layer and per k/v.
    per_layer = flat.view(n_prefix, 2 * n_layer, heads, config.token_dim // heads).unbind(1)
    return tuple(zip(per_layer[0::2], per_layer[1::2]))


def _drop_token_type_ids(kwargs: dict) -> None:
    # PEFT drops token_type_ids for every prompt-learning method (_adjust_prompt_learning_kwargs).
    if kwargs.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None


def _forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
             output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    """PeftModelForCausalLM.forward with the prefix handed to the fused op (see the module docstring).

    Differences from PEFT: the cache (returned with use_cache=True) holds L positions, not P + L; a
    ``past_key_values`` the caller passes (one this forward returned) is used, where PEFT replaces it;
    in training mode no cache is built unless use_cache=True is passed.
    """
    config = self.active_peft_config
    if not _is_prefix_tuning(config):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  inputs_embeds=inputs_embeds, labels=labels, output_attentions=output_attentions,
                                  output_hidden_states=output_hidden_states, return_dict=return_dict,
                                  task_ids=task_ids, **kwargs)
    base = self.get_base_model()
    check_prefix_attn_selected(base, "apply_prefix_attn_to_peft")
    _, seq_len = input_length(input_ids, inputs_embeds)
    _drop_token_type_ids(kwargs)
    device = (input_ids if input_ids is not None else inputs_embeds).device
    kwargs["position_ids"] = shifted_position_ids(
        config.num_virtual_tokens, absolute_position_limit(base), seq_len, cache_argument(kwargs),
        kwargs.get("position_ids"), device)
    kwargs[PREFIX_KV_KWARG] = peft_prefix_kv(self)
    if base.training and kwargs.get("use_cache") is None:
        kwargs["use_cache"] = False  # a training forward builds no cache (one cat per layer) unless asked
    return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           labels=labels, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)


def _prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
    """PEFT's prepare_inputs_for_generation for prefix tuning, the prefix routed to the fused op."""
    additions = self.__dict__.get(_GENERATION_PREFIX_ATTR)
    if additions is None:  # called outside generate(): find them for this step
        if not _is_prefix_tuning(self.active_peft_config):
            return type(self).prepare_inputs_for_generation(self, *args, task_ids=task_ids, **kwargs)
        additions = _generation_additions(self)
    model_inputs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
    _drop_token_type_ids(model_inputs)
    return add_prefix_to_model_inputs(model_inputs, *additions)


def _generation_additions(peft_model) -> tuple:
    """(prefix, P, n_positions) that a generation step adds to its inputs (``add_prefix_to_model_inputs``), after
    checking that the base model still runs the fused attention."""
    base = peft_model.get_base_model()
    check_prefix_attn_selected(base, "apply_prefix_attn_to_peft")
    return peft_prefix_kv(peft_model), peft_model.active_peft_config.num_virtual_tokens, absolute_position_limit(base)


def _generate(self, *args, **kwargs):
    """PEFT's generate with the prefix computed once for the whole call, never copied per beam."""
    if not _is_prefix_tuning(self.active_peft_config) or self._adapters_disabled:
        return type(self).generate(self, *args, **kwargs)
    with torch.no_grad():
        self.__dict__[_GENERATION_PREFIX_ATTR] = _generation_additions(self)
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        self.__dict__.pop(_GENERATION_PREFIX_ATTR, None)


def apply_prefix_attn_to_peft(peft_model):
    """Run a PEFT prefix-tuning model through the fused prefix attention.

    Args:
        peft_model: a ``peft.PeftModelForCausalLM`` whose active adapter is a ``PrefixTuningConfig``
            over a transformers decoder (GPT-2, Llama, Mistral without sliding window, Qwen2, ...; from
            get_peft_model or PeftModel.from_pretrained).
    Returns:
        the same ``peft_model``, patched in place (repeatable). Loss, logits, prompt-encoder gradients
        and generate() tokens equal PEFT's own path; the prefix is computed once per forward on P rows
        and never expanded over the batch, beams or grouped heads; disable_adapter() still gives the
        plain model. Gradient checkpointing with use_reentrant=False works (PEFT's own path refuses it).
        ``revert_prefix_attn_to_peft`` undoes it.
    Raises:
        ImportError without peft; TypeError for another model type or an unsupported base model;
        ValueError for another PEFT method, a config that does not match the base model, or a base
        model with sliding-window or cross-attention. The model is unchanged then.
    """
    peft = _import_peft()
    if not isinstance(peft_model, peft.PeftModelForCausalLM):
        raise TypeError(f"apply_prefix_attn_to_peft takes a peft.PeftModelForCausalLM (get_peft_model with "
                        f"task_type='CAUSAL_LM'), got {type(peft_model).__name__}")
    config = peft_model.active_peft_config
    if not _is_prefix_tuning(config):
        raise ValueError(f"apply_prefix_attn_to_peft supports prefix tuning (PrefixTuningConfig), but the active "
                         f"adapter {peft_model.active_adapter!r} is {config.peft_type}")
    base = peft_model.get_base_model()
    check_supported_model(base, "apply_prefix_attn_to_peft")
    dims = decoder_dims(base)
    expected = {"num_layers": dims["n_layer"], "num_attention_heads": dims["n_kv_head"],
                "token_dim": dims["n_kv_head"] * dims["head_dim"], "num_transformer_submodules": 1}
    for name, value in expected.items():
        if getattr(config, name) != value:
            raise ValueError(f"PrefixTuningConfig.{name}={getattr(config, name)} does not match the "
                             f"{base.config.model_type} model ({value})")
    switch_to_prefix_attn(base)
    # Instance attributes, as PEFT's own disable_adapter() swaps them: it saves and restores these.
    peft_model.forward = types.MethodType(_forward, peft_model)
    peft_model.prepare_inputs_for_generation = types.MethodType(_prepare_inputs_for_generation, peft_model)
    peft_model.generate = types.MethodType(_generate, peft_model)
    peft_model.__dict__[_PATCHED_ATTR] = True
    return peft_model


def revert_prefix_attn_to_peft(peft_model):
    """Undo ``apply_prefix_attn_to_peft``: PEFT's own forward, generate and prepare_inputs_for_generation
    again, and the base model back to the attention implementation it had. Repeatable; a model that
    was never patched is left as is. Returns ``peft_model``."""
    peft = _import_peft()
    if not isinstance(peft_model, peft.PeftModelForCausalLM):
        raise TypeError(f"revert_prefix_attn_to_peft takes a peft.PeftModelForCausalLM, got "
                        f"{type(peft_model).__name__}")
    if not peft_model.__dict__.pop(_PATCHED_ATTR, False):
        return peft_model
    for name in _PATCHED_METHODS:
        peft_model.__dict__.pop(name, None)
    switch_back(peft_model.get_base_model())
    return peft_model
