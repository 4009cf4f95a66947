"""ContrastiveLoss, retrieval metrics, the ict/needle data and contrastive training through the CLI
(docs/latent-pooling.md#contrastive-training, #retrieval-metrics)."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from zoo.config import DataConfig
from zoo.data.loader import ResumableLoader
from zoo.data.retrieval import retrieval_bundle
from zoo.eval import retrieval_metrics
from zoo.train.contrastive import ContrastiveLoss
from tests.helpers import KJV_FIXTURE, read_metrics, run_zoo, train_losses

# ------------------------------------------------------------------------------------------------ 9. the loss
def unit_batch(B=4, h=2, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=g, dtype=dtype), torch.randn(B, D, generator=g, dtype=dtype),
            torch.randn(B, h, D, generator=g, dtype=dtype))


def test_logit_shapes_with_and_without_in_batch_negatives():
    q, pos, neg = unit_batch(B=4, h=2)
    logits, targets = ContrastiveLoss(num_hard_negatives=2).logits_and_targets(q, pos, neg)
    assert logits.shape == (4, 12) and targets.tolist() == [0, 1, 2, 3]
    off = ContrastiveLoss(use_in_batch_negatives=False, num_hard_negatives=2)
    logits, targets = off.logits_and_targets(q, pos, neg)
    assert logits.shape == (4, 3) and targets.tolist() == [0, 0, 0, 0]
    logits, _ = ContrastiveLoss().logits_and_targets(q, pos)
    assert logits.shape == (4, 4)


@pytest.mark.parametrize("in_batch, expected", [(True, math.log(4 * 3)), (False, math.log(3))])
def test_identical_embeddings_give_log_of_candidate_count(in_batch, expected):
    v = torch.randn(8)
    loss = ContrastiveLoss(use_in_batch_negatives=in_batch, num_hard_negatives=2)(
        v.expand(4, 8), v.expand(4, 8), v.expand(4, 2, 8))
    assert abs(float(loss) - expected) < 1e-6


def reference_loss(q, pos, neg, temperature, in_batch):
    """Float64 InfoNCE written row by row (docs/latent-pooling.md#contrastive-training)."""
    q, pos, neg = F.normalize(q, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    B, total = q.shape[0], 0.0
    for i in range(B):
        if in_batch:
            candidates = [pos[j] for j in range(B)] + [neg[j, k] for j in range(B) for k in range(neg.shape[1])]
            target = i
        else:
            candidates = [pos[i]] + [neg[i, k] for k in range(neg.shape[1])]
            target = 0
        scores = torch.stack([torch.dot(q[i], c) / temperature for c in candidates])
        total += float(torch.logsumexp(scores, 0) - scores[target])
    return total / B


@pytest.mark.parametrize("in_batch", [True, False])
def test_loss_matches_float64_reference(in_batch):
    q, pos, neg = unit_batch(B=5, h=3, D=16, dtype=torch.float64)
    loss = ContrastiveLoss(0.07, in_batch, 3)(q * 3, pos * 0.5, neg * 2)             # not unit: normalised inside
    assert abs(float(loss) - reference_loss(q, pos, neg, 0.07, in_batch)) < 1e-10


def test_group_ids_mask_exactly_the_duplicate_positives():
    q, pos, neg = unit_batch(B=5, h=1)
    loss_fn = ContrastiveLoss(num_hard_negatives=1)
    plain, _ = loss_fn.logits_and_targets(q, pos, neg)
    groups = torch.tensor([7, 3, 7, 7, 1])
    masked, _ = loss_fn.logits_and_targets(q, pos, neg, groups)
    expected = torch.zeros(5, 10, dtype=torch.bool)
    for i, j in ((0, 2), (0, 3), (2, 0), (2, 3), (3, 0), (3, 2)):
        expected[i, j] = True
    assert torch.equal(torch.isneginf(masked), expected)
    assert torch.equal(masked[~expected], plain[~expected])
    with_negatives, _ = loss_fn.logits_and_targets(q, pos, neg, groups, negative_group_ids=torch.tensor(
        [[3], [7], [1], [5], [9]]))
    expected[[0, 2, 3], 6] = True                                 # row 1's negative is in group 7
    expected[1, 5] = expected[4, 7] = True                        # row 0's negative is in 3, row 2's in 1
    assert torch.equal(torch.isneginf(with_negatives), expected)
    assert float(loss_fn(q, pos, neg, groups)) < float(loss_fn(q, pos, neg))


def test_bad_inputs_raise_clear_errors():
    q, pos, neg = unit_batch(B=4, h=2)
    with pytest.raises(ValueError, match=r"neg has shape \(4, 2, 8\), expected \(B, h, D\) = \(4, 1, 8\)"):
        ContrastiveLoss(num_hard_negatives=1)(q, pos, neg)
    with pytest.raises(ValueError, match="non-empty"):
        ContrastiveLoss()(torch.zeros(0, 8), torch.zeros(0, 8))
    with pytest.raises(ValueError, match="no neg given"):
        ContrastiveLoss(num_hard_negatives=2)(q, pos)
    with pytest.raises(ValueError, match="pos has shape"):
        ContrastiveLoss()(q, pos[:3])
    with pytest.raises(ValueError, match="group_ids has shape"):
        ContrastiveLoss(num_hard_negatives=2)(q, pos, neg, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=0.0)


# ------------------------------------------------------------------------------------------------ 10. metrics
def test_metrics_of_a_hand_built_score_matrix():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],      # relevant 0: rank 1
                           [0.2, 0.4, 0.8, 0.6],      # relevant 1: rank 3
                           [0.5, 0.5, 0.1, 0.5]])     # relevant 1: tied with two others, pessimistic rank 3
    metrics = retrieval_metrics(scores, torch.eye(4), torch.tensor([0, 1, 1]), ks=(1, 2, 3))
    assert metrics == pytest.approx({"recall@1": 1 / 3, "recall@2": 1 / 3, "recall@3": 1.0, "mrr@3": 5 / 9,
                                     "mrr": 5 / 9})
    relevant = torch.tensor([[True, False, False, False], [False, True, True, False], [False, False, True, False]])
    metrics = retrieval_metrics(scores, torch.eye(4), relevant, ks=(1, 2))
    assert metrics == pytest.approx({"recall@1": (1 + 0.5 + 0) / 3, "recall@2": (1 + 0.5 + 0) / 3,
                                     "mrr@2": (1 + 1 + 0) / 3, "mrr": (1 + 1 + 0.25) / 3})


