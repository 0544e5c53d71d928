"""Config sections every plane shares. Each plane subclasses them to set its own defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from plait.user_code import is_reference


@dataclass(kw_only=True, slots=True)
class RunSection:
    """`[run]`: the run directory `root/name`, the seed, and torch threads per process."""

    name: str = "run"
    root: str = "runs"
    seed: int = 0
    threads: int = 0            # torch threads per process (0: torch's default)
    tensorboard: bool = True    # also write TensorBoard event files to the run's tb/ (metrics.jsonl and .csv always)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        if self.threads < 0:
            raise ValueError(f"run.threads must be >= 0, got {self.threads}")


@dataclass(kw_only=True, slots=True)
class ModelSection:
    """`[model]`: a built-in preset by `name`, or the user's own model: `factory = "package.module:make_model"`
    (or `"file.py:make_model"`), called with `options` as keywords. `model = "pkg.mod:make_model"` is short for
    `[model] factory = ...`. Each plane narrows `name` to its presets; `plait.user_model.build_model` builds it."""

    SHORTHAND: ClassVar[str] = "factory"
    name: str = ""
    factory: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.factory and not is_reference(self.factory):
            raise ValueError(f"model.factory = {self.factory!r} must look like 'package.module:name' or "
                             "'file.py:name'")

    @property
    def label(self) -> str:
        """What names the model to a person (and to a client checking it trains the server's model)."""
        return self.factory or self.name


@dataclass(kw_only=True, slots=True)
class ImageModelSection(ModelSection):
    """`[model]` of the cluster planes (data parallel, parameter server): a FedAvg-paper image model, or the user's
    own (`factory`)."""

    name: Literal["2nn", "cnn"] = "2nn"


@dataclass(kw_only=True, slots=True)
class UserDataSection:
    """The cluster planes' `[data]` keys for the user's own data: `source` (see data/user.py: a loader reference,
    a .npz file, or a folder of per-client files, pooled into one training set) and `test_path` (a .npz test set;
    without it the source's own test split, if it has one, else no test metrics). `data = "pkg:load"` is short for
    `[data] source = ...`."""

    SHORTHAND: ClassVar[str] = "source"
    source: str = ""            # the user's own data (overrides name)
    test_path: str = ""         # a .npz with x and y to test on (overrides the source's own test split)

    def __post_init__(self) -> None:
        if self.test_path and not self.source:
            raise ValueError("data.test_path goes with data.source (a built-in data set brings its own test split)")


TaskName = Literal["classification", "regression"]  # train.task: cross-entropy on class labels, or MSE on float targets
