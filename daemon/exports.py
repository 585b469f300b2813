"""``lorad export``: a registered adapter version, verified, exported with its base model (pipelines/export.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from daemon import registry
from daemon.config import Config
from daemon.store import Store

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.export import ExportResult


def export_version(store: Store, cfg: Config, version: str, fmt: str, *, out: Path | None = None,
                   dtype: str = "float16", force: bool = False) -> ExportResult:
    """Export a registered adapter version ('champion' = the current champion) of this lorad's base model.

    The version is verified first (files complete, hashes match, trained on ``cfg.model.base_model``).
    Default folder: ``<state>/exports/<version>-<format>``.
    """
    from pipelines.export import ExportError, export_model
    from pipelines.model_source import ModelLoadError, resolve_base_model

    if version == "champion":
        champion = registry.champion(store)
        if champion is None:
            raise ExportError("there is no champion yet; name a version (`lorad adapters` lists them)")
        version = champion
    row = registry.verify_adapter(store, version, base_model=cfg.model.base_model)
    state = Path(cfg.paths.state_dir)
    try:
        source = resolve_base_model(cfg.model.base_model, state / "cache", revision=cfg.model.revision or None)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from exc
    device = cfg.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = Path(out) if out is not None else state / "exports" / f"{version}-{fmt}"
    return export_model(source, Path(row["path"]), target, fmt, version=version, base_model=cfg.model.base_model,
                        adapter_sha256=row["sha256"], dtype=dtype, device=device, max_seq_len=cfg.data.max_seq_len,
                        trust_remote_code=cfg.model.trust_remote_code, force=force)
