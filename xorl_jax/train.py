"""CLI: python -m xorl_jax.train --config FILE [--section.key=value ...]

Exit codes: 0 done, 2 bad config or input (one line on stderr says what and where), 1 the run stopped on purpose
(e.g. too many non-finite steps; the last good checkpoint is intact).
"""

from __future__ import annotations

import logging
import os
import sys


def _input_errors():
    """Exception types that mean 'the user's config or input is wrong' (exit 2, one line, no traceback)."""
    from xorl_jax.checkpoint.hf import CheckpointError
    from xorl_jax.config import ConfigError

    errors = [ConfigError, CheckpointError]
    try:
        from xorl_jax.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def _quiet_library_logs():
    """Orbax and absl log every checkpoint detail at INFO; keep the run's own output readable."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None) -> int:
    from xorl_jax.config import ConfigError, parse_cli

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_cli(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_library_logs()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from xorl_jax.trainer import TrainingStopped, run

    try:
        run(cfg)
    except _input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
