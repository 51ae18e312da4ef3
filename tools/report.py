"""The tools' one output convention: a JSON object printed to stdout and, with --output, written to a file."""

from __future__ import annotations

import json


def write_report(result: dict, output: str | None = None, *, indent: int = 2) -> None:
    """Prints `result` as indented JSON; also writes it (newline-terminated) to `output` when given."""
    text = json.dumps(result, indent=indent)
    print(text, flush=True)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
