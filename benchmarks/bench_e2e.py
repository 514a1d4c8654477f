"""End-to-end benchmark: prefix tuning of GPT-2 and of a Llama-shaped model, a training step and
generate(), per route.

The GPU sweep holds the points of issue 9's targets: every route at or above PEFT+SDPA's tokens/s at
B = 8, 32 and 128, training and generate(), and generate() of GPT-2 XL (random weights; 48 layers,
d_model 1600, 25 heads) at B = 128, P = 512, 64 new tokens at 1.5x or more (benchmarks/readme_table.py
checks them against the committed runs).

Routes (providers): peft_sdpa (PEFT prefix tuning alone, SDPA attention: what users run today),
peft+patch (the same PEFT model after apply_prefix_attn_to_peft), native (prefix_attn.PrefixTuning)
and prompt_tuning (PEFT prompt tuning with the same number of virtual tokens, SDPA), on GPT-2 small
and medium shapes and a ~1.2B Llama shape (Llama-3.2-1B's: 16 layers, d_model 2048, 32 heads over 8 KV
heads) with random weights (no download), bf16 on GPU; tiny GPT-2 and Llama configs on CPU. A training step is forward +
backward + AdamW step on the trainable parameters, in train mode (GPT-2's dropouts active, as in a
real run). Figures: ms per step, tokens/s, peak memory; generate: ms and new tokens/s.
"""
import dataclasses
import gc
import time
from typing import Iterator

import torch

from benchmarks.measure import on_gpu, peak_memory_mb

ROUTES = ("peft_sdpa", "peft+patch", "native", "prompt_tuning")


@dataclasses.dataclass(frozen=True)
class E2EShape:
    model: str  # "small", "medium", "xl", "llama-1b"; "tiny" and "llama-tiny" on CPU
    B: int
    L: int
    P: int
    new_tokens: int = 32  # generate() only

    def config(self):
        from transformers import GPT2Config, LlamaConfig

        if self.model.startswith("llama"):
            layers, d_model, heads, kv_heads, ffn, vocab = {
                "llama-1b": (16, 2048, 32, 8, 8192, 128256), "llama-tiny": (2, 64, 4, 2, 128, 1000)}[self.model]
            return LlamaConfig(num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads,
                               num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                               max_position_embeddings=2048, tie_word_embeddings=True)
        sizes = {"small": (12, 768, 12), "medium": (24, 1024, 16), "xl": (48, 1600, 25), "tiny": (2, 64, 4)}[self.model]
        return GPT2Config(n_layer=sizes[0], n_embd=sizes[1], n_head=sizes[2], n_positions=1024,
                          vocab_size=50257 if self.model != "tiny" else 1000)

    def dims(self) -> tuple[int, int, int, int]:
        """(layers, heads, KV heads, head_dim)."""
        c = self.config()
        heads = c.num_attention_heads
        return c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", None) or heads, c.hidden_size // heads

    def expanded_prefix_bytes(self, element_size: int) -> int:
        """E = 2 * layers * B * P * KV heads * head_dim * bytes: what PEFT's expanded prefix costs."""
        layers, _, kv_heads, head_dim = self.dims()
        return 2 * layers * self.B * self.P * kv_heads * head_dim * element_size


def shapes(quick: bool, device) -> dict[str, list[E2EShape]]:
    if not on_gpu(device):
        tiny = {"e2e_train": [E2EShape("tiny", 2, 32, 8), E2EShape("llama-tiny", 2, 32, 8)],
                "e2e_generate": [E2EShape("tiny", 2, 16, 8), E2EShape("llama-tiny", 2, 16, 8)]}
        if quick:
            return tiny
        # GPT-2 small on CPU (random weights), a short and a long prefix: what a CPU user of the patch sees at a
        # real model size (minutes on a 2-core CPU).
        return {"e2e_train": tiny["e2e_train"] + [E2EShape("small", 4, 64, 10), E2EShape("small", 4, 128, 200)],
                "e2e_generate": tiny["e2e_generate"] + [E2EShape("small", 4, 32, 10), E2EShape("small", 8, 64, 200)]}
    if quick:
        return {"e2e_train": [E2EShape("small", 8, 512, 10), E2EShape("small", 8, 512, 200),
                              E2EShape("llama-1b", 8, 512, 32)],
                "e2e_generate": [E2EShape("small", 8, 128, 200), E2EShape("llama-1b", 8, 128, 32)]}
    return {
        "e2e_train": [E2EShape("small", 8, 512, 10), E2EShape("small", 8, 512, 200), E2EShape("small", 32, 512, 200),
                      E2EShape("small", 128, 512, 200), E2EShape("medium", 8, 512, 200),
                      E2EShape("llama-1b", 8, 1024, 32)],
        "e2e_generate": [E2EShape("small", 8, 128, 200), E2EShape("small", 32, 128, 200),
                         E2EShape("small", 128, 128, 200), E2EShape("xl", 128, 128, 512, new_tokens=64),
                         E2EShape("llama-1b", 32, 256, 32)],
    }


