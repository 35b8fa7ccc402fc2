"""DAPO dynamic sampling: counts, trimming, and the prompt cursor across a restart."""

import numpy as np

from gtpo_jax.trainers.dapo import dynamic_sample


class ListCursor:
    def __init__(self, items, position=0):
        self.items, self.position = items, position

    def draw(self, k):
        out = [self.items[(self.position + i) % len(self.items)] for i in range(k)]
        self.position += k
        return out


# prompt p's group accuracy: p % 4 == 0 -> all right, p % 4 == 1 -> all wrong, else 0.5
def accuracy(p):
    return {0: 1.0, 1: 0.0}.get(p % 4, 0.5)


def run(cursor, num_groups, oversample, seed=0):
    return dynamic_sample(
        cursor.draw, lambda prompts: list(prompts), accuracy, num_groups=num_groups, oversample=oversample,
        rng=np.random.default_rng(seed),
    )


def test_counts_and_trimming():
    cursor = ListCursor(list(range(100)))
    result = run(cursor, num_groups=5, oversample=3)
    # round 1 draws 15 prompts 0..14: all right {0,4,8,12}, all wrong {1,5,9,13}, kept 7 -> trim 2
    c = result.counts
    assert (c.drawn, c.all_right, c.all_wrong, c.trimmed, c.kept, c.rounds) == (15, 4, 4, 2, 5, 1)
    assert all(accuracy(p) == 0.5 for p in result.groups)
    assert result.groups == sorted(result.groups)  # order preserved
    assert cursor.position == 15


def test_keep_varied_keeps_uniform_accuracy_groups_it_accepts():
    # gtpo.dynamic_sampling_keep=reward: all-right prompts 0 and 8 have differing rewards, 4 and 12 not
    cursor = ListCursor(list(range(100)))
    result = dynamic_sample(cursor.draw, list, accuracy, num_groups=20, oversample=1,
                            rng=np.random.default_rng(0), max_rounds=1, keep_varied=lambda p: p % 8 == 0)
    c = result.counts
    assert result.groups == [0, 2, 3, 6, 7, 8, 10, 11, 14, 15, 16, 18, 19]
    assert (c.kept, c.kept_uniform_accuracy, c.all_right, c.all_wrong) == (13, 3, 2, 5)


def test_several_rounds_until_enough():
    cursor = ListCursor(list(range(100)))
    result = run(cursor, num_groups=8, oversample=1)
    # round 1: 8 prompts 0..7 keep {2,3,6,7}; round 2: 4 prompts 8..11 keep {10,11}; round 3: 2 -> {}
    # round 4: 2 prompts 14,15 keep both
    assert result.groups == [2, 3, 6, 7, 10, 11, 14, 15]
    assert result.counts.rounds == 4 and result.counts.drawn == 16 and cursor.position == 16


def test_cursor_resume_equals_uninterrupted():
    full = ListCursor(list(range(50)))
    steps_full = [run(full, 3, 2, seed=s).groups for s in range(4)]
    first = ListCursor(list(range(50)))
    steps_a = [run(first, 3, 2, seed=s).groups for s in range(2)]
    resumed = ListCursor(list(range(50)), position=first.position)  # what a checkpoint stores
    steps_b = [run(resumed, 3, 2, seed=s).groups for s in range(2, 4)]
    assert steps_a + steps_b == steps_full


def test_gives_up_after_max_rounds():
    cursor = ListCursor([0, 1])  # every group is all right or all wrong
    result = dynamic_sample(cursor.draw, list, accuracy, num_groups=2, oversample=2,
                            rng=np.random.default_rng(0), max_rounds=3)
    assert result.groups == [] and result.counts.rounds == 3 and result.counts.drawn == 12


def test_warns_when_the_round_cap_is_hit(caplog):
    cursor = ListCursor([0, 1, 2])  # one mixed group in three
    with caplog.at_level("WARNING", logger="gtpo_jax"):
        result = dynamic_sample(cursor.draw, list, accuracy, num_groups=4, oversample=1,
                                rng=np.random.default_rng(0), max_rounds=2)
    # round 1: 4 prompts 0,1,2,0 keep {2}; round 2: 3 prompts 1,2,0 keep {2}
    assert result.groups == [2, 2] and result.counts.rounds == 2
    assert "max_rounds=2" in caplog.text and "2 of 4 groups" in caplog.text


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 200 for c in text]


def test_prompt_source_file_order_or_seeded_shuffle():
    from gtpo_jax.data.pipeline import RLPromptSource
    from gtpo_jax.data.records import RLQuestion

    questions = [RLQuestion(i, f"q{i}", str(i)) for i in range(7)]
    plain = RLPromptSource(questions, CharTokenizer(), shuffle=False)
    assert [p.index for p in plain.draw(10)] == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]  # file order, epoch after epoch
    mixed = RLPromptSource(questions, CharTokenizer(), seed=3)
    drawn = [p.index for p in mixed.draw(14)]
    expected = [int(i) for e in (0, 1) for i in np.random.default_rng([3, e]).permutation(7)]
    assert drawn == expected and drawn[:7] != list(range(7))  # seeded per-epoch permutations
