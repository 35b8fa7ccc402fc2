"""gtpo_jax: SFT and GTPO post-training of block-diffusion language models in JAX/Flax NNX."""

from gtpo_jax.cli import reexec_with_hugepage_malloc, started_as_module
from gtpo_jax.logs import install_noise_filters

# The trainer CLI restarts with huge-page malloc (gtpo_jax.cli) here, before jax, flax and the
# trainers load: from train.main() the restart re-imported them all (~7 s more per launch).
if started_as_module("gtpo_jax.train"):
    reexec_with_hugepage_malloc()

install_noise_filters()  # before transformers (imported by submodules) prints its import-time notices
