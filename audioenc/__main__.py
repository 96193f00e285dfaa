import sys

from audioenc.cli import main

sys.exit(main())
