import sys

from instseg_core.cli import main

sys.exit(main())
