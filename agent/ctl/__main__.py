"""`python -m callerid.agent.ctl`: calleridctl."""

import sys

from callerid.agent.ctl import main

sys.exit(main())
