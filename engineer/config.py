"""Configuration from stacked YAML files and command-line overrides.

A configuration has four groups, `trainer`, `optimizer`, `dataset` and `model`, and a run
`seed`. Each group names the class (or function) it builds with `module:`; its other keys are
that constructor's keyword arguments, checked against its signature and converted to the
annotated types. Sources are applied in order, later ones winning:

1. the experiment's default files, 2. each `-C file.yaml` in the order given,
3. `--group.key=value` and `--seed=N` on the command line.

A file that names a different `module:` for a group starts that group afresh. Only classes and
functions defined in the project's packages or in `torch.optim` can be named, so a
configuration file cannot import or call anything else.
"""

import collections.abc
import copy
import importlib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

GROUPS = ("trainer", "optimizer", "dataset", "model")
ALLOWED_PACKAGES = ("models", "data", "engineer", "loggers", "torch.optim")

# Arguments the runner supplies itself; a configuration may not set them.
SUPPLIED = {"dataset": {"seed"}, "optimizer": {"params"}, "trainer": set(), "model": set()}

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class ConfigError(Exception):
    """A configuration is wrong; the message names the key or file and what is accepted."""


class HelpRequested(Exception):
    """`--help` was given; the exception carries the text listing every option."""


@dataclass
class Config:
    """A resolved configuration.

    Attributes:
        groups: per group, the options set by files or the command line, with `module`.
        seed: the run seed.
    """

    groups: dict[str, dict[str, Any]]
    seed: int
    sources: list[str] = field(default_factory=list)

    def target(self, group: str) -> Callable:
        return resolve(self.groups[group]["module"], group)

    def options(self, group: str) -> dict[str, Any]:
        """The keyword arguments of a group, without `module`."""
        return {key: value for key, value in self.groups[group].items() if key != "module"}

    def value(self, group: str, key: str) -> Any:
        """An option's value: set explicitly, else the constructor's default."""
        if key in self.groups[group]:
            return self.groups[group][key]
        parameter = signature_of(self.target(group), group).get(key)
        return None if parameter is None else parameter.default

    def build(self, group: str, **supplied: Any) -> Any:
        return self.target(group)(**self.options(group), **supplied)

    def to_dict(self) -> dict[str, Any]:
        """The options as set, with `seed`."""
        return {"seed": self.seed, **copy.deepcopy(self.groups)}

    def resolved(self) -> dict[str, Any]:
        """Every option of every group, defaults filled in, with `seed`."""
        groups = {
            group: {"module": self.groups[group]["module"]} | {
                key: copy.deepcopy(self.value(group, key))
                for key in signature_of(self.target(group), group)
            }
            for group in self.groups
        }
        return {"seed": self.seed, **groups}


# ---------------------------------------------------------------------------------------------
# Resolving `module:` names


def resolve(name: Any, group: str) -> Callable:
    """The class or function a `module:` value names, if the project allows it.

    Raises:
        ConfigError: the name is malformed, outside the allowed packages, or not found.
    """
    allowed = ", ".join(f"{package}.*" for package in ALLOWED_PACKAGES)
    if not isinstance(name, str) or not _DOTTED.fullmatch(name):
        raise ConfigError(f"{group}.module={name!r} is not a dotted name; accepted: {allowed}")
    inside = any(name.startswith(package + ".") for package in ALLOWED_PACKAGES)
    if not inside or any(part.startswith("_") for part in name.split(".")):
        raise ConfigError(f"{group}.module={name} is not allowed; accepted: {allowed}")
    module_name, attribute = name.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(f"{group}.module={name}: no module {module_name}") from None
    target = getattr(module, attribute, None)
    defined_in = getattr(target, "__module__", "") or ""
    if not (inspect.isclass(target) or inspect.isfunction(target)) or not any(
        defined_in == package or defined_in.startswith(package + ".")
        for package in ALLOWED_PACKAGES
    ):
        raise ConfigError(
            f"{group}.module={name}: {module_name} defines no class or function {attribute}"
        )
    _check_kind(target, group, name)
    return target


def group_kind(group: str) -> type:
    """The class whose instances a group's constructor must return."""
    import torch  # imported here: the trainer imports this module
    from torch import nn

    from data.common import TensorSplits
    from engineer.trainer import Trainer

    return {"trainer": Trainer, "dataset": TensorSplits, "optimizer": torch.optim.Optimizer,
            "model": nn.Module}[group]


