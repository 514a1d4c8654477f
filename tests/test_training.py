"""Training through the integration: loss curves equal PEFT's, learning, dropout, DDP, HF Trainer.

Tiny random GPT-2s on the CPU (backend "auto" = the torch backend), float32, a few dozen steps.
"""
import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import prefix_attn.integrations.hf_attention as hf_attention
from prefix_attn import PrefixTuning, apply_prefix_attn_to_peft
from tests.helpers import run_two_workers

VOCAB, P = 100, 4
TASK_TOKENS = (torch.arange(10, 15), torch.arange(50, 55))  # task t's sequences use these tokens only


def tiny_model(seed=0, **overrides):
    """A tiny random GPT-2. The learning tests use initializer_range=0.3: with GPT-2's 0.02 a 32-wide
    random model's tied embeddings give logits too small (|logit| < 1) for any prefix to fit a task."""
    kwargs = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, attn_pdrop=0.0, resid_pdrop=0.0,
                  embd_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**kwargs, attn_implementation="eager"))


def task_batch(generator, batch=8, length=12, tasks=None):
    """Sequences of task t's tokens; (input_ids, attention_mask, labels, prefix_idx)."""
    tasks = torch.randint(0, 2, (batch,), generator=generator) if tasks is None else tasks
    choice = torch.randint(0, 5, (batch, length), generator=generator)
    ids = torch.stack([TASK_TOKENS[int(t)][c] for t, c in zip(tasks, choice)])
    mask = torch.ones(batch, length, dtype=torch.long)
    return ids, mask, ids.clone(), tasks


