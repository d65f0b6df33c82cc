"""`Checkpoint`: save the run every N steps and at the end; resume from the newest good one."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from trainloop import CheckpointError, CheckpointWarning, PreviousSaveFailed, RunState, broadcast, load, save
from trainloop.extension import checkpoints_in, expand_path, finish_saves, fsync
from trainloop.hooks import Callback

__all__ = ["Checkpoint", "CheckpointWarning"]

# Hidden names in the checkpoint directory: a save being written, and a pruned checkpoint being
# deleted. Neither is ever taken for a committed checkpoint (those have no leading dot).
_REMAINS = (".*.partial", ".*.pruned")


class Checkpoint(Callback):
    """Save to `dir/step-00000500/` every `every` optimizer steps and when the run finishes.

    Args:
        dir: the directory that holds the checkpoints and the `latest` pointer.
        every: optimizer steps between checkpoints; None saves only at `tl.finish`.
        keep: how many checkpoints to keep; older ones are deleted only after a newer one is
            safely in place. None keeps all.
        resume: restore the run in `tl.prepare` from the newest checkpoint that loads. A
            damaged one (truncated, altered, half-written, unreadable, ill-formed) is skipped
            with one warning naming the file and the reason, and the one before it is used. One
            that does not fit the run (other models, optimizers, schedulers) raises ValueError.
        on_error: "raise" (default) stops the run when a checkpoint cannot be written (disk
            full, permission denied); "warn" warns and trains on. Either way the previous
            checkpoints are untouched.
        background: write each checkpoint on a writer thread while training goes on (default);
            the step that saves waits only while the state is copied (see `tl.save`). A
            background failure is raised (or warned) on every rank at the next save step or at
            `tl.finish`, not at the very next step: ranks synchronise at saves already, and a
            check at every step would cost a collective per step. `finish` waits for the last
            save. Pruning (`keep`) runs on the writer thread once the new checkpoint is
            committed. False: every save completes before its step returns.

    Prepare every object of the run in one `tl.prepare` call: the checkpoint is restored there,
    and it must find the same models, optimizers, schedulers and loaders it saved.
    """

    def __init__(self, dir: str | os.PathLike, every: int | None = None, keep: int | None = None,
                 resume: bool = True, on_error: str = "raise", background: bool = True):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"Checkpoint every must be an integer >= 1 or None (got {every!r})")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"Checkpoint keep must be an integer >= 1 or None (got {keep!r})")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"Checkpoint on_error must be 'raise' or 'warn' (got {on_error!r})")
        self.dir = expand_path(dir, "Checkpoint dir")  # `~` and $VARIABLES, as a shell would
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"Checkpoint dir {self.dir} exists and is not a directory")
        if not isinstance(background, bool):
            raise ValueError(f"Checkpoint background must be True or False (got {background!r})")
        self.every, self.keep, self.resume, self.on_error = every, keep, resume, on_error
        self.background = background
        self.restored_from: Path | None = None
        self._looked_for_checkpoint = False
        self._last_saved_step: int | None = None

    # -- resume --------------------------------------------------------------------------------

    def on_prepare(self, state: RunState) -> RunState | None:
        if not self.resume or self._looked_for_checkpoint:
            return None
        self._looked_for_checkpoint = True
        candidates = None
        if state.is_main:
            candidates = [str(c) for c in checkpoints_in(self.dir) if c.name.startswith("step-")]
        for candidate in broadcast(state, candidates):  # every rank tries the same ones
            try:
                # Reads and checks everything before restoring anything; a CheckpointError is
                # raised on every rank alike, so the ranks move on to the same next candidate.
                state = load(state, candidate)
            except CheckpointError as reason:
                if state.is_main:
                    warnings.warn(f"skipping checkpoint {candidate}: {reason}", CheckpointWarning, stacklevel=2)
                continue
            self.restored_from = Path(candidate)
            self._last_saved_step = state.step
            return state
        return None

    # -- save ----------------------------------------------------------------------------------

    def on_step(self, state: RunState) -> None:
        if self.every is not None and state.step % self.every == 0:
            self._save(state)

    def on_finish(self, state: RunState) -> None:
        if state.step != self._last_saved_step:
            if state.window_micro_steps:
                warnings.warn(
                    f"the run finished inside an accumulation window ({state.window_micro_steps} "
                    f"micro-steps not yet applied): the final checkpoint is the last optimizer step's",
                    CheckpointWarning, stacklevel=2)
            else:
                self._save(state)
        try:
            finish_saves(state)  # the last background save is committed before the run ends
        except CheckpointError as error:
            self._failed(error)

    def _save(self, state: RunState) -> None:
        path = self.dir / f"step-{state.step:08d}"
        prune = (lambda: self._prune(newest=path)) if state.is_main else None
        try:
            try:
                save(state, path, background=self.background, after_commit=prune)
            except PreviousSaveFailed as error:  # now reported on every rank; this save never began
                self._failed(error)
                save(state, path, background=self.background, after_commit=prune)
        except CheckpointError as error:
            self._failed(error)
            return
        self._last_saved_step = state.step

    def _failed(self, error: CheckpointError) -> None:
        if self.on_error == "raise":
            raise error
        warnings.warn(str(error), CheckpointWarning, stacklevel=4)

    def _prune(self, newest: Path) -> None:
        """Delete what `keep` no longer covers, and the remains of saves and prunes that were killed.

        A checkpoint leaves the committed namespace in one rename (to a hidden name) before its
        files are deleted: a process killed mid-prune leaves a hidden remain, never a
        half-deleted `step-*` directory that looks committed.
        """
        for pattern in _REMAINS:
            for leftover in self.dir.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        if self.keep is None:
            return
        committed = sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-"))
        retired = []
        for old in committed[: max(0, len(committed) - self.keep)]:
            if old != newest:
                hidden = self.dir / f".{old.name}.pruned"
                os.replace(old, hidden)
                retired.append(hidden)
        if retired:
            fsync(self.dir)  # the renames are durable before anything is deleted
        for hidden in retired:
            shutil.rmtree(hidden, ignore_errors=True)

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.dir)!r}, every={self.every}, keep={self.keep}, resume={self.resume}, "
                f"background={self.background})")

