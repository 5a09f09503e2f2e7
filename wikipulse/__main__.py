import sys

from wikipulse.cli import main

sys.exit(main())
