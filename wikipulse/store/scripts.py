"""Lua scripts: each kept in a `.lua` file next to the module that runs it, composed from shared fragments in order."""

from __future__ import annotations

from importlib.resources import files


def lua(package: str, *names: str) -> str:
    """The text of the `.lua` files `names` of `package` (a module's `__package__`), joined in order: the fragments a
    script uses first, then the script."""
    return "\n".join(files(package).joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)
