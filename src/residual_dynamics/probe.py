"""``python -m residual_dynamics.probe``: probe a pretrained model (:mod:`residual_dynamics.pretrained.cli`)."""

from residual_dynamics.pretrained.cli import main

if __name__ == "__main__":
    main()
