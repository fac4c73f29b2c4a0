import sys

from fednode.cli import main

sys.exit(main())
