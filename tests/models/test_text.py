"""models/text.py: the corpus splits; a split the text cannot hold is the user's input."""

from __future__ import annotations

import pytest
import torch
from rewriter.models.text import split_ids

from rewriter.errors import InputError


def test_split_ids_takes_head_from_the_start_and_eval_from_the_end():
    ids = torch.randint(0, 1000, (1009,), generator=torch.Generator().manual_seed(7))
    head, tail = split_ids(ids, 13, 5, 3 * 13 + 4)  # 3 eval sequences: the 4 spare dropped
    assert head.shape == (5, 13) and tail.shape == (3, 13)
    assert torch.equal(head.flatten(), ids[:65]) and torch.equal(tail.flatten(), ids[-39:])


def test_split_ids_refuses_with_input_error():
    ids = torch.arange(101)
    with pytest.raises(InputError, match=r"need 104 tokens \(5 \+ 3 sequences of 13\), the "
                                         r"text has 101"):
        split_ids(ids, 13, 5, 39)
    with pytest.raises(ValueError, match="need"):  # still a ValueError for old callers
        split_ids(ids, 13, 8, 0)
    for args, name in (((0, 1, 0), "seq_len"), ((7, -1, 0), "head_seqs"),
                       ((7, 1, -3), "eval_tokens"), ((7.0, 1, 0), "seq_len"),
                       ((7, True, 0), "head_seqs")):
        with pytest.raises(InputError, match=f"split_ids: {name} must be an int"):
            split_ids(ids, *args)
