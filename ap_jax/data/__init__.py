"""Data: games that produce multi-player rollouts, the TFDS dataset, and the Grain pipeline."""
