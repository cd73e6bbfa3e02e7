"""Are W&B credentials configured on this machine? Read locally: no network, no prompt.

The demo's ``--wandb auto`` logs online when they are, offline otherwise. The sources are the
ones ``wandb login`` documents, in its order:

1. the ``WANDB_API_KEY`` environment variable, or an identity token file named by
   ``WANDB_IDENTITY_TOKEN_FILE`` (federated identity);
2. the ``.netrc`` entry for the W&B server (``$NETRC``, else ``~/.netrc`` or ``~/_netrc``),
   which is what ``wandb login`` writes;
3. the ``api_key`` of a W&B settings file (``wandb status`` shows which file).

The server and the settings files come from ``wandb.setup().settings`` (which honours
``WANDB_BASE_URL``, ``WANDB_CONFIG_DIR`` and the settings files). They are read here rather than
through ``wandb.login(verify=False)``: that call also rewrites the user's W&B settings file and
asks the server for the user name.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from lawwatch.demo.config import WandbMode

# W&B's cloud answers as api.forge.coreweave.com (the default server of recent wandb) and as
# api.wandb.ai behind it; `wandb login` of earlier releases stored the key under the latter.
_SAME_SERVER = {"api.forge.coreweave.com": "api.wandb.ai"}
# An identity token issued by the server: three base64url segments (header.payload.signature).
_JWT = re.compile(r"[\w-]+\.[\w-]+\.[\w-]+")


def wandb_mode(requested: WandbMode) -> str:
    """The W&B mode to run in: ``"auto"`` is online when credentials are configured here.

    Malformed credentials are logged as a warning to the ``"lawwatch"`` logger and give
    ``"offline"``: the demo runs, and the run can be uploaded later with ``wandb sync``.

    Args:
        requested: ``"auto"``, or a mode (``"online"``, ``"offline"``, ``"disabled"``) that
            is returned as it is.
    """
    if requested != "auto":
        return requested
    try:
        found = local_credentials()
    except Exception as error:  # malformed credentials or settings: say so and stay offline
        logging.getLogger("lawwatch").warning("lawwatch: W&B credentials unusable: %s", error)
        return "offline"
    return "online" if found is not None else "offline"


def local_credentials() -> str | None:
    """Where this machine's W&B credentials are, or None when none are configured.

    Returns:
        The source: ``"WANDB_API_KEY"``, ``"WANDB_IDENTITY_TOKEN_FILE"``, the path of the
        ``.netrc`` file, or ``"settings file"``.

    Raises:
        ValueError: A source holds something that is not a W&B credential.
    """
    import wandb

    settings = wandb.setup().settings
    env_key = os.environ.get("WANDB_API_KEY")
    token_file = settings.identity_token_file
    if env_key and token_file:
        raise ValueError(
            "both WANDB_API_KEY and WANDB_IDENTITY_TOKEN_FILE are set; W&B accepts one of them."
        )
    if env_key:
        _check_key(env_key, "WANDB_API_KEY")
        return "WANDB_API_KEY"
    if token_file:
        if not Path(token_file).is_file():
            raise ValueError(f"the identity token file {token_file} does not exist.")
        return "WANDB_IDENTITY_TOKEN_FILE"
    if (found := _netrc_key(settings.base_url)) is not None:
        path, key = found
        _check_key(key, str(path))
        return str(path)
    if settings.api_key:
        _check_key(settings.api_key, "the W&B settings file")
        return "settings file"
    return None


def _netrc_file() -> Path:
    """The ``.netrc`` that W&B reads and ``wandb login`` writes (it may not exist)."""
    if explicit := os.environ.get("NETRC"):
        return Path(explicit).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if windows.exists() and not unix.exists() else unix


def _netrc_key(base_url: str) -> tuple[Path, str] | None:
    """``(file, key)`` of the ``.netrc`` entry for the server at ``base_url``, if there is one."""
    path = _netrc_file()
    if not path.is_file():
        return None
    try:
        entries = netrc.netrc(str(path))
    except (netrc.NetrcParseError, OSError) as error:
        raise ValueError(f"{path} cannot be read: {error}") from None
    host = urlsplit(base_url).netloc
    for machine in (host, _SAME_SERVER.get(host)):
        entry = entries.authenticators(machine) if machine else None
        if entry is not None:
            if not entry[2]:
                raise ValueError(f"{path} has an entry for {machine} without a password (key).")
            return path, entry[2]
    return None


def _check_key(key: str, where: str) -> None:
    """Refuse what cannot be a W&B API key: W&B would refuse it at ``wandb.init``."""
    if _JWT.fullmatch(key):
        return
    secret = key.split("-", 1)[-1]  # keys of self-hosted servers carry a prefix: "local-…"
    if not re.fullmatch(r"[\w-]{40,}", secret):
        raise ValueError(
            f"the API key from {where} is malformed (W&B keys have 40 or more letters, digits "
            "and underscores); run `wandb login --relogin`, or pass --wandb offline."
        )
