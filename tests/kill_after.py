"""Test helper: run deepfake-train and SIGKILL the process right after training step EPOCH:STEP.

    python tests/kill_after.py EPOCH:STEP TRAIN_ARGS...
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import train  # noqa: E402


def main() -> int:
    epoch, step = (int(v) for v in sys.argv[1].split(":"))

    def kill(e: int, s: int) -> None:
        if (e, s) == (epoch, step):
            os.kill(os.getpid(), signal.SIGKILL)

    return train.main(sys.argv[2:], on_step=kill)


if __name__ == "__main__":
    sys.exit(main())
