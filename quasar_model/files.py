"""Reading the project's JSON or YAML files (distill configs, competition files): one reader, one
set of error messages naming the file and the problem."""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_file(path: str | os.PathLike) -> dict:
    """A JSON or YAML (.yaml/.yml) config file -> dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r}: not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"config file {str(path)!r}: YAML needs pyyaml (pip install pyyaml), "
                             "or write the config as JSON") from e
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r}: invalid YAML: {' '.join(str(e).split())}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {str(path)!r}: invalid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"config file {str(path)!r}: must hold a mapping at the top level")
    return d
