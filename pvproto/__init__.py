"""extpv wire protocol: framing, messages, version negotiation, the peer session. Nothing else.

>>> from pvproto import encode, FrameDecoder, Ping
>>> FrameDecoder().feed(encode(Ping(nonce=1)))
[Ping(request_id=0, type='ping', nonce=1)]

The package re-exports every public name of its submodules. Each submodule's ``__all__`` is the
one list of them: the star imports bind exactly those names (mypy strict counts them as
re-exports), and the package's ``__all__`` is their sum.
"""

from pvproto import cpulist, errors, framing, messages, ratelimit, session, version
from pvproto.cpulist import *  # noqa: F403 - the names are cpulist.__all__
from pvproto.errors import *  # noqa: F403
from pvproto.framing import *  # noqa: F403
from pvproto.messages import *  # noqa: F403
from pvproto.ratelimit import *  # noqa: F403
from pvproto.session import *  # noqa: F403
from pvproto.version import *  # noqa: F403

__version__ = "0.1.0"

__all__: list[str] = []
__all__ += cpulist.__all__
__all__ += errors.__all__
__all__ += framing.__all__
__all__ += messages.__all__
__all__ += ratelimit.__all__
__all__ += session.__all__
__all__ += version.__all__
