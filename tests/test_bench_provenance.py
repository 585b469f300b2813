"""Provenance of the committed benchmark results: a result that names a commit was measured on that commit,
unmodified (``"dirty": false`` beside it), and the commit is an id, not a sentence.

The rule applies to every object in a results JSON that has a ``commit`` key. The allow-list below names the
results committed before the rule existed that break it; each must be re-run by its program from a clean commit
(most on the device tool's GPU: ``bench/device/``) and then leave the list. A new result that breaks the rule,
or a listed one that no longer does, fails this test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
COMMIT_ID = re.compile(r"[0-9a-f]{7,40}")   # a full or abbreviated git commit id (device runs carry the short one)

# (file under bench/results, JSON path of the object naming the commit): why it breaks the rule.
ALLOWED = {
    # a sentence where the commit belongs
    ("scaling.json", "$.four_gpu"): "'0fed315 (...) plus the per-step-time edit committed in the next commit'",
    # a commit without a recorded clean/dirty state (several completed by hand-written notes)
    ("scaling.json", "$"): "no dirty flag",
    ("scaling.json", "$.resume_check"): "no dirty flag",
    ("train_speed.json", "$"): "no dirty flag (commit 4ae370a, whose drift.json says dirty: true)",
    ("train_speed.json", "$.runs[0].info"): "no dirty flag",
    ("train_speed.json", "$.runs[1].info"): "no dirty flag",
    ("train_speed.json", "$.runs[2].info"): "no dirty flag",
    ("train_speed.json", "$.correctness_check.info"): "no dirty flag",
    ("train_speed.json", "$.cpu_info"): "clean export stated in a hand-written note",
}


def provenance_problems(obj, path: str = "$") -> list[tuple[str, str]]:
    """(JSON path, problem) for each object with a ``commit`` that is not an id or lacks ``"dirty": false``."""
    out = []
    if isinstance(obj, dict):
        if "commit" in obj and not isinstance(obj["commit"], (dict, list)):
            commit = obj["commit"]
            if not (isinstance(commit, str) and COMMIT_ID.fullmatch(commit)):
                out.append((path, f"commit {str(commit)[:60]!r} is not a git commit id"))
            elif obj.get("dirty") is not False:
                out.append((path, f"dirty is {obj.get('dirty', 'missing')!r}, not false"))
        for key, value in obj.items():
            out += provenance_problems(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += provenance_problems(value, f"{path}[{i}]")
    return out


def test_the_check_catches_a_dirty_tree_a_missing_flag_and_a_sentence():
    doc = {"git": {"commit": "a" * 40, "dirty": False},
           "runs": [{"info": {"commit": "b" * 40, "dirty": True}}, {"info": {"commit": "c" * 40}}],
           "part": {"commit": "0fed315 plus an edit"}}
    assert [p for p, _ in provenance_problems(doc)] == ["$.runs[0].info", "$.runs[1].info", "$.part"]


def test_every_result_that_names_a_commit_was_measured_on_it_clean():
    found = {}
    for path in sorted(RESULTS.rglob("*.json")):
        for where, problem in provenance_problems(json.loads(path.read_text(encoding="utf-8"))):
            found[(str(path.relative_to(RESULTS)), where)] = problem
    new = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not new, ("results that name a commit must be written by their program from a clean commit "
                     f"(\"dirty\": false beside it); re-run them: {new}")
    fixed = sorted(set(ALLOWED) - set(found))
    assert not fixed, f"these results now meet the rule: remove them from ALLOWED in {__file__}: {fixed}"


def names_a_commit(obj) -> bool:
    if isinstance(obj, dict):
        return "commit" in obj or any(names_a_commit(v) for v in obj.values())
    if isinstance(obj, list):
        return any(names_a_commit(v) for v in obj)
    return False


def test_every_result_names_the_commit_it_measured():
    """A results JSON with no commit anywhere in it could come from any code: the rule above would never see it."""
    assert not names_a_commit({"runs": [{"tokens_per_second": 1.0}], "machine": {"cpu": "x"}})
    assert names_a_commit({"runs": [{"info": {"commit": "a" * 40, "dirty": False}}]})
    anonymous = [str(p.relative_to(RESULTS)) for p in sorted(RESULTS.rglob("*.json"))
                 if not names_a_commit(json.loads(p.read_text(encoding="utf-8")))]
    assert not anonymous, f"results without the commit they measured (write them with their program): {anonymous}"
