import sys

from yardmaster.agent.main import main

sys.exit(main())
