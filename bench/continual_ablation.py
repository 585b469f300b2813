"""Ablation of the training options on the continual benchmark: the lorad arm of bench/continual.py once
per option (train.curriculum, train.category_weights, train.continued_pretraining, data.min_domain_fraction),
plus a plain lorad run as the control, all on the same stream (same seed, same records, same config apart
from the one option), run as parallel processes.

    # 4-GPU host, GPUs 1-3 free: six runs, two per GPU (the 135M model needs a few GiB each)
    TORCH_COMPILE_DISABLE=1 python3 bench/continual_ablation.py --profile gpu --gpus 1,2,3 --parallel 6 \\
        --cache /root/cache --out $OUT/continual_ablation.json
    nice -n 5 .venv/bin/python bench/continual_ablation.py --profile smoke --parallel 2 \\
        --base-model DIR --out /tmp/ablation.json                                   # a quick check on a CPU

    # the replay sweep that chose data.replay_unit / replay_fraction, picked on validation (2 seeds: run twice)
    TORCH_COMPILE_DISABLE=1 python3 bench/continual_ablation.py --sweep replay --profile gpu --gpus 0,1,2 \
        --parallel 6 --cache /root/cache --out $OUT/continual_replay_sweep.json [--set train.seed=4321]

Everything here is scored on the VALIDATION split of bench/continual.py (each month's holdout records that the
daemon's gate also sees); the test split, which bench/continual.py reports, is never read, so choosing a
setting here is not tuning on the reported numbers.

The runs of ``--sweep options`` (``variants``):
  control                the lorad arm with the profile's config, on the stream WITH raw text records
                         (so continued pre-training has something to act on in every run; ``mixed`` is
                         the default); it also runs the base arm, for the base losses
  curriculum             train.curriculum=easy_to_hard (easy -> hard by the champion's loss, 4 stages)
  category_weights       train.category_weights: each month's tasks weigh 1 + 0.5 x (month - 1), so in
                         every month the newest group outweighs all replayed ones (1, 1.5, 2, 2.5, 3 over
                         the five GPU months); text records weigh 1
  continued_pretraining  train.continued_pretraining=first (the raw text records as a first phase)
  min_domain_fraction    data.min_domain_fraction=0.8. With replay_fraction 0.3 the new records are about
                         65-71 % of a snapshot's characters in GPU months 2-4 (85 % in month 5, whose
                         consultation answers are long), so a floor of 0.8 drops about half the replay
                         there; 0.5 would never bite
  no_text_records        the control without the text records: what adding them (mixed) changes
The raw text records are ``bench/continual.py --text-records N`` (default per profile: ``TEXT_RECORDS``):
chunks of each month's own train-split records as plain text, never of a holdout record.

Each run is ``bench/continual.py --arms lorad`` (the control: ``base,lorad``) in a work folder of its own;
they share the ``--cache`` model folder (the GGUF conversion takes a lock). ``CUDA_VISIBLE_DEVICES`` goes
round robin over ``--gpus``. Each run has a wall-clock timeout (``--run-timeout``; its process group is
killed) and the JSON is rewritten after every run finishes, so a killed ablation keeps what finished.
Per-run JSON, PNG and log go to ``<out stem>_runs/``; the summary JSON is also refreshed every few
seconds from the runs' own JSONs (rewritten after each month), so even a hard kill of the whole ablation
leaves the months that finished.

The runs of ``--sweep replay`` (``replay_variants``): ``baselines`` (base, naive, retrain) once, then the lorad arm
at replay_unit chars 0.30 / 0.35 / 0.38 and records 0.30 / 0.40 (``REPLAY_SETTINGS``), no text records; each
lorad run merged with the baselines gives its goals on validation, and ``picked`` names the setting chosen by
``PICK_RULE`` (most validation goals met, then the smallest validation domain-loss gap to retrain).

Writes (``--out``, default bench/results/continual_ablation.json), per run: the last month's lorad
domain loss, regression loss (the gate half of the regression sets), forgetting, all on validation,
cumulative training tokens, promotions and gate rejections, the run's validation goals, and (options)
each one's difference to the control (run - control; lower is better for the losses and forgetting). One run per option and one seed: differences smaller than the month-to-month noise of
the control (visible in its per-month curve) are not evidence of an effect.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTINUAL = ROOT / "bench" / "continual.py"
TEXT_RECORDS = {"gpu": 50, "cpu": 4, "smoke": 4}   # raw text records a month, per profile (about 15 % of the
#                                                    GPU stream's characters; the small profiles' few records)
METRICS = ("domain_loss", "regression_loss_mean", "forgetting", "tokens_cumulative")


def load_continual():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_continual", CONTINUAL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def newest_first_weights(months: tuple[tuple[str, tuple[str, ...]], ...], step: float = 0.5) -> list[str]:
    """Static category weights under which each month's new group outweighs every older (replayed) one."""
    return [f"{task}={1 + step * i:g}" for i, (_, tasks) in enumerate(months) for task in tasks]


