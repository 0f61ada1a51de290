"""Games that produce multi-player rollouts: the built-in JAX grid game (`gridgame`)."""
