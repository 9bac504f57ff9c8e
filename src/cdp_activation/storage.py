"""Dagster's stored step outputs, encrypted: they hold whole audiences, phone numbers included.

Dagster keeps every asset's and op's output between steps (another process, another worker, a
re-execution from a failed step) with an IO manager; its default pickles them in clear under
`$DAGSTER_HOME/storage`, so each run left a copy of its audience and decisions — numbers,
names, consents — on disk for good. This IO manager writes the same pickles, with the same
layout and the same behaviour, sealed with AES-256-GCM under a key derived from
CDP_PII_HASH_KEY (the sandbox's published one in sandbox mode): the files are unreadable
without the key, and a file changed on disk is refused instead of unpickled. `pii.purge`
removes them once past the retention, `pii.erase` at once.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any

import dagster as dg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from upath import UPath

from cdp_activation.errors import SettingsError
from cdp_activation.pii import SEALED_EXTENSION

_NONCE_BYTES = 12


def storage_cipher() -> AESGCM:
    """The cipher of stored outputs; raises SettingsError when no key is configured."""
    from cdp_activation.pii import pii_key

    key = pii_key()
    if key is None:
        raise SettingsError(
            "CDP_PII_HASH_KEY is not set: Dagster's stored step outputs (whole audiences, "
            "phone numbers included) would be written in clear; set it to a long random "
            "string (e.g. `openssl rand -hex 32`) in the environment of every Dagster process"
        )
    derived = hashlib.blake2b(key, digest_size=32, person=b"cdp-storage").digest()
    return AESGCM(derived)


def seal(cipher: AESGCM, data: bytes) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, data, None)


def unseal(cipher: AESGCM, sealed: bytes, where: str) -> bytes:
    try:
        return cipher.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], None)
    except InvalidTag:
        raise SettingsError(
            f"the stored step output {where} cannot be read with this CDP_PII_HASH_KEY (another "
            "key wrote it, or it was changed on disk); re-run the job from its first step"
        ) from None


class SealedPickleIOManager(dg.UPathIOManager):
    """Pickles, sealed (see the module doc); paths as Dagster's filesystem IO manager's."""

    extension = SEALED_EXTENSION

    def __init__(self, base_dir: str) -> None:
        super().__init__(base_path=UPath(base_dir))
        self._cipher = storage_cipher()

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = seal(self._cipher, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        temporary = path.with_name(path.name + ".partial")
        temporary.write_bytes(data)
        temporary.rename(path)  # a reader never sees half a file

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        return pickle.loads(unseal(self._cipher, path.read_bytes(), str(path)))


class SealedFilesystemIOManager(dg.ConfigurableIOManagerFactory):
    """The project's `io_manager`: step outputs under `base_dir` (default: the instance's
    storage directory, `$DAGSTER_HOME/storage`), sealed with CDP_PII_HASH_KEY."""

    base_dir: str | None = None

    def create_io_manager(self, context: dg.InitResourceContext) -> SealedPickleIOManager:
        base = self.base_dir
        if base is None:
            base = context.instance.storage_directory() if context.instance else "storage"
        return SealedPickleIOManager(base)
