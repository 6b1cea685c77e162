"""The `extproc` command line.

extproc serve --config FILE [--workers N]   the ext_proc gRPC server alone (mesh, sidecar)
extproc up [--config FILE]                   Envoy + the ext_proc server, in the foreground
extproc check-config FILE                    validate the config and the Envoy bootstrap
extproc render-envoy [--config FILE]         print the Envoy bootstrap `up` would run
extproc report [--source FILE|URL] [--html F] spend, savings, rejections from the audit store
extproc audit migrate --config FILE          create the Postgres audit table and partitions
extproc reconcile ACCESS_LOG AUDIT_LOG       records for requests only Envoy's log has
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from extproc import admin_cli
from extproc.config import Config, ConfigError, load_config
from extproc.report import cli as report_cli

log = logging.getLogger("extproc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the ext_proc gRPC server")
    serve.add_argument("--config", help="gateway config YAML (default: built-in defaults)")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    serve.add_argument(
        "--grace", type=float, default=30.0, help="seconds in-flight streams get on shutdown"
    )
    serve.add_argument(
        "--drain",
        type=float,
        default=0.0,
        help="seconds to keep accepting streams after SIGTERM while health reports NOT_SERVING"
        " (above Envoy's health-check interval x unhealthy threshold + timeout: 15 for"
        " envoy/front-proxy.yaml)",
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    up = commands.add_parser("up", help="run Envoy and the ext_proc server together")
    up.add_argument("--config", help="gateway config YAML (default: built-in defaults)")
    up.add_argument("--grace", type=float, default=10.0)
    check = commands.add_parser("check-config", help="validate a config and its Envoy bootstrap")
    check.add_argument("config", nargs="?")
    render = commands.add_parser("render-envoy", help="print the Envoy bootstrap `up` runs")
    render.add_argument("--config")
    reconcile = commands.add_parser(
        "reconcile", help="audit records for streams only Envoy's access log has"
    )
    reconcile.add_argument("access_log")
    reconcile.add_argument("audit_log")
    admin_cli.add_parser(commands)
    admin_cli.add_cache_parser(commands)
    report_cli.add_parsers(commands)
    admin_cli.add_sso_parser(commands)
    return parser


def _reconcile(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from extproc.telemetry.reconcile import read_json_lines, reconcile

    access = read_json_lines(Path(args.access_log))
    found = 0
    for record in reconcile(access, read_json_lines(Path(args.audit_log))):
        print(json.dumps(record, sort_keys=True))
        found += 1
    print(f"extproc: {found} record(s) reconciled", file=sys.stderr)
    return 0


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"extproc: invalid config {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(2) from exc


def _serve(args: argparse.Namespace) -> int:
    from extproc import server, supervisor

    config = _load(args.config)
    if args.workers < 1:
        print("extproc: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        if not config.shared_store:
            print(
                f"extproc: --workers {args.workers} needs a shared store: with store "
                f"{config.store!r} each process would keep its own budgets, rate limits and "
                "cache. Set store: redis://HOST:6379/0, or run one worker.",
                file=sys.stderr,
            )
            return 2
        return supervisor.run_workers(args, config)
    server.install_event_loop_policy()
    try:
        asyncio.run(
            server.serve(
                config,
                grace=args.grace,
                drain=args.drain,
                reuse_port=args.worker,
                serve_metrics=not args.worker,
            )
        )
    except ConfigError as exc:  # found when the runtime is built (e.g. an unwritable spool)
        print(f"extproc: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def _check(args: argparse.Namespace) -> int:
    from extproc import supervisor

    config = _load(args.config)
    problems = supervisor.validate_envoy(config)
    if problems:
        print("extproc: the Envoy bootstrap is invalid:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    print(f"{args.config or 'default config'}: OK ({len(config.providers)} provider(s))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check(args)
    if args.command == "reconcile":
        return _reconcile(args)
    if args.command in ("keys", "cache", "sso"):
        return admin_cli.run(_load(args.config), args)
    if args.command == "report":
        return report_cli.run_report(args, _load(args.config))
    if args.command == "audit":
        return report_cli.run_audit(args, _load(args.config))
    from extproc import envoy_config, supervisor

    config = _load(args.config)
    if args.command == "render-envoy":
        sys.stdout.write(envoy_config.render_yaml(config))
        return 0
    return supervisor.up(args.config, config, args.grace)


if __name__ == "__main__":
    raise SystemExit(main())
