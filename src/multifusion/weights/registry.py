"""Merge methods, registered by a decorator and found by name (as sd-mecha's `@merge_method`).

A merge method is a pure function of tensors. Its signature is its contract:

- positional parameters annotated `Tensor` are models, in order (`a, b`, or `base`), and
  `*models: Tensor` takes any number more;
- keyword-only parameters are hyper-parameters, with defaults; `Annotated[float, Range(...)]`
  declares the range a value must lie in, `Annotated[..., Rule(fn)]` any other check;
- a keyword-only `generator: torch.Generator | None` marks a random method: the spec then takes
  an integer `merge_seed` (default 0; `seed` is the sampling seed) and the caller gives each tensor a generator seeded from it.

`MergeMethod.check` validates hyper-parameters and the model count from that signature alone,
before any tensor is read; every error names the field at fault (`MergeSpecError.field`). The
built-ins are registered in `multifusion.weights.merge` (listed in `BUILTIN`); a method added
from outside is one decorated function.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch

from multifusion.errors import RecipeError, did_you_mean

Tensor = torch.Tensor
BUILTIN = ("weighted_sum", "add_difference", "ties", "dare", "dare_ties", "model_stock", "slerp", "geometric_median")


class MergeSpecError(RecipeError):
    """A merge's method, hyper-parameter or model count is wrong; `field` names the one at fault.
    `plain`, when given, is how a whole-model merge words it (naming the field in the sentence,
    as `merge_models` always has: "3 weights for 2 models")."""

    def __init__(self, field: str, message: str | None = None, plain: str | None = None):
        if message is None:  # re-raised with a location prefixed (`type(err)(f"where: {err}")`)
            super().__init__(field)
            self.field, self.message, self.plain = "", field, field
            return
        super().__init__(plain or f"{field}: {message}")
        self.field, self.message, self.plain = field, message, plain

    def at(self, where: str) -> str:
        """The error located under `where` (`merges.NAME`): `where.field: message`."""
        return f"{where}: {self}" if self.plain else f"{where}.{self.field}: {self.message}"


@dataclass(frozen=True)
class Range:
    """A number's range: lo <(=) value <(=) hi (None: unbounded); always finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        if self.lo is None and self.hi is None:
            return "any finite number"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def interval(self) -> str:
        lo = "(-inf" if self.lo is None else f"{'(' if self.lo_open else '['}{self.lo:g}"
        hi = "inf)" if self.hi is None else f"{self.hi:g}{')' if self.hi_open else ']'}"
        return f"{lo}, {hi}"

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        v = float(value)
        ok = math.isfinite(v)
        if ok and self.lo is not None:
            ok = v > self.lo if self.lo_open else v >= self.lo
        if ok and self.hi is not None:
            ok = v < self.hi if self.hi_open else v <= self.hi
        bounded = self.lo is not None or self.hi is not None
        return None if ok else f"{value!r} is not a finite number" + (f" {self}" if bounded else "")


@dataclass(frozen=True)
class Rule:
    """Any other check of a hyper-parameter: `fn(value, n_models) -> problem or None`."""

    fn: Callable[[Any, int | None], str | None]


@dataclass(frozen=True)
class PerModel:
    """A list with one value per model (in the order the models are named)."""


