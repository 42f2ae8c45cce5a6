"""Pipeline configuration: YAML validated by pydantic.

Every error names the file and the dotted field, e.g.
``configs/demo.yaml: stages.generate.params.temprature: unknown key``.
Relative paths inside a config are relative to the working directory;
``include:`` paths are relative to the including file.

Experiment matrices: a top-level ``matrix: {axis: [values]}`` and a stage's
``matrix: [axes]`` expand that stage into one stage per combination, named
``stage[axis=value,...]`` (axes in alphabetical order). In its params and input
wirings, ``"{axis}"`` is replaced by the combination's value (a string that is exactly
``"{axis}"`` takes the value's YAML type; inside a longer string, its text). An input
wired to an expanded stage takes the variant with the same values on that stage's axes,
so the wiring stage must be expanded over them too; an input the stage kind declares
in ``variadic_inputs`` instead takes every variant (those agreeing on shared axes), each
as its own input named ``input[axis=value,...]`` (``parse_variant`` reads the values back).
A wiring may also name one variant, ``stage[axis=value,...].output``.
"""
from __future__ import annotations

import graphlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core import registry
from pipeline.core.stage import Passthrough, Stage, column_problems, missing_modules, schema_columns
from pipeline.sizing import hub
from pipeline.sizing.assumptions import EstimateSpec
from pipeline.store.layout import default_root


