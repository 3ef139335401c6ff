# Types of the C JSON writer built from _fastjson.pyx (mypy cannot read the extension module).
from collections.abc import Callable
from typing import Any

ABI_VERSION: int

def dumps_compact(value: Any, fallback: Callable[[Any], bytes]) -> bytes: ...
