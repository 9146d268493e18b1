"""Configuration: frozen dataclasses are the one source of every option's default, type, choices and help.

A configuration class declares its fields with `option(default, "help")`; `Literal[...]` types are the
choices, checked when the command line is parsed. `config_command` turns one or more such classes into a
typer command whose flags are the fields (`--batch-size` for `batch_size`, `--tci/--no-tci` for a bool),
plus `--config FILE`:

    defaults of the dataclass  <  --preset NAME (cmdcl-heads)  <  --config FILE (TOML)  <  flags given

TOML keys are the field names (`batch_size` or `batch-size`); a key that no field has is refused with the
list of valid ones, everywhere. The command receives the resolved, frozen instances; `to_toml` writes them
back in a form that `--config` reads, so every artifact can say how to make it again.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable

REQUIRED = "required"   # metadata flag: the value must come from the command line or from --config


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the file or the option."""


def option(default: Any = None, help: str = "", *, flag: str | None = None, required: bool = False,
           cli: bool = True, **extra) -> Any:
    """A dataclass field that is also a command-line option (`flag` overrides the `--name` derived from it)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, REQUIRED: required,
                                                        "cli": cli, **extra})


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def help_of(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def flatten(table: dict, where: str) -> dict:
    """TOML may group keys under [sections] (as `to_toml` writes them); keys are unique across sections."""
    out = {}
    for key, value in table.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            name = k.replace("-", "_")
            if name in out:
                raise ConfigError(f"{where}: key {k!r} is given twice")
            out[name] = v
    return out


def check_keys(values: dict, classes, where: str, ignore=(), cli_only: bool = False) -> None:
    """Refuse keys no field has. `cli_only`: what a user writes (flags, --config, presets) may set only the
    fields that are options; the others (test seams, shapes the program derives) are not theirs to set."""
    valid = {f.name for cls in classes for f in (cli_fields(cls) if cli_only else dataclasses.fields(cls))}
    valid -= set(ignore)
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                          f"{', '.join(sorted(valid))}")


def build(cls, values: dict, where: str = "configuration"):
    """An instance of `cls` from the keys of `values` that it has (type-checked); refuses nothing else."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = coerce(values[f.name], hints[f.name], f"{where}: {f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def from_dict(cls, values: dict, where: str = "configuration"):
    """Like `build`, but every key must belong to `cls` (what a checkpoint or config.toml holds)."""
    check_keys(values, [cls], where)
    return build(cls, values, where)


def coerce(value: Any, hint, where: str) -> Any:
    """value as the annotated type: TOML and JSON give ints for floats, lists for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is type(None) or hint is Any:
            return None
        raise ConfigError(f"{where}: a value is required")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1] if len(errors) == 1 else ConfigError(
            f"{where}: {value!r} is not a {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def check_choices(obj) -> None:
    """Refuse a value outside its Literal choices (for instances built in Python, not from a command line),
    and NaN or an infinity anywhere: NaN passes every `x <= 0` check after this one, and inf passes `x > 0`
    (`weight_decay = inf`, `--lr inf`) to end as NaN weights; neither is a setting."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} is {'NaN' if value != value else value}; give a "
                             "finite number")
        if typing.get_origin(hint) in (typing.Union, types.UnionType):   # Optional[Literal[...]]
            if value is None and type(None) in typing.get_args(hint):
                continue
            hint = next((a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal), hint)
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, typing.get_args(hint)))}, got {value!r}")


def to_toml(sections: dict[str, Any]) -> str:
    """TOML text of {section: dataclass instance or dict}; None values are left out (they mean None)."""
    lines = []
    for section, obj in sections.items():
        lines.append(f"[{section}]")
        items = obj.items() if isinstance(obj, dict) else dataclasses.asdict(obj).items()
        lines += [f"{key} = {_toml_value(value)}" for key, value in items if value is not None]
        lines.append("")
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def config_command(app, name: str, classes: tuple, *, help: str, epilog: str | None = None,
                   presets: Callable[[str], Path] | None = None, handle=None, extra: dict | None = None):
    """Decorator: register `run(*instances)` as command `name`, with one flag per field of `classes`.

    `presets(name) -> Path` adds `--preset NAME` (a TOML file, below --config). `handle(err)` turns a
    ConfigError into the command's own exit (default: a usage error, exit 2). `extra` = {name: (annotation,
    typer.Option)}: options of the command itself (not of a configuration), passed to `run` by keyword.
    """
    import typer

    def decorator(run):
        params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in cli_fields(cls):
                default = None if f.metadata.get(REQUIRED) else f.default
                opt = typer.Option(default, *_decls(f, hints[f.name]), help=_help(f), show_default=default is not None)
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                                annotation=_cli_type(hints[f.name])))
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],
                                        default=typer.Option(None, "--config", help="TOML file of these options "
                                                             "(keys = option names); flags given win.")))
        if presets is not None:
            params.append(inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY,
                                            annotation=typing.Optional[str],
                                            default=typer.Option(None, "--preset", help="A shipped set of "
                                                                 "options (below --config and flags).")))
        for key, (annotation, opt) in (extra or {}).items():
            params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=opt))

        def command(ctx, **values):
            config, preset = values.pop("config"), values.pop("preset", None)
            own = {key: values.pop(key) for key in (extra or {})}
            try:
                merged = resolve(ctx, classes, values, config, presets(preset) if preset is not None else None)
                instances = [build(cls, {k: v for k, v in merged.items() if k in {f.name for f in cli_fields(cls)}},
                                   str(config or "options")) for cls in classes]
            except ConfigError as err:
                if handle:
                    return handle(err)
                raise typer.BadParameter(str(err)) from None
            return run(*instances, **own)

        command.__signature__ = inspect.Signature(params)
        command.__doc__ = run.__doc__
        app.command(name, help=help, epilog=epilog)(command)
        return run

    return decorator


def resolve(ctx, classes, flag_values: dict, config: Path | None, preset: Path | None) -> dict:
    """defaults < preset < config file < flags given on the command line; required fields checked."""
    merged = dict(flag_values)
    for path in (p for p in (preset, config) if p is not None):
        table = flatten(read_toml(path), str(path))
        check_keys(table, classes, str(path), cli_only=True)
        for key, value in table.items():
            source = getattr(ctx.get_parameter_source(key), "name", None)
            if source not in ("COMMANDLINE", "ENVIRONMENT"):
                merged[key] = value
    missing = [flag_of(f) for cls in classes for f in dataclasses.fields(cls)
               if f.metadata.get(REQUIRED) and merged.get(f.name) in (None, "")]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (on the command line or in --config)")
    return merged


def _decls(f: dataclasses.Field, hint) -> list[str]:
    flag = flag_of(f)
    if hint is bool and f.default is False:
        return [flag]                      # a plain switch
    if hint is bool or bool in typing.get_args(hint):
        return [f"{flag}/--no-{flag[2:]}"]   # on by default (or unset): both spellings
    return [flag]


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    return text + (" (required)" if f.metadata.get(REQUIRED) else "")


def _cli_type(hint):
    """The type typer parses: Optional[X] stays, Literal stays (choices), Path-like strings are str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.Optional[args[0]] if len(args) == 1 else hint
    return hint


def version_option(package: str):
    """A `--version` callback option for a typer app's callback."""
    import typer

    def show(value: bool):
        if value:
            from importlib.metadata import PackageNotFoundError, version
            try:
                text = version("cmdcl")
            except PackageNotFoundError:
                text = "unknown (not installed)"
            typer.echo(f"{package} {text}")
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True, help="Show the version and exit.")
