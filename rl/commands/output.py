"""What the commands print: a report as JSON, a refused input as one line on stderr."""

from __future__ import annotations

import json
import sys


def print_report(report: dict, one_line: bool) -> int:
    """A benchmark's report: one JSON object (``--json``) or indented."""
    print(json.dumps(report) if one_line else json.dumps(report, indent=2))
    return 0


def refuse(command: str, error: Exception) -> int:
    """``exitrl COMMAND: message`` on stderr, exit 2."""
    print(f"exitrl {command}: {error}", file=sys.stderr)
    return 2
