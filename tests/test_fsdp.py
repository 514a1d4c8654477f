"""FSDP2 (torch.distributed.fsdp.fully_shard) over a patched Llama with PEFT prefix tuning: two CPU
processes with gloo give the loss and prefix gradients of one process over the whole batch.

The tiny Llama has 4 query heads over 2 KV heads; each decoder layer and the root (the PEFT model,
holding the prompt encoder) are sharded; the frozen base weights are sharded too.
"""
import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("peft")
from peft import PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import prefix_attn.integrations.hf_attention as hf_attention  # noqa: E402
from prefix_attn import apply_prefix_attn_to_peft  # noqa: E402
from tests.helpers import run_two_workers  # noqa: E402

VOCAB, P, ROWS = 100, 4, 3


def _peft_llama():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                        attn_implementation="eager"))
    torch.manual_seed(1)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                encoder_hidden_size=24)
    return apply_prefix_attn_to_peft(get_peft_model(base, config))


def _batch():
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, VOCAB, (2 * ROWS, 7), generator=g)
    return ids, torch.ones_like(ids)


def _loss(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, labels=ids).loss


def _fsdp_worker(rank, world_size, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # both processes are local (see test_training's DDP test)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = _peft_llama()
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids, mask = _batch()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)  # equal halves, no padding: the mean of means is the mean
        seen, entry = [], hf_attention.causal_attention_heads_first

        def spy(q, k, v, prefix_k, prefix_v, *args):  # the fused route, not PEFT's cache
            seen.append((tuple(k.transpose(1, 2).shape), None if prefix_k is None else tuple(prefix_k.shape)))
            return entry(q, k, v, prefix_k, prefix_v, *args)

        hf_attention.causal_attention_heads_first = spy
        loss = _loss(model, ids[rows], mask[rows])
        assert seen == [((ROWS, 7, 2, 16), (P, 2, 16))] * 2, seen
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.prompt_encoder.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_loss_and_prefix_gradients_equal_one_process(tmp_path):
    run_two_workers(_fsdp_worker, tmp_path, "FSDP2")
    model = _peft_llama()
    ids, mask = _batch()
    _loss(model, ids, mask).backward()
    want = {name: p.grad for name, p in model.prompt_encoder.named_parameters()}
    with torch.no_grad():
        halves = [_loss(copy.deepcopy(model), ids[r * ROWS:(r + 1) * ROWS], mask[r * ROWS:(r + 1) * ROWS])
                  for r in range(2)]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], halves[rank], rtol=1e-5, atol=1e-6, msg=f"rank {rank} loss")
        assert got["grads"].keys() == want.keys()
        for name in want:
            assert want[name].abs().sum() > 0
            torch.testing.assert_close(got["grads"][name], want[name], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {name}")
