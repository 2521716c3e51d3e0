import sys

from lora_ds.cli import main

sys.exit(main())
