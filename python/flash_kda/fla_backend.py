"""flash_kda's own backend for flash-linear-attention (FLA): FLA's `chunk_kda` served by flash_kda.chunk_kda.

FLA dispatches `fla.ops.kda.chunk_kda` through a registry of backends: before running its own code it asks
each enabled backend, lowest `priority` first, whether it takes the call (`chunk_kda_verifier`), lets the
first that does compute it, and logs the choice once per backend at INFO ("[FLA Backend] ... -> NAME",
or "... -> NAME rejected: REASON"; logger `fla.backends`). FLA ships an adapter of its own for a package
importable as `flash_kda` (backend "flash_kda", priority 3) that takes a narrower set of calls (V-first
state, fp32 initial state, A_log given, no allow_neg_eigval). This backend (priority 2, asked first)
takes everything flash_kda.chunk_kda serves and rejects the rest with chunk.unsupported_reason's
words; a rejected call goes on to FLA's adapter and then to FLA's Triton path.

Registration. FLA has no plug-in discovery, and importing its KDA module takes seconds, so:
- `import flash_kda` registers this backend when `fla.ops.kda` is already imported;
- `flash_kda.register_fla_backend()` imports fla.ops.kda and registers it (idempotent), whatever the order;
- otherwise FLA's own adapter still sends its calls here, and its first one imports flash_kda, which
  registers this backend for the calls after it.
Turned off with FLASH_KDA_FLA=0 (read on every call, like FLA's own switches; FLA's
FLA_FLASH_KDA_NATIVE=1 forces it on). FLA_DISABLE_BACKEND_DISPATCH=1 turns all of FLA's dispatch off.

Only FLA's public registration API is used: `fla.backends.register(chunk_kda)` in fla-core ≥ 0.6, and
`fla.ops.kda.backends.kda_registry.register(...)` in the releases before it (`fla.ops.backends`).
"""

from __future__ import annotations

from typing import Any

from . import chunk

try:  # fla-core >= 0.6: one registry per dispatchable function
    from fla.backends import BaseBackend
    from fla.backends import register as _register_for_function
except ImportError:  # earlier releases: one registry per operation, in fla.ops.kda.backends
    from fla.ops.backends import BaseBackend

    _register_for_function = None

__all__ = ["BACKEND_TYPE", "FlashKDABackend", "register"]

BACKEND_TYPE = "flash_kda_native"


class FlashKDABackend(BaseBackend):
    """Serves FLA's chunk_kda with flash_kda.chunk_kda when it can (inference only: forward, no grad)."""

    backend_type = BACKEND_TYPE
    package_name = "flash_kda"
    env_var = "FLASH_KDA_FLA"
    default_enable = True
    priority = 2  # ahead of FLA's own FlashKDA adapter (3)

    def chunk_kda_verifier(self, *args: Any, **kwargs: Any) -> tuple[bool, str | None]:
        reason = chunk.unsupported_reason(*args, **kwargs)
        return reason is None, reason

    def chunk_kda(self, *args: Any, **kwargs: Any) -> Any:
        return chunk.chunk_kda(*args, **kwargs)


def register() -> None:
    """Registers FlashKDABackend for FLA's chunk_kda (importing fla.ops.kda); registering again replaces
    the earlier instance (FLA keys backends by backend_type)."""
    if _register_for_function is None:
        from fla.ops.kda.backends import kda_registry

        kda_registry.register(FlashKDABackend())
        return
    from fla.ops.kda import chunk_kda as fla_chunk_kda

    try:
        _register_for_function(fla_chunk_kda)(FlashKDABackend)
    except KeyError as e:
        # FLA finds the registry of a function through inspect.unwrap; a decorator that hides __wrapped__
        # (seen with some torch versions' torch.compiler.disable) leaves chunk_kda without one.
        raise RuntimeError(
            "flash_kda: FLA's chunk_kda has no backend registry in this FLA/torch combination "
            "(inspect.unwrap does not reach the function FLA made dispatchable), so no backend can be "
            "registered for it"
        ) from e
