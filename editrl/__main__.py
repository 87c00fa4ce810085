import sys

from editrl.cli import main

sys.exit(main())
