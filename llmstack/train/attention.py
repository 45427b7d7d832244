"""Per-document attention for packed training batches, registered with transformers.

TRL's `bfd` packing puts several documents in one row with no padding ("padding-free") and marks where each starts:
position_ids restart at 0 and its collator passes `cu_seq_lens_q/k` (cumulative document lengths) to the model. With
transformers' "sdpa" attention those boundaries become a dense block-diagonal mask over the whole packed row: correct,
but SDPA then computes all total² scores, most of them masked out. Attending within each document only costs the sum
of the documents' squares instead:

- on CUDA, the flash attention "varlen" kernel. transformers reaches it through the `flash-attn` package, which has no
  wheel for the GPU image's torch 2.11 / CUDA 13 and takes an hour to build; PyTorch ships the same kernel as
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10);
- elsewhere (the CPU), SDPA over runs of whole documents (`document_kernel`): a document longer than `RUN_TOKENS`
  alone with `is_causal` (SDPA's fused causal kernel, no mask), shorter neighbours together under a block-diagonal
  mask of their run only, so that a row of many short documents is a few calls rather than one per document.
  PyTorch has no CPU varlen kernel, and flex_attention on the CPU compiles through inductor first.

Nothing in transformers, TRL or peft wires either in, so this module registers them under the name "llmstack_varlen"
(hand-written for that reason). Batches that are not packed (padding masks, decoding with a KV cache) go to
transformers' own SDPA path. scripts/bench_train.py times the stage with and without it.
"""

from __future__ import annotations

import functools
import inspect

NAME = "llmstack_varlen"
# Documents shorter than this share one masked SDPA call with their neighbours: each call has a fixed cost, which a
# row of many short documents would otherwise pay per document, while the scores the mask throws away stay within a
# block this long. A longer document gets the causal kernel alone.
RUN_TOKENS = 128


def available() -> bool:
    """True where a per-document kernel runs: on CUDA PyTorch's varlen flash kernel (torch >= 2.10); without CUDA
    `document_kernel` (plain SDPA). A CUDA machine whose torch lacks the varlen kernel keeps transformers' SDPA."""
    import torch

    if not torch.cuda.is_available():
        return True
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
    kernel = _varlen_kernel() if q.is_cuda else document_kernel
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


def runs(cu: list[int], run_tokens: int = RUN_TOKENS) -> list[list[int]]:
    """Document boundaries `cu` (cumulative, starting at 0) cut into runs of consecutive documents, each run its own
    boundaries: a run takes the next document while it stays within `run_tokens` tokens; a longer document is a run
    of its own."""
    out = [[cu[0]]]
    for end in cu[1:]:
        if len(out[-1]) > 1 and end - out[-1][0] > run_tokens:
            out.append([out[-1][-1]])
        out[-1].append(end)
    return out


def document_kernel(q, k, v, cu, max_len, scale, run_tokens: int = RUN_TOKENS):
    """Per-document causal attention through SDPA, one call per run of documents (`runs`): a run of one document
    with is_causal, a run of several under its block-diagonal causal mask. (total, heads, dim) in and out; `max_len`
    is unused (the varlen kernel's signature). Inputs go to SDPA as contiguous (1, heads, len, dim) blocks: the CPU's
    fused kernel takes only those, and a strided or 3-d view falls back to a much slower path."""
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    outs = []
    for bounds in runs(cu.tolist(), run_tokens):
        start, end = bounds[0], bounds[-1]
        qi, ki, vi = (t[start:end].transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
        if groups > 1:
            ki, vi = ki.repeat_interleave(groups, dim=1), vi.repeat_interleave(groups, dim=1)
        if len(bounds) == 2:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:
            doc = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=q.device),
                                          torch.tensor(bounds, device=q.device).diff())
            mask = (doc[:, None] == doc[None, :]).tril()
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)
