# Types of the C codec built from _native.pyx (mypy cannot read the extension module).
from collections.abc import Callable, Mapping
from typing import Any

ABI_VERSION: int

class FlatCodec:
    def __init__(
        self,
        fields: list[tuple[str, str, bool]],
        header: bytes,
        bad: type[Exception],
        fallback: Callable[[Mapping[str, Any]], bytes] | None,
    ) -> None: ...
    def decode_body(self, d: bytes) -> dict[str, Any]: ...
    def encode(self, record: Mapping[str, Any]) -> bytes: ...
