"""``python -m residual_dynamics.train``: the training entry point (:mod:`residual_dynamics.training.train`)."""

from residual_dynamics.training.train import main

if __name__ == "__main__":
    main()