def variants(months: tuple[tuple[str, tuple[str, ...]], ...], text_records: int) -> dict[str, dict]:
    """name -> {"sets": [--set values], "text_records": N, "arms": ..., "what": one line}."""
    weights = json.dumps(newest_first_weights(months), ensure_ascii=False)
    plain = {"sets": [], "text_records": text_records, "arms": "lorad"}
    return {
        "control": {**plain, "arms": "base,lorad", "what": "the profile's config (continued_pretraining mixed)"},
        "curriculum": {**plain, "sets": ["train.curriculum=easy_to_hard"],
                       "what": "easy -> hard by the champion's loss, train.curriculum_stages stages"},
        "category_weights": {**plain, "sets": [f"train.category_weights={weights}"],
                             "what": "each month's tasks weigh 1 + 0.5 x (month - 1): the newest group most"},
        "continued_pretraining": {**plain, "sets": ["train.continued_pretraining=first"],
                                  "what": "raw text records as a first phase, then the chat records"},
        "min_domain_fraction": {**plain, "sets": ["data.min_domain_fraction=0.8"],
                                "what": "new records >= 80 % of each snapshot's characters (replay dropped)"},
        "no_text_records": {**plain, "text_records": 0, "what": "the control without the raw text records"},
    }


def validation(arm: dict) -> tuple[dict, str]:
    """An arm's columns on the validation split (what tuning may see), and which split that is; results made
    before issue 22 had one holdout, which the report also used."""
    if "validation" in arm:
        return {**arm, **arm["validation"]}, "validation"
    return arm, "holdout (made before the validation/test split)"


# The replay sweep (#11's choice of data.replay_unit and data.replay_fraction): (unit, fraction) per run.
REPLAY_SETTINGS = (("chars", 0.30), ("chars", 0.35), ("chars", 0.38), ("records", 0.30), ("records", 0.40))
PICK_RULE = ("the run meeting the most goals on the validation split (goals_validation of the run merged with the "
             "baselines), ties broken by the smaller validation domain-loss gap to retrain")


def replay_variants() -> dict[str, dict]:
    """The replay sweep: the baselines (base, naive, retrain) once, then the lorad arm once per replay setting,
    on the plain stream (no text records); each lorad run is merged with the baselines for its goals."""
    runs = {"baselines": {"sets": [], "text_records": 0, "arms": "base,naive,retrain",
                          "what": "the base, naive and retrain arms, shared by every replay setting"}}
    for unit, fraction in REPLAY_SETTINGS:
        runs[f"{unit}{round(fraction * 100):03d}"] = {
            "sets": [f"data.replay_unit={unit}", f"data.replay_fraction={fraction}"], "text_records": 0,
            "arms": "lorad", "what": f"replay {fraction:g} of each snapshot, counted in {unit}"}
    return runs


def pick(runs: dict[str, dict]) -> dict | None:
    """The setting the sweep chooses (``PICK_RULE``), from each finished run's validation goals; None if none."""
    done = {n: r["goals"] for n, r in runs.items() if r.get("goals") and (r.get("summary") or {}).get("complete")}
    if not done:
        return None

    def gap(n: str) -> float:
        value = (done[n].get("domain_loss_gap_vs_retrain") or {}).get("value")
        return value if value is not None else float("inf")

    def met(n: str) -> int:
        return sum(1 for g in done[n].values() if g["met"])

    best = min(done, key=lambda n: (-met(n), gap(n)))
    return {"run": best, "sets": runs[best]["sets"], "goals_met": met(best), "goals": len(done[best]),
            "domain_loss_gap_vs_retrain": None if gap(best) == float("inf") else gap(best),
            "candidates": {n: {"goals_met": met(n), "domain_loss_gap_vs_retrain":
                               None if gap(n) == float("inf") else gap(n)} for n in done},
            "rule": PICK_RULE, "split": "validation"}