def _check_kind(target: Callable, group: str, name: str) -> None:
    """Refuse a class that does not build what the group needs, before anything calls it.

    Functions are accepted only as model factories defined in `models`.
    """
    kind = group_kind(group)
    if inspect.isclass(target) and issubclass(target, kind):
        return
    if group == "model" and inspect.isfunction(target) and target.__module__.startswith("models."):
        return
    raise ConfigError(f"{group}.module={name} does not build a {kind.__module__}.{kind.__name__}")


def signature_of(target: Callable, group: str) -> dict[str, inspect.Parameter]:
    """The configurable keyword parameters of a constructor, annotations resolved."""
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (NameError, TypeError, AttributeError, SyntaxError):
        # Unresolvable string annotations: fall back to the raw ones.
        hints = {}
    parameters = {}
    for name, parameter in inspect.signature(target).parameters.items():
        if name in SUPPLIED[group] or name == "self":
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        parameters[name] = parameter.replace(annotation=hints.get(name, parameter.annotation))
    return parameters


# ---------------------------------------------------------------------------------------------
# Types


def type_name(annotation: Any) -> str:
    """A short readable name of an annotation, e.g. `int | None` or `tuple[int, ...]`."""
    if annotation is inspect.Parameter.empty:
        return "any"
    if annotation is type(None):
        return "None"
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(argument) for argument in arguments)
    if origin is typing.Literal:
        return " | ".join(repr(argument) for argument in arguments)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in arguments)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return getattr(annotation, "__name__", str(annotation))


