"""``python -m tokenaudit.cli``: what the supervisor and the tests run (the console script's twin)."""

from tokenaudit.cli.main import main

main()
