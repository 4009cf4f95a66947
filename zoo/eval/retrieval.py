"""Retrieval metrics (recall@k, MRR with pessimistic ties) and the held-out retrieval evaluation of an embedder.

    q, d = torch.eye(3), torch.eye(3)
    retrieval_metrics(q, d, torch.tensor([0, 1, 2]))     # every metric 1.0
"""
from __future__ import annotations

import torch

QUERY_CHUNK = 1024


def relevance_matrix(relevant: torch.Tensor, num_queries: int, num_documents: int) -> torch.Tensor:
    """(Q, N) bool from ``relevant``: (Q,) long document ids, or already (Q, N) bool; checks shapes and ranges."""
    if relevant.dtype == torch.bool:
        if tuple(relevant.shape) != (num_queries, num_documents):
            raise ValueError(f"retrieval_metrics: relevant (bool) has shape {tuple(relevant.shape)}, expected "
                             f"(Q, N) = {(num_queries, num_documents)}")
        matrix = relevant
    else:
        if tuple(relevant.shape) != (num_queries,):
            raise ValueError(f"retrieval_metrics: relevant (ids) has shape {tuple(relevant.shape)}, expected "
                             f"(Q,) = ({num_queries},)")
        if num_queries and (int(relevant.min()) < 0 or int(relevant.max()) >= num_documents):
            raise ValueError(f"retrieval_metrics: relevant ids must lie in [0, {num_documents}), got "
                             f"[{int(relevant.min())}, {int(relevant.max())}]")
        matrix = torch.zeros(num_queries, num_documents, dtype=torch.bool, device=relevant.device)
        matrix[torch.arange(num_queries, device=relevant.device), relevant.long()] = True
    empty = (~matrix.any(dim=1)).nonzero()
    if len(empty):
        raise ValueError(f"retrieval_metrics: query {int(empty[0])} has no relevant document")
    return matrix


def pessimistic_ranks(scores: torch.Tensor) -> torch.Tensor:
    """(C, N) long: rank of every document, 1 + the number of *other* documents scoring at least as high.

    Ties count against the model, so equal scores all get the worst rank of their group.
    """
    ascending = scores.sort(dim=-1).values                                                # (C, N)
    below = torch.searchsorted(ascending, scores.contiguous(), right=False)               # (C, N) #{s' < s}
    return scores.shape[-1] - below


def retrieval_metrics(q_emb: torch.Tensor, d_emb: torch.Tensor, relevant: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """recall@k (BEIR: found relevant / all relevant, per query), MRR@max(ks) and MRR of scores ``q_emb · d_embᵀ``.

    q_emb (Q, D), d_emb (N, D) (unit vectors give cosines); relevant: (Q,) long document id or (Q, N) bool. Scores
    are computed in chunks of 1024 queries; ranks are pessimistic (``pessimistic_ranks``), so a collapsed encoder
    scores recall@1 = 0 and MRR = 1/N. Returns ``{"recall@1", "recall@5", "recall@10", "mrr@10", "mrr"}`` for the
    default ``ks``.
    """
    if q_emb.dim() != 2 or d_emb.dim() != 2 or q_emb.shape[1] != d_emb.shape[1]:
        raise ValueError(f"retrieval_metrics: q_emb (Q, D) and d_emb (N, D) must share D, got {tuple(q_emb.shape)} "
                         f"and {tuple(d_emb.shape)}")
    if q_emb.shape[0] == 0 or d_emb.shape[0] == 0:
        raise ValueError("retrieval_metrics: needs at least one query and one document")
    if not ks or min(ks) < 1:
        raise ValueError(f"retrieval_metrics: ks must be positive cut-offs, got {ks}")
    Q, N = q_emb.shape[0], d_emb.shape[0]
    relevant = relevance_matrix(relevant.to(q_emb.device), Q, N)
    dtype = torch.promote_types(q_emb.dtype, torch.float32)
    docs = d_emb.to(dtype)
    cutoff = max(ks)
    recall = {k: 0.0 for k in ks}
    reciprocal_at_cutoff = reciprocal = 0.0
    for start in range(0, Q, QUERY_CHUNK):
        scores = q_emb[start:start + QUERY_CHUNK].to(dtype) @ docs.T                      # (C, N)
        ranks = pessimistic_ranks(scores)                                                  # (C, N)
        rel = relevant[start:start + QUERY_CHUNK]                                          # (C, N)
        count = rel.sum(dim=1).to(dtype)                                                   # (C,)
        for k in ks:
            recall[k] += float(((ranks <= k) & rel).sum(dim=1).to(dtype).div(count).sum())
        best = torch.where(rel, ranks, N + 1).amin(dim=1).to(dtype)                        # (C,)
        reciprocal += float((1.0 / best).sum())
        reciprocal_at_cutoff += float(torch.where(best <= cutoff, 1.0 / best, 0.0).sum())
    metrics = {f"recall@{k}": recall[k] / Q for k in ks}
    metrics[f"mrr@{cutoff}"] = reciprocal_at_cutoff / Q
    metrics["mrr"] = reciprocal / Q
    return metrics


@torch.no_grad()
def encode_inputs(model, inputs: list[tuple[list[int], int]], batch_size: int, pad_id: int) -> torch.Tensor:
    """Embeddings (N, D) of (ids, prefix length) inputs, batched by length to save padding; input order kept."""
    from zoo.data.retrieval import pad_right

    device = next(model.parameters()).device
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]))
    out = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask, pool_mask = pad_right([inputs[i] for i in chunk], pad_id)
        embeddings = model(ids.to(device), mask.to(device), pool_mask.to(device)).float().cpu()
        for row, i in enumerate(chunk):
            out[i] = embeddings[row]
    return torch.stack(out)


@torch.no_grad()
def evaluate_corpus(model, corpus, batch_size: int, tokenizer, max_queries: int | None = None) -> dict:
    """Encode a ``RetrievalCorpus`` (every document, the first ``max_queries`` queries) and score it."""
    was_training = model.training
    model.eval()
    queries = corpus.queries if max_queries is None else corpus.queries[:max_queries]
    q_emb = encode_inputs(model, queries, batch_size, tokenizer.pad_id)
    d_emb = encode_inputs(model, [(ids, 0) for ids in corpus.documents], batch_size, tokenizer.pad_id)
    model.train(was_training)
    return retrieval_metrics(q_emb, d_emb, corpus.relevant[:len(queries)])


def evaluate_retrieval(model, data, batch_size: int, max_batches: int | None = None) -> dict:
    """The held-out retrieval task of a ``RetrievalBundle``: its metrics, with the task name and sizes.

    ``max_batches`` caps the queries (at ``max_batches · batch_size``); the documents are always all encoded.
    """
    max_queries = None if max_batches is None else max_batches * batch_size
    metrics = evaluate_corpus(model, data.corpus, batch_size, data.tokenizer, max_queries)
    queries = len(data.corpus.queries) if max_queries is None else min(max_queries, len(data.corpus.queries))
    return {"task": data.task_name, **metrics, "queries": queries, "documents": len(data.corpus.documents)}
