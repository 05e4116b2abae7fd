"""SCAN stacked cross attention (Lee et al. 2018, §3.1–3.2), batched: all images × all captions of a shard.

Public scoring functions (used by SCAN, PFAN, GLFN and evaluation):

    t2i_scores(regions, num_regions, words, lengths, **hp) -> [I, C]
    i2t_scores(regions, num_regions, words, lengths, **hp) -> [I, C]

regions [I, R, d] (region embeddings), num_regions [I] (valid regions, or None = all R), words [C, W, d]
(word embeddings), lengths [C] (valid words). Padding rows are ignored (masked), so results do not depend on
R or W padding. Hyperparameters (keyword-only): ``lambda_softmax`` (λ₁, attention temperature),
``agg`` ∈ {LogSumExp, Mean, Max, Sum} over words (t2i) or regions (i2t), ``lambda_lse`` (λ₂),
``raw_norm`` ∈ {clipped_l2norm, none} (normalisation of the raw cosine logits before the softmax),
``max_term`` (t2i only, weight of an extra term, see below), ``max_elems`` (shard size bound) and ``eps``.

Text-to-image (t2i), for caption c and image i, word w, region r:
    s_wr = e_w·v_r;  ŝ_wr = [s_wr]₊(leaky 0.1) / ‖[s_·r]₊‖₂ over words (clipped_l2norm);
    α_wr = softmax_r(λ₁ ŝ_wr);  a_w = Σ_r α_wr v_r;  R(e_w, a_w) = cos(e_w, a_w);
    S(i, c) = (1/λ₂) log Σ_w exp(λ₂ R)   (LogSumExp)   or   mean_w R   (Mean).
Image-to-text (i2t) is the mirror: the roles of words and regions swap.

Speed: the attended vectors a_w are never materialised. The cosine's numerator e_w·a_w = Σ_r α_wr s_wr
reuses the logits, and ‖a_w‖² = α_w G α_wᵀ with G = V Vᵀ the regions' [R, R] Gram matrix (for i2t, the
words' [W, W] Gram matrix). The only O(d) work is one GEMM [C·W, d] × [d, I·R] per shard. Shards over
images and captions keep every intermediate under ``max_elems`` elements of [C, W, I, R].

Inference (no autograd: evaluation, retrieval) runs each shard at the GEMM's floor: the rest is ~12 passes
over the shard, in place, in reused buffers (no allocations, no page faults), in the layout [k, l, m, q]
(context item and row, query row and item) that puts every reduction on an outer dimension, vectorised
along the contiguous query items; the softmax stays unnormalised (its sum z cancels: Σ_r α s = Σ_r E s / z,
α G αᵀ = E G Eᵀ / z²; for the clipped logits, |λ₁ŝ| <= |λ₁|, no max shift at |λ₁| <= 20 in float32). On
CPU the shards are further cut to ``CPU_BLOCK`` (2^20) elements so that the passes run in cache.
``benchmarks/scoring_bench.py`` measures both directions against that floor (the same GEMMs alone): on 2
CPU threads, 1000 × 1000 pairs, d = 1024, R = 36, 12 words, ours is ≥ 0.75 of the floor (see
docs/training.md for the figures). Training (autograd) keeps the out-of-place shard, [k, l, q, m].

``max_term`` (PFAN's released code, off by default): S(i, c) += max_term · agg_w(max_r α_wr), i.e. each word's
largest attention weight over the regions, aggregated like the main term (PFAN's ``model_attention.py``,
HaoYang0123/Position-Focused-Attention-Network @ 3e6a304: ``func_attention`` returns ``max_attnT``, the max over
regions of the softmax weights, line 287; ``xattn_score_t2i`` aggregates it and adds 0.5 ×, lines 353–372).

The ``*_reference`` functions are the straightforward per-caption loop of SCAN's released code (with
masking added), kept as the test oracle and the benchmark's baseline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from itmatch.models.encoders import length_mask, upcast

AGGS = ("LogSumExp", "Mean", "Max", "Sum")
RAW_NORMS = ("clipped_l2norm", "none")


def _check(regions: torch.Tensor, num_regions: torch.Tensor | None, words: torch.Tensor, lengths: torch.Tensor,
           agg: str, raw_norm: str) -> torch.Tensor:
    if regions.dim() != 3 or words.dim() != 3 or regions.shape[2] != words.shape[2]:
        raise ValueError(f"need regions [I,R,d] and words [C,W,d] with equal d, got {tuple(regions.shape)} "
                         f"and {tuple(words.shape)}")
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if raw_norm not in RAW_NORMS:
        raise ValueError(f"raw_norm must be one of {RAW_NORMS}, got {raw_norm!r}")
    if lengths.shape != (words.shape[0],):
        raise ValueError(f"lengths must be [C]={words.shape[0]}, got {tuple(lengths.shape)}")
    if num_regions is None:
        return torch.full((regions.shape[0],), regions.shape[1], dtype=torch.long, device=regions.device)
    return num_regions


def _aggregate(x: torch.Tensor, mask: torch.Tensor, dim: int, agg: str, lambda_lse: float,
               count: torch.Tensor) -> torch.Tensor:
    """Aggregate ``x`` over ``dim`` at valid positions (``mask`` broadcastable to x)."""
    if agg == "LogSumExp":
        return torch.logsumexp((lambda_lse * x).masked_fill(~mask, float("-inf")), dim=dim) / lambda_lse
    if agg == "Max":
        return x.masked_fill(~mask, float("-inf")).amax(dim=dim)
    s = (x * mask).sum(dim=dim)
    return s / count.clamp(min=1) if agg == "Mean" else s


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite gradient at 0 (padding rows are exactly 0)."""
    return x.clamp(min=1e-30).sqrt()


