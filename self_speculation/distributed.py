"""Process rank under torchrun (0 when started with plain python)."""

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))
