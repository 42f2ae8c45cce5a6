"""A Ray that ``distill run`` starts itself listens on 127.0.0.1 only.

An exposed GCS, raylet or Jobs API is remote code execution for anyone who can reach it
(CVE-2023-48022). ``ray.init(_node_ip_address="127.0.0.1")`` alone does not help on Linux:
Ray replaces a loopback node address with the machine's routable one unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off (Ray's single-machine mode, read by
``ray._private.ray_constants`` at import time). With the node address kept at 127.0.0.1,
Ray 2.60 binds the GCS, raylet, object manager, core workers, agents and dashboard to it.

The setting is switched only while ``ray.init`` starts the node: the processes it spawns
inherit it, and this process goes back to its previous setting afterwards.

Token files: without ``RAY_AUTH_MODE``, a new local Ray turns token auth on and writes
``~/.ray/auth_token`` with the process umask (0644 by default). The node is started under umask
077 and the token file is made 0600 afterwards, whoever wrote it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(**kwargs: Any) -> None:
    """``ray.init`` of a new single-node Ray bound to 127.0.0.1. Never joins another Ray
    (``address="local"``: neither ``RAY_ADDRESS`` nor a cluster found on the machine)."""
    import ray
    from ray._private import ray_constants

    saved_env = os.environ.get(_FLAG)
    had_const = hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    saved_const = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_FLAG] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    umask = os.umask(0o077)  # a token file Ray writes is this user's only
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **kwargs)
    finally:
        os.umask(umask)
        private_token_files()
        if saved_env is None:
            os.environ.pop(_FLAG, None)
        else:
            os.environ[_FLAG] = saved_env
        if had_const:
            ray_constants.ENABLE_RAY_CLUSTER = saved_const


def private_token_files(home: str | None = None) -> list[str]:
    """Make the Ray token files of this user 0600 (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH``);
    returns the ones changed."""
    changed = []
    home_dir = Path(home or os.environ.get("HOME") or Path.home())
    for path in {home_dir / ".ray" / "auth_token",
                 *([Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()] if os.environ.get("RAY_AUTH_TOKEN_PATH") else [])}:
        try:
            st = path.stat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                path.chmod(0o600)
                changed.append(str(path))
        except OSError:
            continue
    return changed
