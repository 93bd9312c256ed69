import sys

from cpt_jax.demo.command import main

sys.exit(main())
