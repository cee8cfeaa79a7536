"""``python -m residual_dynamics.fetch_smollm2``: the offline SmolLM2 fetch (:mod:`residual_dynamics.pretrained.fetch_smollm2`)."""

from residual_dynamics.pretrained.fetch_smollm2 import main

if __name__ == "__main__":
    main()
