"""A conformance kit: the specification (``docs/spec.md`` §1-§8) as properties any implementation
of dilated attention can run on itself.

    from longnet_ref.conformance import check
    report = check(my_forward, my_backward)   # NumPy; framework="torch" / "jax" / "cupy"
    print(report)                             # the per-section table and minimal counterexamples

Hypothesis draws the configurations and shrinks each failure to a minimal one; the expected
values come from the kit's own brute force ([`oracle`][longnet_ref.conformance.oracle]), which
shares no code with the library. The command line is ``longnet-ref check MODULE:FUNCTION``.
Docs: [Check your implementation](conformance.md).
"""

from .configs import DOMAIN_FLAGS, Config
from .report import Failure, Report
from .runner import check

__all__ = ["DOMAIN_FLAGS", "Config", "Failure", "Report", "check"]