class ConfigError(Exception):
    """Invalid configuration. ``problems`` are ready-to-print lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field(default_factory=default_root,
                      description="local folder or s3://bucket/prefix (default: $DISTILL_ROOT, else .distill)")


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="Ray address; none starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all)")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uses: str | None = Field(None, description="stage kind; defaults to the stage's name")
    inputs: dict[str, str] = Field(default_factory=dict, description="input -> 'stage' or 'stage.output'")
    params: dict[str, Any] = Field(default_factory=dict, description="the stage's own params; Ray resources are params too")
    matrix: list[str] = Field(default_factory=list, description="axes of the pipeline's matrix: one stage per combination")


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    include: list[str] = Field(default_factory=list)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    matrix: dict[str, list[Any]] = Field(default_factory=dict, description="axis -> values, for stages' matrix:")
    stages: dict[str, StageSpec]
    estimate: dict[str, Any] | None = Field(None, description="assumptions of `distill plan --estimate` "
                                                "(pipeline.sizing.assumptions.EstimateSpec)")


@dataclass
class StageNode:
    name: str
    cls: type[Stage]
    stage: Stage
    spec: StageSpec
    origin: str  # the file that defined it
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # input -> (stage, output)
    base: str = ""  # the config's stage name this node was expanded from (its own name if not expanded)
    variant: dict[str, Any] = field(default_factory=dict)  # matrix axis -> value of this expansion


@dataclass
class PipelineConfig:
    name: str
    path: str
    storage: StorageConfig
    ray: RayConfig
    nodes: dict[str, StageNode]
    raw: dict
    matrix: dict[str, list[Any]] = field(default_factory=dict)

    def order(self) -> list[str]:
        """Stage names in dependency order (ties broken by config order)."""
        done: list[str] = []
        seen: set[str] = set()

        def visit(n: str) -> None:
            if n in seen:
                return
            seen.add(n)
            for up, _ in self.nodes[n].inputs.values():
                visit(up)
            done.append(n)

        for n in self.nodes:
            visit(n)
        return done


def _loc(loc: tuple) -> str:
    return ".".join(str(x) for x in loc)


def _pyd_problems(err: ValidationError, file: str, prefix: str = "") -> list[str]:
    out = []
    for e in err.errors():
        where = _loc(tuple(x for x in (prefix, *e["loc"]) if x != ""))
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] not in ("extra_forbidden", "missing") and "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        out.append(f"{file}: {where}: {msg}")
    return out


def parse_set(items: list[str] | None) -> list[tuple[list[str], Any]]:
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {item!r}: expected a.b.c=value"])
        out.append((key.split("."), yaml.safe_load(value) if value != "" else "")),
    return out


def _apply_set(raw: dict, overrides: list[tuple[list[str], Any]], file: str) -> None:
    for keys, value in overrides:
        node = raw
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError([f"{file}: --set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a mapping"])
            node = nxt
        node[keys[-1]] = value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: invalid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return raw


def _collect(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Raw config with included stages merged in, and which file defined each stage."""
    path = path.resolve()
    if path in chain:
        raise ConfigError([f"{path}: include cycle: {' -> '.join(map(str, (*chain, path)))}"])
    raw = _read_yaml(path)
    stages: dict[str, Any] = {}
    origins: dict[str, str] = {}
    matrix: dict[str, Any] = {}
    includes = raw.get("include") or []
    if not isinstance(includes, list):
        raise ConfigError([f"{path}: include: must be a list of files"])
    for inc in includes:
        inc_raw, inc_origins = _collect((path.parent / str(inc)), (*chain, path))
        stages.update(inc_raw.get("stages") or {})
        origins.update(inc_origins)
        if isinstance(inc_raw.get("matrix"), dict):
            matrix.update(inc_raw["matrix"])
    own = raw.get("stages")
    if isinstance(own, dict):
        for k, v in own.items():
            stages[k] = v
            origins[k] = str(path)
    raw = dict(raw)
    if matrix and (isinstance(raw.get("matrix"), dict) or raw.get("matrix") is None):
        raw["matrix"] = {**matrix, **(raw.get("matrix") or {})}  # the including file's axes win
    if own is not None and not isinstance(own, dict):
        raw["stages"] = own  # let pydantic report the type error
    else:
        raw["stages"] = stages
    return raw, origins


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, include, override, validate and wire a pipeline config; every problem found is in
    one :class:`ConfigError`, each naming its file and field."""
    file = str(path)
    raw, origins = _collect(Path(path))
    _apply_set(raw, parse_set(overrides), file)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_pyd_problems(e, file)) from e

    variants, by_base, problems = _expand(spec, origins, file)
    if spec.estimate is not None:
        try:
            EstimateSpec.model_validate(spec.estimate)
        except ValidationError as e:
            problems.extend(_pyd_problems(e, file, "estimate"))
    if problems:
        raise ConfigError(problems)
    nodes = _build_nodes(variants, origins, file, problems)
    for node in nodes.values():
        _wire(node, nodes, spec, variants, by_base, problems)
        _check_node(node, problems)
    if not problems:
        cycle = _find_cycle(nodes)
        if cycle:
            problems.append(f"{file}: stages: dependency cycle: {' -> '.join(cycle)}")
    if problems:
        raise ConfigError(problems)
    cfg = PipelineConfig(spec.name, file, spec.storage, spec.ray, nodes, raw, spec.matrix)
    problems = wiring_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _build_nodes(variants: dict, origins: dict, file: str, problems: list[str]) -> dict[str, StageNode]:
    """A node per stage variant: its registered class and validated params (problems noted)."""
    nodes: dict[str, StageNode] = {}
    for name, (base, combo, sspec) in variants.items():
        origin = _display(origins.get(base, file))
        kind = sspec.uses or base
        try:
            cls = registry.load(kind)
        except (KeyError, ImportError, AttributeError) as e:
            msg = f"{origin}: stages.{base}.uses: {e.args[0] if e.args else e}"
            if msg not in problems:  # once for all the variants of a stage
                problems.append(msg)
            continue
        missing = missing_modules(cls.requires)
        if missing:
            msg = (f"{origin}: stages.{base}.uses: stage kind {cls.kind!r} needs {', '.join(missing)}, which cannot "
                   f"be imported here; install it (this project: pip install -e '.[cpu]', or '.[gpu]' on GPUs)")
            if msg not in problems:
                problems.append(msg)
            continue
        try:
            params = cls.Params.model_validate(hub.normalize_params(sspec.params))  # {repo, revision} -> hf://
        except ValidationError as e:
            problems.extend(_pyd_problems(e, origin, f"stages.{name}.params"))
            continue
        nodes[name] = StageNode(name, cls, cls(name, params), sspec, origin, base=base, variant=combo)
    return nodes


def _wire(node: StageNode, nodes: dict[str, StageNode], spec: PipelineSpec, variants: dict, by_base: dict,
          problems: list[str]) -> None:
    """Resolve each of the node's configured inputs to an upstream (stage, output) of the right type."""
    declared = node.cls.inputs
    for inp, ref in node.spec.inputs.items():
        where = f"{node.origin}: stages.{node.name}.inputs.{inp}"
        if inp not in declared:
            problems.append(f"{where}: unknown input (stage kind {node.cls.kind!r} takes: {', '.join(declared) or 'none'})")
            continue
        targets = _targets(ref, inp, node, spec, variants, by_base, inp in node.cls.variadic_inputs)
        if isinstance(targets, str):
            problems.append(f"{where}: {targets}")
            continue
        for key, up, out in targets:
            if up not in nodes:
                continue  # already reported
            up_outputs = nodes[up].cls.outputs
            if not out:
                if len(up_outputs) != 1:
                    problems.append(f"{where}: stage {up!r} has outputs {', '.join(up_outputs)}; name one as {up}.OUTPUT")
                    continue
                out = next(iter(up_outputs))
            if out not in up_outputs:
                problems.append(f"{where}: stage {up!r} has no output {out!r} (it has: {', '.join(up_outputs)})")
                continue
            if up_outputs[out] != declared[inp]:
                problems.append(f"{where}: expects a {declared[inp]}, but {up}.{out} is a {up_outputs[out]}")
                continue
            node.inputs[key] = (up, out)


