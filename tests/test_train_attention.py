"""Per-document attention for packed batches (llmstack/train/attention.py).

On CPU the registered attention runs `document_kernel` (SDPA over runs of whole documents); on CUDA the same dispatch
calls PyTorch's varlen flash kernel, which scripts/gpu_check.sh checks against `document_kernel` on the GPU. Here we
check the dispatch (boundaries from TRL's collator or from position_ids, the (batch, heads, seq, dim) reshapes, GQA,
the fallback for padded batches) against the ground truth of running each document on its own, and the CPU kernel's
values and gradients against SDPA with the full block-diagonal mask.
"""

import pytest
import torch

from llmstack.train import attention


def small_gqa_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


DOCS = [torch.arange(3, 10), torch.arange(20, 33), torch.arange(40, 45)]  # 7 + 13 + 5 tokens


def packed_batch():
    ids = torch.cat(DOCS)[None]
    pos = torch.cat([torch.arange(len(d)) for d in DOCS])[None]
    cu = torch.tensor([0, 7, 20, 25], dtype=torch.int32)
    return ids, pos, cu


def one_by_one(model):
    with torch.no_grad():
        return torch.cat([model(d[None]).logits[0] for d in DOCS])


def test_boundaries_from_position_ids():
    _, pos, cu = packed_batch()
    got, longest = attention.boundaries(pos)
    assert got.tolist() == cu.tolist() and longest == 13
    # two rows, the second not starting a new document at 0 in the flat view still starts one
    got, _ = attention.boundaries(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]))
    assert got.tolist() == [0, 3, 5, 10]


@pytest.mark.parametrize("with_cu", [True, False], ids=["collator-cu_seq_lens", "position_ids-only"])
def test_packed_logits_equal_each_document_alone(with_cu):
    name = attention.register()
    model = small_gqa_llama(name)
    truth = one_by_one(model)
    ids, pos, cu = packed_batch()
    extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 13, "max_length_k": 13} if with_cu else {}
    with torch.no_grad():
        packed = model(ids, position_ids=pos, **extra).logits[0]
    torch.testing.assert_close(packed, truth, atol=1e-5, rtol=1e-5)
    # the check can fail: without document boundaries the later documents attend to the earlier ones
    with torch.no_grad():
        leaky = model(ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
    assert not torch.allclose(leaky[7:], truth[7:], atol=1e-3)


def test_matches_transformers_sdpa_on_packed_and_padded_batches():
    ours = small_gqa_llama(attention.register())
    sdpa = small_gqa_llama("sdpa")
    ids, pos, _ = packed_batch()
    padded = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    mask = (padded != 0).long()
    with torch.no_grad():
        # use_cache=False as TRL passes in training: with a cache transformers does not look for packed sequences
        torch.testing.assert_close(ours(ids, position_ids=pos, use_cache=False).logits,
                                   sdpa(ids, position_ids=pos, use_cache=False).logits, atol=1e-5, rtol=1e-5)
        a, b = ours(padded, attention_mask=mask).logits, sdpa(padded, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)


def test_generation_with_kv_cache_takes_the_sdpa_path():
    ours = small_gqa_llama(attention.register())
    sdpa = small_gqa_llama("sdpa")
    prompt = torch.tensor([[3, 4, 5, 6]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert ours.generate(prompt, **kw).tolist() == sdpa.generate(prompt, **kw).tolist()


def test_sft_stage_uses_it_only_where_the_kernel_runs():
    from trl import SFTConfig

    from llmstack.train.loading import packed_attention

    packed = SFTConfig(output_dir="/tmp/x", packing=True, packing_strategy="bfd", use_cpu=True, bf16=False)
    unpacked = SFTConfig(output_dir="/tmp/x", packing=False, use_cpu=True, bf16=False)
    assert packed_attention(unpacked) is None
    assert packed_attention(packed) == attention.NAME  # on CUDA with torch >= 2.10, and on every CPU


def test_runs_group_short_neighbours_and_leave_a_long_document_alone():
    assert attention.runs([0, 7, 20, 25], run_tokens=128) == [[0, 7, 20, 25]]
    assert attention.runs([0, 50, 100, 150, 400, 410], run_tokens=128) == [[0, 50, 100], [100, 150], [150, 400],
                                                                           [400, 410]]
    assert attention.runs([0, 300], run_tokens=128) == [[0, 300]]


@pytest.mark.parametrize("lens", [[7, 13, 5], [40, 3, 90, 1, 200, 30, 30], [256], [1, 1, 1, 60]],
                         ids=["short", "mixed", "one-long", "ones"])
@pytest.mark.parametrize("run_tokens", [1, 16, 128, 4096])
def test_document_kernel_equals_sdpa_with_the_block_diagonal_mask_values_and_gradients(lens, run_tokens):
    import torch.nn.functional as F

    torch.manual_seed(0)
    total, heads, kv_heads, dim = sum(lens), 4, 2, 16
    q, k, v = (torch.randn(total, h, dim, requires_grad=True, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()

    def dense():
        qq, kk, vv = (t.transpose(0, 1)[None] for t in (q, k, v))
        kk, vv = kk.repeat_interleave(2, dim=1), vv.repeat_interleave(2, dim=1)
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=0.3)[0].transpose(0, 1)

    grad = torch.randn(total, heads, dim, dtype=torch.float64)
    ours = attention.document_kernel(q, k, v, cu, max(lens), 0.3, run_tokens=run_tokens)
    truth = dense()
    torch.testing.assert_close(ours, truth)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(truth, (q, k, v), grad)):
        torch.testing.assert_close(a, b)
    if len(lens) > 1:  # the check can fail: one causal call over the whole row lets documents see each other
        leaky = attention.document_kernel(q, k, v, torch.tensor([0, total], dtype=torch.int32), total, 0.3)
        assert not torch.allclose(leaky, truth)
