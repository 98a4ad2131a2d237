import sys

from scoretk.evaluation.evaluate import main

sys.exit(main())
