"""zoo eval's near/far split of MQAR accuracy for segmented models (zoo.eval.evaluate.recall_distance)."""
from __future__ import annotations

import torch

from zoo.eval.evaluate import recall_distance, segment_length
from zoo.layers.titans_hybrids import TitansMAC

IGNORE = -100


def test_recall_distance_on_a_hand_made_batch():
    """Segments of 4: keys 7 and 8 at positions 0 and 2; queries of 7 at 3 (same segment: near) and 9 (far), of 8 at
    6 (far); a scored token without an earlier occurrence (5 at position 10) is neither."""
    input_ids = torch.tensor([[7, 1, 8, 7, 0, 0, 8, 0, 0, 7, 5, 0]])
    labels = torch.full_like(input_ids, IGNORE)
    labels[0, [3, 6, 9, 10]] = torch.tensor([1, 2, 1, 4])
    near, far = recall_distance(input_ids, labels, segment_len=4)
    assert near[0].nonzero().flatten().tolist() == [3]
    assert far[0].nonzero().flatten().tolist() == [6, 9]


def test_segment_length_finds_the_mac_segment_and_none_elsewhere():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), TitansMAC(8, 2, segment_len=16, persistent_tokens=1,
                                                                   memory=dict(chunk_size=8)))
    assert segment_length(model) == 16
    assert segment_length(torch.nn.Linear(8, 8)) is None