def build(route: str, shape: E2EShape, device, dtype):
    """The model of one route and its trainable parameters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(shape.config()).to(dtype)
    base.set_attn_implementation("sdpa")
    if route == "native":
        from prefix_attn import PrefixTuning

        model = PrefixTuning(base, num_virtual_tokens=shape.P).to(device)
    else:
        from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

        if route == "prompt_tuning":
            config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=shape.P)
        else:
            config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=shape.P)
        model = get_peft_model(base, config).to(device)
        if route == "peft+patch":
            from prefix_attn import apply_prefix_attn_to_peft

            model = apply_prefix_attn_to_peft(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def _sync(device):
    if on_gpu(device):
        torch.cuda.synchronize()


def _time_ms(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _quantiles(times) -> tuple[float, float, float]:
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(x) for x in q)


def _peak_mb(fn, device) -> float:
    """GPU: the whole process's peak allocation during fn (weights included, as committed runs record
    it). CPU: the peak of tensor storages fn allocates and holds (activations, gradients, caches, the
    expanded prefix), counted by a dispatch mode."""
    if not on_gpu(device):
        return peak_memory_mb(fn, device)
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


def run(quick: bool, device, providers=None, dtype=None, **_) -> Iterator[dict]:
    dtype = dtype or (torch.bfloat16 if on_gpu(device) else torch.float32)
    routes = [r for r in (providers or ROUTES) if r in ROUTES]
    try:
        import peft  # noqa: F401
    except ImportError:
        for bench, points in shapes(quick, device).items():
            for s in points:
                for route in routes:
                    if route != "native":
                        yield {"bench": bench, "provider": route, "mode": "all", **dataclasses.asdict(s),
                               "skipped": "peft is not installed"}
        routes = [r for r in routes if r == "native"]
    for bench, points in shapes(quick, device).items():
        for s in points:
            ids, mask, base = _point_inputs(bench, bench, s, device, dtype)
            shape_routes = [r for r in routes if not (r == "prompt_tuning" and bench == "e2e_generate")]  # training only
            if on_gpu(device):
                yield from _routes_one_by_one(bench, s, shape_routes, ids, mask, device, dtype, base)
            else:
                yield from _routes_interleaved(bench, s, shape_routes, ids, mask, device, dtype, base)


# torch.compile options of the compiled modes on a GPU: inductor with CUDA graphs, the way users remove host cost
# from a whole step.
GRAPH_OPTIONS = {"mode": "reduce-overhead"}
# One point per mode: compiling each route's model takes most of a minute.
GRAPH_SHAPES = {"train": E2EShape("small", 8, 512, 200), "generate": E2EShape("small", 32, 128, 200)}
GRAPH_ROUTES = ("peft_sdpa", "peft+patch", "native")


def run_compiled(quick: bool, device, providers=None, dtype=None, **_) -> Iterator[dict]:
    """``python -m benchmarks --only graphs``: the compiled modes of issue 9 on a GPU, per route (PEFT+SDPA
    compiled alike): a training step under torch.compile(mode="reduce-overhead") (CUDA graphs) and generate()
    with a static cache, whose decoding step transformers compiles with the same options. Records: bench
    "graphs_train" / "graphs_generate", modes "train_step_compiled" / "generate_static_compiled"; without a GPU,
    skipped ones. A route that fails to compile or run gives a skipped record with the error, and the others
    still run."""
    dtype = dtype or (torch.bfloat16 if on_gpu(device) else torch.float32)
    routes = [r for r in (providers or GRAPH_ROUTES) if r in GRAPH_ROUTES]
    for kind, s in GRAPH_SHAPES.items():
        if on_gpu(device):
            yield from compiled_point(f"graphs_{kind}", f"e2e_{kind}", s, routes, device, dtype, GRAPH_OPTIONS)
        else:
            for route in routes:
                yield {"bench": f"graphs_{kind}", "provider": route, "mode": "all", **dataclasses.asdict(s),
                       "skipped": "CUDA graphs need a GPU"}


def compiled_point(bench, workload, s, routes, device, dtype, compiled):
    """Records of one point of the compiled modes: each route built, compiled with ``compiled`` (torch.compile
    options), warmed up and timed in turn (``run_compiled``; the CPU tests call it with a tiny shape)."""
    ids, mask, base = _point_inputs(bench, workload, s, device, dtype)
    yield from _routes_one_by_one(workload, s, routes, ids, mask, device, dtype, base, compiled)


def _point_inputs(bench, workload, s, device, dtype):
    """(input ids, attention mask of ones, the fields every record of the point carries) of one e2e point."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, s.config().vocab_size, (s.B, s.L), generator=g).to(device)
    base = dict(bench=bench, dtype=str(dtype).replace("torch.", ""), B=s.B, L=s.L, P=s.P, H=s.dims()[1],
                Hkv=s.dims()[2], D=s.dims()[3], model=s.model,
                **({"new_tokens": s.new_tokens} if workload == "e2e_generate" else {}),
                expanded_prefix_mb=s.expanded_prefix_bytes(torch.tensor([], dtype=dtype).element_size()) / 2**20)
    return ids, torch.ones_like(ids), base


