"""ap_jax: ActionParty (multi-subject action binding in generative video games) in JAX."""

__version__ = "0.1.0"