def test_constant_embeddings_score_zero_recall_and_mrr_one_over_n():
    metrics = retrieval_metrics(torch.ones(5, 4), torch.ones(7, 4), torch.tensor([0, 1, 2, 3, 6]))
    assert metrics["recall@1"] == 0.0 and metrics["recall@5"] == 0.0
    assert metrics["mrr"] == pytest.approx(1 / 7) and metrics["mrr@10"] == pytest.approx(1 / 7)


def test_embeddings_equal_to_their_targets_score_one_everywhere():
    documents = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    relevant = torch.randint(0, 50, (2100,), generator=torch.Generator().manual_seed(1))  # > one chunk of 1024
    metrics = retrieval_metrics(documents[relevant], documents, relevant)
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "mrr@10", "mrr"}
    assert all(value == 1.0 for value in metrics.values())


def test_metrics_refuse_bad_relevance():
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\)"):
        retrieval_metrics(torch.ones(2, 4), torch.ones(3, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="query 1 has no relevant document"):
        retrieval_metrics(torch.ones(2, 4), torch.ones(3, 4), torch.tensor([[True, False, False], [False] * 3]))


# ------------------------------------------------------------------------------------------------ data
def ict_config(**retrieval) -> DataConfig:
    cfg = DataConfig(name="ict", path=str(KJV_FIXTURE))
    for key, value in retrieval.items():
        setattr(cfg.retrieval, key, value)
    return cfg


def test_ict_pairs_split_by_book_and_group_by_window():
    bundle = retrieval_bundle(ict_config(query_len=64, passage_len=200))
    tokenizer = bundle.tokenizer
    train, test = bundle.train, bundle.test
    records = [json.loads(line) for line in KJV_FIXTURE.read_text().splitlines()]
    chapter_sizes = Counter((r["book"], r["chapter"]) for r in records)
    lone_verses = sum(1 for size in chapter_sizes.values() if size % 5 == 1)       # windows of one verse: dropped
    assert len(train) + len(test) == len(records) - lone_verses
    james = {tokenizer.decode(ids) for ids, _ in bundle.corpus.queries}
    assert len(bundle.corpus.queries) == len(test) == 107 and len(bundle.corpus.documents) == 23
    assert any(text.startswith("James, a servant of God") for text in james)
    item = train[7]                                                          # Genesis 1:8, window 1:6-10
    query = tokenizer.decode(item["query"][0])
    assert query.startswith("And God called the firmament Heaven") and item["query"][0][-1] == tokenizer.eos_id
    positive = tokenizer.decode(item["positive"])
    assert query not in positive and positive.startswith("And God said, Let there be a firmament")
    assert item["group_id"] == 1 and [train.window_of[i] for i in range(5, 10)] == [1] * 5
    negative_window = item["negative_group_ids"][0]
    assert negative_window != 1 and train.verses.chapter_of[negative_window] == train.verses.chapter_of[1]
    assert all(len(item["query"][0]) <= 64 and len(n) <= 200 for n in item["negatives"])
    relevant_doc = tokenizer.decode(bundle.corpus.documents[int(bundle.corpus.relevant[0])])
    assert relevant_doc.startswith(tokenizer.decode(bundle.corpus.queries[0][0]))


def test_ict_batches_are_right_padded_and_pool_masks_skip_the_instruction():
    bundle = retrieval_bundle(ict_config(instruction="Find the verse", hard_negatives=2))
    loader = ResumableLoader(bundle.train, 6, seed=0, collate_fn=bundle.collate)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 6 and batch["negative_ids"].shape[:2] == (6, 2)
    assert batch["negative_ids"].shape[2] == batch["positive_ids"].shape[1]
    prefix = len("Instruct: Find the verse\nQuery: ")
    mask, pool_mask = batch["attention_mask"], batch["pool_mask"]
    assert torch.equal(pool_mask, mask & (torch.arange(mask.shape[1]) >= prefix))
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(mask.shape[1]) < lengths[:, None])      # right padding
    assert (batch["input_ids"][~mask] == bundle.tokenizer.pad_id).all()
    assert batch["negative_group_ids"].shape == (6, 2)


