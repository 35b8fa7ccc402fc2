"""gtpo_jax: SFT and GTPO post-training of block-diffusion language models in JAX/Flax NNX."""

from gtpo_jax.logs import install_noise_filters

install_noise_filters()  # before transformers (imported by submodules) prints its import-time notices
