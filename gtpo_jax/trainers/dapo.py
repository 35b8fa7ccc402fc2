"""DAPO dynamic sampling (docs/algorithm.md §5.2): keep only groups whose accuracy is strictly between 0 and 1.

`keep_varied` (gtpo.dynamic_sampling_keep: reward, off by default and outside SPEC §5.2) also keeps
a group whose accuracy is 0 or 1 when its rewards still differ: with the speed reward, a prompt all
of whose answers are right but decode at different speeds. SPEC's rule drops such groups, which
leaves the speed part only the spread of speeds among one mixed group's right answers.

Prompts come in order from a resumable cursor. Each round draws `oversample` × (groups still
needed) prompts, rolls them out and scores them; rounds repeat until `num_task_per_step`
groups are kept (or `max_rounds` is reached: the step then trains on what it has, and says
so). The surplus of the last round is trimmed at random with the step's generator.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

log = logging.getLogger("gtpo_jax")

G = TypeVar("G")  # a scored group of rollouts


@dataclasses.dataclass
class DapoCounts:
    drawn: int = 0
    all_right: int = 0
    all_wrong: int = 0
    kept: int = 0
    kept_uniform_accuracy: int = 0  # of `kept`: accuracy 0 or 1, kept for differing rewards (keep_varied)
    trimmed: int = 0
    rounds: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {f"dapo/{k}": v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class DynamicSampleResult(Generic[G]):
    groups: list[G]
    counts: DapoCounts


def dynamic_sample(
    draw_prompts: Callable[[int], Sequence],
    rollout_and_score: Callable[[Sequence], list[G]],
    group_accuracy: Callable[[G], float],
    *,
    num_groups: int,
    oversample: int,
    rng: np.random.Generator,
    enabled: bool = True,
    max_rounds: int = 8,
    keep_varied: Callable[[G], bool] | None = None,
) -> DynamicSampleResult[G]:
    """`draw_prompts(k)` advances the cursor by k prompts; `rollout_and_score(prompts)` returns one
    scored group per prompt; `group_accuracy(group)` its mean accuracy; `keep_varied(group)`, if
    given, whether a group of accuracy 0 or 1 is kept all the same (all_right / all_wrong count
    the groups dropped). `counts.rounds` (logged as dapo/rounds) is the number of rounds used."""
    counts = DapoCounts()
    kept: list[G] = []
    if not enabled:
        groups = rollout_and_score(draw_prompts(num_groups))
        counts.drawn = counts.kept = len(groups)
        counts.rounds = 1
        for g in groups:
            acc = group_accuracy(g)
            counts.all_right += acc >= 1.0
            counts.all_wrong += acc <= 0.0
        return DynamicSampleResult(groups, counts)
    while len(kept) < num_groups and counts.rounds < max_rounds:
        counts.rounds += 1
        prompts = draw_prompts(oversample * (num_groups - len(kept)))
        counts.drawn += len(prompts)
        for g in rollout_and_score(prompts):
            acc = group_accuracy(g)
            if 0.0 < acc < 1.0 or (keep_varied is not None and keep_varied(g)):
                kept.append(g)
            elif acc >= 1.0:
                counts.all_right += 1
            else:
                counts.all_wrong += 1
    if len(kept) > num_groups:
        counts.trimmed = len(kept) - num_groups
        chosen = np.sort(rng.choice(len(kept), size=num_groups, replace=False))
        kept = [kept[i] for i in chosen]
    elif len(kept) < num_groups:
        log.warning(
            "dynamic sampling reached gtpo.max_rounds=%d with %d of %d groups kept (%d all right, %d all wrong); "
            "training on what was kept (raise gtpo.max_rounds or gtpo.oversample to fill the step)",
            max_rounds, len(kept), num_groups, counts.all_right, counts.all_wrong,
        )
    counts.kept = len(kept)
    counts.kept_uniform_accuracy = sum(not 0.0 < group_accuracy(g) < 1.0 for g in kept)
    return DynamicSampleResult(kept, counts)
