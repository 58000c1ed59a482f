"""``python -m robust_cert`` is the ``robust-cert`` command (what ``torchrun -m`` launches)."""

from robust_cert.cli import run

if __name__ == "__main__":
    run()
