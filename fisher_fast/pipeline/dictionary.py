"""The task dictionary of Algorithm 1: baseline tasks, each with its probe and its best cell.

A dictionary is a directory::

    dictionary.json                  format, versions, shared settings, one entry per task
    probes/<task>.safetensors        the baseline's probe (weights; its SHA-256 is in the JSON)
    searches/<task>.json             the FUSE checkpoint of the baseline's search (resumable)

Every baseline shares one probe architecture (Definition 3: distances compare FIMs of the same
network), one probe training schedule and one FUSE setting; they are fixed when the dictionary
is created and stored in ``dictionary.json``. Each baseline's best cell is found by FUSE in the
full space of cells. Writes are atomic (temporary file, then rename) and an entry is added to
the JSON only after its probe file is complete, so an interrupted build leaves a valid
dictionary of the tasks finished so far. Opening verifies the format, the version and every
probe's checksum: a damaged or foreign dictionary is an error that names the file, and nothing
is overwritten (adding a task that is already there is an error too).

Several processes may build into one dictionary at once (e.g. one per task): every update holds
an exclusive lock on ``dictionary.lock`` (``fcntl.flock``) while it re-reads ``dictionary.json``,
merges its entry into what other processes have written meanwhile, and writes both files. The
long work (a probe's training, a search) runs outside the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fisher_fast._version import __version__
from fisher_fast.distributed import is_main, on_main
from fisher_fast.io import atomic_write, write_json
from fisher_fast.nas import FuseConfig, Genotype, SearchSpace, fuse_search
from fisher_fast.tasks.cache import state_sha256
from fisher_fast.tasks.probes import make_probe
from fisher_fast.tasks.suites import Suite
from fisher_fast.tasks.task import Task
from fisher_fast.tasks.threads import probe_threads
from fisher_fast.tasks.train import Probe, ProbeRecipe, TrainConfig

DICTIONARY_FORMAT = "fisher_fast.task_dictionary"
DICTIONARY_VERSION = 1
"""Bumped when the layout or the meaning of a field changes; older readers refuse newer files."""
INDEX_FILE = "dictionary.json"
LOCK_FILE = "dictionary.lock"
REPLACE_HINT = (
    "`fisher-fast dictionary build ... --replace {task}` (the same command that built it), or "
    "TaskDictionary.add(task, replace=True) in Python"
)
"""How to replace one baseline, from the command line and from Python."""


class DictionaryError(ValueError):
    """A task dictionary is missing, damaged, incompatible, or asked to overwrite an entry."""


@dataclass(frozen=True)
class DictionarySettings:
    """What every baseline of a dictionary shares.

    Args:
        arch: probe architecture (a name of :data:`fisher_fast.tasks.PROBES`).
        input_shape: ``(C, H, W)`` of the tasks' inputs.
        head_width: probe output units (the largest class count of the baselines and targets).
        train: how probes are trained.
        fuse: the FUSE setting of the baselines' searches (and the default for a target's).
        nodes: nodes per cell of the full space the baselines are searched in (3 or 4).
        fisher: FIM kind of the distances (``"exact"`` needs no labels across tasks).
        epsilon: the probes' ε (Definition 2; a warning when a probe misses it).
    """

    arch: str
    input_shape: tuple[int, ...]
    head_width: int
    train: TrainConfig
    fuse: FuseConfig
    nodes: int = 4
    fisher: str = "exact"
    epsilon: float = 0.1

    @classmethod
    def for_suite(
        cls, suite: Suite, target: Task, fuse: FuseConfig, nodes: int = 4
    ) -> DictionarySettings:
        """The settings of a dictionary of ``suite``'s tasks for ``target``: the suite's probe,
        training, ε and head width, ``target``'s input shape, the given FUSE setting."""
        return cls(
            arch=suite.default_arch,
            input_shape=tuple(target.splits().train.x.shape[1:]),
            head_width=suite.head_width,
            train=suite.train,
            fuse=fuse,
            nodes=nodes,
            epsilon=suite.epsilon,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, as ``dictionary.json`` holds them. Inverse: :meth:`from_dict`."""
        return {
            "arch": self.arch,
            "input_shape": list(self.input_shape),
            "head_width": self.head_width,
            "train": self.train.to_dict(),
            "fuse": self.fuse.to_dict(),
            "nodes": self.nodes,
            "fisher": self.fisher,
            "epsilon": self.epsilon,
        }

    def train_probe(self, task: Task, seed: int, device: torch.device | str = "cpu") -> Probe:
        """``task``'s probe with these settings, trained on ``device`` (where it stays); a task
        whose inputs or class count do not fit the probes is a :class:`DictionaryError`."""
        shape = tuple(task.splits().train.x.shape[1:])
        if shape != self.input_shape or task.num_classes > self.head_width:
            raise DictionaryError(
                f"task {task.name!r} ({task.num_classes} classes, inputs {shape}) does not fit "
                f"the dictionary's probes (inputs {self.input_shape}, {self.head_width} outputs)"
            )
        return self.probe_recipe.train_probe(task, seed, device)

    @property
    def probe_recipe(self) -> ProbeRecipe:
        """How every baseline's probe is trained: these settings' architecture, head width,
        ε and training."""
        return ProbeRecipe(self.arch, self.head_width, self.epsilon, self.train)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionarySettings:
        """The settings :meth:`to_dict` wrote into ``dictionary.json``."""
        return cls(
            arch=data["arch"],
            input_shape=tuple(data["input_shape"]),
            head_width=int(data["head_width"]),
            train=TrainConfig(**data["train"]),
            fuse=FuseConfig.from_dict(data["fuse"]),
            nodes=int(data["nodes"]),
            fisher=data["fisher"],
            epsilon=float(data["epsilon"]),
        )


@dataclass(frozen=True)
class Baseline:
    """One dictionary entry: the task's name, its best cell (found by FUSE in the full space),
    its probe file and metadata, and the search's report (:meth:`SearchResult.to_dict`)."""

    task: str
    genotype: Genotype
    probe_file: str
    probe_sha256: str
    probe: dict[str, Any]
    search: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, as an entry of ``dictionary.json``. Inverse: :meth:`from_dict`."""
        return {
            "task": self.task,
            "genotype": self.genotype.to_string(),
            "probe_file": self.probe_file,
            "probe_sha256": self.probe_sha256,
            "probe": self.probe,
            "search": self.search,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        """The entry :meth:`to_dict` wrote into ``dictionary.json``."""
        return cls(
            task=data["task"],
            genotype=Genotype.from_string(data["genotype"]),
            probe_file=data["probe_file"],
            probe_sha256=data["probe_sha256"],
            probe=dict(data["probe"]),
            search=dict(data["search"]),
        )


class TaskDictionary:
    """Baseline tasks with their probes and best cells, stored in ``root`` (see module doc).

    Create one with :meth:`create`, open an existing one with :meth:`open`; add baselines with
    :meth:`add`. Iterating yields the :class:`Baseline` entries in the order they were added.
    """

    def __init__(
        self, root: Path, settings: DictionarySettings, entries: dict[str, Baseline]
    ) -> None:
        self.root = root
        self.settings = settings
        self._entries = entries

    @classmethod
    def create(cls, root: str | os.PathLike[str], settings: DictionarySettings) -> TaskDictionary:
        """A new, empty dictionary in ``root`` (created; it must not hold a dictionary yet)."""
        path = Path(root)
        with locked(path):
            if (path / INDEX_FILE).exists():
                raise DictionaryError(
                    f"{path} already holds a task dictionary; open it with TaskDictionary.open, "
                    "or choose another directory"
                )
            dictionary = cls(path, settings, {})
            dictionary._write_index()
        return dictionary

    @classmethod
    def open(
        cls, root: str | os.PathLike[str], *, unverified: Collection[str] = ()
    ) -> TaskDictionary:
        """The dictionary in ``root``, verified: format, version and every probe's checksum
        but those of the tasks in ``unverified`` (about to be replaced)."""
        path = Path(root)
        settings, entries = _read_index(path)
        dictionary = cls(path, settings, entries)
        for entry in entries.values():
            if entry.task not in unverified:
                dictionary._read_probe_state(entry)
        return dictionary

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Baseline]:
        return iter(self._entries.values())

    def __contains__(self, task: object) -> bool:
        return task in self._entries

    def __getitem__(self, task: str) -> Baseline:
        if task not in self._entries:
            raise KeyError(f"no baseline {task!r} in {self.root}; it holds {self.names()}")
        return self._entries[task]

    def names(self) -> list[str]:
        return list(self._entries)

    def load_probe(self, task: str) -> nn.Module:
        """Baseline ``task``'s probe, in eval mode, its weights verified against the checksum."""
        s = self.settings
        model = make_probe(s.arch, s.input_shape, s.head_width)
        model.load_state_dict(self._read_probe_state(self[task]))
        return model.eval()

    def add(
        self,
        task: Task,
        *,
        seed: int = 0,
        progress: bool = False,
        replace: bool = False,
        device: torch.device | str = "cpu",
    ) -> Baseline:
        """Train ``task``'s probe, search its best cell with FUSE in the full space, store both.

        ``seed`` seeds the probe; the search's generator is seeded by ``seed`` and the task's
        name together (:func:`task_seed`), so baselines do not share their candidates. The
        search checkpoints each round under ``searches/``, so an interrupted :meth:`add` of the
        same task resumes it. An existing entry of the same name is an error unless ``replace``
        is given. ``device``: where the probe trains and the search runs (files hold CPU
        tensors either way).
        """
        s = self.settings
        if not replace:
            self._refuse_existing(task.name)
        probe = on_main(
            f"training the probe of {task.name!r}", lambda: s.train_probe(task, seed, device)
        )
        slug = file_slug(task.name)
        result = fuse_search(
            SearchSpace.full(s.nodes),
            task.splits().train,
            num_classes=task.num_classes,
            generator=torch.Generator().manual_seed(task_seed(seed, task.name)),
            config=s.fuse,
            checkpoint=self.root / "searches" / f"{slug}.json",
            progress=progress,
            device=device,
        )
        probe_file = f"probes/{slug}.safetensors"
        state = {n: t.detach().cpu().contiguous() for n, t in probe.model.state_dict().items()}
        entry = Baseline(
            task=task.name,
            genotype=result.genotype,
            probe_file=probe_file,
            probe_sha256=state_sha256(state),
            probe=probe.metadata(),
            search=result.to_dict(),
        )
        with locked(self.root):
            self._merge_from_disk()
            if not replace:
                self._refuse_existing(task.name)  # another process may have added it meanwhile
            self._write_probe(probe_file, state)
            self._entries[task.name] = entry
            self._write_index()
        return entry

    def _refuse_existing(self, name: str) -> None:
        if name in self._entries:
            raise DictionaryError(
                f"{self.root} already has a baseline {name!r}; to replace it use "
                + REPLACE_HINT.format(task=shlex.quote(name))
                + ", or add the task under another name"
            )

    def _merge_from_disk(self) -> None:
        """Take in the entries other processes wrote since this dictionary was read (call
        inside :func:`locked`); the settings on disk must still be this dictionary's."""
        if not is_main() or not (self.root / INDEX_FILE).exists():
            return
        settings, entries = _read_index(self.root)
        if settings != self.settings:
            raise DictionaryError(
                f"{self.root / INDEX_FILE} was rewritten with other settings while this "
                "process worked; build into another directory"
            )
        self._entries = {**self._entries, **entries}

    def check_compatible(self, settings: DictionarySettings) -> None:
        """Raise unless this dictionary was built with ``settings`` (to extend it safely)."""
        if settings != self.settings:
            mine, theirs = self.settings.to_dict(), settings.to_dict()
            differ = sorted(k for k in mine if mine[k] != theirs[k])
            raise DictionaryError(
                f"{self.root} was built with other settings ({', '.join(differ)} differ: "
                f"{[mine[k] for k in differ]} there, {[theirs[k] for k in differ]} asked); "
                "build into another directory, or use the same settings"
            )

    def _write_probe(self, relative: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if is_main():
            atomic_write(self.root / relative, lambda tmp: save_file(tensors, str(tmp)))

    def _read_probe_state(self, entry: Baseline) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.root / entry.probe_file
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise DictionaryError(
                f"the probe of baseline {entry.task!r} ({path}) cannot be read "
                f"({type(exc).__name__}: {exc}); re-add it with "
                + REPLACE_HINT.format(task=shlex.quote(entry.task))
                + ", or rebuild the dictionary"
            ) from exc
        if state_sha256(state) != entry.probe_sha256:
            raise DictionaryError(
                f"the probe of baseline {entry.task!r} ({path}) does not match its checksum in "
                f"{self.root / INDEX_FILE}: the file is damaged; re-add it with "
                + REPLACE_HINT.format(task=shlex.quote(entry.task))
                + ", or rebuild the dictionary"
            )
        return state

    def _write_index(self) -> None:
        if not is_main():
            return
        write_json(
            self.root / INDEX_FILE,
            {
                "format": DICTIONARY_FORMAT,
                "version": DICTIONARY_VERSION,
                "fisher_fast": __version__,
                "torch": torch.__version__,
                "settings": self.settings.to_dict(),
                "tasks": [e.to_dict() for e in self._entries.values()],
            },
        )


def build_dictionary(
    root: str | os.PathLike[str],
    tasks: Sequence[Task],
    settings: DictionarySettings,
    *,
    seed: int = 0,
    progress: bool = True,
    replace: Collection[str] = (),
    threads: int | None = None,
    device: torch.device | str = "cpu",
) -> TaskDictionary:
    """Create the dictionary in ``root``, or open it (its settings must be ``settings``), and
    add every task of ``tasks`` it does not hold yet: running it again after an interruption
    finishes the job, and running it on a complete dictionary only verifies it. The tasks
    named in ``replace`` are trained and searched again and their entries replaced (their
    old probes are not verified, so a damaged one can be replaced this way).

    Under torch.distributed, rank 0 opens or creates the dictionary, trains the probes and
    writes the files; every rank takes part in the data-parallel FUSE searches.
    ``threads``: torch's CPU threads meanwhile (default: 1 for the small probes; see
    :mod:`fisher_fast.tasks.threads`). ``device``: where probes train and searches run.
    """
    with probe_threads(settings.arch, threads):
        path = Path(root)

        unknown = sorted(set(replace) - {t.name for t in tasks})
        if unknown:
            raise DictionaryError(
                f"cannot replace {unknown}: not among the tasks being built ({[t.name for t in tasks]})"
            )

        def open_or_create() -> TaskDictionary:
            with locked(path):
                if not (path / INDEX_FILE).exists():
                    dictionary = TaskDictionary(path, settings, {})
                    dictionary._write_index()
                    return dictionary
            dictionary = TaskDictionary.open(path, unverified=replace)
            dictionary.check_compatible(settings)
            return dictionary

        dictionary = on_main(f"opening the task dictionary {path}", open_or_create)
        todo = [t for t in tasks if t.name not in dictionary or t.name in replace]
        quiet = not progress or not todo or not is_main()
        for task in tqdm(todo, desc="baseline tasks", disable=quiet):
            present = on_main("reading the task dictionary", lambda: _refreshed(dictionary))
            if task.name in present and task.name not in replace:
                continue  # another process building into this directory has added it
            try:
                dictionary.add(
                    task,
                    seed=seed,
                    progress=progress,
                    replace=task.name in replace,
                    device=device,
                )
            except DictionaryError:
                if task.name not in dictionary:  # not another process adding it meanwhile
                    raise
        return dictionary


def _refreshed(dictionary: TaskDictionary) -> list[str]:
    """The baselines of ``dictionary`` after taking in what other processes have written."""
    with locked(dictionary.root):
        dictionary._merge_from_disk()
    return dictionary.names()


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the exclusive lock of the dictionary in ``root`` (``root/dictionary.lock``, created
    if needed) for the duration; other processes wait. Only rank 0 writes, so only it locks."""
    if not is_main():
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_index(path: Path) -> tuple[DictionarySettings, dict[str, Baseline]]:
    """The settings and entries of ``path/dictionary.json``, its format and version checked."""
    index = path / INDEX_FILE
    if not index.exists():
        raise DictionaryError(
            f"no task dictionary in {path} ({INDEX_FILE} is missing); build one with "
            "`fisher-fast dictionary build`"
        )
    try:
        data = json.loads(index.read_text())
        fmt, version = data["format"], data["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DictionaryError(
            f"{index} is not a readable task dictionary ({type(exc).__name__}: {exc}); it is "
            "damaged: restore it from a copy or build the dictionary again in a new directory"
        ) from exc
    if fmt != DICTIONARY_FORMAT:
        raise DictionaryError(f"{index} is not a task dictionary (format {fmt!r})")
    _check_version(index, version)
    try:
        settings = DictionarySettings.from_dict(data["settings"])
        entries = {e["task"]: Baseline.from_dict(e) for e in data["tasks"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise DictionaryError(
            f"{index} has a malformed field ({type(exc).__name__}: {exc}); it is damaged: "
            "restore it from a copy or build the dictionary again in a new directory"
        ) from exc
    return settings, entries


def _check_version(index: Path, version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise DictionaryError(
            f"{index} has format version {version!r}, a {type(version).__name__}, where a whole "
            f'number is written (this fisher_fast writes "version": {DICTIONARY_VERSION}); '
            "the file was edited or written by another tool: restore it from a copy, or set "
            "the number"
        )
    if version != DICTIONARY_VERSION:
        raise DictionaryError(
            f"{index} has format version {version}; this fisher_fast "
            f"({__version__}) reads version {DICTIONARY_VERSION}: use the "
            "fisher_fast version that wrote it, or build the dictionary again"
        )


def task_seed(seed: int, name: str) -> int:
    """A 62-bit seed for one task's search, from the run's ``seed`` and the task's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 2


def file_slug(name: str) -> str:
    """A file-name-safe, collision-free form of a task name (readable part + short hash)."""
    readable = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "task"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
