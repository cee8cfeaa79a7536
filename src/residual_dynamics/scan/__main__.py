"""``python -m residual_dynamics.scan``: the injection-coefficient scan (:mod:`residual_dynamics.scan.cli`)."""

from residual_dynamics.scan.cli import main

if __name__ == "__main__":
    main()
