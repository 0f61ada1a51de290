"""Training: mesh and shardings from config, optax, Orbax checkpoints, the resumable multi-host loop."""