def _accepts_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return str in typing.get_args(annotation)
    return False


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` converted to `annotation`, or a ConfigError naming `key` and the type."""
    error = ConfigError(f"{key}={value!r} is not of type {type_name(annotation)}")
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        for member in arguments:
            if member is type(None):
                continue
            try:
                return coerce(value, member, key)
            except ConfigError:
                continue
        raise error
    if origin is typing.Literal:
        if value in arguments:
            return value
        raise ConfigError(f"{key}={value!r} is not accepted; accepted: {type_name(annotation)}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise error
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        raise error
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise error from None
        raise error
    if annotation is str:
        if isinstance(value, str):
            return value
        raise error
    if origin in (tuple, list, collections.abc.Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise error
        if origin is tuple and arguments and arguments[-1] is not Ellipsis:
            if len(value) != len(arguments):
                raise error
            items = [coerce(v, a, key) for v, a in zip(value, arguments)]
        else:
            member = arguments[0] if arguments else Any
            items = [coerce(v, member, key) for v in value]
        return tuple(items) if (origin or annotation) is tuple else list(items)
    if inspect.isclass(annotation) and isinstance(value, annotation):
        return value
    raise error


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """A command-line value: YAML syntax, except that a string option keeps the text as is."""
    if _accepts_str(annotation) and text not in ("null", "None", "~"):
        return text
    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}={text!r} is not a valid value") from None


# ---------------------------------------------------------------------------------------------
# Reading and merging sources


def read_file(path: str | Path) -> dict[str, Any]:
    """One YAML configuration file, checked for its layout."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {reason}") from None
    content = {} if content is None else content
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of groups")
    for key, value in content.items():
        if key == "seed":
            continue
        if key not in GROUPS:
            raise ConfigError(
                f"config file {path}: unknown group {key!r}; accepted: seed, {', '.join(GROUPS)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"config file {path}: group {key} must be a mapping of options")
    return content


def merge(stack: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], Any]:
    """Apply parsed files in order; a new `module:` for a group drops its earlier options."""
    groups: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    seed = None
    for content in stack:
        seed = content.get("seed", seed)
        for group in GROUPS:
            update = content.get(group) or {}
            module = update.get("module")
            if module is not None and module != groups[group].get("module"):
                groups[group] = {}
            groups[group].update(copy.deepcopy(update))
    return groups, seed


def validate(groups: dict[str, dict[str, Any]], seed: Any) -> Config:
    """Check every group's keys and types against its constructor."""
    checked = {}
    for group in GROUPS:
        options = dict(groups.get(group) or {})
        if "module" not in options:
            raise ConfigError(f"{group}.module is not set; name the {group} class with module:")
        target = resolve(options.pop("module"), group)
        parameters = signature_of(target, group)
        values = {"module": groups[group]["module"]}
        for key, value in options.items():
            if key not in parameters:
                accepted = ", ".join(parameters) or "none"
                raise ConfigError(f"unknown option {group}.{key}; accepted: {accepted}")
            values[key] = coerce(value, parameters[key].annotation, f"{group}.{key}")
        for key, parameter in parameters.items():
            if parameter.default is inspect.Parameter.empty and key not in values:
                raise ConfigError(f"{group}.{key} is required by {values['module']}")
        checked[group] = values
    seed = coerce(0 if seed is None else seed, int, "seed")
    if not 0 <= seed < 2**32:  # the range NumPy's generators accept
        raise ConfigError(f"seed={seed} is out of range; accepted: 0 to {2**32 - 1}")
    return Config(groups=checked, seed=seed)


# ---------------------------------------------------------------------------------------------
# The command line


def _split_arguments(argv: list[str]) -> tuple[list[str], list[tuple[str, str]], bool]:
    """Config files, `(key, text)` overrides in order, and whether help was asked for."""
    files, overrides, wants_help = [], [], False
    position = 0
    while position < len(argv):
        argument = argv[position]
        position += 1
        if argument in ("-h", "--help"):
            wants_help = True
            continue
        if argument in ("-C", "--config") or argument.startswith(("-C=", "--config=")):
            if "=" in argument:
                files.append(argument.split("=", 1)[1])
            elif position < len(argv):
                files.append(argv[position])
                position += 1
            else:
                raise ConfigError(f"{argument} needs a file name")
            continue
        if argument.startswith("-C") and len(argument) > 2:
            files.append(argument[2:])
            continue
        if not argument.startswith("--"):
            raise ConfigError(
                f"unexpected argument {argument!r}; accepted: -C FILE, --seed=N, "
                "--group.key=value"
            )
        key, equals, text = argument[2:].partition("=")
        if not equals:
            if position >= len(argv):
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
            text = argv[position]
            position += 1
        overrides.append((key, text))
    return files, overrides, wants_help


def parse(argv: list[str], default_files: list[str | Path], default_seed: int = 0) -> Config:
    """Build a configuration from the default files, `-C` files and overrides in `argv`.

    Raises:
        ConfigError: any problem, with a one-line message.
        HelpRequested: `-h`/`--help` was given; it carries the help text.
    """
    files, overrides, wants_help = _split_arguments(argv)
    stack = [read_file(path) for path in [*default_files, *files]]
    groups, seed = merge(stack)
    seed = default_seed if seed is None else seed

    # Overrides: module first, so that keys are checked against the final class.
    for key, text in sorted(overrides, key=lambda item: not item[0].endswith(".module")):
        if key == "seed":
            seed = parse_value(text, int, "seed")
            continue
        group, dot, option = key.partition(".")
        if group not in GROUPS or not dot or "." in option or not option:
            raise ConfigError(
                f"unknown option --{key}; accepted: --seed, --GROUP.KEY with GROUP one of "
                f"{', '.join(GROUPS)} (see --help)"
            )
        if option == "module":
            if text != groups[group].get("module"):
                groups[group] = {}
            groups[group]["module"] = text
            continue
        if "module" not in groups[group]:
            raise ConfigError(f"{group}.module is not set; name the {group} class with module:")
        parameters = signature_of(resolve(groups[group]["module"], group), group)
        if option not in parameters:
            raise ConfigError(
                f"unknown option --{key}; accepted: {', '.join(parameters) or 'none'}"
            )
        groups[group][option] = parse_value(text, parameters[option].annotation, f"{key}")

    config = validate(groups, seed)
    config.sources = [str(path) for path in [*default_files, *files]]
    if wants_help:
        raise HelpRequested(help_text(config))
    return config


def help_text(config: Config) -> str:
    """Every option of the configured classes with its type and current value."""
    lines = [
        "options (later sources win: default files, then each -C FILE, then --key=value):",
        "  -C FILE                 add a YAML config file (repeatable)",
        f"  --seed=N                run seed (now {config.seed})",
    ]
    for group in GROUPS:
        lines.append(f"{group} ({config.groups[group]['module']}):")
        for key, parameter in signature_of(config.target(group), group).items():
            set_value = key in config.groups[group]
            value = config.groups[group][key] if set_value else parameter.default
            origin = "" if set_value else " (default)"
            name = f"--{group}.{key}"
            lines.append(
                f"  {name:<36} {type_name(parameter.annotation):<18} {value!r}{origin}"
            )
    return "\n".join(lines)
