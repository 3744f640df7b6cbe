import sys

from kdedge.cli import main

sys.exit(main())
