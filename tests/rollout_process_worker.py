"""One process of tests/test_rollout_processes.py (run through scripts/launch_local.py): exports a
tiny model whose parameters span the processes, gathers them as the weight push does, and splits a
batch of rollouts across the processes through a fake engine."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np


class StampingBackend:
    """A fake engine: each rollout records which process generated it, with which seed and prompt."""

    def __init__(self, process: int):
        self.process, self.calls = process, []

    def generate(self, prompts, n, *, seed):
        from gtpo_jax.rollout.base import Rollout

        self.calls.append((len(prompts), seed))
        return [[Rollout(prompt=np.asarray(p, np.int32), tokens=np.asarray([self.process, seed, j], np.int32),
                         step_map=np.arange(1, 4, dtype=np.int32), logprobs=np.full(3, -0.5, np.float32),
                         tail_tokens=None, tail_steps=None, finish_reason="stop", text=f"p{self.process}")
                 for j in range(n)] for p in prompts]


def main(out: str) -> int:
    import jax
    from flax import nnx

    from gtpo_jax.checkpoint import param_tree
    from gtpo_jax.distributed import DistributedSection, initialize
    from gtpo_jax.hf_io import export_hf_dir, host_tensors
    from gtpo_jax.model import ModelConfig, init_model
    from gtpo_jax.model.params import nnx_to_hf
    from gtpo_jax.rollout.split import ProcessSplitRollout
    from gtpo_jax.sharding import MeshConfig, build_mesh, shard_model

    initialize(DistributedSection())
    me = jax.process_index()
    model = init_model(ModelConfig.tiny(vocab_size=96, tie_word_embeddings=False), seed=0)
    shard_model(model, build_mesh(MeshConfig(data=1, fsdp=-1, tensor=1)))
    params = param_tree(nnx.state(model, nnx.Param))
    spanning = [k for k, v in jax.tree_util.tree_leaves_with_path(params) if not v.is_fully_addressable]
    assert spanning, "no parameter spans the processes: the test would not test the gather"
    export_hf_dir(params, model.cfg, os.path.join(out, "export"), dtype="bfloat16")
    pushed = dict(nnx_to_hf(path, array, model.cfg) for path, array in host_tensors(params, "bfloat16"))
    np.savez(os.path.join(out, f"pushed_{me}.npz"), **{k: v.view(np.uint16) for k, v in pushed.items()})

    fake = StampingBackend(me)
    split = ProcessSplitRollout(fake)
    groups = split.generate([[10 + i] * (i + 1) for i in range(5)], 2, seed=7)
    with open(os.path.join(out, f"rollouts_{me}.pkl"), "wb") as f:
        pickle.dump({"groups": groups, "calls": fake.calls}, f)
    print(f"process {me}: {len(spanning)} spanning parameters, {len(groups)} rollout groups", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
