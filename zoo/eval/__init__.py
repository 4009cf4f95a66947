"""Evaluation: held-out loss, perplexity, bits per byte, synthetic-task accuracy, retrieval metrics (``zoo eval``).

    from zoo.eval import retrieval_metrics
    retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]))      # every metric 1.0
"""


def __getattr__(name: str):
    if name == "retrieval_metrics":
        from zoo.eval.retrieval import retrieval_metrics

        return retrieval_metrics
    raise AttributeError(f"module 'zoo.eval' has no attribute {name!r}")


__all__ = ["retrieval_metrics"]
