import sys

from infra.tools.cli import main

sys.exit(main())