def merged_validation_goals(continual: Any, run_json: dict, baselines: dict | None, name: str) -> dict | None:
    """A replay run's goals on validation: its lorad arm merged with the baselines run (``continual.merge``);
    None while the baselines are missing or do not fit (other months, another stream)."""
    if baselines is None:
        return None
    try:
        return continual.merge([run_json, baselines], [f"{name}.json", "baselines.json"]).get("goals_validation")
    except (ValueError, KeyError):
        return None


def summarize(run_json: dict) -> dict:
    """The last month's lorad numbers of one run on the validation split, and the gate's decisions over the
    stream. Never the test split: a sweep that chose on it would be tuning on the reported numbers."""
    months = run_json.get("months") or []
    if not months or "lorad" not in months[-1]["arms"]:
        return {"months_done": len(months)}
    last, split = validation(months[-1]["arms"]["lorad"])
    evals = [d for m in months if m.get("lorad") for d in m["lorad"]["decisions"] if d["kind"] == "eval"]
    promotions = [d for m in months if m.get("lorad") for d in m["lorad"]["decisions"]
                  if d["kind"] == "promote" and d["ok"]]
    out: dict[str, Any] = {"months_done": len(months), "complete": bool(run_json.get("complete")),
                           "scored_on": split, **{k: last[k] for k in METRICS},
                           "domain_loss_by_group": last["holdout_loss"],
                           "promotions": len(promotions), "candidates": len(evals),
                           "rejected": sum(1 for d in evals if d["ok"] is False),
                           "domain_loss_by_month": [validation(m["arms"]["lorad"])[0]["domain_loss"] for m in months]}
    if "base" in months[-1]["arms"]:
        base = validation(months[-1]["arms"]["base"])[0]
        out["base"] = {"domain_loss": base["domain_loss"], "regression_loss_mean": base["regression_loss_mean"]}
    snapshots = [r.get("snapshot") or {} for m in months if m.get("lorad") for r in m["lorad"]["runs"]]
    out["replay_records"] = sum(s.get("n_replay") or 0 for s in snapshots)
    return out


def differences(summary: dict, control: dict | None) -> dict | None:
    """run - control for each metric (None where either is missing or either run is incomplete)."""
    if not control or summary.get("months_done") != control.get("months_done") or not summary.get("months_done"):
        return None
    out = {}
    for k in (*METRICS, "promotions"):
        a, b = summary.get(k), control.get(k)
        out[k] = None if a is None or b is None else a - b
    for k in ("domain_loss", "regression_loss_mean"):
        a, b = summary.get(k), control.get(k)
        out[f"{k}_relative"] = None if a is None or not b else a / b - 1
    return out


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False))
    os.replace(tmp, path)


