"""The read side: the fixed report queries over the contract tables and their parameters,
prices and the cost report, the usage API (``tokenaudit api``, or inside the sink for the
embedded store), the CLI's report formatting, the anomaly follower and its webhook, and
``verify``. Reads only: everything it touches was written by ``tokenaudit.sinks``."""
