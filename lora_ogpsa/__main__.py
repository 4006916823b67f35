"""`python -m lora_ogpsa` is the `lora-ogpsa` command."""

import sys

from lora_ogpsa.entry import main

sys.exit(main())
