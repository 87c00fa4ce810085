"""editrl: RL post-training (Edit-GRPO) for instruction-based video-editing diffusion models.

One import namespace. The repository keeps one top-level folder per running
process (``cluster/`` the driver, ``rollout_workers/``, ``reward_server/``,
``learner/``) plus the shared homes (``policy/``, ``protocol/``) and offline
``tools/``; each is the subpackage ``editrl.<folder>``:

* in a wheel, ``pyproject.toml``'s ``package-dir`` puts them inside this package
  (the only top-level package it installs), with ``configs/`` and ``assets/`` as
  package data;
* in a source checkout (a clone, or the working directory a Ray job uploads),
  the repository root is added to this package's search path, so
  ``editrl.policy`` is the checkout's ``policy/`` folder and every process of a
  job imports the uploaded code, never a mix with an installed copy.
"""
from pathlib import Path as _Path

_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "cluster" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (a package's __path__)
