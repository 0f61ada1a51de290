"""`python -m ap_jax.eval [--episodes N] [--out detector.json]`: the detector's accuracy on real built-in-game
frames, clean and perturbed (noise, blur), as a Markdown table (about 25 s for 128 episodes on 2 CPU cores)."""

from ap_jax.eval import detector

detector._main()  # pylint: disable=protected-access
