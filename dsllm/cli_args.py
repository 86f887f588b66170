"""A config dataclass as a command line: one flag per field, its type from `typing.get_type_hints`, its help
from the field's docstring, its default from the class. `--recipe FILE` (YAML or JSON) supplies values
first and the command line overrides them; `--model.FIELD VALUE` collects model overrides. No torch here:
`--help` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import typing
from pathlib import Path
from typing import Any

from dsllm.errors import ArgumentParser, UserError, finite
from dsllm.train_config import flag

MODEL_PREFIX = "--model."


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring} for a dataclass and its bases (the string literal right after the field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _kind(hint: Any) -> type:
    """bool, int, float or str: the one non-None type of a field's hint (`int | None` -> int)."""
    options = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    return next((t for t in (bool, int, float) if t in options), str)


def add_config_arguments(parser: ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` (dataclass): `--max-steps N`, booleans as `--compile`."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    own = list(cls.__dict__.get("__annotations__", {}))  # the class's own options first, then every run's
    for field in sorted(dataclasses.fields(cls), key=lambda f: own.index(f.name) if f.name in own else len(own)):
        if field.name in skip or field.name.startswith("_"):
            continue
        kind = _kind(hints[field.name])
        names = [flag(field.name)] + (["--ds-config"] if field.name == "ds_config" else [])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required or field.default is dataclasses.MISSING else field.default
        help_text = docs.get(field.name, "").replace("%", "%%")
        if kind is bool:  # --compile / --no-compile (which turns off a recipe's)
            parser.add_argument(
                *names, dest=field.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        convert = {int: int, float: finite}.get(kind, str)
        if type(None) in typing.get_args(hints[field.name]):  # `none` clears a recipe's value (e.g. a budget)
            convert = _or_none(convert)
        parser.add_argument(
            *names,
            dest=field.name,
            type=convert,
            default=default,
            metavar=field.name.upper() if kind is str else kind.__name__.upper(),
            help=help_text + (" (required)" if required else ""),
        )


def _or_none(convert):
    def value(text: str):
        return None if text.lower() == "none" else convert(text)

    value.__name__ = getattr(convert, "__name__", "value")  # (argparse names the type in its errors)
    return value


def add_recipe_argument(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        metavar="FILE",
        help="YAML or JSON file of option values (launch/recipes/); options given here override it",
    )


def split_model_overrides(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """({field: value} of every `--model.FIELD VALUE` / `--model.FIELD=VALUE`, the other arguments)."""
    overrides, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(MODEL_PREFIX):
            key, eq, value = arg[len(MODEL_PREFIX) :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg}: needs a value, e.g. {arg} VALUE")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def read_json_or_yaml(file: Path, option: str) -> Any:
    """The value a .yaml/.yml (safe_load) or JSON file holds; a malformed one is refused naming `option` and the
    file (recipes, mixture files)."""
    is_yaml = file.suffix.lower() in (".yaml", ".yml")
    try:
        text = file.read_text()
        if is_yaml:
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as err:  # json's ValueError, yaml's YAMLError, a file that is not UTF-8
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{option} {file}: not valid {'YAML' if is_yaml else 'JSON'} ({first}); fix the file") from None


def read_recipe(path: str, cls: type) -> dict[str, Any]:
    """The option values of a recipe file, keyed by field name; unknown keys are refused with did-you-mean.
    A recipe may name its model overrides under "model_overrides" (or write "model" as {"preset": ..., FIELD: ...})."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--recipe {path}: no such file; see launch/recipes/ for examples")
    values = read_json_or_yaml(file, "--recipe")
    if not isinstance(values, dict):
        raise UserError(f"--recipe {path}: must hold a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    if isinstance(values.get("model"), dict):
        model = dict(values.pop("model"))
        if "preset" not in model:
            raise UserError(f'--recipe {path}: model: needs "preset" (a preset name or JSON file) next to its fields')
        values["model"] = model.pop("preset")
        values["model_overrides"] = {**model, **values.get("model_overrides", {})}
    known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise UserError(f"--recipe {path}: unknown option {key!r}{hint}; fix the spelling or remove it")
    if "ds_config" in values and not Path(values["ds_config"]).is_file():
        here = file.parent / values["ds_config"]  # relative to the recipe, when not to the working folder
        if here.is_file():
            values["ds_config"] = str(here)
    return values


def parse_config(cls: type, parser: ArgumentParser, argv: list[str] | None, model_overrides: bool = False):
    """Parse `argv` into an instance of `cls`: the recipe's values, then the command line's."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_model_overrides(argv) if model_overrides else ({}, argv)
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe")
    known, _ = recipe_parser.parse_known_args(rest)
    recipe = read_recipe(known.recipe, cls) if known.recipe else {}
    recipe_overrides = recipe.pop("model_overrides", {}) or {}
    if not isinstance(recipe_overrides, dict):
        raise UserError(f"--recipe {known.recipe}: model_overrides must be a mapping of field: value")
    parser.set_defaults(**recipe)
    args = vars(parser.parse_args(rest))
    for extra in ("local_rank", "recipe"):
        args.pop(extra, None)
    if model_overrides:
        args["model_overrides"] = {**recipe_overrides, **overrides}
    missing = [flag(name) for name, value in args.items() if value is None and _required(cls, name)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return cls(**args)


def _required(cls: type, name: str) -> bool:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def add_launcher_argument(parser: ArgumentParser) -> None:
    """DeepSpeed's launcher appends --local_rank=N to every rank's command line."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
