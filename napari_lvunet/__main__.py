"""``python -m napari_lvunet``: the same command as ``napari-lvunet``."""

import sys

from .cli import main

sys.exit(main())
