"""One resumable training loop for everything the project trains (the zoo's VAE and UNets, the judge).

Exact resume, atomic checkpoints, a loss log that a resume does not duplicate, and checkpoints
that cannot run code are easy to get subtly wrong; they live here once. A trainer supplies what
differs -- a step function (the batch and its loss), the learning rate of each step, and an
optional hook after each optimiser step (an EMA, a snapshot) -- and :class:`TrainingRun` does
the rest:

- processes and devices go through accelerate's ``Accelerator`` (``prepare``, ``backward``,
  ``clip_grad_norm_``, ``reduce``). Under ``accelerate launch`` the model is wrapped for
  data-parallel training, each process draws its own part of the batch (its index joins the
  tag of its step generator), losses are averaged over processes, and only the main process
  writes the log and the checkpoints.
- step ``s`` draws from :func:`step_generator` ``(seed, tag, s)`` and from nothing else, so a
  run resumed at any checkpoint ends with exactly the parameters of an uninterrupted one.
- a checkpoint is one safetensors file, written atomically (:func:`multifusion.io.atomic_path`)
  every ``checkpoint_every`` steps and at the last step of each call: the model, any extra
  modules (an EMA), the optimiser state flattened into tensors, and JSON metadata (step,
  seconds, the optimiser's param groups, the trainer's own ``meta``).
- the loss log is a CSV of metric means, one row every ``log_every`` steps and at the last step
  of each call; resuming truncates it to the checkpoint's step.

Deviation from accelerate's ``save_state``/``load_state``: they write a folder file by file
(not atomically) and pickle the optimiser and the RNG state (``optimizer.bin``,
``random_states_0.pkl``). Loading unpickles them with ``weights_only=True`` and an allow-list
of numpy types, and an RNG file that fails to load is skipped with an info log. A safetensors
file holds no code to run and a single file can be renamed into place, and the RNG state is not
needed here because every random draw comes from the step's generator.
"""

from __future__ import annotations

import csv
import json
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from multifusion.errors import MultifusionError
from multifusion.io import atomic_path

CHECKPOINT = "checkpoint.safetensors"
"""File name of a run's checkpoint (after a run's ``prefix``)."""
LOSS_LOG = "loss.csv"
"""File name of a run's loss log (after a run's ``prefix``)."""
FORMAT = 1
"""Version of the checkpoint layout, stored in each checkpoint."""
_INFO_KEY = "multifusion"  # the safetensors metadata entry that holds our JSON
_CHANNELS_LAST_KEY = "multifusion.channels_last"  # names of the tensors saved channels-last

StepFn = Callable[[int, torch.Generator], Mapping[str, torch.Tensor]]
"""``(step, generator) -> metrics``: scalar tensors by name, ``"loss"`` the one backpropagated."""


class CheckpointError(MultifusionError):
    """A checkpoint that is refused: not a safetensors file (a pickle), or not one of this run."""


def derived_seed(seed: int, *keys: str | int) -> int:
    """A 32-bit seed that depends only on ``seed`` and ``keys`` (strings enter as their CRC-32)."""
    entropy = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def step_generator(seed: int, tag: str, step: int) -> torch.Generator:
    """The CPU generator of training step ``step``: it depends only on (seed, tag, step)."""
    return torch.Generator().manual_seed(derived_seed(seed, tag, step))


# ----------------------------------------------------------------------------- files


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    """Write ``tensors`` and the JSON-serialisable ``info`` to a safetensors file, atomically.

    Tensors come back from :func:`load_tensors` with their values, and channels-last ones
    channels-last: a CPU convolution's float sums depend on its input's memory layout, so a
    loaded tensor must keep it to compute bit for bit as the saved one did. (The zoo's VAE
    latents are channels-last, and the shipped UNets were trained on them.)
    """
    payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    channels_last = [k for k, v in tensors.items() if _is_channels_last(v)]
    with atomic_path(path) as tmp:
        save_file(payload, tmp, metadata={_INFO_KEY: json.dumps(info), _CHANNELS_LAST_KEY: json.dumps(channels_last)})


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(
            f"{path} is not a safetensors file ({err}); it was not loaded, because unpickling a file can run "
            "arbitrary code. Delete it to have it made again (a checkpoint: training starts again at step 0)"
        ) from err


def _info(path: Path, f: Any) -> dict[str, Any]:
    raw = (f.metadata() or {}).get(_INFO_KEY)
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not one multifusion wrote (no {_INFO_KEY!r} metadata)")
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError) as err:
        info = err
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{path}: its {_INFO_KEY!r} metadata is damaged (not a JSON object); delete the file to have it "
            "made again (a checkpoint: training starts again at step 0)"
        )
    return info