def _routes_one_by_one(workload, s, routes, ids, mask, device, dtype, base, compiled=None):
    """One route's model at a time (on a GPU the peak memory is the process's, weights included). compiled
    (torch.compile options, see _workload): a route that fails to compile or run gives a skipped record naming
    the error, and each route's model compiles anew."""
    reps = 10 if workload == "e2e_train" else 3
    for route in routes:
        model = params = fn = None
        try:
            model, params = build(route, s, device, dtype)
            fn, mode, tokens = _workload(workload, model, params, ids, mask, s.new_tokens, compiled)
            times = [_time_ms(fn, device) for _ in range(reps)]
            yield {**base, "provider": route, **_record(fn, mode, tokens, times, device)}
        except torch.OutOfMemoryError:
            yield {**base, "provider": route, "mode": "all", "skipped": "out of memory"}
        except Exception as error:  # noqa: BLE001 - a route that cannot compile is a finding, not the sweep's end
            if compiled is None:
                raise
            yield {**base, "provider": route, "mode": "all", "skipped": f"{type(error).__name__}: {error}"[:500]}
        finally:
            model = params = fn = None
            gc.collect()
            if compiled is not None:
                torch._dynamo.reset()  # not against the last route's guards
            if on_gpu(device):
                torch.cuda.empty_cache()


def _routes_interleaved(bench, s, routes, ids, mask, device, dtype, base):
    """CPU: every route's model built first, then timed in turns (route A, B, C, A, B, C, ...), so that the
    shared machine's load drifts over all routes alike: timed one route after another, the tiny rows'
    ratios swung by 1.3x from run to run. The peak memory is counted per call (measure.peak_memory_mb)."""
    # A tiny generate() row takes about 0.1 s per call: 21 turns (7 before 2026-12-06, whose medians moved by up to
    # 10% between runs) cost about 6 s a row; the GPT-2 small rows take seconds per call and keep 7.
    reps = 20 if bench == "e2e_train" else 21 if s.model.endswith("tiny") else 7
    workloads = {}
    for route in routes:
        model, params = build(route, s, device, dtype)
        workloads[route] = _workload(bench, model, params, ids, mask, s.new_tokens)
    times = {route: [] for route in workloads}
    for _ in range(reps):
        for route, (fn, _, _) in workloads.items():
            times[route].append(_time_ms(fn, device))
    for route, (fn, mode, tokens) in workloads.items():
        yield {**base, "provider": route, **_record(fn, mode, tokens, times[route], device)}


def _workload(bench, model, params, ids, mask, new_tokens=32, compiled=None):
    """(fn, mode, tokens per call) of a route's model, warmed up: a training step (forward, backward,
    AdamW step on the trainable parameters, in train mode) or a greedy generate() of new_tokens.

    compiled: None (eager), or torch.compile options (GRAPH_OPTIONS on a GPU): the training step's model
    under torch.compile, generate() with a static cache whose decoding step transformers compiles with
    them (mode "train_step_compiled" / "generate_static_compiled")."""
    if bench == "e2e_train":
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        forward = model if compiled is None else torch.compile(model, **compiled)

        def step():
            if compiled is not None:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs are done
            loss = forward(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # warm-up: kernel compilation, optimizer state (and graph capture)
            step()
        return step, "train_step" if compiled is None else "train_step_compiled", ids.numel()
    model.eval()
    static = {} if compiled is None else dict(cache_implementation="static",
                                              compile_config=_compile_config(compiled, ids.device))

    def gen():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **static)

    for _ in range(1 if compiled is None else 2):  # compiled: the first call compiles, the second captures
        gen()
    return gen, "generate" if compiled is None else "generate_static_compiled", ids.shape[0] * new_tokens


def _compile_config(options: dict, device):
    """transformers' CompileConfig for generate()'s static-cache decoding step, with torch.compile ``options``.
    transformers compiles that step by itself on a GPU only; elsewhere (the CPU tests of this path) it is told
    to, through its own switch."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=options.get("fullgraph", False), mode=options.get("mode"),
                           backend=options.get("backend", "inductor"), dynamic=options.get("dynamic"))
    if not on_gpu(device):
        config._compile_all_devices = True
    return config


def _record(fn, mode, tokens, times, device) -> dict:
    ms = _quantiles(times)
    return {"mode": mode, "ms_p50": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "tokens_per_s": tokens / ms[0] * 1e3,
            "peak_mem_mb": _peak_mb(fn, device)}
