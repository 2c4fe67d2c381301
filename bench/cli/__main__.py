"""`python -m bench.cli ...`, as torchrun starts the harness."""
import sys

from bench.cli import main

sys.exit(main())
