"""`python -m lora_ogpsa` is the `lora-ogpsa` command."""

import sys

from lora_ogpsa.cli import main

sys.exit(main())
