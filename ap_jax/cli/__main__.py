import sys

from ap_jax.cli import main

sys.exit(main())
