"""Where the tests find the shared data: `../shared` beside the repository, or $SHARED_DIR;
the authors' parity outputs in its `parity/` folder, or $PARITY_DIR (one definition, so a
clone elsewhere needs only SHARED_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("SHARED_DIR", REPO_ROOT.parent / "shared"))
PARITY_DIR = Path(os.environ.get("PARITY_DIR", SHARED_DIR / "parity"))
