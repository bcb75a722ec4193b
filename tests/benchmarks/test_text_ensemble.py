"""benchmarks/text_ensemble.py's generated token task: what decides the label is really there in every row."""

from __future__ import annotations

import numpy as np

from benchmarks.text_ensemble import CLS, KEYWORDS, NOT, TOPICS, VOCAB, token_task


def topic_of(token: int) -> int | None:
    return (token - 3) // KEYWORDS if 3 <= token < 3 + KEYWORDS * len(TOPICS) else None


def test_each_row_holds_more_keywords_of_its_label_unnegated_and_the_others_behind_not():
    rows = token_task(300, seed=0, label_noise=0.0)
    assert len(rows["input_ids"]) == len(rows["label"]) == 300
    counted_wrongly = 0
    for ids, mask, label in zip(rows["input_ids"], rows["attention_mask"], rows["label"]):
        assert ids[0] == CLS and len(mask) == len(ids) and 9 <= len(ids) <= 33 and max(ids) < VOCAB
        real = [t for prev, t in zip(ids, ids[1:]) if topic_of(t) is not None and prev != NOT]
        negated = [t for prev, t in zip(ids, ids[1:]) if topic_of(t) is not None and prev == NOT]
        assert 2 <= len(real) <= 5 and 1 <= len(negated) <= 4
        assert {topic_of(t) for t in real} == {label} and label not in {topic_of(t) for t in negated}
        counts = np.bincount([topic_of(t) for t in real + negated], minlength=len(TOPICS))
        counted_wrongly += int(counts.argmax() != label or (counts == counts.max()).sum() > 1)
    assert counted_wrongly > 50  # counting keywords alone misreads a good share of the rows


def test_label_noise_redraws_about_that_share_and_the_seed_fixes_the_rows():
    """A noisy row's label is checked against its own unnegated keywords (the noise draw shifts the stream)."""
    clean, noisy = token_task(2000, 3, 0.0), token_task(2000, 3, 0.25)
    assert clean == token_task(2000, 3, 0.0)
    changed = np.mean(np.asarray(noisy["label"]) != np.asarray([topic_of(next(
        t for p, t in zip(ids, ids[1:]) if topic_of(t) is not None and p != NOT)) for ids in noisy["input_ids"]]))
    assert 0.12 < changed < 0.25  # a redraw lands on the true topic a quarter of the time