def test_needle_pairs_are_seeded_and_carry_the_needle():
    cfg = DataConfig(name="needle")
    cfg.retrieval.passage_len, cfg.retrieval.hard_negatives, cfg.retrieval.test_examples = 64, 2, 10
    bundle = retrieval_bundle(cfg)
    again = retrieval_bundle(cfg)
    item = bundle.train[3]
    assert item == again.train[3] and item != bundle.train[4]
    needle = item["query"][0][:-1]
    assert len(needle) == 8 and len(item["positive"]) == 64
    text = bytes(item["positive"][:-1])
    assert bytes(needle) in text
    for negative in item["negatives"]:
        assert bytes(needle) not in bytes(negative[:-1]) and len(negative) == 64
        assert sum(a != b for a, b in zip(negative, item["positive"])) <= 8     # the same filler
    assert len(bundle.corpus.documents) == 30 and bundle.corpus.relevant.tolist() == list(range(10))


# ------------------------------------------------------------------------------------------------ 11. training
TINY_EMBED = ["model.architecture=embedding", "model.dim=64", "model.depth=2", "model.attention.heads=2",
              "model.embedding.num_latents=16", "model.embedding.heads=2", "model.embedding.mlp_ratio=2",
              "model.embedding.head_dim=32", "data.name=ict", "data.batch_size=8", "data.eval_batch_size=32",
              "data.retrieval.query_len=64", "data.retrieval.passage_len=96", "trainer.limit_val_batches=2",
              "trainer.log_every_n_steps=1", "trainer.val_check_interval=10", "optim.warmup_steps=2",
              "optim.lr=5e-4"]


@pytest.fixture
def small_kjv(tmp_path):
    """Genesis 1-3 (train, 81 verses) and Ruth 1 (held out, 22 verses) from the committed fixture.

    Byte-level inverse cloze generalises slowly; 20 steps of 8 over this corpus are about three epochs, enough for
    the training loss to fall clearly (the smoke test checks that the task optimises, not what it generalises to).
    """
    records = [json.loads(line) for line in KJV_FIXTURE.read_text().splitlines()]
    keep = [r for r in records if (r["book"], r["chapter"]) in {("Genesis", 1), ("Genesis", 2), ("Genesis", 3),
                                                                 ("Ruth", 1)}]
    path = tmp_path / "small_kjv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return path


