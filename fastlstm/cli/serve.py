"""Serve a model over HTTP and WebSocket: whole sequences, live streams batched across clients, metrics.

Needs the optional extra ``fastlstm[serve]`` (Starlette, uvicorn with uvloop and httptools, websockets,
prometheus_client). The endpoints are described in ``fastlstm.server``.
"""

from __future__ import annotations

from . import CommandError

NAME = "serve"
HELP = "a streaming inference server (needs fastlstm[serve])"


def add_arguments(parser) -> None:
    from . import _positive_int

    parser.add_argument("model", help="the model file")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on (default 8000; 0: any free port)")
    parser.add_argument("--max-batch", type=_positive_int, default=64, metavar="N",
                        help="the most stream steps run as one batch (default 64; 1 turns batching off)")
    parser.add_argument("--max-delay-us", type=int, default=200, metavar="N",
                        help="how long the oldest waiting step may wait for others to join its batch (default 200)")
    parser.add_argument("--capacity", type=_positive_int, default=10_000, metavar="N",
                        help="the most live streams (default 10000)")
    parser.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                        help="seconds a stream's state is kept after its last step (default 300)")
    parser.add_argument("--max-message-bytes", type=_positive_int, default=1 << 20, metavar="N",
                        help="the largest request body or WebSocket message (default 1 MiB)")


def run(args) -> None:
    from . import load_model

    try:
        from .. import server
    except ImportError as exc:
        raise CommandError(f"fastlstm serve needs the optional extra fastlstm[serve] ({exc.name} is not "
                           "installed): pip install 'fastlstm[serve]'") from None
    if args.max_delay_us < 0 or args.idle_timeout <= 0:
        raise CommandError("--max-delay-us must be 0 or more and --idle-timeout positive")
    server.serve(load_model(args), source=args.model, host=args.host, port=args.port, max_batch=args.max_batch,
                 max_delay_us=args.max_delay_us, capacity=args.capacity, idle_timeout=args.idle_timeout,
                 max_message_bytes=args.max_message_bytes)
