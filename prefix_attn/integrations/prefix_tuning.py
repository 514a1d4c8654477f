"""Prefix tuning without PEFT: ``PrefixTuning``, several task prefixes in one batch.

The module wraps a frozen transformers decoder (GPT-2, Llama, Mistral without sliding window, Qwen2,
...) switched to the fused attention (apply_prefix_attn). Each forward computes the prefix once,
(T, n_layer, 2, P, Hkv, D) with the model's key/value heads Hkv, and
hands per-layer views to the attention function with ``prefix_idx`` (B,) picking each row's task;
the op reduces the prefix gradient over the batch per task, so nothing is expanded over the batch
or beams. Positions follow PEFT: the sequence starts at position P (rotary models rotate new tokens by
P + i; the prefix keys are used as given).
"""
from typing import Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from prefix_attn.checks import check_index_values
from prefix_attn.integrations._prefix_params import PrefixKV, PrefixMLP
from prefix_attn.integrations._routing import (
    PREFIX_IDX_KWARG, PREFIX_KV_KWARG, add_prefix_to_model_inputs, cache_argument, input_length,
    shifted_position_ids)
from prefix_attn.integrations.hf_attention import (
    absolute_position_limit, check_prefix_attn_selected, check_supported_model, decoder_dims, model_config,
    switch_to_prefix_attn)

PREFIX_FORMAT = "prefix_attn.prefix"
PREFIX_FORMAT_VERSION = "1"
_STATE_PREFIX = "prefix_encoder."


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_init_text_ids(ids, num_virtual_tokens: int, num_tasks: int, vocab_size: int) -> None:
    if (not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool
            or ids.dim() != 2 or ids.shape[1] != num_virtual_tokens or ids.shape[0] not in (1, num_tasks)):
        raise ValueError(f"init_text_ids must be integer token ids of shape (1, {num_virtual_tokens}) or "
                         f"({num_tasks}, {num_virtual_tokens}), got {getattr(ids, 'shape', ids)}")
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(f"init_text_ids holds ids outside the vocabulary [0, {vocab_size})")


