"""editrl reward server: scores (instruction, source video, edited video) over HTTP.

Run it with ``python -m reward_server --config configs/reward_server.yaml``; see
:mod:`reward_server.app` for the API and :mod:`reward_server.backends` for the
scoring backends. Nothing in this package imports torch.
"""
