"""Lua scripts: each kept in a `.lua` file next to the module that runs it, composed from shared fragments in order."""

from __future__ import annotations

from importlib.resources import files


def lua(package: str, *names: str) -> str:
    """The text of the `.lua` files `names` of `package` (a module's `__package__`), joined in order: the fragments a
    script uses first, then the script."""
    return "\n".join(files(package).joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)


def script(package: str, name: str, *fragments: str, own: tuple[str, ...] = ()) -> str:
    """The script `name` of `package`, after the shared fragments of this package it calls (fence, trim), in order,
    then the fragments of its own package (`own`)."""
    return "\n".join([lua(__package__, *fragments), lua(package, *own, name)] if fragments else [lua(package, *own, name)])