def _check_node(node: StageNode, problems: list[str]) -> None:
    """Required inputs wired, and the stage's own checks of its params (and of its variadic inputs)."""
    declared = node.cls.inputs
    for inp in declared:
        if inp not in node.spec.inputs and inp not in node.cls.optional_inputs and not _satisfied_by_params(node, inp):
            problems.append(f"{node.origin}: stages.{node.name}.inputs.{inp}: required input is not wired")
    for fld, msg in node.stage.check():
        problems.append(f"{node.origin}: stages.{node.name}.params.{fld}: {msg}")
    if node.cls.variadic_inputs and not problems:
        for fld, msg in node.stage.check_variants(list(node.inputs)):
            section = "inputs" if fld in declared else "params"
            problems.append(f"{node.origin}: stages.{node.name}.{section}.{fld}: {msg}")


def wiring_problems(cfg: PipelineConfig) -> list[str]:
    """Every wired dataset against the columns its reader declares it needs (``Stage.needs``),
    with each output's columns from its writer's declaration (``Stage.produces``), in
    dependency order. An output whose writer declares nothing is not checked."""
    known: dict[tuple[str, str], dict | None] = {}
    problems = []
    for name in cfg.order():
        node = cfg.nodes[name]
        needs = node.stage.needs()
        for inp, (up, out) in node.inputs.items():
            have = known.get((up, out))
            need = needs.get(input_base(inp))
            if have is None or not need:
                continue
            for msg in column_problems(need, have):
                problems.append(f"{node.origin}: stages.{name}.inputs.{inp}: {up}.{out}: {msg} "
                                f"(stage {name!r}, kind {node.cls.kind!r})")
        for out, declared in node.stage.produces().items():
            if isinstance(declared, Passthrough):
                src = node.inputs.get(declared.input)
                base = known.get(src) if src else None
                known[(name, out)] = None if base is None else {**base, **schema_columns(declared.added)}
            elif declared is not None:
                known[(name, out)] = schema_columns(declared)
    return problems


# -- experiment matrices -----------------------------------------------------------------------

_AXIS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"[A-Za-z0-9_.+-]+")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REF = re.compile(r"([^.\[\]]+(?:\[[^\]]*\])?)(?:\.([^.\[\]]+))?")


def value_label(value: Any) -> str:
    """A matrix value as it appears in names and inside longer strings (booleans as YAML writes them)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def variant_label(combo: dict[str, Any]) -> str:
    return ",".join(f"{k}={value_label(v)}" for k, v in sorted(combo.items()))


def variant_name(base: str, combo: dict[str, Any]) -> str:
    """``base[axis=value,...]`` (axes in alphabetical order), or ``base`` for no axes."""
    return f"{base}[{variant_label(combo)}]" if combo else base


def parse_variant(name: str) -> tuple[str, dict[str, str]]:
    """``("base", {axis: value label})`` from a variant's stage or input name."""
    base, sep, rest = name.partition("[")
    if not sep:
        return name, {}
    pairs = [p.partition("=") for p in rest.rstrip("]").split(",") if p]
    return base, {k: v for k, _, v in pairs}


def input_base(key: str) -> str:
    """The declared input a wired input key belongs to (``runs[seed=0]`` -> ``runs``)."""
    return key.partition("[")[0]


class _SubstError(Exception):
    pass


