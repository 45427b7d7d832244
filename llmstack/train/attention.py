"""Per-document attention for packed training batches, at flash-attention speed, registered with transformers.

TRL's `bfd` packing puts several documents in one row with no padding ("padding-free") and marks where each starts:
position_ids restart at 0 and its collator passes `cu_seq_lens_q/k` (cumulative document lengths) to the model. With
transformers' "sdpa" attention those boundaries become a dense block-diagonal mask over the whole packed row: correct,
but SDPA then runs its masked (memory-efficient) kernel over total² scores, most of them masked out. The flash
attention "varlen" kernel instead attends within each document only. transformers reaches that kernel through the
`flash-attn` package, which has no wheel for the GPU image's torch 2.11 / CUDA 13 and takes an hour to build; PyTorch
ships the same kernel as `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10). Nothing in transformers, TRL or peft
wires that one in, so this module registers it under the name "llmstack_varlen" (hand-written, ~40 lines, for that
reason). Batches that are not packed (padding masks, decoding with a KV cache) go to transformers' own SDPA path.
"""

from __future__ import annotations

import functools
import inspect

NAME = "llmstack_varlen"


def available() -> bool:
    """True where the varlen kernel runs: a CUDA device and a torch that ships torch.nn.attention.varlen."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> str:
    """Register the attention and its mask function with transformers; returns the name for attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def _mask(*args, **kwargs):
    """No mask for padding-free batches (the kernel takes document boundaries instead); a padded batch gets the
    ordinary SDPA mask and goes down the SDPA path."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             cu_seq_lens_q=None, max_length_q=None, position_ids=None, **kwargs):
    """transformers attention interface: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq, dim);
    returns (batch, seq, heads, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, s, d = query.shape
    if attention_mask is not None or key.shape[2] != s or (cu_seq_lens_q is None and position_ids is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    if cu_seq_lens_q is None:
        cu_seq_lens_q, max_length_q = boundaries(position_ids.expand(b, s))
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, kv_heads, d)
    v = value.transpose(1, 2).reshape(b * s, kv_heads, d)
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    kernel = _varlen_kernel() if q.is_cuda else reference_kernel
    out = kernel(q, k, v, cu, int(max_length_q), scaling)
    return out.view(b, s, h, d), None


def boundaries(position_ids):
    """Cumulative document lengths of a packed batch, flattened row after row: a document starts where its
    position id is 0 (and every row starts a document)."""
    import torch

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


@functools.cache
def _varlen_kernel():
    """varlen_attn's keyword arguments moved between torch releases (2.10: is_causal; later: window_size=(-1, 0) for
    causal, enable_gqa): adapt to the installed one once."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    native_gqa = "enable_gqa" in params

    def kernel(q, k, v, cu, max_len, scale):
        kw = dict(causal)
        if "scale" in params:
            kw["scale"] = scale
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                kw["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    return kernel


def reference_kernel(q, k, v, cu, max_len, scale):
    """The same computation one document at a time through SDPA: what the CPU tests check the dispatch against,
    and the path on a machine without the CUDA kernel. (total, heads, dim) in and out."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qi, ki, vi = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
        ki, vi = ki.repeat_interleave(groups, dim=0), vi.repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1)
    return out