def test_tiny_ict_training_learns_and_exports_an_evaluable_embedder(tmp_path, small_kjv, capsys):
    args = [*TINY_EMBED, f"data.path={small_kjv}", f"run.root={tmp_path}", "run.name=e", "trainer.max_steps=20"]
    assert run_zoo("train", *args) == 0
    rows = [r for r in read_metrics(tmp_path / "e" / "metrics.csv") if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    accuracy = [float(r["train/accuracy"]) for r in rows]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert sum(accuracy[-5:]) / 5 > 1 / 8
    negative = [float(r["train/negative_cosine"]) for r in rows]
    assert sum(negative[-5:]) < sum(negative[:5])                         # negatives pushed apart
    val = [r for r in read_metrics(tmp_path / "e" / "metrics.csv") if r.get("val/recall@1")]
    assert len(val) == 2 and all(r.get("val/accuracy") and r.get("val/mrr@10") for r in val)
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert saved["task"] == "ict_retrieval" and saved["queries"] == 22 and saved["documents"] == 5

    capsys.readouterr()
    model = tmp_path / "e" / "model"
    assert run_zoo("eval", f"checkpoint={model}", "tasks=ict_retrieval", f"eval.out={tmp_path / 'ict.json'}") == 0
    result = json.loads(capsys.readouterr().out)
    assert {"recall@1", "recall@5", "recall@10", "mrr@10", "mrr"} <= set(result)
    assert result["recall@1"] == pytest.approx(saved["recall@1"])            # the export reproduces training's eval
    assert json.loads((tmp_path / "ict.json").read_text())["mrr"] == result["mrr"]
    assert run_zoo("eval", f"checkpoint={model}", "data.eval_batch_size=8", "eval.max_batches=1",
                   f"eval.out={tmp_path / 'default.json'}") == 0                # default: its own ict_retrieval
    default = json.loads(capsys.readouterr().out)
    assert (default["task"], default["queries"], default["documents"]) == ("ict_retrieval", 8, 5)
    assert run_zoo("eval", f"checkpoint={model}", "tasks=bogus") == 2
    assert capsys.readouterr().err.strip() == ("zoo: unknown eval task 'bogus'; known: ict_retrieval, "
                                               "needle_retrieval")

    stage2 = [*args[:-2], "trainer.max_steps=2", "model.embedding.in_batch_negatives=false",
              "data.retrieval.hard_negatives=2"]                              # embed_stage2's recipe
    assert run_zoo("train", *stage2, "run.name=stage2", f"init_from={model}") == 0
    assert run_zoo("train", *stage2, "run.name=fresh") == 0
    from_stage1, fresh = (float(read_metrics(tmp_path / name / "metrics.csv")[0]["train/loss"])
                          for name in ("stage2", "fresh"))
    assert from_stage1 < fresh                                                # the same batch, trained weights


def test_contrastive_training_resumes_bit_exactly(tmp_path, small_kjv):
    common = [*TINY_EMBED, f"data.path={small_kjv}", f"run.root={tmp_path}", "trainer.checkpoint_every_n_steps=3",
              "trainer.val_check_interval=100", "optim.decay_steps=6"]
    assert run_zoo("train", *common, "run.name=straight", "trainer.max_steps=6") == 0
    assert run_zoo("train", *common, "run.name=split", "trainer.max_steps=3") == 0
    assert run_zoo("train", *common, "run.name=split", "trainer.max_steps=6", "resume=auto") == 0
    straight, split = (train_losses(tmp_path / name) for name in ("straight", "split"))
    assert sorted(straight) == list(range(1, 7)) and straight == split
    assert len(set(straight.values())) == 6


def test_embedding_architecture_refuses_text_data(tmp_path, capsys):
    assert run_zoo("train", *TINY_EMBED, "data.name=text", f"data.path={KJV_FIXTURE}", f"run.root={tmp_path}",
                   "trainer.max_steps=1") != 0
    assert "set data.name=ict or needle" in capsys.readouterr().err


def test_bundled_nv_embed_configs_carry_a_task_instruction_that_reaches_the_query():
    from zoo.config import parse_args
    from zoo.data.retrieval import query_prefix

    configs = [parse_args([f"config={name}.yaml"]).config for name in ("nv-embed", "embed_stage1", "embed_stage2")]
    instructions = {config.data.retrieval.instruction for config in configs}
    assert len(instructions) == 1 and all(instructions)                    # the same ICT task in every stage
    instruction = instructions.pop()
    bundle = retrieval_bundle(ict_config(instruction=instruction, query_len=configs[0].data.retrieval.query_len))
    query = bundle.tokenizer.decode(bundle.train[0]["query"][0])
    assert query.startswith(query_prefix(instruction)) and len(query) > len(query_prefix(instruction))
    passage = bundle.tokenizer.decode(bundle.train[0]["positive"])
    assert instruction not in passage                                      # passages carry no instruction

