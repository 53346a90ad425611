"""Finds UCX before the extension module loads.

The extension links against libucp/libucs. The PyPI wheel `libucx-cu13` (a dependency of this
package) ships them; `libucx.load_library()` opens them so the extension's own lookup finds
them already loaded. Without that wheel the system's dynamic loader must find a UCX >= 1.22
(ld.so.conf or LD_LIBRARY_PATH), e.g. one staged next to a GPU job.
"""

import os


def load_ucx():
    if os.environ.get("PREFIXD_SYSTEM_UCX", "") not in ("", "0"):
        return
    try:
        import libucx
    except ImportError:
        return
    libucx.load_library()