@dataclass(frozen=True)
class Hyper:
    name: str
    default: Any
    range: Range | None = None
    rule: Rule | None = None
    integer: bool = False
    per_model: bool = False

    def problem(self, value, n_models: int | None) -> str | None:
        if value is None and self.default is None:
            return None
        if self.integer and (isinstance(value, bool) or not isinstance(value, int)):
            if not (isinstance(value, float) and value.is_integer()):
                return f"{value!r} is not an integer"
        if self.range is not None and (p := self.range.problem(value)):
            return p
        return self.rule.fn(value, n_models) if self.rule is not None else None


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the function and what its signature declares.

    `ratio` names the hyper-parameter block weights set per block (None: the method takes no
    block weights); `block_models` the model count a block-weighted merge needs, if fixed;
    `block_ratio` turns a block weight into that hyper-parameter's value."""

    name: str
    fn: Callable[..., Tensor]
    models: tuple[str, ...]  # the named model parameters
    variadic: bool  # takes *models
    min_models: int
    hypers: Mapping[str, Hyper]
    random: bool
    ratio: str | None = None
    block_models: int | None = None
    block_ratio: Callable[[float], Any] | None = None
    notes: Mapping[str, str] = field(default_factory=dict)  # what to say for a hyper-parameter it does not take
    doc: str = field(default="", compare=False)

    @property
    def max_models(self) -> int | None:
        return None if self.variadic else len(self.models)

    def ratio_range(self) -> Range | None:
        """The range a block weight must lie in: the ratio hyper-parameter's."""
        if self.ratio is None:
            return None
        return Range(0, 1) if self.block_ratio is not None else self.hypers[self.ratio].range

    def check(self, hyper: Mapping[str, Any], n_models: int | None = None, *, blocks: bool = False) -> dict[str, Any]:
        """The hyper-parameters with defaults filled in, checked against the signature (and the
        model count when known). MergeSpecError naming the field."""
        for name in hyper:
            if name not in self.hypers and name in self.notes:
                raise MergeSpecError(name, self.notes[name], self.notes[name])
            if name not in self.hypers:
                takes = ", ".join(f"`{h}`" for h in self.hypers) or "no hyper-parameters"
                raise MergeSpecError(name, f"{self.name} takes {takes}, not `{name}`{did_you_mean(name, self.hypers)}")
        if blocks and self.ratio is None:
            raise MergeSpecError("blocks", f"{self.name} has no ratio to set per block; block weights apply to {_with_ratio()}")
        if blocks and self.ratio in hyper and hyper[self.ratio] is not None:
            raise MergeSpecError(
                "blocks", f"give either block weights (`blocks`) or a single weighting (`{self.ratio}`), not both"
            )
        out = {}
        for name, h in self.hypers.items():
            value = hyper.get(name, h.default)
            problem = h.problem(value, n_models)
            if problem:
                raise MergeSpecError(name, problem)
            if h.per_model and value is not None and n_models is not None and len(value) != n_models:
                raise MergeSpecError(
                    name,
                    f"has {len(value)} entries for {n_models} models; give one per model, in the order of `models`",
                    f"{len(value)} {name} for {n_models} models; give one per model, in the order the models are named",
                )
            out[name] = int(value) if h.integer and value is not None else value
        if n_models is not None:
            problem = self.count_problem(n_models, blocks)
            if problem:
                raise MergeSpecError("method", problem, problem)
        return out

    def count_problem(self, n: int, blocks: bool = False) -> str | None:
        if blocks and self.block_models is not None and n != self.block_models:
            return f"a block-weighted {self.name.removeprefix('weighted_').replace('_', ' ')} merges {_count(self.block_models)} models, got {n}"
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = _count(self.min_models) if self.min_models == self.max_models else f"at least {self.min_models}"
            if self.max_models is not None and self.max_models != self.min_models:
                want = f"{self.min_models} to {self.max_models}"
            who = f" ({', '.join(self.models)}{', ...' if self.variadic else ''})" if self.models else ""
            return f"{self.name} merges {want} models{who}, got {n}"
        return None

    def __call__(self, tensors: Sequence[Tensor], hyper: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
        kwargs = {k: v for k, v in hyper.items() if k != "merge_seed"}
        if self.random:
            kwargs["generator"] = generator
        return self.fn(*tensors, **kwargs)


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    fn: Callable | None = None,
    *,
    name: str | None = None,
    ratio: str | None = None,
    min_models: int | None = None,
    block_models: int | None = None,
    block_ratio: Callable[[float], Any] | None = None,
    notes: Mapping[str, str] | None = None,
):
    """Register `fn` as a merge method (usable bare, `@merge_method`, or with options): its
    models and hyper-parameters are read from its signature (module docstring)."""

    def register(f: Callable) -> Callable:
        key = name or f.__name__.lstrip("_")
        hints = typing.get_type_hints(f, include_extras=True)
        models, variadic, hypers, random = [], False, {}, False
        for p in inspect.signature(f).parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                models.append(p.name)
            elif p.kind == p.VAR_POSITIONAL:
                variadic = True
            elif p.kind == p.KEYWORD_ONLY and p.name == "generator":
                random = True
            elif p.kind == p.KEYWORD_ONLY:
                if p.default is p.empty:
                    raise TypeError(f"merge method {key}: hyper-parameter {p.name!r} needs a default")
                rng = rule = None
                hint = hints.get(p.name)
                metas = getattr(hint, "__metadata__", ())
                for meta in metas:
                    rng = meta if isinstance(meta, Range) else rng
                    rule = meta if isinstance(meta, Rule) else rule
                base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
                per_model = any(isinstance(m, PerModel) for m in metas)
                hypers[p.name] = Hyper(p.name, p.default, rng, rule, integer=base is int, per_model=per_model)
            else:
                raise TypeError(f"merge method {key}: unsupported parameter {p.name!r} (**kwargs)")
        if random:
            hypers["merge_seed"] = Hyper("merge_seed", 0, Range(0, None), integer=True)
        if ratio is not None and ratio not in hypers:
            raise TypeError(f"merge method {key}: ratio {ratio!r} is not one of its hyper-parameters")
        MERGE_METHODS[key] = MergeMethod(
            key,
            f,
            tuple(models),
            variadic,
            min_models if min_models is not None else len(models) + (1 if variadic else 0),
            hypers,
            random,
            ratio,
            block_models,
            block_ratio,
            dict(notes or {}),
            inspect.getdoc(f) or "",
        )
        return f

    return register(fn) if fn is not None else register


def get_merge_method(name: str, field: str = "method") -> MergeMethod:
    """The registered method `name`; MergeSpecError naming `field`, with "did you mean"."""
    if name not in MERGE_METHODS:
        raise MergeSpecError(
            field, f"unknown merge method {name!r} (known: {', '.join(MERGE_METHODS)}){did_you_mean(name, MERGE_METHODS)}"
        )
    return MERGE_METHODS[name]


def _with_ratio() -> str:
    return ", ".join(f"{m.name} ({m.ratio})" for m in MERGE_METHODS.values() if m.ratio is not None)


def _count(n: int) -> str:
    return {1: "one", 2: "two", 3: "three"}.get(n, str(n))
