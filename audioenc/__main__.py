import sys

from audioenc.cli import console_main

sys.exit(console_main())
