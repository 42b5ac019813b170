"""Where datasets live when no folder is given: $METASSL_DATA, else ~/.cache/metassl."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "METASSL_DATA"


def data_home() -> Path:
    """Returns the default data folder: $METASSL_DATA when set, else ~/.cache/metassl.

    Each dataset uses a subfolder named after it, e.g. <data_home>/omniglot.
    """
    configured = os.environ.get(DATA_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "metassl"
