"""tokenaudit: exact, cheap token-usage auditing for self-hosted LLM inference.

The code follows the data: ``tokenaudit.inference`` -> ``tokenaudit.schemas`` ->
``tokenaudit.streams`` -> ``tokenaudit.sinks``, with ``tokenaudit.infra`` beside them.
Each lives in its own top-level folder of the repository (see pyproject.toml).
"""

__version__ = "0.1.0"
