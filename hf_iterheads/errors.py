"""One exception type for mistakes a user can fix: the CLI prints it as one line, no traceback."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator


class IterHeadsError(ValueError):
    """Bad input (unknown task, impossible length, unusable model ...): message is meant for a person."""


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error types of whichever HTTP client huggingface_hub uses (httpx2, httpx, requests)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@contextlib.contextmanager
def hub_errors(action: str, offline_hint: str = "") -> Iterator[None]:
    """Turn the Hub client's failures during ``action`` (e.g. "upload to acme/x") into one IterHeadsError:
    no network, offline mode, no token, or the Hub's refusal. ``offline_hint`` ends the no-network message."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    hint = f"; {offline_hint}" if offline_hint else ""
    try:
        yield
    except OfflineModeIsEnabled:
        raise IterHeadsError(f"cannot {action}: HF_HUB_OFFLINE=1 is set (no Hub access){hint}") from None
    except LocalTokenNotFoundError:
        raise IterHeadsError(f"cannot {action}: no Hugging Face token (run `hf auth login` or set HF_TOKEN)") from None
    except HfHubHTTPError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IterHeadsError(f"cannot {action}: the Hub refused: {first}") from None
    except _network_errors() as err:
        raise IterHeadsError(f"cannot {action}: no network / Hub unreachable ({type(err).__name__}: {err}){hint}") from None


def require_hub(action: str, token: str | None = None, offline_hint: str = "") -> None:
    """Before any work: offline mode is off, the Hub answers and a token is accepted (``whoami``); else one line.

    Offline mode is checked first: with it set, a missing token is not the user's real problem."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        hint = f"; {offline_hint}" if offline_hint else ""
        raise IterHeadsError(f"cannot {action}: HF_HUB_OFFLINE=1 is set (no Hub access){hint}")
    with hub_errors(action, offline_hint):
        HfApi(token=token).whoami()
