import sys

from aivailable.cli import main

sys.exit(main())
