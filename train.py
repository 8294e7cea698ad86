"""Train a galaxy classifier: ``python train.py [group=option ...] [key=value ...]``.

The same entry point as the ``galaxy-train`` command that installing the package provides (see
``galaxy_lightning/train.py``); the configs are ``conf/``, shipped in the package as
``galaxy_lightning.conf``. The README lists the config groups.
"""

from galaxy_lightning.train import main

if __name__ == "__main__":
    main()
