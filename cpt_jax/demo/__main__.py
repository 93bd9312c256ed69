import sys

from cpt_jax.demo.cli import main

sys.exit(main())
