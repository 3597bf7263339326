"""What a run puts on disk, so that a failed or aborted run takes it back and says exactly what it kept."""

from __future__ import annotations

import contextlib
from pathlib import Path


class _RunFiles:
    """What a run puts on disk, so that a failed or aborted run can take it back and say exactly what it kept."""

    def __init__(self) -> None:
        self.claimed: list[Path] = []  # image names reserved (empty placeholders until written)
        self.written: list[Path] = []
        self.preview = None  # the PreviewCallback
        self.preview_dir_created = False
        self.extras: dict[Path, int | None] = {}  # animation / contact sheet -> mtime before the run (None: new)

    def watch(self, path: Path | None) -> None:
        if path is not None:
            self.extras[path] = path.stat().st_mtime_ns if path.exists() else None

    def undo(self) -> str:
        """Remove what the run wrote, except finished images; describe what is left."""
        from ..images import release_claims

        release_claims([p for p in self.claimed if p not in self.written])
        removed = []
        folder = getattr(self.preview, "folder", None)
        if folder is not None:
            frames = [folder / f"{step}.png" for step, _ in self.preview.frames]
            count = sum(1 for p in frames if p.exists())
            for p in frames:
                p.unlink(missing_ok=True)
            if self.preview_dir_created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
            if count:
                removed.append(f"the {count} preview frame{'s' * (count != 1)} it wrote in {str(folder)!r}")
        for path, before in self.extras.items():
            if path.exists() and (before is None or path.stat().st_mtime_ns != before):
                path.unlink()
                removed.append(repr(str(path)))
        if self.written:
            kept = f"kept the {len(self.written)} image(s) printed above, nothing else"
        else:
            kept = "nothing written"
        return kept + (f" (removed {' and '.join(removed)})" if removed else "")


@contextlib.contextmanager
def _undo_on_failure(files: _RunFiles):
    try:
        yield
    except BaseException as e:
        e.stepdiff_kept = files.undo()  # type: ignore[attr-defined]
        raise


