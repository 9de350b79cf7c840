"""What every section of the configuration shares: strict parsing and the error type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the source."""


class _Strict(BaseModel):
    # strict: "5" is not an int and "yes" is not a bool; extra="forbid": a misspelt key is an error.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


__all__ = ["ConfigError", "_Strict"]