def _shards(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, max(1, size))]


def _shard_sizes(I: int, C: int, R: int, W: int, max_elems: int) -> tuple[int, int]:
    """Shard sizes of the two sets with Ib·Cb·R·W <= max_elems."""
    per_pair = max(1, R * W)
    pairs = max(1, max_elems // per_pair)
    cb = min(C, max(1, int(math.sqrt(pairs))))
    ib = min(I, max(1, pairs // cb))
    cb = min(C, max(1, pairs // ib))
    return ib, cb


def t2i_scores(regions: torch.Tensor, num_regions: torch.Tensor | None, words: torch.Tensor,
               lengths: torch.Tensor, *, lambda_softmax: float = 9.0, agg: str = "LogSumExp",
               lambda_lse: float = 6.0, raw_norm: str = "clipped_l2norm", max_term: float = 0.0,
               max_elems: int = 1 << 23, eps: float = 1e-8) -> torch.Tensor:
    """Text-to-image stacked cross attention scores [I, C] (see the module docstring)."""
    num_regions = _check(regions, num_regions, words, lengths, agg, raw_norm)
    # context = regions (attended), queries = words (aggregated) → [I, C]
    return _xattn(regions, num_regions, words, lengths, lambda_softmax, agg, lambda_lse, raw_norm, max_term,
                  max_elems, eps)


def i2t_scores(regions: torch.Tensor, num_regions: torch.Tensor | None, words: torch.Tensor,
               lengths: torch.Tensor, *, lambda_softmax: float = 4.0, agg: str = "Mean",
               lambda_lse: float = 6.0, raw_norm: str = "clipped_l2norm", max_term: float = 0.0,
               max_elems: int = 1 << 23, eps: float = 1e-8) -> torch.Tensor:
    """Image-to-text stacked cross attention scores [I, C] (see the module docstring); ``max_term`` unused."""
    num_regions = _check(regions, num_regions, words, lengths, agg, raw_norm)
    # context = words, queries = regions → [C, I]
    return _xattn(words, lengths, regions, num_regions, lambda_softmax, agg, lambda_lse, raw_norm, 0.0,
                  max_elems, eps).t()


def _xattn(K: torch.Tensor, klens: torch.Tensor, Q: torch.Tensor, qlens: torch.Tensor, lam: float, agg: str,
           lam_lse: float, raw_norm: str, max_term: float, max_elems: int, eps: float) -> torch.Tensor:
    """Context sets K [Nk, Lk, d] (attended) × query sets Q [Nq, Lq, d] (aggregated) → [Nk, Nq].

    Both directions are this one computation: t2i has context = regions, queries = words; i2t the reverse.
    Padding rows are zeroed first, so their logits are exactly 0 (no masking needed in the norms)."""
    Nk, Lk, _ = K.shape
    Nq, Lq, _ = Q.shape
    if Nk == 0 or Nq == 0:
        return K.new_zeros(Nk, Nq)
    Lk = max(1, int(klens.max()))  # drop all-padding columns
    Lq = max(1, int(qlens.max()))
    # sort both sets by length so that each shard is trimmed to its own longest item (real captions have a
    # long tail of lengths; padding would otherwise cost as much as words)
    kperm = torch.argsort(klens, descending=True, stable=True)
    qperm = torch.argsort(qlens, descending=True, stable=True)
    klens, qlens = klens[kperm], qlens[qperm]
    grad = torch.is_grad_enabled() and (K.requires_grad or Q.requires_grad)
    kshards, qshards = _plan(klens, qlens, max_elems, K.device, grad)
    if not grad:
        out = _xattn_inference(K, kperm, klens, Q, qperm, qlens, kshards, qshards, lam, agg, lam_lse, raw_norm,
                               max_term, eps)
        return out[torch.argsort(kperm)][:, torch.argsort(qperm)]
    kmask = length_mask(klens, Lk)  # [Nk, Lk]
    qmask = length_mask(qlens, Lq)  # [Nq, Lq]
    K = K[kperm, :Lk].mul_(kmask[..., None].to(K.dtype))  # (the gather is a copy: zero its padding in place)
    Q = Q[qperm, :Lq].mul_(qmask[..., None].to(Q.dtype))
    G = K @ K.transpose(1, 2)  # [Nk, Lk, Lk] context Gram matrices
    q_norm = _sqrt(Q.pow(2).sum(2))  # [Nq, Lq]
    rows = []
    for k0, k1, lk in kshards:
        cols = [_xattn_shard(K[k0:k1, :lk], kmask[k0:k1, :lk], klens[k0:k1], G[k0:k1, :lk, :lk],
                             Q[q0:q1, :lq], qmask[q0:q1, :lq], qlens[q0:q1], q_norm[q0:q1, :lq], lam, agg,
                             lam_lse, raw_norm, max_term, eps)
                for q0, q1, lq in qshards]
        rows.append(torch.cat(cols, 1))
    out = torch.cat(rows, 0)  # rows / columns in sorted order
    return out[torch.argsort(kperm)][:, torch.argsort(qperm)]


# CPU inference shards: at most this many elements of [C, W, I, R] (besides ``max_elems``), so that the shard
# buffers (3 × this many floats) stay in cache between the passes over them (2^19–2^21 measured alike within
# the noise; 2^22 was ~7% slower on 1 thread)
CPU_BLOCK = 1 << 20


def _plan(klens: torch.Tensor, qlens: torch.Tensor, max_elems: int, device: torch.device, grad: bool
          ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Shards (start, end, longest length) of the two length-sorted (descending) sets."""
    Lk = max(1, int(klens[0])) if len(klens) else 1
    Lq = max(1, int(qlens[0])) if len(qlens) else 1
    if device.type == "cpu" and not grad:
        max_elems = min(max_elems, CPU_BLOCK)
    kb, qb = _shard_sizes(len(klens), len(qlens), Lk, Lq, max_elems)
    kl, ql = klens.tolist(), qlens.tolist()
    return ([(s, e, max(1, kl[s])) for s, e in _shards(len(kl), kb)],
            [(s, e, max(1, ql[s])) for s, e in _shards(len(ql), qb)])


def logits_gemm_shapes(direction: str, num_regions: torch.Tensor, lengths: torch.Tensor, *,
                       max_elems: int = 1 << 23, device: str | torch.device = "cpu", grad: bool = False
                       ) -> list[tuple[int, int]]:
    """The [m, n] output shapes of the logits GEMMs ([m, d] × [d, n]) that :func:`t2i_scores` /
    :func:`i2t_scores` run for these region counts and caption lengths (the scoring benchmark's floor)."""
    klens, qlens = (num_regions, lengths) if direction == "t2i" else (lengths, num_regions)
    klens = torch.sort(klens, descending=True).values
    qlens = torch.sort(qlens, descending=True).values
    kshards, qshards = _plan(klens, qlens, max_elems, torch.device(device), grad)
    return [((k1 - k0) * lk, (q1 - q0) * lq) for k0, k1, lk in kshards for q0, q1, lq in qshards]


def _xattn_inference(K, kperm, klens, Q, qperm, qlens, kshards, qshards, lam, agg, lam_lse, raw_norm,
                     max_term, eps) -> torch.Tensor:
    """The shards of :func:`_xattn` without autograd, [Nk, Nq] in the length-sorted order (``kperm``,
    ``qperm``; ``klens``, ``qlens`` already sorted): each shard's items are gathered (padding zeroed) once, and
    the shard is computed in place, in reused buffers, and in the layout [k, l, m, q] (context item, its row;
    query row, query item), so that every reduction (the norm over the query rows, the softmax and the sums
    over the context rows) runs over an outer dimension, vectorised along the contiguous query items. The
    softmax is left unnormalised: with E = exp(λ₁ŝ − c) and z = Σ_l E_l, Σ_l α_l s_l = Σ_l E_l s_l / z and
    α G αᵀ = E G Eᵀ / z², so A = E / z is never formed."""
    Nk, Nq = K.shape[0], Q.shape[0]
    d = K.shape[2]
    out = torch.empty(Nk, Nq, dtype=torch.float32 if K.dtype in (torch.float16, torch.bfloat16) else K.dtype,
                      device=K.device)
    size = max((k1 - k0) * lk * (q1 - q0) * lq for k0, k1, lk in kshards for q0, q1, lq in qshards)
    # under autocast the GEMMs pick their own dtype: no out= buffers there (out= bypasses autocast)
    bufs = None if torch.is_autocast_enabled(K.device.type) else (K.new_empty(2 * size), K.new_empty(size))
    qparts = []  # each query shard once: rows [m, q], norms [1, m, q], mask [1, m, q], lengths [1, q]
    for q0, q1, lq in qshards:
        qmask = length_mask(qlens[q0:q1], lq)
        Qs = Q[qperm[q0:q1], :lq].mul_(qmask[..., None].to(Q.dtype))  # [nq, lq, d], padding zeroed
        qparts.append((Qs.transpose(0, 1).reshape(lq * (q1 - q0), d), _sqrt(Qs.pow(2).sum(2)).t()[None],
                       qmask.t()[None], qlens[q0:q1][None]))
    for k0, k1, lk in kshards:
        nk = k1 - k0
        kmask = length_mask(klens[k0:k1], lk)
        Kk = K[kperm[k0:k1], :lk].mul_(kmask[..., None].to(K.dtype))  # [nk, lk, d], padding zeroed
        Gk = Kk @ Kk.transpose(1, 2)  # [nk, lk, lk] context Gram matrices
        kpad = None if bool(kmask.all()) else ~kmask[:, :, None, None]
        Kk = Kk.view(nk * lk, d)
        for (q0, q1, lq), (Qt, qn, qm, ql) in zip(qshards, qparts, strict=True):
            out[k0:k1, q0:q1] = _xattn_shard_inference(Kk, nk, lk, kpad, Gk, Qt, q1 - q0, lq, qn, qm, ql, lam,
                                                       agg, lam_lse, raw_norm, max_term, eps, bufs)
    return out


def _xattn_shard_inference(Kk, nk, lk, kpad, G, Qt, nq, lq, qn, qm, ql, lam, agg, lam_lse, raw_norm, max_term,
                           eps, bufs) -> torch.Tensor:
    n = nk * lk * lq * nq
    shape = (nk, lk, lq, nq)
    if bufs is None:
        S = Kk @ Qt.t()
        SG = S.new_empty((2, *shape))  # [S; G E]
        SG[0] = S.view(shape)
        X = torch.empty_like(S)
    else:
        SG = bufs[0][: 2 * n].view(2, *shape)
        torch.mm(Kk, Qt.t(), out=SG[0].view(nk * lk, lq * nq))
        X = bufs[1][:n]
    S, X = SG[0], X.view(shape)  # S[k, l, m, q] = K[k, l] · Q[q, m]
    low = S.dtype in (torch.float16, torch.bfloat16)
    if raw_norm == "clipped_l2norm":  # leaky ReLU 0.1, l2-normalised over the query rows m
        torch.ops.aten.leaky_relu.out(S, 0.1, out=X)
        if low:
            nrm = _norm(X, 2)  # accumulated in float32
        else:  # square + sum into the free half of SG (vector_norm over a middle dimension is slow on CPU)
            nrm = torch.mul(X, X, out=SG[1]).sum(2, keepdim=True).sqrt_()
        X.mul_(lam / (nrm + eps))
    else:
        torch.mul(S, lam, out=X)
    if kpad is not None:
        X.masked_fill_(kpad, float("-inf"))
    # unnormalised softmax over the context rows l. The clipped logits lie in [-|λ₁|, |λ₁|], so in float32 /
    # float64 exp needs no shift for |λ₁| <= 20 (E, E G Eᵀ stay within e^±40 · G); else the usual max shift
    if raw_norm == "clipped_l2norm" and abs(lam) <= 20 and not low:
        E = X.exp_()
    else:
        E = X.sub_(X.amax(1, keepdim=True)).exp_()
    z = upcast(E.sum(1))  # [nk, lq, nq]
    Ev = E.view(nk, lk, lq * nq)
    if bufs is None:
        SG[1] = torch.bmm(G, Ev).view(shape)
    else:
        torch.bmm(G, Ev, out=SG[1].view(nk, lk, lq * nq))
    num, ctx = upcast(SG.mul_(E).sum(2))  # Σ_l E_l s_l, Σ_l E_l (G E)_l: [nk, lq, nq] each
    num = num / z  # Σ_l α_l s_l
    ctx_sq = ctx / (z * z)  # ‖attended context‖²
    cos = num / upcast(qn * _sqrt(ctx_sq)).clamp(min=eps)  # [nk, lq, nq]
    count = ql.to(cos.dtype)
    res = _aggregate(cos, qm, 1, agg, lam_lse, count)  # [nk, nq]
    if max_term:  # each query row's largest attention weight
        res = res + max_term * _aggregate(upcast(E.amax(1)) / z, qm, 1, agg, lam_lse, count)
    return res


def _norm(X: torch.Tensor, dim: int = 3) -> torch.Tensor:
    """‖X‖ over ``dim`` (keepdim), accumulated and returned in float32 for float16 / bfloat16 X."""
    low = X.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(X, dim=dim, keepdim=True, dtype=torch.float32 if low else None)


def _xattn_shard(K, kmask, klens, G, Q, qmask, qlens, q_norm, lam, agg, lam_lse, raw_norm, max_term, eps
                 ) -> torch.Tensor:
    """One shard with autograd (training), layout [k, l, q, m]; see :func:`_xattn_inference` for inference."""
    nk, Lk, d = K.shape
    nq, Lq, _ = Q.shape
    # logits, context-major: S[k, l, q, m] = K[k, l] · Q[q, m]; one GEMM, the only O(d) work
    S = (K.reshape(nk * Lk, d) @ Q.reshape(nq * Lq, d).t()).view(nk, Lk, nq, Lq)
    pad = not bool(kmask.all())
    if raw_norm == "clipped_l2norm":  # leaky ReLU, l2-normalised over the queries of each context item
        X = F.leaky_relu(S, 0.1)
        X = X * (lam / (_norm(X) + eps))
    else:
        X = S * lam
    if pad:
        X = X.masked_fill(~kmask[:, :, None, None], float("-inf"))
    A = torch.softmax(X, dim=1)  # attention over the context items
    num = (A * S).sum(1)  # [nk, nq, Lq] = q · attended context
    GA = torch.bmm(G, A.reshape(nk, Lk, nq * Lq)).view(nk, Lk, nq, Lq)
    ctx_sq = (GA * A).sum(1)  # ‖attended context‖²
    # (norms and cosines in float32: under fp16 autocast eps would underflow to 0 and padding give 0/0)
    cos = num / upcast(q_norm[None] * _sqrt(ctx_sq)).clamp(min=eps)  # [nk, nq, Lq]
    m = qmask[None]
    count = qlens[None].to(cos.dtype)
    out = _aggregate(cos, m, 2, agg, lam_lse, count)  # [nk, nq]
    if max_term:  # each word's largest attention weight over the (valid: padding has weight 0) regions
        best = upcast(A.amax(1))  # [nk, nq, Lq]
        out = out + max_term * _aggregate(best, m, 2, agg, lam_lse, count)
    return out


def xattn_scores(direction: str, regions: torch.Tensor, num_regions: torch.Tensor | None, words: torch.Tensor,
                 lengths: torch.Tensor, **hp) -> torch.Tensor:
    """``direction`` ∈ {t2i, i2t} → the matching scoring function."""
    if direction == "t2i":
        return t2i_scores(regions, num_regions, words, lengths, **hp)
    if direction == "i2t":
        return i2t_scores(regions, num_regions, words, lengths, **hp)
    raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")


# ---------------------------------------------------------------- reference (per-caption loop, SCAN's code)

def _l2norm_ref(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _cosine_ref(x1: torch.Tensor, x2: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    return (x1 * x2).sum(dim) / (x1.norm(2, dim) * x2.norm(2, dim)).clamp(min=eps)


def attention_weights(query: torch.Tensor, context: torch.Tensor, lam: float, raw_norm: str = "clipped_l2norm",
                      eps: float = 1e-8) -> torch.Tensor:
    """SCAN's attention of each query item over the context: query [n, Lq, d], context [n, Ls, d] (no
    padding) → weights [n, Lq, Ls] (leaky-ReLU 0.1 logits l2-normalised over the queries, softmax of λ·logits
    over the context). Per pair, unsharded: the reference loop and the PFAN figure."""
    attn = torch.bmm(context, query.transpose(1, 2))  # [n, Ls, Lq]
    if raw_norm == "clipped_l2norm":
        attn = _l2norm_ref(F.leaky_relu(attn, 0.1), 2, eps)
    return torch.softmax(attn.transpose(1, 2) * lam, dim=2)  # [n, Lq, Ls]


def _func_attention_ref(query: torch.Tensor, context: torch.Tensor, lam: float, raw_norm: str, eps: float
                        ) -> torch.Tensor:
    """query [n, Lq, d], context [n, Ls, d] (no padding) → weighted context [n, Lq, d] (SCAN's func_attention)."""
    return torch.bmm(attention_weights(query, context, lam, raw_norm, eps), context)


def _agg_ref(row: torch.Tensor, agg: str, lam_lse: float) -> torch.Tensor:
    if agg == "LogSumExp":
        return torch.log(torch.exp(row * lam_lse).sum(1)) / lam_lse
    if agg == "Max":
        return row.max(1).values
    if agg == "Sum":
        return row.sum(1)
    return row.mean(1)


def t2i_scores_reference(regions, num_regions, words, lengths, *, lambda_softmax=9.0, agg="LogSumExp",
                         lambda_lse=6.0, raw_norm="clipped_l2norm", max_term=0.0, eps=1e-8, **_) -> torch.Tensor:
    """Per-caption loop of SCAN's xattn_score_t2i (images batched per caption, grouped by region count)."""
    num_regions = _check(regions, num_regions, words, lengths, agg, raw_norm)
    out = regions.new_zeros(regions.shape[0], words.shape[0])
    for c, idx, img, cap_e in _per_caption_groups(regions, num_regions, words, lengths):
        ctx = _func_attention_ref(cap_e, img, lambda_softmax, raw_norm, eps)
        row = _cosine_ref(cap_e, ctx, 2, eps)  # [n_img, n_word]
        s = _agg_ref(row, agg, lambda_lse)
        if max_term:  # PFAN's released t2i: max over regions of the attention weights
            best = attention_weights(cap_e, img, lambda_softmax, raw_norm, eps).max(2).values
            s = s + max_term * _agg_ref(best, agg, lambda_lse)
        out[idx, c] = s
    return out


def i2t_scores_reference(regions, num_regions, words, lengths, *, lambda_softmax=4.0, agg="Mean",
                         lambda_lse=6.0, raw_norm="clipped_l2norm", eps=1e-8, **_) -> torch.Tensor:
    """Per-caption loop of SCAN's xattn_score_i2t (images batched per caption, grouped by region count)."""
    num_regions = _check(regions, num_regions, words, lengths, agg, raw_norm)
    out = regions.new_zeros(regions.shape[0], words.shape[0])
    for c, idx, img, cap_e in _per_caption_groups(regions, num_regions, words, lengths):
        ctx = _func_attention_ref(img, cap_e, lambda_softmax, raw_norm, eps)
        row = _cosine_ref(img, ctx, 2, eps)  # [n_img, n_region]
        out[idx, c] = _agg_ref(row, agg, lambda_lse)
    return out


def _per_caption_groups(regions, num_regions, words, lengths):
    """The reference loop: per caption c, per group of images with the same region count n, yield
    (c, image rows, their regions [n_img, n, d], the caption expanded to [n_img, len, d])."""
    groups = [(n, (num_regions == n).nonzero().flatten()) for n in num_regions.unique().tolist()]
    for c in range(words.shape[0]):
        cap = words[c, : int(lengths[c])][None]
        for n, idx in groups:
            yield c, idx, regions[idx, :n], cap.expand(len(idx), -1, -1)
