"""``python -m lib_memslice plan | doctor | bench``."""

import sys

from .cli import main

sys.exit(main())
