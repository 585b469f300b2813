"""Attack: read the users' data as another local user (issue 28).

Before the fix an existing state folder kept its 0755/0644 modes (records, adapters and reports readable
by everyone on the host); only a newly created folder was 0700.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from daemon.store import DB_NAME, ensure_state_dir, open_store


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_an_existing_state_folder_becomes_private(tmp_path):
    state = tmp_path / "state"
    adapter = state / "adapters" / "v0001-abcd"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (state / DB_NAME).write_bytes(b"")
    (state / "runs").mkdir()
    (state / "runs" / "report.json").write_text("{}")
    outside = tmp_path / "outside.txt"
    outside.write_text("not lorad's")
    os.symlink(outside, state / "link")
    for p in (state, state / "adapters", adapter, state / "runs"):
        os.chmod(p, 0o755)
    for p in (adapter / "adapter_model.safetensors", state / DB_NAME, state / "runs" / "report.json", outside):
        os.chmod(p, 0o644)

    ensure_state_dir(state)

    for p in (state, state / "adapters", adapter, state / "runs"):
        assert mode(p) == 0o700, (p, oct(mode(p)))
    for p in (adapter / "adapter_model.safetensors", state / DB_NAME, state / "runs" / "report.json"):
        assert mode(p) == 0o600, (p, oct(mode(p)))
    assert mode(outside) == 0o644, "a symbolic link is never followed"


def test_files_lorad_writes_afterwards_are_private(tmp_path):
    # A fresh process: the umask is process-wide, so it is checked where nothing else changed it.
    code = (f"import os; os.umask(0o022)\n"
            f"from daemon.store import open_store\n"
            f"s = open_store({str(tmp_path / 'state')!r}); s.close()\n"
            f"open({str(tmp_path / 'state' / 'new-report.json')!r}, 'w').write('{{}}')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ})
    for name in (DB_NAME, "new-report.json"):
        assert mode(tmp_path / "state" / name) == 0o600, name
    assert mode(tmp_path / "state") == 0o700
    open_store(tmp_path / "state").close()
