"""``python -m llama_core.cli`` (e.g. under torchrun), the same as the ``llama-core`` script."""

import sys

from .main import main

sys.exit(main())
