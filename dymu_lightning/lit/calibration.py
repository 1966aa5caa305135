"""The calibration LightningModule: DyMU thresholds over global batches, resumable.

Lightning runs it with ``trainer.validate``: there is nothing to train. Each step is one global
batch; the module ranks every layer's edges over all processes (see
:class:`~dymu_lightning.core.calibration.GlobalBatchCut`) and accumulates the batch thresholds. All
processes end each step with identical statistics, so rank 0 alone writes the state and the results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.core import LayerMerges, MergePolicy
from dymu_lightning.core.calibration import GlobalBatchCut, ThresholdStats, TokenStats
from dymu_lightning.files import atomic_path

log = logging.getLogger(__name__)

STATE_FILE = "calibration_state.pt"
RESULTS_FILE = "thresholds.json"
# Slurm sends it before the time limit (`#SBATCH --signal=USR1@120`) or ahead of a preemption.
REQUEUE_SIGNAL = signal.SIGUSR1
# Fault injection (tests only). After global step N, DYMU_FAULT_KILL_AFTER_STEP=N makes a process
# SIGKILL itself; DYMU_FAULT_STALL_AFTER_STEP=N makes it stall, as a hung process would, until the
# requeue signal arrives. DYMU_FAULT_RANK=R limits both to global rank R (default: every process).
_KILL_AFTER_STEP = int(os.environ.get("DYMU_FAULT_KILL_AFTER_STEP", "0")) or None
_STALL_AFTER_STEP = int(os.environ.get("DYMU_FAULT_STALL_AFTER_STEP", "0")) or None
_FAULT_RANK = int(os.environ["DYMU_FAULT_RANK"]) if os.environ.get("DYMU_FAULT_RANK") else None


class CollectiveError(RuntimeError):
    """A collective with the other processes failed: one died, hung, or lost the network."""


class Requeued(Exception):
    """The run stopped at a step boundary after the requeue signal, with its state saved; every
    process raises it at the same step. ``requeue()`` then puts the job back in the queue."""

    def __init__(self, message: str, job: str, leader: bool) -> None:
        super().__init__(message)
        self.job = job
        self.leader = leader  # global rank 0 requeues; the others only stop

    def requeue(self) -> bool:
        """Requeue the job (global rank 0 only); False when `scontrol requeue` failed.

        Slurm SIGTERMs every task of the job as soon as it is requeued, so the caller ignores SIGTERM
        before this: the process is leaving anyway, and the signal would cut its last line off.
        """
        if not self.leader:
            return True
        command = ["scontrol", "requeue", self.job]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            log.error("`%s` failed: %s", " ".join(command), result.stderr.strip())
        return result.returncode == 0

    def outcome(self, requeued: bool) -> str:
        if requeued:
            return f"{self}; job {self.job} requeued, it resumes from there"
        return f"{self}; requeueing failed: submit the same command again to resume"


class CalibrationModule(L.LightningModule):
    """Accumulates per-layer thresholds of one encoder.

    Args:
        backbone: the adapter.
        model: the host encoder (moved to the device by Lightning).
        r: target merges per image, per layer.
        num_blocks: read features after this many blocks (None: all).
        out_dir: where the resumable state is saved.
        save_every_n_steps: state-saving period in global steps.
        fingerprint: what makes a saved state belong to this run (checked on resume).
        full_tokens: tokens per image without merging.
        state: a saved state to continue from, or None.
        requeue_job: a Slurm job id: on the requeue signal, save the state at the next step boundary,
            requeue this job and stop (None: the signal is not handled here).
        native: batches hold images of different sizes (``pixels`` a list of ``[3, H_i, W_i]``, packed
            through the backbone's ``merged_forward_images``); ``full_tokens`` is then the most tokens an
            image can have, and :attr:`full_tokens` counts each image's own unmerged tokens.
    """

    def __init__(
        self,
        backbone: Backbone,
        model: nn.Module,
        r: list[int],
        num_blocks: int | None,
        out_dir: Path,
        save_every_n_steps: int,
        fingerprint: dict[str, Any],
        full_tokens: int,
        state: dict[str, Any] | None = None,
        requeue_job: str | None = None,
        native: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.encoder = model
        self.r = list(r)
        self.num_blocks = num_blocks
        self.out_dir = Path(out_dir)
        self.save_every_n_steps = save_every_n_steps
        self.fingerprint = fingerprint
        self.thresholds = ThresholdStats(len(r))
        self.tokens = TokenStats(full_tokens)
        self.native = native
        #: native sizes: every image's own token count before merging (None: all have full_tokens)
        self.full_tokens = TokenStats(full_tokens) if native else None
        self.steps_done = 0
        self.images_seen = 0
        self.images_skipped = 0
        self.index_sums = torch.zeros(2, dtype=torch.float64)
        self.bytes_gathered_per_step = 0
        self.bytes_gathered_per_layer: list[int] = []
        self._step_ends: list[float] = []  # this run's step end times, for seconds_per_step
        self._saved_seconds_per_step: float | None = None  # of the runs before this one
        if state is not None:
            self.thresholds.load_state_dict(state["thresholds"])
            self.tokens.load_state_dict(state["tokens"])
            if self.full_tokens is not None:
                self.full_tokens.load_state_dict(state["full_tokens"])
            self.steps_done = int(state["steps_done"])
            self.images_seen = int(state["images_seen"])
            self.images_skipped = int(state["images_skipped"])
            self.index_sums = state["index_sums"].clone()
            # A rerun of a finished run does no step: it reports what the last steps measured.
            self.bytes_gathered_per_step = int(state.get("bytes_gathered_per_step", 0))
            self.bytes_gathered_per_layer = list(state.get("bytes_gathered_per_layer", []))
            self._saved_seconds_per_step = state.get("seconds_per_step")
        self.requeue_job = requeue_job
        self._requeue_signalled = False
        self._previous_handler: Any = None
        if requeue_job is not None:
            # Installed now, not when the loop starts: the default action of SIGUSR1 is to terminate,
            # and the signal may come while the model or the process group is still being set up.
            self._previous_handler = signal.signal(REQUEUE_SIGNAL, self._on_requeue_signal)
        self._started = time.perf_counter()
        self._images_this_run = 0

    # ----- one global step ---------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._beat()
        valid = batch["valid"].bool()
        dtype = next(self.encoder.parameters()).dtype
        # native sizes: a list of images of different sizes, which the tower packs
        pixels = [image.to(dtype) for image in batch["pixels"]] if self.native else batch["pixels"].to(dtype)
        # Real images, images skipped as undecodable (their rows keep their index but are invalid), and
        # whether this process got the requeue signal: riding on this gather, every process learns of a
        # signal at the same step boundary, so they all stop there together, between collectives.
        local = [valid.sum(), ((batch["index"] >= 0) & ~valid).sum(), torch.tensor(int(self._requeue_signalled))]
        counts = self._gather(torch.stack([c.to(valid.device) for c in local]))
        global_images, skipped, signalled = (int(c) for c in counts.reshape(-1, 3).sum(dim=0))
        if signalled:
            self._stop_for_requeue()
        cut = GlobalBatchCut(self.r, valid, global_images, gather=self._gather)
        batch_thresholds: dict[int, Tensor] = {}

        def record(merges: LayerMerges) -> None:
            batch_thresholds[merges.layer] = merges.batch_threshold

        policy = MergePolicy(mode="batch_topk", r=self.r, batch_cut=cut, on_layer=record)
        with torch.no_grad():
            if self.native:
                out = self.backbone.merged_forward_images(self.encoder, pixels, policy, num_blocks=self.num_blocks)
            else:
                out = self.backbone.merged_forward(self.encoder, pixels, policy, num_blocks=self.num_blocks)
        if global_images > 0:
            for layer, threshold in batch_thresholds.items():
                self.thresholds.add(layer, threshold)
        # Token counts of every real image of the global batch: fixed-size payload, -1 for padding.
        lengths = torch.where(valid, out.lengths, torch.full_like(out.lengths, -1))
        every_length = self._gather(lengths)
        self.tokens.add(every_length[every_length >= 0].cpu())
        if self.full_tokens is not None:  # each image's own cells before merging (group -1 past them)
            cells = (out.group >= 0).sum(dim=1)
            every_full = self._gather(torch.where(valid, cells, torch.full_like(cells, -1)))
            self.full_tokens.add(every_full[every_full >= 0].cpu())
        # Which images were seen, summarised: sum and sum of squares of their global indices.
        # A sample seen twice, or missed, changes them (the audit behind "exactly once").
        index = self._gather(torch.where(valid, batch["index"], torch.full_like(batch["index"], -1)))
        seen = index[index >= 0].double()
        self.index_sums += torch.stack([seen.sum(), (seen**2).sum()]).cpu()

        self.steps_done += 1
        self.images_seen += global_images
        self.images_skipped += skipped
        self._images_this_run += global_images
        self.bytes_gathered_per_step = (
            8 * len(local) + sum(cut.bytes_sent) + (3 if self.native else 2) * lengths.numel() * lengths.element_size()
        )
        self.bytes_gathered_per_layer = list(cut.bytes_sent)
        self._step_ends.append(time.perf_counter())
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        summary = self.tokens.summary()
        self.log("img/s", self._images_this_run / elapsed, prog_bar=True, on_step=True, on_epoch=False)
        if summary["mean"] is not None:
            self.log("tokens", float(summary["mean"]), prog_bar=True, on_step=True, on_epoch=False)
        if self.steps_done % self.save_every_n_steps == 0:
            self.save_state()
        self._inject_faults()

    def on_validation_start(self) -> None:
        self._started = time.perf_counter()
        self._images_this_run = 0
        self._step_ends = []
        if self.trainer is not None and self.trainer.world_size > 1:
            # In place of Lightning's SIGTERM handler, which broadcasts to the other processes from
            # inside the handler: when srun stops the tasks because one failed, that broadcast fails
            # with a long traceback. Ours prints one line and ends the process as SIGTERM would.
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_validation_end(self) -> None:
        self.save_state()
        if self.requeue_job is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous_handler)

    @property
    def seconds_per_step(self) -> float | None:
        """Mean wall time of this run's steps after the first (which carries the warm-up), or of its
        only step; None before any step."""
        ends = [self._started, *self._step_ends]
        if len(ends) < 2:
            return self._saved_seconds_per_step
        if len(ends) == 2:
            return ends[1] - ends[0]
        return (ends[-1] - ends[1]) / (len(ends) - 2)

    # ----- preemption and faults -----------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        print(
            f"note: rank {self.global_rank}: stopped by SIGTERM in global step {self.steps_done + 1} (the job was "
            "cancelled or requeued, or another task failed); rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def _beat(self) -> None:
        """Record in the process group's store that this rank starts the next step: when a collective
        fails, the others can then name the rank that never got there."""
        store = self._store()
        if store is not None:
            with contextlib.suppress(Exception):  # the store is a diagnostic aid only
                store.set(f"dymu/step/{self.global_rank}", str(self.steps_done + 1))

    def _store(self) -> Any:
        if self.trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return None
        try:
            return torch.distributed.distributed_c10d._get_default_store()
        except Exception:
            return None

    def _absent_ranks(self) -> list[int]:
        """Ranks that have not started the current step (died or hung before it), as the store tells;
        empty when that cannot be found out (the store went down with its host, rank 0)."""
        store = self._store()
        if store is None:
            return []
        step, absent = self.steps_done + 1, []
        try:
            store.set_timeout(timedelta(seconds=5))
            for rank in range(self.trainer.world_size):
                key = f"dymu/step/{rank}"
                if not store.check([key]) or int(store.get(key)) < step:
                    absent.append(rank)
        except Exception:
            return []
        return absent

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: saving or calling collectives inside a handler could interleave with the
        # collective this process is in the middle of (which is what Lightning's own handler risks).
        self._requeue_signalled = True

    def _stop_for_requeue(self) -> None:
        """Every process is here at the same step: save, wait for each other, stop (the CLI requeues)."""
        if self.trainer.is_global_zero:
            self.save_state()
        # Nobody leaves before the state is on disk: srun may kill the others once one exits.
        self.trainer.strategy.barrier("requeue")
        raise Requeued(
            f"stopped at global step {self.steps_done} on the requeue signal; "
            f"state saved in {self.out_dir / STATE_FILE}",
            job=str(self.requeue_job),
            leader=self.trainer.is_global_zero,
        )

    def _inject_faults(self) -> None:
        if _FAULT_RANK is not None and self.global_rank != _FAULT_RANK:
            return
        if self.steps_done == _KILL_AFTER_STEP:
            # Die as a preempted or crashed process would, without cleanup.
            os.kill(os.getpid(), signal.SIGKILL)
        if self.steps_done == _STALL_AFTER_STEP:
            deadline = time.monotonic() + 600
            while not self._requeue_signalled and time.monotonic() < deadline:
                time.sleep(0.05)

    # ----- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "thresholds": self.thresholds.state_dict(),
            "tokens": self.tokens.state_dict(),
            **({"full_tokens": self.full_tokens.state_dict()} if self.full_tokens is not None else {}),
            "steps_done": self.steps_done,
            "images_seen": self.images_seen,
            "images_skipped": self.images_skipped,
            "index_sums": self.index_sums.clone(),
            "bytes_gathered_per_step": self.bytes_gathered_per_step,
            "bytes_gathered_per_layer": list(self.bytes_gathered_per_layer),
            "seconds_per_step": self.seconds_per_step,
        }

    def save_state(self) -> None:
        """Rank 0 writes the state atomically: a kill mid-write leaves the previous state."""
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        with atomic_path(self.out_dir / STATE_FILE) as temporary:
            torch.save(self.state(), temporary)

    # ----- collectives ---------------------------------------------------------------------------------
    def _gather(self, tensor: Tensor) -> Tensor:
        """``[n]`` -> ``[world * n]`` (same shape on every process)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return tensor
        try:
            # torch.distributed's own all_gather (Lightning's goes through a deprecated functional one).
            parts = [torch.empty_like(tensor) for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather(parts, tensor.contiguous())
            return torch.cat(parts).reshape(-1)
        except RuntimeError as error:  # gloo/NCCL errors, timeouts included, are RuntimeErrors
            step, resume = self.steps_done + 1, f"Rerun the same command to resume from {self.out_dir / STATE_FILE}"
            why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            absent = self._absent_ranks()
            if absent:
                names = ", ".join(str(r) for r in absent)
                raise CollectiveError(
                    f"rank{'s' if len(absent) > 1 else ''} {names} did not reach global step {step}: died, or hung "
                    f"longer than trainer.timeout_s (seen by rank {self.global_rank}, whose all-gather failed). "
                    f"{resume} ({why})"
                ) from error
            raise CollectiveError(
                f"rank {self.global_rank}: an all-gather with the other {self.trainer.world_size - 1} process(es) "
                f"failed in global step {step}: a process died, hung longer than trainer.timeout_s, "
                f"or lost the network. {resume} ({why})"
            ) from error

    def configure_optimizers(self) -> None:
        return None


def read_state(out_dir: Path) -> dict[str, Any] | None:
    """The saved state in ``out_dir``, if any, unchecked; a one-line error if it cannot be read."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["fingerprint"]  # noqa: B018 (a state without one is not ours)
    except Exception as error:  # a truncated zip, a pickle torch refuses, another file altogether
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} is not a readable calibration state ({why}); resume=false starts over (and replaces it)"
        ) from None
    return state


def check_state(state: dict[str, Any] | None, out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """``state`` (from :func:`read_state`) if it belongs to this run; an error if it belongs to another."""
    if state is None:
        return None
    saved = dict(state["fingerprint"])
    if "shards" in saved:  # the same folder, given relative or absolute, through a link or not
        saved["shards"] = str(Path(saved["shards"]).expanduser().resolve())
    if saved != fingerprint:
        differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise ValueError(
            f"{Path(out_dir) / STATE_FILE} holds the state of a different calibration run (differs in: "
            f"{', '.join(differing)}). Use another out_dir, or resume=false to start over."
        )
    return state


def load_state(out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state in ``out_dir``, if any; an error if it cannot be read or belongs to another run."""
    return check_state(read_state(out_dir), out_dir, fingerprint)


def check_previous_results(out_dir: Path, fingerprint: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    """A FileExistsError if ``out_dir`` holds a thresholds.json that another run wrote (one whose
    recorded fingerprint differs, keys in ``ignore`` aside): this run would overwrite it."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())["extra"]["fingerprint"]
    except (ValueError, KeyError, TypeError):
        recorded = None
    ours = json.loads(json.dumps(fingerprint))
    if not isinstance(recorded, dict):
        why = "it records no run fingerprint: another tool or version wrote it"
    else:
        recorded = {**recorded, "shards": str(Path(recorded.get("shards", "")).expanduser().resolve())}
        differing = sorted(k for k in set(recorded) | set(ours) if k not in ignore and recorded.get(k) != ours.get(k))
        if not differing:
            return
        why = f"another calibration wrote it; differs in: {', '.join(differing)}"
    raise FileExistsError(f"{path} would be overwritten ({why}); use another out_dir, or remove the file")
