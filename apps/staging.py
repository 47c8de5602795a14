"""Write a report directory all at once: into a temporary sibling, renamed into place at the end.

A run that fails midway (bad input found late, out of memory, Ctrl-C) leaves the previous report,
or nothing, at --out: never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError

# A directory holding this file is a headscope report we may replace...
REPORT_MARKER = "heads.json"
# ...if it holds nothing but what a report writes: anything else would go with it.
REPORT_FILES = {"heads.json", "heads.csv", "report.html", "run.json"}


class StagedDir:
    """Usage:
        stage = StagedDir(out)        # checks --out can be written, creates the temporary sibling
        ... write files into stage.path ...
        stage.commit()                # atomic rename to out (replacing an earlier report)
        stage.discard()               # on failure: remove the temporary directory
    """

    def __init__(self, out):
        self.out = Path(out).expanduser().absolute()
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {str(self.out)!r} exists and is not a directory.")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / REPORT_MARKER).exists():
            raise OutputError(f"--out {str(self.out)!r} is a non-empty directory that does not hold a headscope "
                              "report; refusing to replace it. Choose another --out.")
        self.replaces = self.out.is_dir() and (self.out / REPORT_MARKER).exists()
        if self.replaces:
            others = sorted(p.name for p in self.out.iterdir() if p.name not in REPORT_FILES)
            if others:
                raise OutputError(f"--out {str(self.out)!r} holds a headscope report and other files "
                                  f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); the new report "
                                  "replaces the whole directory, so they would be deleted. Move them, or choose "
                                  "another --out.")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            # mkdtemp makes the directory private (0700); a report should get the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.path, 0o777 & ~umask)
        except OSError as exc:
            raise OutputError(f"cannot write the report to {str(self.out)!r}: {exc.strerror or exc}. "
                              "Choose a writable --out.") from None

    def commit(self) -> Path:
        """Move the finished report into place; an earlier report at --out is replaced."""
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "report")
        try:
            os.replace(self.path, self.out)
        except OSError:
            if old is not None:  # put the earlier report back
                os.replace(old / "report", self.out)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