def _substitute(value: Any, combo: dict[str, Any], axes: dict[str, list], where: str) -> Any:
    """``value`` with ``{axis}`` placeholders of the pipeline's matrix replaced by ``combo``'s values."""
    if isinstance(value, dict):
        return {k: _substitute(v, combo, axes, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, combo, axes, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    for axis in _PLACEHOLDER.findall(value):
        if axis in axes and axis not in combo:
            raise _SubstError(f"{where}: {{{axis}}} names matrix axis {axis!r}, but the stage is not expanded over it "
                              f"(add it to the stage's matrix: list)")
    whole = _PLACEHOLDER.fullmatch(value)
    if whole and whole.group(1) in combo:
        return combo[whole.group(1)]
    return _PLACEHOLDER.sub(lambda m: value_label(combo[m.group(1)]) if m.group(1) in combo else m.group(0), value)


def _expand(spec: PipelineSpec, origins: dict[str, str], file: str):
    """Every stage of the config, matrix stages expanded: ``{name: (base, combo, spec)}``, the
    names each config stage became, and the problems found."""
    problems: list[str] = []
    matrix = spec.matrix
    for axis, values in matrix.items():
        if not _AXIS.fullmatch(axis):
            problems.append(f"{file}: matrix.{axis}: an axis name is a word (letters, digits, _)")
        if not values:
            problems.append(f"{file}: matrix.{axis}: needs at least one value")
        seen: set[str] = set()
        for i, v in enumerate(values):
            if v is None or not isinstance(v, (str, int, float, bool)):
                problems.append(f"{file}: matrix.{axis}[{i}]: a value is a string, number or boolean (got {v!r})")
            elif not _LABEL.fullmatch(value_label(v)):
                problems.append(f"{file}: matrix.{axis}[{i}]: {v!r}: a value may use letters, digits, '_', '.', '+', '-'")
            elif value_label(v) in seen:
                problems.append(f"{file}: matrix.{axis}[{i}]: {v!r} is listed twice")
            else:
                seen.add(value_label(v))
    if problems:
        return {}, {}, problems
    variants: dict[str, tuple[str, dict, StageSpec]] = {}
    by_base: dict[str, list[str]] = {}
    for name, s in spec.stages.items():
        origin = _display(origins.get(name, file))
        unknown = [a for a in s.matrix if a not in matrix]
        if unknown:
            problems.append(f"{origin}: stages.{name}.matrix: unknown axis {unknown[0]!r} "
                            f"(the pipeline's matrix: has {', '.join(matrix) or 'none'})")
            continue
        if len(set(s.matrix)) != len(s.matrix):
            problems.append(f"{origin}: stages.{name}.matrix: an axis is listed twice")
            continue
        by_base[name] = []
        for values in itertools.product(*(matrix[a] for a in s.matrix)):
            combo = dict(zip(s.matrix, values))
            vname = variant_name(name, combo)
            try:
                params = _substitute(s.params, combo, matrix, f"stages.{name}.params")
                inputs = {k: _substitute(v, combo, matrix, f"stages.{name}.inputs.{k}") for k, v in s.inputs.items()}
            except _SubstError as e:
                problems.append(f"{origin}: {e}")
                break
            if not all(isinstance(v, str) for v in inputs.values()):
                bad = next(k for k, v in inputs.items() if not isinstance(v, str))
                problems.append(f"{origin}: stages.{name}.inputs.{bad}: a wiring is 'stage' or 'stage.output' "
                                f"(got {inputs[bad]!r})")
                break
            if vname in variants or (vname != name and vname in spec.stages):
                problems.append(f"{origin}: stages.{name}: expands to {vname!r}, which is also a stage's name")
                break
            variants[vname] = (name, combo, s.model_copy(update={"params": params, "inputs": inputs}))
            by_base[name].append(vname)
    return variants, by_base, problems


def _targets(ref: str, inp: str, node: StageNode, spec: PipelineSpec, variants: dict,
             by_base: dict[str, list[str]], variadic: bool) -> list[tuple[str, str, str]] | str:
    """The (input key, stage, output) wirings ``ref`` stands for at input ``inp`` of ``node``,
    or why it is wrong. A variadic input's key carries the variant: ``inp[axis=value,...]``."""
    def key(up: str) -> str:
        combo = variants[up][1] if up in variants else {}
        return variant_name(inp, combo) if variadic else inp

    m = _REF.fullmatch(ref)
    up, out = (m.group(1), m.group(2) or "") if m else (ref.partition(".")[0], "")
    if up in by_base:  # a stage of the config (expanded or not)
        axes = spec.stages[up].matrix
        if not axes:
            return [(key(up), up, out)]
        own = node.variant
        missing = [a for a in axes if a not in own]
        if not missing:
            picked = [variant_name(up, {a: own[a] for a in axes})]
        elif variadic:
            picked = [v for v in by_base[up]
                      if all(value_label(variants[v][1][a]) == value_label(own[a]) for a in axes if a in own)]
        else:
            return (f"stage {up!r} is expanded over matrix axes {', '.join(axes)}, but stage {node.base!r} is not "
                    f"expanded over {', '.join(missing)}: add them to its matrix:, wire it to an input that takes "
                    f"every variant, or name one ({variant_name(up, {a: spec.matrix[a][0] for a in axes})})")
        return [(key(v), v, out) for v in picked]
    if up in variants:  # one variant, named
        return [(key(up), up, out)]
    if m is None or up not in spec.stages:
        return f"no stage named {up!r}"
    return []  # the stage failed to expand (already reported)


def _satisfied_by_params(node: StageNode, inp: str) -> bool:
    """An input may be given as a param of the same name instead (e.g. a model path)."""
    return getattr(node.stage.params, inp, None) is not None


def _display(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _find_cycle(nodes: dict[str, StageNode]) -> list[str] | None:
    """A dependency cycle among ``nodes`` (its stage names, the first repeated last), or None."""
    graph = {n: [up for up, _ in node.inputs.values()] for n, node in nodes.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(reversed(e.args[1]))  # graphlib lists each node before the one it depends on
    return None