@torch.no_grad()
def text_prefix_kv(model: PreTrainedModel, token_ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's own keys and values for ``token_ids`` (N, P): (N, n_layer, 2, P, Hkv, D) float32.

    Runs the model (in eval mode, positions 0..P-1, no prefix) with a cache and reads each layer's keys
    and values from it, as the model caches them: for rotary models the keys are rotated for
    positions 0..P-1, so a prefix initialised from text first equals that text placed before the
    sequence (which then sits at positions P + i).
    """
    was_training = model.training
    try:
        model.eval()
        out = model.base_model(input_ids=token_ids, use_cache=True)
    finally:
        model.train(was_training)
    # The field is "past_key_values" up to transformers 5.23 and "cache" from 5.24 on.
    cache = next(value for name, value in out.items() if name in ("cache", "past_key_values"))
    per_layer = [torch.stack([layer.keys, layer.values], dim=1) for layer in cache.layers]  # (N, 2, Hkv, P, D)
    return torch.stack(per_layer, dim=1).transpose(-3, -2).float()


class PrefixTuning(nn.Module):
    """Prefix tuning (Li & Liang 2021) of a frozen decoder through the fused prefix attention.

    Args:
        model: a transformers decoder whose attention goes through AttentionInterface: GPT-2
            (GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2ForSequenceClassification, ...), Llama, Mistral
            without sliding window, Qwen2, ... It is switched to attn_implementation="prefix_attn" and
            frozen (requires_grad False on all its parameters); it stays the caller's object.
        num_virtual_tokens: P, prefix slots per layer, each holding (Hkv, D) keys and values (the
            model's key/value heads). For GPT-2, P + the sequence length must fit n_positions.
        num_tasks: T independent prefixes; ``prefix_idx`` (B,) picks each row's.
        projection_dim: None trains the per-layer keys and values directly (``PrefixKV``); an int E
            trains the paper's reparameterisation instead, per task a (P, E) matrix → Linear(E, E) → tanh →
            Linear(E, 2 * n_layer * Hkv * D) (``PrefixMLP``; ``merge()`` folds it into keys and values).
        init_text_ids: optional (1, P) or (T, P) token ids: each layer's keys and values start as the
            frozen model's own for those tokens (the paper's initialisation from real words); (1, P)
            initialises every task alike. Only without projection_dim.

    Trainable parameters are the prefix's alone. ``state_dict()`` and ``load_state_dict()`` cover only
    them (keys "prefix_encoder.*"): the frozen model belongs to the caller, and Trainer checkpoints stay
    the size of the prefix. The prefix is kept in float32 and cast to the model's dtype when used, as
    PEFT does.

    Raises TypeError for an unsupported model, ValueError for bad sizes or ids or a model with sliding-window
    or cross-attention; the model is unchanged then.
    """

    def __init__(self, model: PreTrainedModel, num_virtual_tokens: int, num_tasks: int = 1,
                 projection_dim: Optional[int] = None, init_text_ids: Optional[torch.Tensor] = None):
        super().__init__()
        check_supported_model(model, "PrefixTuning")
        _check_positive_int("num_virtual_tokens", num_virtual_tokens)
        _check_positive_int("num_tasks", num_tasks)
        _check_positive_int("projection_dim", projection_dim, allow_none=True)
        n_positions = absolute_position_limit(model)
        if n_positions is not None and num_virtual_tokens >= n_positions:
            raise ValueError(f"num_virtual_tokens={num_virtual_tokens} leaves no position for the sequence: "
                             f"GPT-2 has n_positions={n_positions}")
        dims = decoder_dims(model)
        device = model.device
        init_kv = None
        if init_text_ids is not None:
            if projection_dim is not None:
                raise ValueError("init_text_ids sets the keys and values themselves: use it with projection_dim=None")
            _check_init_text_ids(init_text_ids, num_virtual_tokens, num_tasks, model_config(model).vocab_size)
            init_kv = text_prefix_kv(model, init_text_ids.to(device)).expand(num_tasks, -1, -1, -1, -1, -1)

        switch_to_prefix_attn(model)
        model.requires_grad_(False)
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens
        self.num_tasks = num_tasks
        self.projection_dim = projection_dim
        sizes = (num_tasks, dims["n_layer"], num_virtual_tokens, dims["n_kv_head"], dims["head_dim"])
        if init_kv is not None:
            self.prefix_encoder = PrefixKV.from_tensor(init_kv)
        elif projection_dim is None:
            self.prefix_encoder = PrefixKV(*sizes, init_std=model_config(model).initializer_range, device=device)
        else:
            self.prefix_encoder = PrefixMLP(*sizes, projection_dim=projection_dim, device=device)

    # ---- the prefix ----------------------------------------------------------------------------------

    @property
    def config(self):
        """The wrapped model's config (for code such as Trainer that reads ``model.config``)."""
        return self.model.config

    def prefix_kv(self) -> tuple:
        """Tuple over layers of (k, v), each (P, Hkv, D) for one task or (T, P, Hkv, D), in the model's dtype.

        Views of one (T, n_layer, 2, P, Hkv, D) tensor (cast from float32 only if the model is not float32);
        differentiable into the prefix parameters through one autograd node (an unbind, whose backward
        stacks the layers' gradients once), not four selects per layer.
        """
        kv = self.prefix_encoder().to(self.model.dtype)
        if self.num_tasks == 1:
            kv = kv[0]
        per_layer = kv.flatten(-5, -4).unbind(-4)  # entry 2l: layer l's keys, 2l + 1: its values
        return tuple(zip(per_layer[0::2], per_layer[1::2]))

    def merge(self) -> "PrefixTuning":
        """Replace the MLP reparameterisation by the keys and values it produces (as the paper does after
        training): outputs unchanged, fewer parameters, the prefix still trainable. No-op without one."""
        if isinstance(self.prefix_encoder, PrefixMLP):
            with torch.no_grad():
                kv = self.prefix_encoder()
            self.prefix_encoder = PrefixKV.from_tensor(kv)
            self.projection_dim = None
        return self

    def _check_prefix_idx(self, prefix_idx, batch: int, device) -> Optional[torch.Tensor]:
        """(B,) int64 task per row on ``device`` for a bank, None for a single task; ValueError if wrong."""
        if prefix_idx is None:
            return None if self.num_tasks == 1 else torch.zeros(batch, dtype=torch.long, device=device)
        if isinstance(prefix_idx, int) and not isinstance(prefix_idx, bool):
            prefix_idx = torch.full((batch,), prefix_idx, dtype=torch.long, device=device)
        if (not isinstance(prefix_idx, torch.Tensor) or prefix_idx.dtype.is_floating_point
                or prefix_idx.dtype.is_complex or prefix_idx.dtype == torch.bool):
            raise ValueError(f"prefix_idx must be an integer tensor of shape (batch,) = ({batch},) or an int, "
                             f"got {prefix_idx!r}")
        if prefix_idx.shape != (batch,):
            raise ValueError(f"prefix_idx must have shape (batch,) = ({batch},), got {tuple(prefix_idx.shape)}")
        prefix_idx = prefix_idx.to(device=device, dtype=torch.long)
        # One read per forward (and per new tensor): the op's own check of the same tensor is then free.
        check_index_values("prefix_idx", prefix_idx, self.num_tasks - 1,
                           f"the task indices in [0, {self.num_tasks})")
        return None if self.num_tasks == 1 else prefix_idx

    # ---- running the model ---------------------------------------------------------------------------

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, prefix_idx: Union[torch.Tensor, int, None] = None, **kwargs):
        """Run the model behind the prefix.

        Args:
            input_ids: (B, L); or inputs_embeds (B, L, hidden_size) in kwargs.
            attention_mask: (B, L) (or (B, past + L) with past_key_values) 1 for tokens, 0 for padding.
            labels: as the wrapped model takes them.
            prefix_idx: (B,) task of each row, or an int for all; default task 0.
            kwargs: the wrapped model's other forward arguments (position_ids are shifted by P).
        Returns:
            the wrapped model's output (its cache, with use_cache, holds only the sequence's positions;
            in training mode no cache is built unless use_cache=True is passed).
        Raises:
            ValueError for a bad prefix_idx, an unsupported cache, or when P + past + L exceeds GPT-2's
            n_positions.
        """
        check_prefix_attn_selected(self.model, "PrefixTuning")
        batch, seq_len = input_length(input_ids, kwargs.get("inputs_embeds"))
        device = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).device
        prefix_idx = self._check_prefix_idx(prefix_idx, batch, device)
        kwargs["position_ids"] = shifted_position_ids(
            self.num_virtual_tokens, absolute_position_limit(self.model), seq_len, cache_argument(kwargs),
            kwargs.get("position_ids"), device)
        if labels is not None:
            kwargs["labels"] = labels
        if prefix_idx is not None:
            kwargs[PREFIX_IDX_KWARG] = prefix_idx
        if self.model.training and kwargs.get("use_cache") is None:
            kwargs["use_cache"] = False  # a training forward builds no cache (one cat per layer) unless asked
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **{PREFIX_KV_KWARG: self.prefix_kv()},
                          **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 prefix_idx: Union[torch.Tensor, int, None] = None, **generate_kwargs):
        """The wrapped model's generate() behind the prefix.

        prefix_idx (B,) (or an int) picks each row's task. The prefix is computed once and never
        repeated: only prefix_idx is, by generate itself, for beams and num_return_sequences.
        """
        if not self.model.can_generate():
            raise TypeError(f"{type(self.model).__name__} cannot generate: wrap a model with a language-model head "
                            "(GPT2LMHeadModel, LlamaForCausalLM, ...)")
        check_prefix_attn_selected(self.model, "PrefixTuning")
        batch, _ = input_length(input_ids, generate_kwargs.get("inputs_embeds"))
        device = (input_ids if input_ids is not None else generate_kwargs["inputs_embeds"]).device
        prefix_idx = self._check_prefix_idx(prefix_idx, batch, device)
        prefix = self.prefix_kv()
        n_prefix, n_positions = self.num_virtual_tokens, absolute_position_limit(self.model)
        model = self.model
        had_own = "prepare_inputs_for_generation" in model.__dict__
        original = model.prepare_inputs_for_generation

        # generate() accepts a model keyword only if prepare_inputs_for_generation names it: prefix_idx is.
        def prepare_inputs_for_generation(*args, prefix_idx=None, **kwargs):
            return add_prefix_to_model_inputs(original(*args, **kwargs), prefix, n_prefix, n_positions, prefix_idx)

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            if prefix_idx is not None:
                generate_kwargs[PREFIX_IDX_KWARG] = prefix_idx
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """Gradient (activation) checkpointing of the wrapped model, as Trainer(gradient_checkpointing=True)
        asks for it (``kwargs`` such as every_n_layers go to the model). use_reentrant must stay False
        (the default here): the prefix travels as a keyword argument, which reentrant checkpointing does
        not differentiate."""
        checkpoint_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if checkpoint_kwargs["use_reentrant"]:
            raise ValueError("PrefixTuning needs gradient checkpointing with use_reentrant=False")
        # transformers 5.23 renamed gradient_checkpointing_enable (kept, deprecated); 5.17 has only the old name.
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        """The name transformers < 5.23 and its Trainer use; see activation_checkpointing_enable."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        if hasattr(self.model, "activation_checkpointing_disable"):
            self.model.activation_checkpointing_disable()
        else:
            self.model.gradient_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    # ---- state and files -----------------------------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The prefix parameters only (keys "prefix_encoder.*"): the frozen model is not part of the state."""
        return self.prefix_encoder.state_dict(*args, destination=destination, prefix=prefix + _STATE_PREFIX,
                                              keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what ``state_dict()`` gave (keys "prefix_encoder.*"); other keys are unexpected."""
        own = {key[len(_STATE_PREFIX):]: value for key, value in state_dict.items() if key.startswith(_STATE_PREFIX)}
        unexpected = [key for key in state_dict if not key.startswith(_STATE_PREFIX)]
        if strict and unexpected:
            raise RuntimeError(f"Unexpected key(s) in state_dict of PrefixTuning: {unexpected} (it holds only "
                               "'prefix_encoder.*')")
        result = self.prefix_encoder.load_state_dict(own, strict=strict, assign=assign)
        return type(result)([_STATE_PREFIX + k for k in result.missing_keys],
                            [_STATE_PREFIX + k for k in result.unexpected_keys] + unexpected)

    def save_prefix(self, path) -> None:
        """Write the prefix alone to ``path`` (safetensors): tensor "prefix" (T, n_layer, 2, P, Hkv, D) float32.

        An unmerged reparameterisation is saved as the keys and values it produces (as PEFT saves its
        adapters); its metadata (format, format_version, model_type, n_layer, n_head, n_kv_head, head_dim,
        n_embd (the hidden size), num_virtual_tokens, num_tasks) lets ``load_prefix`` check the file
        against a model.
        """
        from safetensors.torch import save_file

        with torch.no_grad():
            kv = self.prefix_encoder().detach().to("cpu", torch.float32).contiguous()
        metadata = {"format": PREFIX_FORMAT, "format_version": PREFIX_FORMAT_VERSION,
                    "model_type": model_config(self.model).model_type,
                    "num_virtual_tokens": str(self.num_virtual_tokens), "num_tasks": str(self.num_tasks),
                    **{k: str(v) for k, v in _file_dims(self.model).items()}}
        save_file({"prefix": kv}, str(path), metadata=metadata)

    @classmethod
    def load_prefix(cls, model: PreTrainedModel, path) -> "PrefixTuning":
        """A PrefixTuning around ``model`` holding the prefix saved at ``path`` (merged form, trainable).

        Raises TypeError for an unsupported model and ValueError, naming ``path`` and what is wrong, for a
        file that is not a saved prefix (unreadable or truncated, other or extra tensors, missing or
        malformed metadata, a tensor of another shape or dtype than float32, non-finite values) or
        that does not fit the model (model type, layers, heads, key/value heads, head dim, positions); the
        model is unchanged then. Files written before n_kv_head was recorded (GPT-2 only) read as
        n_kv_head = n_head.
        """
        from safetensors import SafetensorError, safe_open

        check_supported_model(model, "PrefixTuning.load_prefix")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = sorted(handle.keys())
                if metadata.get("format") != PREFIX_FORMAT or "prefix" not in names:
                    raise ValueError(f"{path} is not a prefix saved by PrefixTuning.save_prefix")
                if metadata.get("format_version") != PREFIX_FORMAT_VERSION:
                    raise ValueError(f"{path} has prefix format version {metadata.get('format_version')!r}; this "
                                     f"version of prefix_attn reads version {PREFIX_FORMAT_VERSION}")
                if names != ["prefix"]:
                    raise ValueError(f"{path} holds tensors {names}; a saved prefix holds the tensor 'prefix' alone")
                kv = handle.get_tensor("prefix")
        except SafetensorError as error:  # truncated or corrupt header or payload
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
        model_type = model_config(model).model_type
        if metadata.get("model_type") != model_type:
            raise ValueError(f"{path} holds a prefix for model type {metadata.get('model_type')!r}, not {model_type}")
        if "n_kv_head" not in metadata:  # written before grouped heads were recorded: KV heads = heads
            metadata = {**metadata, "n_kv_head": metadata.get("n_head")}
        saved = {name: _metadata_int(metadata, name, path)
                 for name in ("n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "num_virtual_tokens",
                              "num_tasks")}
        dims = _file_dims(model)
        for name, value in dims.items():
            if saved[name] != value:
                raise ValueError(f"{path} holds a prefix for a model with {name}={saved[name]}, but this model "
                                 f"has {name}={value}")
        num_tasks, n_prefix = saved["num_tasks"], saved["num_virtual_tokens"]
        expected = (num_tasks, dims["n_layer"], 2, n_prefix, dims["n_kv_head"], dims["head_dim"])
        if tuple(kv.shape) != expected:
            raise ValueError(f"{path}: tensor 'prefix' has shape {tuple(kv.shape)}, its metadata says {expected}")
        if kv.dtype != torch.float32:
            raise ValueError(f"{path}: tensor 'prefix' has dtype {kv.dtype}; a saved prefix is float32")
        if not torch.isfinite(kv).all():
            raise ValueError(f"{path}: tensor 'prefix' holds non-finite values (NaN or inf)")
        tuned = cls(model, num_virtual_tokens=n_prefix, num_tasks=num_tasks)
        tuned.prefix_encoder = PrefixKV.from_tensor(kv.to(model.device))
        return tuned


def _file_dims(model) -> dict:
    """The model sizes a prefix file records (GPT-2's names: n_embd is the hidden size)."""
    dims = decoder_dims(model)
    return {"n_layer": dims["n_layer"], "n_head": dims["n_head"], "n_kv_head": dims["n_kv_head"],
            "head_dim": dims["head_dim"], "n_embd": dims["hidden_size"]}


def _metadata_int(metadata: dict, name: str, path) -> int:
    """A positive integer of a prefix file's metadata; ValueError naming the file and the key."""
    if name not in metadata:
        raise ValueError(f"{path}: metadata has no {name!r}; a saved prefix records it")
    text = metadata[name]
    if not (isinstance(text, str) and text.isdecimal() and text.isascii() and int(text) > 0):
        raise ValueError(f"{path}: metadata {name}={text!r} is not a positive integer")
    return int(text)
