"""Loading pydantic configs from YAML with errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None, model: type[C], **overrides: Any) -> C:
    """``model`` from a YAML file (or defaults when ``path`` is None), then CLI ``overrides``.

    Overrides that are None are ignored, so CLI options can default to None.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        data = loaded or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {field}: {e['msg']}")
        where = str(path) if path is not None else "settings"
        raise ConfigError(f"{where}: invalid {model.__name__}:\n" + "\n".join(lines)) from None
