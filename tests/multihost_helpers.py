"""Test helpers shared by in-process and multi-process runs (PYTHONPATH=tests): a custom
reward, and a way for one process to die."""

from __future__ import annotations

import os
import signal
import sys

from gtpo_jax.rewards import register_reward


@register_reward("digit_fraction", replace=True)
def digit_fraction(inp, correct, params) -> float:
    """Share of digits in the response text: varies between random rollouts."""
    return sum(c.isdigit() for c in inp.text) / max(len(inp.text), 1)


def train_and_die(die_process: int, die_before_step: int, argv: list[str]) -> int:
    """`python -m gtpo_jax.train` in which process `die_process` is SIGKILLed when it starts the
    given step (as a lost host would vanish: no exception, no clean-up)."""
    import jax

    from gtpo_jax.trainers import session as session_module

    original = session_module.TrainingSession.update

    def update(self, arrays):
        if jax.process_index() == die_process and self.step + 1 == die_before_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, arrays)

    session_module.TrainingSession.update = update
    from gtpo_jax.train import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_and_die(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