def file_info(path: str | Path) -> dict[str, Any]:
    """The info of a file :func:`save_tensors` wrote, read from its header alone."""
    with _opened(Path(path)) as f:
        return _info(Path(path), f)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (on the CPU) and info of a file :func:`save_tensors` wrote.

    Only ever parsed as safetensors: anything else, a pickle included, raises CheckpointError
    without being unpickled.
    """
    with _opened(Path(path)) as f:
        channels_last = set(json.loads((f.metadata() or {}).get(_CHANNELS_LAST_KEY, "[]")))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = _info(Path(path), f)
    for k in channels_last:
        tensors[k] = tensors[k].contiguous(memory_format=torch.channels_last)
    return tensors, info


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """What a run needs to continue exactly where it stopped."""

    step: int
    elapsed: float
    """Seconds of training so far, over every call."""
    meta: dict[str, Any]
    """The trainer's own record (e.g. where a fine-tune started, the arguments of the run)."""
    modules: dict[str, dict[str, torch.Tensor]]
    """State dicts by module name: ``"model"`` and any extra module (an EMA)."""
    optimizer: dict[str, Any]
    """A torch optimiser state dict."""


def _flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser state dict as tensors ``optimizer/<param>/<key>`` and JSON (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": plain}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in info["state"].items()}
    for name, value in tensors.items():
        _, index, key = name.split("/", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` as one safetensors file (atomically): no pickle anywhere."""
    tensors, optimizer = _flatten_optimizer(ckpt.optimizer)
    for name, state in ckpt.modules.items():
        tensors.update({f"{name}/{k}": v for k, v in state.items()})
    info = {"format": FORMAT, "step": ckpt.step, "elapsed": ckpt.elapsed, "meta": ckpt.meta, "optimizer": optimizer}
    save_tensors(path, tensors, info)


def _checked(path: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {info.get('format')!r}, not {FORMAT}: retrain from scratch")
    return info


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """``step``, ``elapsed`` (seconds) and ``meta`` of a checkpoint, read from its header alone."""
    info = _checked(path, file_info(path))
    if not isinstance(info.get("step"), int) or not isinstance(info.get("meta"), dict):
        raise CheckpointError(f"{path}: its metadata lacks the step or the run's record; delete it to train from step 0")
    return info


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path``, read as safetensors only (CheckpointError for anything else)."""
    tensors, info = load_tensors(path)
    info = _checked(path, info)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    optimizer = {}
    for name, value in tensors.items():
        module, key = name.split("/", 1)
        if module == "optimizer":
            optimizer[name] = value
        else:
            modules.setdefault(module, {})[key] = value
    return Checkpoint(info["step"], info["elapsed"], info["meta"], modules, _unflatten_optimizer(optimizer, info["optimizer"]))


def read_log(path: str | Path, upto: int) -> list[dict[str, str]]:
    """The rows of a loss log up to step ``upto`` (none when the file does not exist)."""
    if not Path(path).exists():
        return []
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                step = row.get("step")
                if step is None or not step.strip().isdigit():
                    raise ValueError(f"line {len(rows) + 2}: step {step!r} is not a step number")
                if int(step) <= upto:
                    rows.append(row)
    except (ValueError, csv.Error) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(
            f"{path} is not a loss log this run wrote ({type(err).__name__}: {str(err)[:200]}); delete it "
            "to resume without it (the checkpoint continues; the earlier loss rows are lost)"
        ) from None
    return rows


# ----------------------------------------------------------------------------- the run


class TrainingRun:
    """A model, its optimiser and a run folder: trains to a step count, resumable at any checkpoint.

    ``folder`` holds ``{prefix}checkpoint.safetensors`` and ``{prefix}loss.csv``. ``tag`` names the
    run's random stream (with ``seed``). ``modules`` are saved and restored with the model but not
    trained (an EMA). ``metrics`` are the keys a step function returns, logged as means over each
    log interval. Use :attr:`model` (prepared by the accelerator) in the step function.
    """

    def __init__(
        self,
        folder: str | Path,
        tag: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        seed: int,
        modules: Mapping[str, torch.nn.Module] | None = None,
        metrics: Sequence[str] = ("loss",),
        checkpoint_every: int = 250,
        log_every: int = 25,
        prefix: str = "",
        accelerator: Accelerator | None = None,
    ) -> None:
        self.accelerator = accelerator or Accelerator()
        self.tag, self.seed = tag, seed
        self.modules = {"model": model, **(modules or {})}
        self._optimizer = optimizer
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.metrics = tuple(metrics)
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.checkpoint_path = Path(folder) / f"{prefix}{CHECKPOINT}"
        self.log_path = Path(folder) / f"{prefix}{LOSS_LOG}"
        self.step, self.elapsed = 0, 0.0

    def generator(self, step: int) -> torch.Generator:
        """The generator of ``step`` in this process (each process of a launch draws its own)."""
        acc = self.accelerator
        tag = self.tag if acc.num_processes == 1 else f"{self.tag}/process{acc.process_index}"
        return step_generator(self.seed, tag, step)

    def resume(self) -> dict[str, Any] | None:
        """Load the checkpoint, if there is one: returns its ``meta``, or None to start at step 0."""
        legacy = self.checkpoint_path.with_suffix(".pt")
        if legacy.exists():
            raise CheckpointError(
                f"{legacy} is a pickled checkpoint from an older multifusion; it is not loaded, because unpickling "
                f"can run arbitrary code. Delete it and {self.log_path.name} to train this model from scratch"
            )
        if not self.checkpoint_path.exists():
            return None
        ckpt = load_checkpoint(self.checkpoint_path)
        if ckpt.modules.keys() != self.modules.keys():
            raise CheckpointError(
                f"{self.checkpoint_path} holds the modules {sorted(ckpt.modules)}, this run has {sorted(self.modules)}"
            )
        for name, module in self.modules.items():
            module.load_state_dict(ckpt.modules[name])
        self._optimizer.load_state_dict(self._with_live_types(ckpt.optimizer))
        self.step, self.elapsed = ckpt.step, ckpt.elapsed
        return ckpt.meta

    def _with_live_types(self, state: dict[str, Any]) -> dict[str, Any]:
        # JSON has no tuples: give back the ones the optimiser was built with (AdamW's betas).
        groups = [
            {k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()}
            for live, saved in zip(self._optimizer.param_groups, state["param_groups"])
        ]
        return {**state, "param_groups": groups}

    def train(
        self,
        step_fn: StepFn,
        steps: int,
        *,
        lr: Callable[[int], float],
        max_grad_norm: float | None = None,
        after_step: Callable[[int], None] | None = None,
        stop: int | None = None,
        meta: Mapping[str, Any] | None = None,
        progress: bool = True,
        desc: str | None = None,
    ) -> None:
        """Train from :attr:`step` to ``steps`` (or to ``stop``, earlier, checkpointed there).

        Each step: ``step_fn(step, generator)``, every param group's learning rate set to
        ``lr(step)``, backward, gradient clipping to ``max_grad_norm``, optimiser step, then
        ``after_step(step)``. ``meta`` is stored in every checkpoint this call writes.
        """
        stop = steps if stop is None else min(stop, steps)
        main = self.accelerator.is_main_process
        if main:
            self._truncate_log()
        params = [p for group in self._optimizer.param_groups for p in group["params"]]
        bar = tqdm(total=steps, initial=self.step, desc=desc or self.tag, disable=not (progress and main), dynamic_ncols=True)
        self.model.train()
        start, before = time.time(), self.elapsed
        pending: list[list[float]] = []
        while self.step < stop:
            values = step_fn(self.step, self.generator(self.step))
            rate = lr(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = rate
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(values["loss"])
            if max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(params, max_grad_norm)
            self.optimizer.step()
            if after_step is not None:
                after_step(self.step)
            pending.append(self._reduced(values))
            self.step += 1
            self.elapsed = before + time.time() - start
            bar.update(1)
            if self.step % self.log_every == 0 or self.step == stop:
                self._log(pending, rate, bar)
                pending = []
            if self.step % self.checkpoint_every == 0 or self.step == stop:
                self._checkpoint(dict(meta or {}))
        bar.close()

    def _reduced(self, values: Mapping[str, torch.Tensor]) -> list[float]:
        """This step's metrics, averaged over processes."""
        stacked = torch.stack([values[k].detach().float() for k in self.metrics])
        return self.accelerator.reduce(stacked, "mean").tolist()

    @property
    def _fields(self) -> list[str]:
        return ["step", *self.metrics, "lr", "seconds"]

    def _truncate_log(self) -> None:
        rows = read_log(self.log_path, self.step)
        with atomic_path(self.log_path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def _log(self, pending: list[list[float]], lr: float, bar: Any) -> None:
        # A mean over axis 0 of the (steps, metrics) array: numpy's summation order depends on the
        # layout, and this is the arithmetic the zoo's logs always used, so the numbers stay the same.
        means = dict(zip(self.metrics, np.mean(np.array(pending), axis=0).tolist()))
        bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()})
        if self.accelerator.is_main_process:
            with open(self.log_path, "a", newline="") as fh:
                row = {"step": self.step, **means, "lr": lr, "seconds": round(self.elapsed, 1)}
                csv.DictWriter(fh, fieldnames=self._fields).writerow(row)

    def _checkpoint(self, meta: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            modules = {name: module.state_dict() for name, module in self.modules.items()}
            save_checkpoint(
                self.checkpoint_path, Checkpoint(self.step, self.elapsed, meta, modules, self._optimizer.state_dict())
            )
        self.accelerator.wait_for_everyone()
