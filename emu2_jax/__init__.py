"""emu2_jax: Emu2 and Emu in JAX/Flax, trainable on TPU pods and GPU meshes."""
