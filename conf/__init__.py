"""The Hydra configs, installed as the package ``galaxy_lightning.conf`` (see pyproject.toml), so
that ``galaxy-train`` finds them as ``pkg://galaxy_lightning.conf`` from any directory."""
