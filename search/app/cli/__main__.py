import sys

from search.app.cli.main import main

sys.exit(main())
