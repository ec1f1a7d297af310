import sys

from trainer.program import main

sys.exit(main())