@pytest.mark.parametrize("projection", [False, True])
def test_loss_curve_equals_peft(projection):
    """Liger-style convergence check: PEFT alone and PEFT + patch, same seed, dropout off, 30 AdamW steps."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=24)
    ref = peft.get_peft_model(tiny_model(initializer_range=0.3), config)
    ours = apply_prefix_attn_to_peft(copy.deepcopy(ref))
    curves = []
    for model in (ref, ours):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=3e-2 if projection else 1e-1)
        generator = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(30):
            ids, mask, labels, _ = task_batch(generator, tasks=torch.zeros(8, dtype=torch.long))
            mask[:2, -3:] = 0  # some right padding
            labels = labels.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(torch.tensor(losses, dtype=torch.float64))
    ref_curve, our_curve = curves
    assert ref_curve[-1] < 0.6 * ref_curve[0]  # it trained
    # float32 rounding compounds through 30 optimizer steps; observed differences are ~1e-6.
    err = (our_curve - ref_curve).abs().max().item()
    assert err <= 1e-4, f"loss curves differ by {err:.3g}: {our_curve.tolist()} vs {ref_curve.tolist()}"


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_native_prefix_learns_two_tasks_in_mixed_batches(projection_dim):
    tuned = PrefixTuning(tiny_model(initializer_range=0.3), P, num_tasks=2, projection_dim=projection_dim)
    tuned.train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=3e-1 if projection_dim is None else 1e-1)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        ids, mask, labels, tasks = task_batch(generator)
        loss = tuned(ids, attention_mask=mask, labels=labels, prefix_idx=tasks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # Each task's prefix steers towards its own tokens.
    tuned.eval()
    ids = torch.tensor([[10, 11, 12, 13], [50, 51, 52, 53]])
    with torch.no_grad():
        probs = tuned(ids, prefix_idx=torch.tensor([0, 1])).logits[:, -1].softmax(-1)
    own = probs[0, TASK_TOKENS[0]].sum(), probs[1, TASK_TOKENS[1]].sum()
    other = probs[0, TASK_TOKENS[1]].sum(), probs[1, TASK_TOKENS[0]].sum()
    assert own[0] > 0.3 and own[1] > 0.3 and own[0] > 5 * other[0] and own[1] > 5 * other[1], (own, other)


def test_attention_dropout_is_honoured(monkeypatch):
    seen = []
    entry = hf_attention.causal_attention_heads_first

    def spy(*args):
        seen.append(args[-1])  # dropout_p
        return entry(*args)

    monkeypatch.setattr(hf_attention, "causal_attention_heads_first", spy)
    tuned = PrefixTuning(tiny_model(attn_pdrop=0.3), P, num_tasks=2)
    plain = PrefixTuning(tiny_model(attn_pdrop=0.0), P, num_tasks=2)  # same weights, no dropout
    plain.load_state_dict(tuned.state_dict())
    ids, mask, _, tasks = task_batch(torch.Generator().manual_seed(0), batch=3)

    def logits(model, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(ids, attention_mask=mask, prefix_idx=tasks).logits

    tuned.train()
    first, again, other = logits(tuned, 1), logits(tuned, 1), logits(tuned, 2)
    assert set(seen) == {0.3}
    assert torch.equal(first, again)  # same seed, same dropout mask
    assert not torch.allclose(first, other, atol=1e-3)  # another seed drops other probabilities
    seen.clear()
    tuned.eval()
    assert torch.equal(logits(tuned, 1), logits(tuned, 2))
    assert set(seen) == {0.0}
    torch.testing.assert_close(logits(tuned, 1), logits(plain.eval(), 1), rtol=0, atol=1e-6)


# ---- DDP over two CPU processes ------------------------------------------------------------------

def _ddp_tuned():
    tuned = PrefixTuning(tiny_model(), P, num_tasks=2, projection_dim=8)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in tuned.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return tuned


def _ddp_batch():
    return task_batch(torch.Generator().manual_seed(6), batch=6, tasks=torch.tensor([0, 1, 1, 0, 1, 1]))


def _ddp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    # Gloo picks its network interface from the hostname unless told: on machines whose hostname
    # resolves to an unreachable address the rendezvous hangs. Both processes are local: loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_ddp_tuned())
        ids, mask, labels, tasks = _ddp_batch()
        rows = slice(rank * 3, rank * 3 + 3)  # equal halves, no padding: the mean of means is the mean
        model(ids[rows], attention_mask=mask[rows], labels=labels[rows], prefix_idx=tasks[rows]).loss.backward()
        grads = {name: p.grad for name, p in model.module.named_parameters() if p.requires_grad}
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        # Free DDP's reducer while the process group still exists: freed after
        # destroy_process_group() it can block in gloo (an intermittent hang seen here).
        dist.barrier()
        del model, grads
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_over_the_whole_batch(tmp_path):
    run_two_workers(_ddp_worker, tmp_path, "DDP")
    tuned = _ddp_tuned()
    ids, mask, labels, tasks = _ddp_batch()
    tuned(ids, attention_mask=mask, labels=labels, prefix_idx=tasks).loss.backward()
    want = {name: p.grad for name, p in tuned.named_parameters() if p.requires_grad}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == want.keys()
        for name in want:
            assert want[name].abs().sum() > 0
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


# ---- HF Trainer ----------------------------------------------------------------------------------

class _TaskDataset(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.ids, self.mask, self.labels, self.tasks = task_batch(torch.Generator().manual_seed(9), batch=n)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i],
                "prefix_idx": self.tasks[i]}


def test_hf_trainer_trains_and_saves(tmp_path):
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    tuned = PrefixTuning(tiny_model(), P, num_tasks=2, projection_dim=8)
    base_before = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    prefix_before = {k: v.clone() for k, v in tuned.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="steps", save_steps=3,
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=True)
    trainer = Trainer(model=tuned, args=args, train_dataset=_TaskDataset())
    result = trainer.train()
    assert result.global_step == 3
    assert all(torch.equal(v, base_before[k]) for k, v in tuned.model.state_dict().items())  # frozen
    assert any(not torch.equal(v, prefix_before[k]) for k, v in tuned.state_dict().items())  # trained
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-3"):
        saved = load_file(str(folder / "model.safetensors"))
        assert set(saved) == set(prefix_before)  # the prefix alone, not the frozen GPT-2
    reloaded = PrefixTuning(tiny_model(), P, num_tasks=2, projection_dim=8)
    reloaded.load_state_dict(load_file(str(tmp_path / "final" / "model.safetensors")))
    ids, mask, _, tasks = task_batch(torch.Generator().manual_seed(1), batch=3)
    tuned.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, prefix_idx=tasks).logits, tuned(ids, prefix_idx=tasks).logits)
