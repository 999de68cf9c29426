"""Single-process tests of the integration helpers: model inputs, the CP loss, argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cp_data.collate import ContextParallelCollator
from cp_data.integrations import ContextParallelAttention, cp_loss, model_inputs, sum_gradients
from test_attention import single_rank_group  # noqa: F401  (a gloo world of one process)


def llama3_batch() -> dict:
    instances = [dict(input_ids=torch.arange(1, 13), doc_lens=torch.tensor([5, 7]))]
    return ContextParallelCollator(load_balancer="llama3", cp_rank=1, cp_world_size=2)(instances)


def test_model_inputs_hold_ids_positions_and_metadata_but_not_labels():
    batch = llama3_batch()
    inputs = model_inputs(batch, "cpu")
    assert list(inputs) == [
        "input_ids",
        "position_ids",
        "cu_doc_lens_q",
        "cu_doc_lens_k",
        "max_doc_len_q",
        "max_doc_len_k",
        "local_k_slice",
    ]
    assert inputs["position_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]  # rank 1: in document 2 of 7
    assert inputs["local_k_slice"] == slice(5, 12) and inputs["max_doc_len_k"] == 7
    assert model_inputs(batch)["input_ids"] is batch["input_ids"]  # no device: nothing moved
    with pytest.raises(ValueError, match="missing metadata among keys"):
        model_inputs({key: batch[key] for key in ("input_ids", "labels", "position_ids")})


def test_cp_loss_is_the_mean_over_labelled_tokens_on_one_rank(single_rank_group):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 4, 0, -100, 2]])
    loss = cp_loss(logits, labels, dist.group.WORLD)
    want = F.cross_entropy(logits[0], labels[0], ignore_index=-100)
    torch.testing.assert_close(loss, want, atol=1e-15, rtol=0)
    got_grad, want_grad = (torch.autograd.grad(x, logits)[0] for x in (loss, want))
    torch.testing.assert_close(got_grad, want_grad, atol=1e-15, rtol=0)
    empty = cp_loss(logits, torch.full((1, 6), -100), dist.group.WORLD)
    assert float(empty.detach()) == 0.0  # nothing to predict: no NaN
    half = cp_loss(logits.detach().bfloat16(), labels, dist.group.WORLD)
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match=r"logits \(6, 5\) and labels \(5,\) must hold the same tokens"):
        cp_loss(logits, labels[:, :5], dist.group.WORLD)


def test_sum_gradients_on_one_rank_keeps_them(single_rank_group):
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    before = [p.grad.clone() for p in layer.parameters()]
    sum_gradients(layer.parameters(), dist.group.WORLD)
    assert all(torch.equal(p.grad, b) for p, b in zip(layer.parameters(), before))


def test_attention_function_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="group is required"):
        ContextParallelAttention(None, "zig_zag")
    with pytest.raises(ValueError, match="backend must be one of"):
        ContextParallelAttention("cp", "zig_zag", backend="cuda")
    with pytest.raises(ValueError, match="unknown load balancer 'ring'"):
        ContextParallelAttention("cp", "ring")
    attention = ContextParallelAttention("cp", "zig_zag")
    x = torch.zeros(1, 4, 6, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="call the model without attention_mask"):
        attention(module, x, x, x, torch.ones(1, 1, 6, 6))
    with pytest.raises(ValueError, match="no attention dropout"):
        attention(module, x, x, x, None, dropout=0.1)
    with pytest.raises(ValueError, match="got batch size 2"):
        attention(module, x.expand(2, -1, -1, -1), x, x, None)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        attention(module, x, x, x, None, sliding_window=4)
