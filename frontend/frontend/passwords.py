"""Password hashes: scrypt at OWASP's minimum (N=2^17, r=8, p=1), in werkzeug's `scrypt:N:r:p$salt$hex` format.

Hashes of older parameters (werkzeug's default scrypt N=2^15, or pbkdf2) still verify; `needs_rehash` tells the
caller to store a fresh hash after the next successful login. Each hash takes 128 MiB (128 · N · r bytes) for a
moment, so at most `concurrency` are computed at once: a burst of logins waits instead of exhausting memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

from werkzeug.security import check_password_hash

SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
MAX_SCRYPT_N = 2**20  # 1 GiB per hash: the most a setting may ask for
HASH_CONCURRENCY = 4
_SALT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def scrypt_maxmem(n: int, r: int, p: int) -> int:
    """hashlib's memory ceiling for these parameters (its default, 32 MiB, is below what N=2^17 needs)."""
    return 128 * r * (n + p + 2) + (1 << 20)  # the work array (128·r·N), the p blocks, scratch, and slack


class PasswordHasher:
    """Hashes new passwords with scrypt(n, r, p) and verifies hashes of any parameters werkzeug knows."""

    def __init__(self, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
                 concurrency: int = HASH_CONCURRENCY) -> None:
        if n < 2 or n & (n - 1) or n > MAX_SCRYPT_N:
            raise ValueError(f"scrypt N must be a power of two up to {MAX_SCRYPT_N}")
        self.n, self.r, self.p = n, r, p
        self.method = f"scrypt:{n}:{r}:{p}"
        self._slots = threading.BoundedSemaphore(concurrency)

    def hash(self, password: str) -> str:
        salt = "".join(secrets.choice(_SALT_CHARS) for _ in range(16))
        with self._slots:
            digest = hashlib.scrypt(password.encode(), salt=salt.encode(), n=self.n, r=self.r, p=self.p,
                                    maxmem=scrypt_maxmem(self.n, self.r, self.p))
        return f"{self.method}${salt}${digest.hex()}"

    def verify(self, stored: str, password: str) -> bool:
        method, _, rest = stored.partition("$")
        salt, _, expected = rest.partition("$")
        with self._slots:
            parts = method.split(":")
            if parts[0] != "scrypt":  # an older werkzeug method (pbkdf2): werkzeug checks it
                return check_password_hash(stored, password)
            try:
                n, r, p = (int(x) for x in parts[1:4]) if len(parts) == 4 else (2**15, 8, 1)
            except ValueError:
                return False
            if n < 2 or n > MAX_SCRYPT_N or r < 1 or p < 1 or r * p > 64:
                return False
            digest = hashlib.scrypt(password.encode(), salt=salt.encode(), n=n, r=r, p=p,
                                    maxmem=scrypt_maxmem(n, r, p))
        return hmac.compare_digest(digest.hex(), expected)

    def needs_rehash(self, stored: str) -> bool:
        """Whether a hash that just verified was made with other parameters than the current ones."""
        return not stored.startswith(f"{self.method}$")
