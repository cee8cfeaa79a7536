"""residual-dynamics' launchers for Hydra (see :mod:`.launchers`)."""
