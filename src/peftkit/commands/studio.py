"""`peftkit studio [--host H --port P --workspace DIR]`: plan, inspect data, train, watch, compare, chat and export in
the browser (pages served by this process; no external requests).

Files are read and written only under the workspace (default: the current folder). It listens on loopback unless
--host says otherwise; any other address needs a token (--token or $PEFTKIT_STUDIO_TOKEN), which the printed URL
carries. Runs started here are ordinary `peftkit train` runs (their recipe in their folder: the CLI resumes them),
and they keep training when the studio stops.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("studio", help="the workflow in the browser: plan, data, train, compare, chat, export",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only; any other needs --token)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default=".", metavar="DIR",
                   help="the folder the studio reads and writes under (default: the current folder)")
    p.add_argument("--token", default=os.environ.get("PEFTKIT_STUDIO_TOKEN"),
                   help="require this token on every API request (default: $PEFTKIT_STUDIO_TOKEN; needed beyond "
                        "loopback)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from peftkit.studio import create_app
    except ImportError as e:
        raise ImportError(f"peftkit studio needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'peftkit[serve]'") from None
    from urllib.parse import quote

    from peftkit.commands.serve import bind, is_loopback
    from peftkit.errors import PeftkitError

    if not args.token and not is_loopback(args.host):
        raise PeftkitError(f"--host {args.host} is not a loopback address, so anyone who can reach it could train and "
                           "read files in the workspace: set --token TOKEN (or $PEFTKIT_STUDIO_TOKEN)")
    sock = bind(args.host, args.port)
    try:
        app = create_app(args.workspace, token=args.token)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(app, log_level="warning")
    sock.listen(config.backlog)  # the URL below is good as soon as it is printed
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}/" + (f"?token={quote(args.token)}" if args.token else "")
    print(f"peftkit studio: {app.state.workspace.root} on {url}", file=sys.stderr)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
