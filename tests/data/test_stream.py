import json

import numpy as np
import pytest
import torch

from trainer.data.stream import SampleStream, TokenFile, eval_batches

SEQ = 8
NUM_SAMPLES = 50


def counting_file(path, num_samples: int = NUM_SAMPLES) -> TokenFile:
    """Tokens 0, 1, 2, ...: a sample's first token divided by SEQ is its index."""
    np.arange(num_samples * SEQ + 1, dtype=np.uint32).tofile(path)
    return TokenFile(path, "uint32")


@pytest.fixture
def tokens(tmp_path) -> TokenFile:
    return counting_file(tmp_path / "train.bin")


def indices(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // SEQ).tolist()


def stream(tokens, micro_batch=2, grad_accum=3, dp_rank=0, dp_size=1, seed=7, **kw) -> SampleStream:
    return SampleStream(tokens, SEQ, micro_batch, grad_accum, dp_rank, dp_size, seed, **kw)


def take(s: SampleStream, n: int) -> list[list[int]]:
    return [indices(s.next_micro_batch()[0]) for _ in range(n)]


def test_token_file_samples(tokens):
    assert len(tokens) == NUM_SAMPLES * SEQ + 1
    assert tokens.num_samples(SEQ) == NUM_SAMPLES
    last = tokens.sample(NUM_SAMPLES - 1, SEQ)
    assert last.dtype == np.int64 and last.tolist() == list(range((NUM_SAMPLES - 1) * SEQ, NUM_SAMPLES * SEQ + 1))
    with pytest.raises(IndexError):
        tokens.sample(NUM_SAMPLES, SEQ)


def test_micro_batch_shapes_and_shift(tokens):
    x, y = stream(tokens).next_micro_batch()
    assert x.shape == y.shape == (2, SEQ)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_two_ranks_cover_an_epoch_exactly_once(tokens):
    ranks = [stream(tokens, dp_rank=r, dp_size=2) for r in range(2)]
    global_batch = 2 * 3 * 2
    steps = NUM_SAMPLES // global_batch
    assert ranks[0].steps_per_epoch == steps
    seen = [i for s in ranks for batch in take(s, steps * 3) for i in batch]
    assert len(seen) == len(set(seen)) == steps * global_batch  # no overlap; only the tail is dropped
    assert set(seen) <= set(range(NUM_SAMPLES))
    assert all(s.epoch == 1 and s.step == steps for s in ranks)


def test_step_samples_do_not_depend_on_the_split(tokens):
    single = stream(tokens, micro_batch=2, grad_accum=2)
    pair = [stream(tokens, micro_batch=2, grad_accum=1, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(30):  # several epochs of 12 steps
        one_rank = take(single, 2)
        two_ranks = [take(s, 1)[0] for s in pair]
        assert one_rank == two_ranks


def test_resume_mid_epoch_matches_uninterrupted(tokens):
    original = stream(tokens)
    take(original, 7)  # mid-step (3 micro-batches per step) and mid-epoch
    state = json.loads(json.dumps(original.state_dict()))
    resumed = stream(tokens)
    resumed.load_state_dict(state)
    assert take(resumed, 40) == take(original, 40)  # crosses into the next epochs


def test_start_step_matches_consuming_steps(tokens):
    consumed = stream(tokens)
    take(consumed, 3 * 10)
    assert take(stream(tokens, start_step=10), 12) == take(consumed, 12)


def test_resume_at_step_boundary_with_another_split(tokens):
    single = stream(tokens, micro_batch=2, grad_accum=2)
    take(single, 2 * 5)
    pair = [stream(tokens, micro_batch=2, grad_accum=1, dp_rank=r, dp_size=2) for r in range(2)]
    for s in pair:
        s.load_state_dict(single.state_dict())
    assert take(single, 2) == [take(s, 1)[0] for s in pair]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"seed": 8}, "seed"),
        ({"grad_accum": 2}, "global_batch"),
        ({"micro_batch": 3, "grad_accum": 2}, "micro_batch"),
    ],
)
def test_resume_rejects_a_different_order(tokens, changes, field):
    saved = stream(tokens)
    take(saved, 1)  # mid-step, so the split must match too
    with pytest.raises(ValueError, match=f"saved with {field}="):
        stream(tokens, **changes).load_state_dict(saved.state_dict())


def test_epochs_reshuffle_and_seeds_are_deterministic(tokens):
    steps = NUM_SAMPLES // 6
    epochs = take(stream(tokens), 2 * 3 * steps)
    first, second = epochs[: 3 * steps], epochs[3 * steps :]
    assert first != second
    assert take(stream(tokens), 3 * steps) == first
    assert take(stream(tokens, seed=8), 3 * steps) != first


def test_corpus_smaller_than_a_global_batch(tmp_path):
    small = counting_file(tmp_path / "small.bin", num_samples=5)
    with pytest.raises(ValueError, match="corpus has 5 samples .* fewer than one global batch 6"):
        stream(small)


def _eval_samples(tokens, global_batch, micro_batch, dp, num_batches=4) -> list[list[list[int]]]:
    return [
        [indices(x) for x, _ in eval_batches(tokens, SEQ, global_batch, micro_batch, r, dp, num_batches)]
        for r in range(dp)
    ]


def test_eval_batches_shard_the_first_samples(tokens):
    per_rank = _eval_samples(tokens, global_batch=6, micro_batch=3, dp=2)
    # Global batch b is samples 6b + [0, 6); rank r takes its r-th half: all of the first 24 samples, once.
    assert per_rank[0][1] == [6, 7, 8] and per_rank[1][0] == [3, 4, 5]
    assert sorted(i for rank in per_rank for batch in rank for i in batch) == list(range(24))
    assert _eval_samples(tokens, global_batch=6, micro_batch=3, dp=2)[0] == per_rank[0]  # the same every call


@pytest.mark.parametrize("micro_batch,dp", [(6, 1), (2, 1), (3, 2), (1, 2), (2, 3), (1, 6)])
def test_eval_set_is_the_same_at_every_layout(tokens, micro_batch, dp):
    """Megatron-style: num_batches global batches, whatever the dp degree and micro-batch."""
    per_rank = _eval_samples(tokens, global_batch=6, micro_batch=micro_batch, dp=dp)
    assert all(len(batch) == micro_batch for rank in per_rank for batch in rank)
    assert sorted(i for rank in per_rank for batch in rank for i in batch) == list(range(24))


def test_eval_batches_wrap_around_a_small_file(tmp_path):
    small = counting_file(tmp_path / "val.bin", num_samples=5)
    batches = [indices(x) for x, _ in eval_batches(small, SEQ, 4, 4, 0, 1, num_batches=2)]
    assert batches == [[0, 1, 2, 3], [4, 0, 1, 2]]


def test_eval_batches_reject_a_file_shorter_than_one_sample(tmp_path):
    np.arange(SEQ, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(ValueError, match="0 samples of seq_len\\+1"):
        eval_batches(TokenFile(tmp_path / "val.bin", "uint16"), SEQ, 1, 1, 0, 1, 1)


def test_eval_batches_reject_a_split_smaller_than_one_global_batch(tmp_path):
    small = counting_file(tmp_path / "val.bin", num_samples=5)
    with pytest.raises(ValueError, match="5 samples .* fewer than one global batch 8; raise data.val_fraction"):
        eval_batches(small, SEQ, 8, 4, 0, 1, num_batches=1)
