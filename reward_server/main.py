"""Run the reward server process: ``serve(config)`` starts uvicorn on config.host:config.port."""
from __future__ import annotations

import logging

import uvicorn

from editrl.reward_server.app import create_app
from editrl.reward_server.config import ServerConfig

logger = logging.getLogger(__name__)


def serve(config: ServerConfig, log_level: str = "info") -> None:
    """Serve the reward API until the process is stopped (blocking)."""
    app = create_app(config)
    logger.info("reward server listening on http://%s:%d (reward config %s)", config.host, config.port, config.reward.version)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False)
