"""``python -m dfq_plugins.cli`` (and ``torchrun -m dfq_plugins.cli``): the ``dfq`` command."""
import sys

from .main import main

sys.exit(main())
