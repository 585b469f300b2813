"""The `lorad` command.

Only argparse and the stdlib are imported at module level: `lorad --help` must answer
instantly. Each subcommand imports what it needs inside its handler.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration,
3 another lorad already runs on the state folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RUNNING = 0, 1, 2, 3


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-c", "--config", metavar="FILE", help="YAML config file (default: built-in defaults)")
    p.add_argument("--state", metavar="DIR", help="state folder (overrides paths.state_dir; default ./lorad-state)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="lorad",
        description="Continual-learning daemon for LLMs: watches a folder for new data, detects drift, "
                    "fine-tunes LoRA adapters, evaluates them against the champion and hot-swaps the winner.",
        epilog="Configuration: every key can be set in the YAML file or as LORAD_<SECTION>__<KEY> in the "
               "environment. Run `lorad config show --defaults` for the full reference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", parents=[common], help="run the daemon (inbox, scheduler, training, server)")
    p.add_argument("--inbox", metavar="DIR", help="watched folder (overrides paths.inbox)")
    _host_port(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", parents=[common], help="serve the champion over the OpenAI-compatible API only")
    _host_port(p)
    p.set_defaults(func=cmd_run, serve_only=True)

    p = sub.add_parser("status", parents=[common], help="show champion, pending data, running job and last events")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--events", type=int, default=10, metavar="N", help="how many recent events to show")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="show or check the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    q = csub.add_parser("show", parents=[common], help="print the effective configuration as YAML")
    q.add_argument("--defaults", action="store_true", help="print the commented defaults (the example file)")
    q.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    q.add_argument("--markdown", action="store_true", help="print the reference tables (as in README.md)")
    q.set_defaults(func=cmd_config_show)
    q = csub.add_parser("check", parents=[common], help="validate a config; exit 2 listing every problem")
    q.set_defaults(func=cmd_config_check)
    return parser


def _host_port(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (overrides serve.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (overrides serve.port; default 8000)")


def _load(args: argparse.Namespace):
    """Load the config with command-line overrides; ConfigError propagates to main()."""
    from daemon.config import load_config

    overrides: dict[str, dict[str, Any]] = {"paths": {}, "serve": {}}
    if getattr(args, "state", None):
        overrides["paths"]["state_dir"] = args.state
    if getattr(args, "inbox", None):
        overrides["paths"]["inbox"] = args.inbox
    if getattr(args, "host", None):
        overrides["serve"]["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["serve"]["port"] = args.port
    return load_config(args.config, overrides=overrides)


# ----------------------------------------------------------------------------- commands


def cmd_config_show(args: argparse.Namespace) -> int:
    from daemon.config import Config, render_markdown, render_yaml

    if args.markdown:
        print(render_markdown())
        return EXIT_OK
    cfg = Config() if args.defaults else _load(args)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(render_yaml(cfg, with_docs=args.defaults))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    _load(args)
    print(f"{args.config or 'defaults'}: OK")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daemon.service import read_lock_info, status_snapshot
    from daemon.store import DB_NAME, open_store

    cfg = _load(args)
    state = Path(cfg.paths.state_dir)
    info = read_lock_info(state)
    store = open_store(state, readonly=True) if (state / DB_NAME).exists() else None
    try:
        snap = status_snapshot(cfg, store, daemon_info=info, events=args.events)
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps(snap, indent=2, ensure_ascii=False, default=str))
    else:
        print(_format_status(snap))
    return EXIT_OK


def _format_status(s: dict) -> str:
    import time

    def ts(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if t else "-"

    d = s["daemon"]
    lines = [f"state      {s['state_dir']}",
             f"daemon     {'running, pid ' + str(d.get('pid')) + ' at ' + str(d.get('url')) if d['running'] else 'not running'}",
             f"base model {s['base_model']}"]
    if not s["initialized"]:
        lines.append("store      not initialised yet (start `lorad run` or ingest a file)")
        return "\n".join(lines)
    ch = s["champion"]
    lines.append(f"champion   {ch['version'] + ' (parent ' + str(ch['parent']) + ')' if ch else 'base model (no adapter promoted yet)'}")
    c = s["counts"]
    lines.append(f"data       {c.get('files', 0)} files, {c.get('records', 0)} records, "
                 f"{c.get('records_pending', 0)} pending for training")
    lines.append(f"adapters   {c.get('adapters', 0)}")
    for r in s["runs"]:
        progress = f"step {r['step']}/{r['total_steps'] or '?'}"
        lines.append(f"run        {r['id']} {r['kind']} {r['status']} {progress} {r.get('reason') or ''}".rstrip())
    if s["events"]:
        lines.append("events")
        for e in s["events"]:
            mark = {True: "ok ", False: "no ", None: "   "}[e["ok"]]
            lines.append(f"  {ts(e['ts'])} {mark}{e['kind']:<8} {e['subject'] or '':<12} {e['reason'] or ''}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.log import setup_logging
    from daemon.service import AlreadyRunning, Daemon

    cfg = _load(args)
    setup_logging(cfg.metrics.log_level, cfg.metrics.log_format)
    try:
        return Daemon(cfg).run()
    except AlreadyRunning as e:
        print(f"lorad: {e}", file=sys.stderr)
        return EXIT_RUNNING


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from daemon.config import ConfigError

        if isinstance(e, ConfigError):
            print(f"lorad: invalid configuration\n{e}", file=sys.stderr)
            return EXIT_USAGE
        from daemon.store import StoreError

        if isinstance(e, StoreError):
            print(f"lorad: {e}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
