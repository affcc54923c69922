"""The self-test's bugs live in bitnet/bugs.py; this name stays for `bitnet.diagnose.bugs:Class` SPECs."""
from ..bugs import *  # noqa: F401,F403
from ..bugs import ALL_BUGS, BUG_NAMES, BUGS, PIPELINE_BUGS, get_bug, inject, wrap_task  # noqa: F401
