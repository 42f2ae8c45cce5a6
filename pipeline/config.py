"""Pipeline configuration: YAML validated by pydantic.

Every error names the file and the dotted field, e.g.
``configs/demo.yaml: stages.generate.params.temprature: unknown key``.
Relative paths inside a config are relative to the working directory;
``include:`` paths are relative to the including file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import registry
from .stage import Passthrough, Stage, column_problems, schema_columns


class ConfigError(Exception):
    """Invalid configuration. ``problems`` are ready-to-print lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field(".distill", description="local folder or s3://bucket/prefix")


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="Ray address; none starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all)")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uses: str | None = Field(None, description="stage kind; defaults to the stage's name")
    inputs: dict[str, str] = Field(default_factory=dict, description="input -> 'stage' or 'stage.output'")
    params: dict[str, Any] = Field(default_factory=dict, description="the stage's own params; Ray resources are params too")


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    include: list[str] = Field(default_factory=list)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    stages: dict[str, StageSpec]


@dataclass
class StageNode:
    name: str
    cls: type[Stage]
    stage: Stage
    spec: StageSpec
    origin: str  # the file that defined it
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # input -> (stage, output)


@dataclass
class PipelineConfig:
    name: str
    path: str
    storage: StorageConfig
    ray: RayConfig
    nodes: dict[str, StageNode]
    raw: dict

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
    includes = raw.get("include") or []
    if not isinstance(includes, list):
        raise ConfigError([f"{path}: include: must be a list of files"])
    for inc in includes:
        inc_raw, inc_origins = _collect((path.parent / str(inc)), (*chain, path))
        stages.update(inc_raw.get("stages") or {})
        origins.update(inc_origins)
    own = raw.get("stages")
    if isinstance(own, dict):
        for k, v in own.items():
            stages[k] = v
            origins[k] = str(path)
    raw = dict(raw)
    if own is not None and not isinstance(own, dict):
        raw["stages"] = own  # let pydantic report the type error
    else:
        raw["stages"] = stages
    return raw, origins


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    file = str(path)
    raw, origins = _collect(Path(path))
    _apply_set(raw, parse_set(overrides), file)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_pyd_problems(e, file)) from e

    problems: list[str] = []
    nodes: dict[str, StageNode] = {}
    for name, sspec in spec.stages.items():
        origin = _display(origins.get(name, file))
        kind = sspec.uses or name
        try:
            cls = registry.load(kind)
        except (KeyError, ImportError, AttributeError) as e:
            problems.append(f"{origin}: stages.{name}.uses: {e.args[0] if e.args else e}")
            continue
        try:
            params = cls.Params.model_validate(sspec.params)
        except ValidationError as e:
            problems.extend(_pyd_problems(e, origin, f"stages.{name}.params"))
            continue
        nodes[name] = StageNode(name, cls, cls(name, params), sspec, origin)

    for name, node in nodes.items():
        declared = node.cls.inputs
        for inp, ref in node.spec.inputs.items():
            where = f"{node.origin}: stages.{name}.inputs.{inp}"
            if inp not in declared:
                problems.append(f"{where}: unknown input (stage kind {node.cls.kind!r} takes: {', '.join(declared) or 'none'})")
                continue
            up, _, out = ref.partition(".")
            if up not in spec.stages:
                problems.append(f"{where}: no stage named {up!r}")
                continue
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
            node.inputs[inp] = (up, out)
        for inp in declared:
            if inp not in node.spec.inputs and inp not in node.cls.optional_inputs and not _satisfied_by_params(node, inp):
                problems.append(f"{node.origin}: stages.{name}.inputs.{inp}: required input is not wired")
        for fld, msg in node.stage.check():
            problems.append(f"{node.origin}: stages.{name}.params.{fld}: {msg}")

    if not problems:
        cycle = _find_cycle(nodes)
        if cycle:
            problems.append(f"{file}: stages: dependency cycle: {' -> '.join(cycle)}")
    if problems:
        raise ConfigError(problems)
    cfg = PipelineConfig(spec.name, file, spec.storage, spec.ray, nodes, raw)
    problems = wiring_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


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
            if have is None or not needs.get(inp):
                continue
            for msg in column_problems(needs[inp], have):
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


def _satisfied_by_params(node: StageNode, inp: str) -> bool:
    """An input may be given as a param of the same name instead (e.g. a model path)."""
    return getattr(node.stage.params, inp, None) is not None


def _display(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _find_cycle(nodes: dict[str, StageNode]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for up, _ in nodes[n].inputs.values():
            if state.get(up) == 1:
                return stack[stack.index(up):] + [up]
            if up not in state:
                found = dfs(up)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in nodes:
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None
