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

    p = sub.add_parser("ingest", parents=[common], help="ingest data files into the store (files are not moved)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--dry-run", action="store_true", help="validate and count, write nothing")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("drift", parents=[common], help="test whether CURRENT data drifted from REFERENCE data")
    p.add_argument("--reference", required=True, metavar="PATH", help="data the model already knows")
    p.add_argument("--current", metavar="PATH", help="new data (required unless --warm)")
    p.add_argument("--warm", action="store_true",
                   help="only compute and cache the reference's features, so the next check is quick")
    p.add_argument("--adapter", metavar="VERSION", help="score response loss under this adapter version (default: the champion; 'base' = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation test (same seed, same answer)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser("eval", parents=[common], help="evaluate a candidate adapter against the champion")
    p.add_argument("--candidate", required=True, metavar="VERSION",
                   help="the adapter version to judge (see `lorad adapters`)")
    p.add_argument("--incumbent", default="champion", metavar="VERSION|champion|base",
                   help="what it must beat: an adapter version, the champion (default) or the bare base model")
    p.add_argument("--holdout", metavar="FILE", help="new-data holdout (default: the candidate snapshot's holdout)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("model", help="prepare the base model")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True
    q = msub.add_parser("prepare", parents=[common],
                        help="resolve the base model once (convert a GGUF into the cache); print where it is")
    q.add_argument("--json", action="store_true", help="print machine-readable JSON")
    q.set_defaults(func=cmd_model_prepare)

    p = sub.add_parser("train", parents=[common], help="train a candidate adapter on data files")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="data files (any format ingest reads)")
    p.add_argument("--parent", default="champion", metavar="VERSION|none",
                   help="warm-start from this adapter version; 'none' = from scratch (default: the champion)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (overrides train.max_steps)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-node", parents=[common],
                       help="on another host: join the multi-node training runs the daemon starts (train.nnodes)")
    p.add_argument("--node-rank", type=int, metavar="R",
                   help="this host's node rank, 1 .. train.nnodes-1 (default: $LORAD_NODE_RANK; 0 is the daemon's)")
    p.set_defaults(func=cmd_train_node)

    p = sub.add_parser("export", parents=[common],
                       help="export an adapter version merged into the base model (merged, bnb4 or onnx)")
    p.add_argument("version", metavar="VERSION", help="adapter version, or 'champion'")
    p.add_argument("--format", required=True, choices=("merged", "bnb4", "onnx"), dest="export_format",
                   help="merged: safetensors in --dtype; bnb4: bitsandbytes NF4; onnx: float32 graph for onnxruntime")
    p.add_argument("--out", metavar="DIR", help="target folder (default: <state>/exports/VERSION-FORMAT)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="weights dtype of merged (and of bnb4's unquantized parts); default float16")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("adapters", parents=[common], help="list adapter versions with lineage")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("promote", parents=[common], help="make an adapter version the champion (verified first)")
    p.add_argument("version", metavar="VERSION", help="the adapter version to serve (see `lorad adapters`)")
    p.add_argument("--reason", default="manual promotion", help="recorded with the alias change")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", parents=[common], help="point the champion back at the previous champion")
    p.add_argument("--reason", default="manual rollback", help="recorded with the alias change")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("unpark", parents=[common],
                       help="make parked records (refused promote.max_refusals times) pending again")
    p.add_argument("records", nargs="*", type=int, metavar="RECORD_ID", help="record ids (see `lorad status --json`)")
    p.add_argument("--all", action="store_true", help="every parked record")
    p.add_argument("--reason", default="unparked by hand", help="recorded with the event")
    p.set_defaults(func=cmd_unpark)

    p = sub.add_parser("config", help="show or check the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    q = csub.add_parser("show", parents=[common], help="print the effective configuration as YAML")
    q.add_argument("--defaults", action="store_true", help="print the commented defaults (the example file)")
    q.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    q.add_argument("--markdown", action="store_true", help="print the reference tables (as in docs/configuration.md)")
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


def _existing_store(cfg: Any, hint: str = "", **kwargs: Any):
    """The store of ``cfg``'s state folder (``daemon.store.open_existing_store``), or None after telling the user
    that the folder has none (``hint``: what to do about it). Creates nothing."""
    from daemon.store import NoStore, open_existing_store

    try:
        return open_existing_store(cfg.paths.state_dir, **kwargs)
    except NoStore as e:
        print(f"lorad: {e}{'; ' + hint if hint else ''}", file=sys.stderr)
        return None


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
    from daemon.store import has_store, open_store

    cfg = _load(args)
    state = Path(cfg.paths.state_dir)
    info = read_lock_info(state)
    live = _live_status(info, cfg.serve.admin_token) if info and info.get("url") else None
    if live is not None and not live.get("redacted"):
        print(json.dumps(live, indent=2, ensure_ascii=False, default=str) if args.json else _format_status(live))
        return EXIT_OK
    store = open_store(state, readonly=True) if has_store(state) else None
    try:
        snap = status_snapshot(cfg, store, daemon_info=info, events=args.events)
    finally:
        if store is not None:
            store.close()
    if live is not None:  # without the admin token the daemon tells only its public part: add its live view
        snap.update({k: live[k] for k in ("job", "inbox_pending", "engine") if k in live})
    if args.json:
        print(json.dumps(snap, indent=2, ensure_ascii=False, default=str))
    else:
        print(_format_status(snap))
    return EXIT_OK


def _reachable(url: str) -> str:
    """A daemon's URL as a client on this host reaches it (a wildcard bind address is not connectable)."""
    return url.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")


def _live_status(info: dict, admin_token: str = "") -> dict | None:
    """Ask the running daemon for its status (it knows the schedule and the live job); None if it does not answer.

    With the admin token the whole document, else only its public part (marked ``redacted``).
    """
    import urllib.request

    url = _reachable(str(info["url"]))
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/status", headers=headers), timeout=3) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


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
    refused = s.get("refused_records") or {}
    for w in refused.get("waiting") or []:
        lines.append(f"waiting    {w['records']} records of refused {w['version']} join the next run: {w['reason']}")
    for p in refused.get("parked") or []:
        lines.append(f"parked     {p['records']} records ({ts(p['ts'])}): {p['reason']}")
    lines.append(f"adapters   {c.get('adapters', 0)}")
    d = s.get("last_drift")
    if d:
        lines.append(f"last drift {ts(d['ts'])} {'DRIFT' if d['ok'] else 'no drift'} ({d['subject']}): {d['reason'] or ''}")
    if s.get("job"):
        lines.append(f"job        {s['job'].get('stage')} {s['job'].get('run_id') or s['job'].get('trigger') or ''}")
    for r in s["runs"]:
        progress = f"step {r['step']}/{r['total_steps'] or '?'}"
        eta = f" ETA {r['eta_seconds']:.0f} s" if r.get("eta_seconds") is not None else ""
        lines.append(f"run        {r['id']} {r['kind']} {r['status']} {progress}{eta} {r.get('reason') or ''}".rstrip())
    for r in s.get("fleet") or []:
        state = ("up" if r["up"] else "DOWN") + ("" if r.get("ready", True) or not r["up"] else ", not ready")
        lines.append(f"replica    {r['url']} {state}, serving {r['champion'] or '?'}, loaded "
                     f"{', '.join(r['loaded']) or '-'}, last contact {ts(r['last_contact'])}"
                     + (f": {r['error']}" if r.get("error") else ""))
    for j in s.get("schedule") or []:
        lines.append(f"next       {j['name']}: {j['next_run']}")
    if s["events"]:
        lines.append("events")
        for e in s["events"]:
            mark = {True: "ok ", False: "no ", None: "   "}[e["ok"]]
            lines.append(f"  {ts(e['ts'])} {mark}{e['kind']:<8} {e['subject'] or '':<12} {e['reason'] or ''}")
    return "\n".join(lines)


def cmd_model_prepare(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from daemon.store import ensure_state_dir
    from pipelines.model_source import ModelLoadError, resolve_base_model

    cfg = _load(args)
    cache = ensure_state_dir(cfg.paths.state_dir) / "cache"
    t0 = time.perf_counter()
    print(f"lorad: preparing base model {cfg.model.base_model} (a GGUF is converted once, ~35 s)", file=sys.stderr)
    try:
        where = resolve_base_model(cfg.model.base_model, cache, revision=cfg.model.revision or None)
    except ModelLoadError as e:
        print(f"lorad: {e}", file=sys.stderr)
        return EXIT_FAILED
    out = {"base_model": cfg.model.base_model, "path": str(where), "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(out) if args.json else f"base model ready at {Path(where)} ({out['seconds']} s)")
    return EXIT_OK


def cli_ingest(paths: list[str], cfg: Any, *, dry_run: bool) -> dict:
    """`lorad ingest`: ingest files into the store at cfg.paths.state_dir; the files are not moved.

    A dry run against a state folder without a database uses an in-memory one, so it creates nothing.
    """
    from daemon.store import Store, has_store, open_store
    from pipelines.ingest import ingest_files

    if dry_run and not has_store(cfg.paths.state_dir):
        store = Store(":memory:")
    else:
        store = open_store(cfg.paths.state_dir)
    try:
        return ingest_files(paths, store, cfg.data, source="cli", dry_run=dry_run, limits=cfg.ingest)
    finally:
        store.close()


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import format_ingest_summary

    cfg = _load(args)
    result = cli_ingest(args.files, cfg, dry_run=args.dry_run)
    print(json.dumps(result, ensure_ascii=False, indent=2) if args.json else format_ingest_summary(result))
    failed_files = [f for f in result.get("files", []) if f.get("file_error")]
    return EXIT_FAILED if failed_files and len(failed_files) == len(result.get("files", [])) else EXIT_OK


def cmd_drift(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daemon.drift_check import cli_drift

    cfg = _load(args)
    if args.current is None and not args.warm:
        print("lorad: drift needs --current PATH (or --warm to cache the reference's features only)",
              file=sys.stderr)
        return EXIT_USAGE
    for p in (args.reference, None if args.warm else args.current):
        if p is not None and not Path(p).is_file():
            print(f"lorad: no such file: {p}", file=sys.stderr)
            return EXIT_USAGE
    try:
        version, adapter = _drift_adapter(cfg, args.adapter)
    except LookupError as e:
        print(f"lorad: {e}", file=sys.stderr)
        return EXIT_FAILED
    report = cli_drift(args.reference, None if args.warm else args.current, cfg, seed=args.seed,
                       max_tokens=cfg.drift.max_tokens, adapter=adapter, adapter_version=version)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2, default=str))
    elif args.warm:
        print(f"reference features {report['reference_features']}: {report['n_reference']} records, "
              f"scored by {report['scored_by']}")
    else:
        verdict = "DRIFT" if report["drift"] else ("insufficient data" if report.get("status") ==
                                                      "insufficient_data" else "no drift")
        print(f"{verdict}: p = {report.get('p_value')}, effect = {report.get('effect')}, "
              f"n = {report['n_reference']} vs {report['n_current']}")
        for t in report.get("tests", []):
            print(f"  {'*' if t['drifted'] else ' '} {t['name']:<28} p = {t['p_value']:.4g}")
        print(report.get("explanation", ""))
    return EXIT_OK


def _drift_adapter(cfg, which: str | None):
    """(version, folder) whose loss the drift check measures: --adapter, else the champion, else the base."""
    from daemon.store import NoStore, has_store, open_existing_store

    which = which or "champion"
    if which in ("base", "none"):
        return None, None
    if which == "champion" and not has_store(cfg.paths.state_dir):
        return None, None  # no state yet: nothing was ever promoted
    from daemon.evaluation import adapter_path
    from daemon.registry import AdapterError

    try:
        store = open_existing_store(cfg.paths.state_dir, readonly=True)
    except NoStore as e:
        raise LookupError(f"--adapter {which}: {e}") from None
    with store:
        try:
            return adapter_path(store, cfg, which)
        except AdapterError as e:
            raise LookupError(f"--adapter {which}: {e}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from daemon.evaluation import evaluate_candidate
    from daemon.registry import AdapterError
    from pipelines.evaluate import EvalError

    cfg = _load(args)
    store = _existing_store(cfg, "`lorad train --data FILE` makes a candidate")
    if store is None:
        return EXIT_FAILED
    with store:
        try:
            out = evaluate_candidate(store, cfg, args.candidate, args.incumbent, holdout_file=args.holdout)
        except (AdapterError, EvalError) as e:
            print(f"lorad: {e}", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=2, default=str))
    else:
        from daemon.evaluation import format_summary

        print(format_summary(out))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daemon.evaluation import read_files
    from daemon.registry import AdapterError
    from daemon.runs import JobError, create_run, run_in_process
    from daemon.store import open_store

    cfg = _load(args)
    missing = [p for p in args.data if not Path(p).is_file()]
    if missing:
        print(f"lorad: data file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    payloads, problems = read_files(args.data)
    if problems:
        print(f"lorad: skipped {len(problems)} unusable record(s), first: {problems[0]}", file=sys.stderr)
    if not payloads:
        print("lorad: no usable records in the given files", file=sys.stderr)
        return EXIT_FAILED
    store = open_store(cfg.paths.state_dir)
    try:
        run_id, run_dir = create_run(store, cfg, payloads, parent=args.parent, trigger="manual",
                                     max_steps=args.max_steps)
        print(f"lorad: run {run_id}: {len(payloads)} records -> {run_dir}", file=sys.stderr)
        result = run_in_process(store, cfg, run_id, run_dir)
    except (JobError, AdapterError) as e:
        print(f"lorad: training failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        store.close()
    keys = ("version", "path", "loss_first", "loss_last", "tokens", "tokens_per_second")
    out = {k: result[k] for k in keys} | {"run_id": run_id, "status": result["status"]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['version']}: loss {out['loss_first']:.4f} -> {out['loss_last']:.4f}, {out['tokens']} tokens "
              f"at {out['tokens_per_second']:.0f} tokens/s\n  {out['path']}\n"
              f"  judge it against the champion on records it did not train on: lorad eval --candidate "
              f"{out['version']} --holdout FILE")
    return EXIT_OK


def cmd_train_node(args: argparse.Namespace) -> int:
    """Join every multi-node run the daemon announces in its runs folder (shared storage) until SIGTERM/SIGINT."""
    import os
    import signal
    import threading

    from daemon.runs import runs_dir
    from pipelines.train.distributed import NODE_RANK_ENV, follow

    cfg = _load(args)
    raw = args.node_rank if args.node_rank is not None else os.environ.get(NODE_RANK_ENV, "")
    try:
        rank = int(raw)
    except ValueError:
        rank = -1
    if rank < 1:
        print(f"lorad: train-node needs this host's node rank >= 1 (--node-rank or ${NODE_RANK_ENV}; node 0 is the "
              f"daemon's host); got {raw!r}", file=sys.stderr)
        return EXIT_USAGE
    runs = runs_dir(cfg)
    if not runs.is_dir():
        print(f"lorad: {runs} does not exist: mount the daemon's state folder at {cfg.paths.state_dir} "
              f"(or pass --state) on this host", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"event": "follow", "runs": str(runs), "node_rank": rank}), flush=True)
    follow(runs, rank, should_stop=stop.is_set, log=lambda r: print(json.dumps(r), flush=True))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daemon.registry import AdapterError
    from daemon.exports import export_version
    from pipelines.export import ExportError

    cfg = _load(args)
    store = _existing_store(cfg, "train an adapter first (`lorad train --data FILE`)", readonly=True)
    if store is None:
        return EXIT_FAILED
    print(f"lorad: exporting {args.version} as {args.export_format}", file=sys.stderr)
    with store:
        try:
            result = export_version(store, cfg, args.version, args.export_format,
                                    out=Path(args.out) if args.out else None, dtype=args.dtype, force=args.force)
        except (AdapterError, ExportError) as e:
            print(f"lorad: {e}", file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(f"{result.version} -> {result.path} ({result.format}, {result.bytes_total / 2**20:.1f} MiB, "
              f"{result.seconds:.1f} s)")
    return EXIT_OK


def cmd_adapters(args: argparse.Namespace) -> int:
    from daemon.registry import list_adapters
    from daemon.store import has_store, open_store

    cfg = _load(args)
    if not has_store(cfg.paths.state_dir):
        rows = []
    else:
        with open_store(cfg.paths.state_dir, readonly=True) as store:
            rows = list_adapters(store)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no adapters yet (train one with `lorad train --data FILE`)")
    for r in rows:
        flag = "* champion" if r["champion"] else ("  previous" if r["previous_champion"] else "")
        loss = r["metrics"].get("loss_last")
        print(f"{r['version']:<16} parent {str(r['parent']):<16} loss {loss if loss is None else round(loss, 4)!s:<8} {flag}")
    return EXIT_OK


def _admin_change(args: argparse.Namespace, route: str, body: dict, change: Callable[..., dict]) -> int:
    """Change the champion alias. When a daemon serves this state dir, ask it (``/admin/<route>``) so the
    engine preloads and swaps in the same step; otherwise change the registry directly."""
    import getpass
    from pathlib import Path

    from daemon.registry import AdapterError
    from daemon.service import read_lock_info

    cfg = _load(args)
    actor = f"cli:{getpass.getuser()}"
    info = read_lock_info(Path(cfg.paths.state_dir))
    if info and info.get("url"):
        answer = _post_admin(str(info["url"]), route, cfg.serve.admin_token, body)
        if answer is not None:
            status, result = answer
            if status == 200:
                _print_change(args, result, f"the daemon at {info['url']} serves it now")
                return EXIT_OK
            if status != 403:  # 403: admin endpoints disabled there; fall through to the registry with a warning
                print(f"lorad: the running daemon refused: {result.get('error', {}).get('message', result)}",
                      file=sys.stderr)
                return EXIT_FAILED
            print(f"lorad: warning: the daemon at {info['url']} has no admin token, so it keeps serving its current "
                  "champion until it restarts; set serve.admin_token (LORAD_SERVE__ADMIN_TOKEN) for live swaps",
                  file=sys.stderr)
    store = _existing_store(cfg)
    if store is None:
        return EXIT_FAILED
    with store:
        try:
            result = change(store, cfg, actor=actor)
        except AdapterError as e:
            print(f"lorad: {e}", file=sys.stderr)
            return EXIT_FAILED
    _print_change(args, result, "recorded in the registry; a daemon serves it from its next start")
    return EXIT_OK


def _print_change(args: argparse.Namespace, result: dict, where: str) -> None:
    """``{"from", "to"}`` as JSON (--json) or as a line: champion: OLD -> NEW (where it takes effect)."""
    if args.json:
        print(json.dumps(result))
        return
    print(f"champion: {result.get('from') or 'the base model'} -> {result.get('to') or 'the base model'} ({where})")


def _post_admin(url: str, route: str, token: str, body: dict) -> tuple[int, dict] | None:
    """POST to a running daemon's admin API; None when nothing answers there (a stale lock file)."""
    import urllib.error
    import urllib.request

    url = _reachable(url) + "/admin/" + route
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:  # a promotion preloads the adapter first
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": {"message": f"HTTP {e.code}"}}
    except (OSError, ValueError):
        return None


def cmd_promote(args: argparse.Namespace) -> int:
    from daemon.registry import promote

    return _admin_change(args, "promote", {"version": args.version, "reason": args.reason},
                         lambda store, cfg, actor: promote(store, args.version, reason=args.reason, actor=actor,
                                                           base_model=cfg.model.base_model))


def cmd_rollback(args: argparse.Namespace) -> int:
    from daemon.registry import rollback

    return _admin_change(args, "rollback", {"reason": args.reason},
                         lambda store, cfg, actor: rollback(store, reason=args.reason, actor=actor))


def cmd_unpark(args: argparse.Namespace) -> int:
    """Parked records become pending again and join the next training run; their past refusals are forgotten."""
    from daemon.runs import unpark_records

    if bool(args.records) == bool(args.all):
        print("lorad: name the RECORD_IDs to unpark, or --all (not both)", file=sys.stderr)
        return EXIT_USAGE
    cfg = _load(args)
    store = _existing_store(cfg)
    if store is None:
        return EXIT_FAILED
    with store:
        done = unpark_records(store, None if args.all else args.records, reason=args.reason)
    missing = sorted(set(args.records) - set(done))
    print(json.dumps({"unparked": done, "not_parked": missing}))
    return EXIT_OK if done or args.all else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.log import setup_logging
    from daemon.service import AlreadyRunning, Daemon

    cfg = _load(args)
    setup_logging(cfg.metrics.log_level, cfg.metrics.log_format)
    daemon = Daemon(cfg)
    daemon.serve_only = bool(getattr(args, "serve_only", False))
    try:
        return daemon.run()
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
