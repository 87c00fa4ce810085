"""``python -m editrl.reward_server --config configs/reward_server.yaml [--host H] [--port P] [--redis-url URL]``.

The same as ``editrl reward-server``. Binds 127.0.0.1 unless the config or
``--host`` says otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys

from editrl.reward_server.config import ServerConfig, load_server_config
from editrl.reward_server.main import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editrl.reward_server", description="Run the editrl reward server.")
    parser.add_argument("--config", help="YAML ServerConfig (defaults when omitted)")
    parser.add_argument("--host", help="override config.host")
    parser.add_argument("--port", type=int, help="override config.port")
    parser.add_argument("--redis-url", help="override config.redis_url (shared cache and config registry)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = load_server_config(args.config) if args.config else ServerConfig()
        overrides = {
            k: v for k, v in (("host", args.host), ("port", args.port), ("redis_url", args.redis_url)) if v is not None
        }
        if overrides:
            config = ServerConfig.model_validate({**config.model_dump(), **overrides})
    except (OSError, ValueError) as exc:
        logging.getLogger("editrl.reward_server").error("%s", exc)
        return 2
    serve(config, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
