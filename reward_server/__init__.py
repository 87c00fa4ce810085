"""editrl reward server: scores (instruction, source video, edited video) over HTTP.

Run it with ``python -m editrl.reward_server --config configs/reward_server.yaml``; see
:mod:`editrl.reward_server.app` for the API, :mod:`editrl.reward_server.reward_config` for
reward configs and :mod:`editrl.reward_server.backends` for the scoring backends
(``docs/reward_server.md`` for the whole picture). Nothing here imports the
policy; torch and transformers are imported only when an internal-VLM backend
is built.
"""