def command(name: str, v: dict, args: argparse.Namespace, runs_dir: Path) -> list[str]:
    cmd = [sys.executable, str(CONTINUAL), "--profile", args.profile, "--arms", v["arms"],
           "--out", str(runs_dir / f"{name}.json"), "--work", str(args.work_root / name),
           "--text-records", str(v["text_records"]), "--timeout", str(args.cycle_timeout)]
    if args.cache is not None:
        cmd += ["--cache", str(args.cache)]
    if args.base_model:
        cmd += ["--base-model", args.base_model]
    if args.months:
        cmd += ["--months", str(args.months)]
    for s in v["sets"] + args.set:
        cmd += ["--set", s]
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=("gpu", "cpu", "smoke"), default="gpu")
    ap.add_argument("--sweep", choices=("options", "replay"), default="options",
                    help="options: one lorad run per training option against a control (default); replay: the "
                         "baselines once and one lorad run per replay setting, the pick chosen on validation")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "continual_ablation.json")
    ap.add_argument("--cache", type=Path, default=None, help="shared model cache for every run (bench/continual.py "
                                                             "--cache; default its own)")
    ap.add_argument("--base-model", default=None, help="model.base_model; default the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--work-root", type=Path, default=None,
                    help="parent of the runs' work folders (state, adapters: kept); default a temporary folder "
                         "where a run's folder is removed when it finished well and kept when it failed")
    ap.add_argument("--parallel", type=int, default=3, help="runs at once")
    ap.add_argument("--gpus", default="", help="comma list of GPU ids, given to the runs round robin as "
                                               "CUDA_VISIBLE_DEVICES (default: the environment's)")
    ap.add_argument("--only", default="", help="comma list of run names (default all; control is always run)")
    ap.add_argument("--text-records", type=int, default=None,
                    help="raw text records a month in every run but no_text_records (default per profile: "
                         + ", ".join(f"{k} {v}" for k, v in TEXT_RECORDS.items()) + ")")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra config override for every run (after the run's own)")
    ap.add_argument("--months", type=int, default=None, help="only the first N months")
    ap.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one run may take before it is killed")
    ap.add_argument("--cycle-timeout", type=float, default=1200.0, help="bench/continual.py --timeout")
    args = ap.parse_args(argv)

    continual = load_continual()
    profile = continual.PROFILES[args.profile]
    months = profile.months[:args.months] if args.months else profile.months
    text_records = TEXT_RECORDS[args.profile] if args.text_records is None else args.text_records
    if args.sweep == "replay":   # the replay sweep runs the plain stream, as the reported benchmark does
        text_records = 0
    every = variants(months, text_records) if args.sweep == "options" else replay_variants()
    lead = "control" if args.sweep == "options" else "baselines"   # always run: the others compare with it
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] or list(every)
    bad = [n for n in wanted if n not in every]
    if bad:
        ap.error(f"--only {','.join(bad)}: unknown run; allowed: {', '.join(every)}")
    names = [lead] + [n for n in wanted if n != lead]
    if args.parallel < 1:
        ap.error(f"--parallel must be >= 1, got {args.parallel}")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    runs_dir = args.out.with_name(f"{args.out.stem}_runs")
    keep_work = args.work_root is not None
    if args.work_root is None:   # not under --out: that folder is fetched back from the GPU machine
        import tempfile

        args.work_root = Path(tempfile.mkdtemp(prefix="lorad-ablation-"))

    # Every run's config through lorad's own builder before anything starts: a bad --set fails here.
    from daemon.config import ConfigError
    from pipelines.models import EMBEDDED_DEFAULT

    for name in names:
        try:
            continual.build_run_config(profile, args.work_root / name, args.base_model or EMBEDDED_DEFAULT, [],
                                       continual.parse_sets(every[name]["sets"] + args.set))
        except (ValueError, ConfigError) as e:
            print(f"bench/continual_ablation.py: run {name}: {e}", file=sys.stderr)
            return 2

    result: dict[str, Any] = {
        "benchmark": "continual_ablation", "sweep": args.sweep, "profile": args.profile, "complete": False,
        "git": continual.git_commit(), "machine": continual.machine_info(),
        "environment": {k: os.environ[k] for k in ("TORCH_COMPILE_DISABLE",) if k in os.environ},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stream": [{"month": i + 1, "group": g, "tasks": list(t)} for i, (g, t) in enumerate(months)],
        "text_records_per_month": text_records, "parallel": args.parallel, "gpus": gpus,
        "method": ("one run of bench/continual.py's lorad arm per option, same seed and records; the numbers are "
                   "the last month's on the VALIDATION split (domain_loss: mean loss over every group; forgetting: "
                   "mean loss increase on earlier groups; goals: goals_validation); difference = run - control. "
                   "The test split is reported by bench/continual.py and never read here"
                   if args.sweep == "options" else
                   "the baselines once and the lorad arm once per replay setting, same seed and records; each lorad "
                   "run merged with the baselines (bench/continual.py --merge) gives its goals on the VALIDATION "
                   f"split; picked: {PICK_RULE}. The test split is never read here"),
        "runs": {n: {"what": every[n]["what"], "sets": every[n]["sets"] + args.set,
                     "text_records": every[n]["text_records"], "arms": every[n]["arms"], "status": "pending"}
                 for n in names},
    }
    write_json(args.out, result)

    def collect(name: str) -> None:
        """Read a run's own JSON (rewritten after every month) into its summary, and redo the differences."""
        run_path = runs_dir / f"{name}.json"
        try:
            run_json = json.loads(run_path.read_text())
        except (OSError, ValueError):   # not written yet
            return
        entry = result["runs"][name]
        entry["summary"] = summarize(run_json)
        if args.sweep == "options":
            entry["goals"] = run_json.get("goals_validation")
            control = result["runs"]["control"].get("summary")
            for n, e in result["runs"].items():   # the control may finish after the others
                if n != "control" and "summary" in e:
                    e["vs_control"] = differences(e["summary"], control)
        elif name != "baselines":
            try:
                baselines = json.loads((runs_dir / "baselines.json").read_text())
            except (OSError, ValueError):   # not written yet
                baselines = None
            entry["goals"] = merged_validation_goals(continual, run_json, baselines, name)

    def finish(name: str, proc: subprocess.Popen, started: float, status: str) -> None:
        entry = result["runs"][name]
        entry.update(status=status, returncode=proc.returncode, wall_seconds=round(time.monotonic() - started, 1))
        collect(name)
        write_json(args.out, result)
        print(f"[ablation] {name}: {status} (rc {proc.returncode}) in {entry['wall_seconds']:.0f} s", flush=True)
        if status == "done" and not keep_work:
            import shutil

            shutil.rmtree(args.work_root / name, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so the finally below stops our runs
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    slot = 0
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                name = pending.pop(0)
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                    result["runs"][name]["gpu"] = env["CUDA_VISIBLE_DEVICES"]
                slot += 1
                runs_dir.mkdir(parents=True, exist_ok=True)
                log = open(runs_dir / f"{name}.log", "wb")
                cmd = command(name, every[name], args, runs_dir)
                result["runs"][name].update(status="running", command=cmd)
                # A session of its own: a timeout kills the run and every subprocess it started.
                running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True), time.monotonic(), log)
                print(f"[ablation] {name}: started" + (f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""),
                      flush=True)
            for name in running:   # months finished so far, in case the whole ablation is killed
                collect(name)
            write_json(args.out, result)
            time.sleep(5.0)
            for name, (proc, started, log) in list(running.items()):
                if proc.poll() is None and time.monotonic() - started > args.run_timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    log.close()
                    del running[name]
                    finish(name, proc, started, f"timed out after {args.run_timeout:.0f} s (killed)")
                elif proc.poll() is not None:
                    log.close()
                    del running[name]
                    finish(name, proc, started, "done" if proc.returncode == 0 else "failed")
    finally:
        for name, (proc, started, log) in running.items():   # interrupted: take our runs down with us
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            result["runs"][name].update(status="interrupted", returncode=proc.returncode)
        write_json(args.out, result)
    for name in names:   # the baselines may have finished after a replay run
        collect(name)
    if args.sweep == "replay":
        result["picked"] = pick({n: r for n, r in result["runs"].items() if n != "baselines"})
    result["complete"] = all(r["status"] == "done" for r in result["runs"].values())
    result["work_root"] = str(args.work_root)
    write_json(args.out, result)
    if not keep_work:
        try:
            args.work_root.rmdir()   # empty once every run finished well
        except OSError:
            print(f"kept the failed runs' work folders under {args.work_root}")
    for name, r in result["runs"].items():
        s, d = r.get("summary") or {}, r.get("vs_control") or {}
        line = f"{name:22s} {r['status']:10s}"
        if "domain_loss" in s:
            line += (f" domain {s['domain_loss']:.4f} regression {s['regression_loss_mean']:.4f} "
                     f"forgetting {s['forgetting'] if s['forgetting'] is not None else float('nan'):+.4f} "
                     f"tokens {s['tokens_cumulative']} promotions {s['promotions']}")
        if d.get("domain_loss") is not None:
            line += f"  vs control: domain {d['domain_loss']:+.4f} regression {d['regression_loss_mean']:+.4f}"
        print(line)
    if result.get("picked"):
        print(f"picked on validation: {result['picked']['run']} ({' '.join(result['picked']['sets'])}), "
              f"{result['picked']['goals_met']} of {result['picked']['goals']} goals met")
    print(f"wrote {args.out}")
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
