"""python -m xorl_jax.server --config X.yaml [--host 127.0.0.1] [--port 8000] [--section.key=value ...]

Serves the Tinker API (the `tinker` SDK's ServiceClient, TrainingClient, SamplingClient and RestClient) on one base
model from the config: LoRA tenants (`lora.enable_lora: true`) or one full-weight model. Binds 127.0.0.1 unless
--host says otherwise; any other address needs an API key (XORL_JAX_API_KEY, or --api-key-file), which every
request must then carry (X-API-Key). docs/SERVER.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m xorl_jax.server", description=__doc__.split("\n\n")[1],
                                epilog="Any config key can be overridden as for training: --section.key=value "
                                       "(e.g. --train.output_dir=out/rl --lora.lora_rank=32).")
    p.add_argument("--config", required=True, help="YAML config (sectioned, or xorl's flat server format)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="file holding the API key clients must send (default: $XORL_JAX_API_KEY)")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body accepted (MiB)")
    return p.parse_known_args(argv)


def _api_key(args) -> str | None:
    key = None
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as e:
            raise SystemExit(_fail(f"--api-key-file {args.api_key_file}: {e.strerror}"))
    key = key or os.environ.get("XORL_JAX_API_KEY") or None
    if key is not None and not key.startswith("tml-"):
        raise SystemExit(_fail("the API key must start with 'tml-' (the tinker SDK refuses other keys)"))
    if key is not None and len(key) < 16:
        raise SystemExit(_fail("the API key is too short: use at least 16 characters"))
    if args.host not in LOCAL_HOSTS and key is None:
        raise SystemExit(_fail(f"--host {args.host} accepts connections from other machines: set an API key "
                               "(XORL_JAX_API_KEY=tml-... or --api-key-file FILE)"))
    return key


def _check_port(host: str, port: int) -> None:
    """The address is free and valid before minutes of model loading, not after (a race with another process
    taking it meanwhile still gets the one-line error at bind time)."""
    import socket

    if not 0 <= port <= 65535:
        raise SystemExit(_fail(f"--port {port}: a TCP port is 0..65535 (0: any free port)"))
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SystemExit(_fail(f"--host {host}: {e.strerror or e}"))
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise SystemExit(_fail(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? "
                                   "pick another --port)"))


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    from xorl_jax.config import ConfigError

    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("xorl_jax.server")
    api_key = _api_key(args)
    _check_port(args.host, args.port)
    try:
        from xorl_jax.config import check_runnable, load_config
        from xorl_jax.server import settings

        cfg = check_runnable(load_config(args.config, overrides), need_data=False)
        settings.check(cfg)
    except ConfigError as e:
        return _fail(str(e))
    level = str(cfg.server.get("log_level") or "").upper()
    if level in ("DEBUG", "INFO", "WARNING", "ERROR"):
        logging.getLogger("xorl_jax").setLevel(level)
    for line in settings.report(cfg):
        log.info("config: %s", line)

    import jax

    from xorl_jax.parallel import distributed
    from xorl_jax.server import follow
    from xorl_jax.server.api import Service, make_server
    from xorl_jax.server.futures import FutureStore, Worker
    from xorl_jax.server.host import ModelHost

    from xorl_jax.errors import CheckpointError
    from xorl_jax.parallel.mesh import MeshError

    distributed.initialize()
    try:
        host = ModelHost(cfg)  # its checks (xorl_jax.preflight) name a bad output_dir, config.json, mesh or weights
    except (ConfigError, CheckpointError, MeshError, OSError) as e:
        return _fail(str(e))
    removed = host.storage.clean_temporaries()
    if removed:
        log.info("removed %d half-written saves of an earlier run", len(removed))
    if jax.process_index() != 0:
        follow.follow(host)
        return 0

    store = FutureStore()
    worker = Worker(store, before_each=follow.send)
    service = Service(host, worker, store, api_key=api_key, max_body=int(args.max_request_mb * 2**20))
    try:
        server = make_server(service, args.host, args.port)
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    mode = f"LoRA tenants (default rank {cfg.lora.lora_rank})" if host.lora_mode else "one full-weight model"
    log.info("serving %s (%s) on http://%s:%d%s; checkpoints in %s", host.base_model, mode, args.host,
             server.server_address[1], ", API key required" if api_key else "", host.storage.root)
    print(f"xorl_jax server ready on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        worker.stop()
        follow.stop_followers()
        server.server_close()
    log.info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
